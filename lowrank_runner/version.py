"""The version of lowrank-runner (what ``lrr --version`` prints and every run and export
records)."""

__version__ = "0.1.0"
