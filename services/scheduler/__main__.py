"""``python -m fabric.services.scheduler``: run one scheduler (active, or standby behind the lease)."""

from fabric.service import main

from .service import SchedulerService

if __name__ == "__main__":
    main(SchedulerService)
