"""lowrank-runner: a declarative YAML recipe runner for low-rank adaptation."""

__version__ = "0.1.0"
