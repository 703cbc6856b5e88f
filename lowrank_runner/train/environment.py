"""Where a run ran: package versions, lowrank-runner's own git state, Python, OS,
CPU/GPU, CUDA, and the process's peak memory. torch is imported only by the functions
that need it, so ``lrr report`` stays light."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from lowrank_runner.version import __version__

# The libraries whose versions change results (numbers, tokenisation, data loading, merges).
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "safetensors",
            "huggingface-hub", "numpy", "scikit-learn", "scipy")


def package_versions() -> dict[str, str | None]:
    """Installed distribution versions (``importlib.metadata``); None when not installed."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """Commit and dirty flag (uncommitted changes or untracked, not ignored, files) of
    lowrank-runner's own checkout, when installed from one (both None for a wheel install
    or without git)."""
    root = Path(__file__).resolve().parents[2]  # the checkout lowrank_runner was imported from
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, sysctl on macOS), else the
    architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_count() -> int | None:
    """CPUs this process may run on (its affinity), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def hardware(accelerator=None) -> dict:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    info = {
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "machine": platform.machine(),
        "gpu_count": len(gpus),
        "gpus": [g["name"] for g in gpus],
        "gpu_details": gpus,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if accelerator is not None:
        info.update(device=str(accelerator.device), num_processes=accelerator.num_processes,
                    mixed_precision=str(accelerator.mixed_precision))
    return info


def environment(accelerator=None) -> dict:
    return {
        "lowrank_runner": {"version": __version__, **git_state()},
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "os": {"system": platform.system(), "release": platform.release()},
        "packages": package_versions(),
        "hardware": hardware(accelerator),
    }


def peak_memory() -> dict:
    """Peak resident memory of this process (MB) and, on CUDA, peak allocated/reserved
    memory of the current device since the process started."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    out = {"cpu_max_rss_mb": round(rss_mb, 1)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out
