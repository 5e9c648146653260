"""``python -m fabric.services.spawner --nats-url URL --node NODE --state-dir DIR``."""

from fabric.service import main

from .service import SpawnerService

if __name__ == "__main__":
    SpawnerService.own_process = True
    main(SpawnerService)
