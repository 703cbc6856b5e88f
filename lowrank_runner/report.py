"""The reproducibility report of a run (``report.json``; deepened later with report.md)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import lowrank_runner

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "peft", "numpy")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """Commit and dirty flag of lowrank-runner's own checkout, when installed from one."""
    root = Path(lowrank_runner.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def hardware(accelerator=None) -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
    }
    if accelerator is not None:
        info.update(device=str(accelerator.device), num_processes=accelerator.num_processes,
                    mixed_precision=str(accelerator.mixed_precision))
    return info


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def environment(accelerator=None) -> dict:
    return {
        "lowrank_runner": {"version": lowrank_runner.__version__, **git_state()},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "hardware": hardware(accelerator),
    }
