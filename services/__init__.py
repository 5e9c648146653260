"""fabric's services: one package each, each run as its own OS process (``python -m fabric.services.<name>``)."""
