"""A local backbone's weight files checked before transformers reads them: the
safetensors file or the shards its index names, each present and readable, so a
truncated or missing file is named (not a deep traceback)."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.backbones.resolve import BackboneRef, one_line, read_json
from lowrank_runner.errors import BackboneError

def check_weight_files(ref: BackboneRef) -> None:
    """A local directory's weights are there and whole: safetensors headers, shards named
    by an index, PyTorch zip archives (a truncated download is named here, not deep inside
    transformers). Safetensors are preferred, as transformers does."""
    directory = Path(ref.location)
    for single, index, check in (("model.safetensors", "model.safetensors.index.json", _check_safetensors),
                                 ("pytorch_model.bin", "pytorch_model.bin.index.json", _check_torch_archive)):
        if (directory / single).is_file():
            files = [directory / single]
        elif (directory / index).is_file():
            files = shard_files(directory / index)
        else:
            continue
        for path in files:
            check(path)
        return
    raise BackboneError(
        f"backbone '{ref.name}': {directory} holds no weights (model.safetensors, or model.safetensors.index.json "
        "with its shards); copy them next to config.json (lrr inspect needs only config.json)"
    )


def shard_files(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BackboneError(f"{index}: no weight_map (tensor name -> shard file); restore it from the model's source")
    files = [index.parent / str(f) for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise BackboneError(f"{index} names shards that are not in {index.parent}: {', '.join(absent[:4])}"
                            f"{' ...' if len(absent) > 4 else ''}; copy or download them again")
    return files


def _damaged(path: Path, why: str) -> BackboneError:
    return BackboneError(f"{path}: {why}; it may be truncated or corrupted: copy or download it again")


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, f"not a readable safetensors file ({one_line(exc)})") from None


def _check_torch_archive(path: Path) -> None:
    """``torch.save`` writes a zip archive (older PyTorch a bare pickle, left to the
    weights_only loader); one whose central directory is missing was cut short."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise _damaged(path, "empty")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise _damaged(path, "an incomplete PyTorch zip archive")


