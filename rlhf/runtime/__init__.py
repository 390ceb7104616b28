"""What every service runs on: server bootstrap, config, errors and validation, jobs and workers, registry, database."""
