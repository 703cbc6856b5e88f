"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

::

    RUN_DIR/checkpoints/step-000040/
      state.json            step, data position, loss window, best so far, config hash
      trainable.safetensors adapter (full capacity, masks, ranks) and head tensors
      best.safetensors      the best checkpoint's adapter + head so far (if any)
      optimizer.pt          optimizer state (adapter and head parameters only)
      scheduler.pt          learning-rate scheduler state
      method.pt             the method's own state (rank-allocator statistics)
      rng-<process>.pt      torch (CPU and CUDA), NumPy and Python RNG states per process

A checkpoint is assembled in ``step-N.tmp`` and renamed when complete, so a run killed
while writing leaves the previous checkpoint intact. Only adapter and head tensors are
stored, never the frozen backbone. ``.pt`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    path: Path
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, accelerator, *, state: dict, trainable: dict, best: dict | None,
                    optimizer, scheduler, method, data_generator: torch.Tensor, keep: int) -> None:
    """Write checkpoint ``step-<state['step']>`` from every process (collective: all call it)."""
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{state['step']:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # data_generator: the shuffling generator's state at the start of the current epoch
    torch.save({**_rng_state(), "data": data_generator}, tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if best:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(method.state_dict(), tmp / "method.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "processes": accelerator.num_processes}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step-*") if p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run directory (unfinished ``.tmp`` ones ignored)."""
    done = sorted(p for p in (run_dir / CHECKPOINTS_DIR).glob("step-*")
                  if p.suffix != ".tmp" and (p / STATE_FILE).is_file())
    if not done:
        return None
    return Checkpoint(done[-1], json.loads((done[-1] / STATE_FILE).read_text()))


def restore_checkpoint(checkpoint: Checkpoint, accelerator, model, optimizer, scheduler, method):
    """Load a checkpoint into the prepared training objects; returns the best tensors so
    far (or None) and the data generator's state at the start of the interrupted epoch."""
    from safetensors.torch import load_file

    path = checkpoint.path
    rng = path / f"rng-{accelerator.process_index}.pt"
    if checkpoint.state.get("processes") != accelerator.num_processes or not rng.is_file():
        raise ValueError(
            f"{path} was written by {checkpoint.state.get('processes')} process(es), this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    unwrapped = accelerator.unwrap_model(model)
    result = unwrapped.load_state_dict(load_file(str(path / "trainable.safetensors")), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors the model does not have: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    method.load_state_dict(torch.load(path / "method.pt", weights_only=True))
    rng_state = torch.load(rng, weights_only=True)
    _set_rng_state(rng_state)
    best = path / "best.safetensors"
    return (load_file(str(best)) if best.is_file() else None), rng_state["data"]
