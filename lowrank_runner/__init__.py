"""lowrank-runner: a declarative YAML recipe runner for low-rank adaptation."""

from lowrank_runner.version import __version__

__all__ = ["__version__", "load_adapted"]


def __getattr__(name):
    # Lazy, so `import lowrank_runner` (and `lrr validate`) stays free of torch.
    if name == "load_adapted":
        from lowrank_runner.export.bundle import load_adapted

        return load_adapted
    raise AttributeError(f"module 'lowrank_runner' has no attribute {name!r}")
