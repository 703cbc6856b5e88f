"""Where a run trains: the accelerator device, the mixed precision ``auto`` resolves to,
and which process of an ``accelerate launch`` / torchrun job this is (read from the
environment before any Accelerator exists)."""

from __future__ import annotations

import os


def has_accelerator_device() -> bool:
    import torch

    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def resolve_mixed_precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (set before any Accelerator exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
