"""What the three exports share: the name of their metadata file and the dtypes they
write, the option checks and the ``--out`` check made before anything is loaded, the
staged output directory (renamed into place only when every check passed), the
provenance every export records (the backbone actually loaded included, with a warning
when it is not the one the run trained on), and freeing a model an export is done with.
"""

from __future__ import annotations

import gc
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

from lowrank_runner.errors import ExportError, UsageError, warn
from lowrank_runner.export.card import local_path
from lowrank_runner.outputs import require_free, staged_directory
from lowrank_runner.version import __version__

EXPORT_INFO = "lrr_export.json"
BUNDLE_FORMAT = "lowrank-runner-bundle"  # lrr_export.json "format" of an adapter bundle (export/bundle.py)
DTYPES = ("float32", "bfloat16", "float16")


def check_tolerance(value, option: str = "--tolerance"):
    """A tolerance option: a finite number ≥ 0 (NaN would fail every comparison and blame
    the model; Inf would check nothing). None stays None (the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{option} {value}: give a finite number ≥ 0 (the largest allowed difference, e.g. 1e-3)")
    return float(value)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def check_size(size, option: str, example: str = "5GB, 500MB") -> int:
    """A size option (``--max-shard-size``, ``--max-memory``): 5GB, 1.5GB, 500MB, 2KiB or a
    number of bytes, as transformers reads sizes (a lowercase ``b``, 5Gb, is bits) and
    with decimals; returns the bytes (> 0)."""
    found = _SIZE.fullmatch(str(size))
    unit = found[2] if found else ""
    scale = _UNITS.get(unit.upper()) if found else None
    if scale is None:
        raise UsageError(f"{option} {size}: give a size such as {example} (decimals too: 1.5GB; units B, KB, MB, GB, "
                         "TB, KiB, MiB, GiB, TiB) or a number of bytes")
    bits = unit.endswith("b") and not unit.lower().endswith("ib") and unit.upper() != "B"
    value = int(float(found[1]) * scale) // (8 if bits else 1)
    if value <= 0:
        raise UsageError(f"{option} {size}: must be more than 0 bytes; give a size such as {example}")
    return value


def check_out(out: Path, source: Path) -> None:
    """``--out`` before anything is loaded: outside the source, free (absent or an empty
    directory), and creatable where it is (probed with a temporary directory, removed)."""
    import tempfile

    target, origin = out.resolve(), source.resolve()
    if target == origin or origin in target.parents:
        raise UsageError(f"--out {out}: inside the exported source {source}; choose a directory outside it")
    require_free(out, "--out")
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a directory; choose another location")
    try:
        Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent)).rmdir()
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc}); choose a writable location") from None



@contextmanager
def staged_output(out: Path):
    """:func:`staged_directory`, with a failed write (disk full, permissions) an
    :class:`ExportError` (the staging directory is removed: nothing written)."""
    try:
        with staged_directory(out) as tmp:
            yield tmp
    except OSError as exc:
        raise ExportError(f"--out {out}: writing the export failed ({exc}); nothing written") from None


def collect_if_alive(ref) -> None:
    """``ref``: a weak reference to a model the caller just dropped. Reference cycles can
    keep a model alive until the next full garbage collection; run one only then (a
    full collection is slow in a big process)."""
    if ref() is not None:
        gc.collect()


def backbone_checked(backbone: dict) -> dict:
    """``backbone`` (:func:`~lowrank_runner.export.source.loaded_backbone`), its warning
    (a backbone other than the one the run trained on) printed, as the export records it."""
    if backbone.get("warning"):
        warn(backbone["warning"])
    return backbone


def provenance(source: Path, adapter_cfg: dict, fmt: str, backbone: dict, base_model: str | None = None) -> dict:
    """What every export's metadata says about where it came from; ``backbone``: the
    backbone actually loaded (:func:`~lowrank_runner.export.source.loaded_backbone`);
    ``base_model``: the hub id the user names as the base model (``--base-model``: the
    model a local backbone was copied from), for the model card and a PEFT adapter."""
    return {
        "lowrank_runner_version": __version__,
        "format": fmt,
        "source_run": str(source.resolve()),
        "recipe_hash": adapter_cfg.get("recipe_hash"),
        "config_hash": adapter_cfg.get("config_hash"),
        "method": adapter_cfg["method"],
        "backbone": backbone,
        "model_class": adapter_cfg["task"]["model_class"],
        "base_model_id": base_model,
    }


def write_export_files(directory: Path, info: dict) -> None:
    """What closes every export, inside its staging directory: ``lrr_export.json``
    (``info`` without local paths: :func:`portable`) and the model card ``README.md``
    (:mod:`~lowrank_runner.export.card`, which reads the source's files by ``info``)."""
    from lowrank_runner.export.card import write_model_card

    (directory / EXPORT_INFO).write_text(json.dumps(portable(info), indent=2) + "\n")
    write_model_card(directory, info)


def portable(value):
    """An export's record as it may be published (``--push-to-hub``): every absolute local
    path (the run directory, a local backbone, a ``pkg:`` backbone's directory inside the
    virtual environment) replaced by its last component (``run``, ``bert``, ``model``),
    and the backbone's ``warning`` (a sentence of paths) left out (``same_as_run`` says it)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items() if k != "warning"}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if local_path(value):
        return Path(value.replace("\\", "/")).name or value
    return value


_HUB_URL = re.compile(r"https?://huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+?)/?$")
_HUB_ID = re.compile(r"(?<![\w./-])([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w-]*(?:\.[\w-]+)*)(?![\w/])")


def _package_metadata(package: str):
    """The metadata of the installed distribution that provides ``package`` (None if none)."""
    from importlib import metadata

    for name in metadata.packages_distributions().get(package, []):
        try:
            return metadata.metadata(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def declared_hub_id(package: str) -> str | None:
    """The Hugging Face hub id a package that ships a model declares for it: a
    ``Project-URL`` (or ``Home-page``) of its distribution on huggingface.co
    (``Project-URL: Model, https://huggingface.co/ORG/NAME``). None where it declares
    none (a model config's ``_name_or_path`` is where it was loaded from when saved,
    often another model, and is not read)."""
    meta = _package_metadata(package)
    if meta is None:
        return None
    urls = [entry.split(",", 1)[-1].strip() for entry in meta.get_all("Project-URL") or []]
    for url in urls + [meta.get("Home-page") or ""]:
        found = _HUB_URL.match(url)
        if found:
            return found[1]
    return None


def described_hub_ids(package: str) -> list[str]:
    """Hub ids (``ORG/NAME``) the package's one-line summary mentions: a hint for the user
    to confirm with ``--base-model``, never used on its own."""
    meta = _package_metadata(package)
    summary = (meta.get("Summary") or "") if meta is not None else ""
    return list(dict.fromkeys(m.rstrip(".") for m in _HUB_ID.findall(summary)))
