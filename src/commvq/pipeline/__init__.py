"""Pipeline stages: each is a frozen ``SomethingConfig`` plus ``run(config) -> Path``."""
