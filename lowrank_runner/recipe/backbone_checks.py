"""What a recipe says about its backbone, checked before anything loads: a ``pkg:``
path, a local model directory (with ``config.json``) or a hub id (``backbone.name``,
``backbone.tokenizer``); ``backbone.quantization`` that bitsandbytes can serve, with a
method that adapts modules and without FSDP."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from lowrank_runner.errors import Problem
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.document import Document
from lowrank_runner.recipe.problems import problem
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def backbone_problems(doc: Document, backbone) -> list[Problem]:
    if not isinstance(backbone, dict):
        return []
    out = _tokenizer_problems(doc, backbone.get("tokenizer"))
    if not isinstance(backbone.get("name"), str):
        return out
    name, revision = backbone["name"], backbone.get("revision")
    if revision is not None and (is_pkg_path(name) or expand_user(name).is_dir()):
        out.append(problem(doc, ("backbone", "revision"), f"a local backbone has no revisions: revision "
                           f"'{revision}' is ignored for {name} (it applies to hub ids); remove it", severity="warning"))
    return out + _backbone_name_problems(doc, name)


QUANT_PATH = ("backbone", "quantization")
QUANT_INSTALL = "pip install 'lowrank-runner[quantization]' (bitsandbytes), or remove backbone.quantization"


def quantization_problems(doc: Document, backbone: dict, method: dict, training: dict) -> list[Problem]:
    """``backbone.quantization``: bitsandbytes is installed (found without importing it,
    and so torch), has a backend beyond CUDA (else a warning: it needs a CUDA GPU, which
    loading checks), the method adapts modules instead of training the backbone's own
    weights (full, bitfit: frozen int4/int8 data cannot be trained), and FSDP is off
    (sharding bitsandbytes' packed weights needs its quantized storage dtype, not set up)."""
    quant = backbone.get("quantization")
    if not isinstance(quant, dict) or quant.get("bits") not in (4, 8):
        return []
    out = []
    fsdp = training.get("fsdp")
    if isinstance(fsdp, dict) and fsdp.get("enabled") is True:
        out.append(problem(doc, QUANT_PATH, "a quantized backbone cannot be sharded with training.fsdp here; set "
                                            "training.fsdp.enabled: false (one process per GPU holds the whole 4/8-bit "
                                            "base) or remove backbone.quantization"))
    name = method.get("name")
    spec = method_specs().get(name) if isinstance(name, str) else None
    if spec is not None and _trains_backbone_weights(spec):
        adapters = ", ".join(n for n, s in method_specs().items() if not _trains_backbone_weights(s))
        out.append(problem(doc, QUANT_PATH, f"method '{name}' trains the backbone's own weights, which "
                                            f"backbone.quantization stores as frozen {quant['bits']}-bit data; use an "
                                            f"adapter method ({adapters}) or "
                                            "remove backbone.quantization"))
    found = importlib.util.find_spec("bitsandbytes")
    if found is None:
        return out + [problem(doc, QUANT_PATH, f"bitsandbytes is not installed; {QUANT_INSTALL}")]
    version = _installed_version("bitsandbytes")
    if version is not None and version < (0, 45):
        out.append(problem(doc, QUANT_PATH, f"bitsandbytes {'.'.join(map(str, version))} is too old (0.45 or later "
                                            f"needed); pip install -U 'lowrank-runner[quantization]'"))
    elif not any((Path(d) / "backends" / "cpu").is_dir() for d in (found.submodule_search_locations or [])):
        out.append(problem(doc, QUANT_PATH, "this bitsandbytes has no CPU backend: it runs quantized layers on a CUDA "
                                            "GPU only (checked when the model loads); pip install -U bitsandbytes to "
                                            "run on the CPU too", severity="warning"))
    return out


def _installed_version(dist: str) -> tuple[int, ...] | None:
    """A distribution's version as integers (``0.50.2`` → ``(0, 50, 2)``), None if unknown."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version(dist)
    except PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3]) or None


def _tokenizer_problems(doc: Document, name) -> list[Problem]:
    """``backbone.tokenizer``: a pkg: path, a local directory or a hub id."""
    if not isinstance(name, str):
        return []
    path = ("backbone", "tokenizer")
    if is_pkg_path(name):
        try:
            resolve_pkg_path(name)
        except ValueError as exc:
            return [problem(doc, path, str(exc))]
        return []
    if not expand_user(name).exists() and (name.startswith((".", "/", "~")) or not _HUB_ID.match(name)):
        return [problem(doc, path, f"no such directory: {name} (and it is not a hub id like org/model)")]
    return []


def _backbone_name_problems(doc: Document, name: str) -> list[Problem]:
    path = ("backbone", "name")
    if is_pkg_path(name):
        try:
            resolved = resolve_pkg_path(name)
        except ValueError as exc:
            return [problem(doc, path, str(exc))]
        return [] if (resolved / "config.json").is_file() else [problem(doc, path, f"{resolved} holds no config.json")]
    local = expand_user(name)
    if local.exists() and not local.is_dir():
        return [problem(doc, path, f"{name} is a file, not a model directory; point backbone.name at the directory "
                                   "that holds config.json (or a hub id like org/model)")]
    if local.exists():
        if not (local / "config.json").is_file():
            return [problem(doc, path, f"local directory {name} holds no config.json; point backbone.name at a model directory")]
        return []
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        return [problem(doc, path, f"no such directory: {name} (and it is not a hub id like org/model)")]
    return []



def _trains_backbone_weights(spec) -> bool:
    """A weight-update method without targets trains the backbone's own weights (full
    fine-tuning, BitFit); prefix-tuning takes no targets either but trains none of them."""
    return spec.schema.get("x-targets", True) is False and spec.kind == "update"
