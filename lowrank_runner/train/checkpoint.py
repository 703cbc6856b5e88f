"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

::

    RUN_DIR/checkpoints/step-000040/
      state.json               step, data position, loss window, best so far, config hash,
                               format version, and the size and SHA-256 of every file below
      trainable.safetensors    adapter (full capacity, masks, ranks) and head tensors
      best.safetensors         the best checkpoint's adapter + head so far (if any)
      optimizer.safetensors    optimizer state (adapter and head parameters only)
      scheduler.safetensors    learning-rate scheduler state
      method.safetensors       the method's own state (rank-allocator statistics)
      rng-<process>.safetensors torch (CPU and CUDA), NumPy and Python RNG states per process,
                               and the data order's generator

Every file is safetensors: tensors as tensors, everything else (numbers, strings, lists,
dicts with integer keys, tuples) as JSON in the file's metadata (:func:`pack`), so
resuming never unpickles anything. A checkpoint is assembled in ``step-N.tmp`` and
renamed when complete, so a run killed while writing leaves the previous checkpoint
intact. Only adapter and head tensors are stored, never the frozen backbone.

Under FSDP (train/fsdp.py) the frozen backbone is sharded but every trained tensor and
its optimizer state stay whole and identical on every process, so the main process
writes the same files as without FSDP (nothing to gather; :func:`save_checkpoint`
refuses a sharded tensor), ``lrr export`` reads a sharded run's directory as any other,
and a checkpoint resumes with or without FSDP (with the same number of processes).

Before a run resumes, :func:`latest_checkpoint` checks the newest checkpoint against
its manifest (every file present, same size and SHA-256): a damaged one is refused with
the file named and the older complete checkpoints listed (remove the damaged one to
resume from an older one); lrr never falls back silently, since that would repeat
training steps without telling. Checkpoints of older lowrank-runner versions (pickled
``.pt`` files) are refused: they cannot be resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowrank_runner.errors import CheckpointError
from lowrank_runner.rundir.layout import CHECKPOINTS_DIR, checkpoint_dirs, checkpoint_name

STATE_FILE = "state.json"
FORMAT = 2  # 1: torch.save pickles (.pt); 2: safetensors + JSON
_STRUCTURE_KEY = "lrr_state"


@dataclass
class Checkpoint:
    path: Path
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]


# ------------------------------------------------------------ tensors + JSON, no pickle


def pack(value, tensors: dict[str, torch.Tensor]):
    """``value`` as JSON-able data; its tensors are moved (on the CPU) into ``tensors``
    and referenced by key. Dicts with non-string keys and tuples keep their types."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key, "device": value.device.type}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: pack(v, tensors) for k, v in value.items()}
        return {"__items__": [[pack(k, tensors), pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [pack(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state holds a {type(value).__name__}: only tensors and plain values can be saved")


def unpack(data, tensors: dict[str, torch.Tensor], device: torch.device | None = None):
    """Inverse of :func:`pack`; tensors that lived on an accelerator go to ``device``."""
    if isinstance(data, list):
        return [unpack(v, tensors, device) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        tensor = tensors[data["__tensor__"]]
        return tensor.to(device) if device is not None and data.get("device", "cpu") != "cpu" else tensor
    if "__items__" in data:
        return {unpack(k, tensors, device): unpack(v, tensors, device) for k, v in data["__items__"]}
    if "__tuple__" in data:
        return tuple(unpack(v, tensors, device) for v in data["__tuple__"])
    return {k: unpack(v, tensors, device) for k, v in data.items()}


def save_state(path: Path, value) -> None:
    """Write ``value`` (tensors and plain values) as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = pack(value, tensors)
    save_file(tensors, str(path), metadata={_STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: Path, device: torch.device | None = None):
    """Read what :func:`save_state` wrote (no pickle involved)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        structure = json.loads((f.metadata() or {})[_STRUCTURE_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack(structure, tensors, device)


# ------------------------------------------------------------------ RNG states


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


# ------------------------------------------------------------------ writing


def _state_digest(state: dict) -> str:
    """SHA-256 of ``state.json``'s own content (without this digest): edits and damage
    that still parse as JSON are caught too."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def save_checkpoint(run_dir: Path, accelerator, *, state: dict, trainable: dict, best: dict | None,
                    optimizer, scheduler, method, data_generator: torch.Tensor, keep: int) -> None:
    """Write checkpoint ``step-<state['step']>`` from every process (collective: all call it)."""
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS_DIR
    final = root / checkpoint_name(state["step"])
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # data_generator: the shuffling generator's state at the start of the current epoch
    save_state(tmp / f"rng-{accelerator.process_index}.safetensors", {**_rng_state(), "data": data_generator})
    if accelerator.is_main_process:
        _check_whole(trainable, best)
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if best:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        save_state(tmp / "optimizer.safetensors", optimizer.state_dict())
        save_state(tmp / "scheduler.safetensors", scheduler.state_dict())
        save_state(tmp / "method.safetensors", method.state_dict())
    accelerator.wait_for_everyone()  # every process's RNG file is written
    if accelerator.is_main_process:
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        manifest = {**state, "processes": accelerator.num_processes, "format": FORMAT, "files": files}
        manifest["digest"] = _state_digest(manifest)
        (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _complete_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_whole(*states: dict | None) -> None:
    """Trained tensors are whole under FSDP (train/fsdp.py); a shard here would be saved as a part."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [k for state in states if state for k, v in state.items() if isinstance(v, DTensor)]
    if sharded:
        raise RuntimeError(f"checkpoint: sharded (FSDP) tensors reached the checkpoint: {sharded[:3]}")


# ------------------------------------------------------------------ reading


def _complete_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint directories that were completely written (renamed from ``.tmp``), oldest first."""
    return checkpoint_dirs(run_dir)


def _damaged(path: Path, older: list[Path], problem: str) -> CheckpointError:
    if older:
        advice = (f"the older checkpoint {older[-1]} looks complete: remove {path} to resume from it, "
                  f"or start again in a new directory")
    else:
        advice = "there is no older checkpoint: start the run again in a new directory (lrr run RECIPE --output NEW_DIR)"
    return CheckpointError(f"{problem}; this checkpoint cannot be resumed; {advice}")


def read_manifest(path: Path, older: list[Path] = ()) -> dict:
    """``state.json`` of checkpoint directory ``path``, checked against the files beside it."""
    state_file = path / STATE_FILE
    if any(path.glob("*.pt")) and not (state_file.is_file() and "format" in _json_or_none(state_file, {})):
        raise CheckpointError(
            f"{path}: written by an older lowrank-runner (pickled .pt files, which lrr no longer loads); it cannot be "
            f"resumed: start the run again in a new directory (lrr run RECIPE --output NEW_DIR)"
        )
    if not state_file.is_file():
        raise _damaged(path, older, f"{state_file}: missing")
    state = _json_or_none(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "step" not in state:
        raise _damaged(path, older, f"{state_file}: not a complete checkpoint state (truncated or edited)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: checkpoint format {state.get('format')}, this lowrank-runner reads "
                              f"format {FORMAT}; it cannot be resumed: start the run again in a new directory")
    if state.get("digest") != _state_digest(state):
        raise _damaged(path, older, f"{state_file}: damaged or edited (its content does not match its digest)")
    processes = state.get("processes") if isinstance(state.get("processes"), int) else 0
    required = {"trainable.safetensors", "optimizer.safetensors", "scheduler.safetensors", "method.safetensors",
                *(f"rng-{i}.safetensors" for i in range(processes))}
    if processes < 1 or not required <= set(state["files"]):
        raise _damaged(path, older, f"{state_file}: not a complete checkpoint state (truncated or edited)")
    for name, expected in state["files"].items():
        file = path / name
        if not file.is_file():
            raise _damaged(path, older, f"{file}: missing")
        if _digest(file) != expected:
            raise _damaged(path, older, f"{file}: damaged (its size or SHA-256 differs from {state_file})")
    return state


def _json_or_none(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return default


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run directory (unfinished ``.tmp`` ones are
    ignored), verified; a damaged one raises :class:`CheckpointError`."""
    done = _complete_dirs(run_dir)
    if not done:
        return None
    return Checkpoint(done[-1], read_manifest(done[-1], done[:-1]))


def restore_checkpoint(checkpoint: Checkpoint, accelerator, model, optimizer, scheduler, method):
    """Load a checkpoint into the prepared training objects; returns the best tensors so
    far (or None) and the data generator's state at the start of the interrupted epoch."""
    from safetensors.torch import load_file

    path = checkpoint.path
    rng = path / f"rng-{accelerator.process_index}.safetensors"
    if checkpoint.state.get("processes") != accelerator.num_processes or not rng.is_file():
        raise ValueError(
            f"{path} was written by {checkpoint.state.get('processes')} process(es), this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )

    def read(name: str, loader):
        try:
            return loader(path / name)
        except Exception as exc:  # damaged after the manifest check, or not ours
            raise CheckpointError(f"{path / name}: cannot be read ({exc}); this checkpoint cannot be resumed") from None

    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    result = unwrapped.load_state_dict(read("trainable.safetensors", lambda p: load_file(str(p))), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors the model does not have: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(read("optimizer.safetensors", load_state))
    scheduler.load_state_dict(read("scheduler.safetensors", load_state))
    method.load_state_dict(read("method.safetensors", lambda p: load_state(p, device)))
    rng_state = read(rng.name, load_state)
    _set_rng_state(rng_state)
    best = path / "best.safetensors"
    return (read(best.name, lambda p: load_file(str(p))) if best.is_file() else None), rng_state["data"]
