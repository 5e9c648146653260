"""``python -m fabric.services.allocator --nats-url URL --node NODE --state-dir DIR``."""

from fabric.service import main

from .service import AllocatorService

if __name__ == "__main__":
    main(AllocatorService)
