"""``lrr export --peft``: any adapter run as a standard Hugging Face PEFT LoRA adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, the task head as
``modules_to_save``), which ``peft``, vLLM (``--enable-lora``), TGI and every engine that
knows LoRA can serve.

Every method here trains an update of low rank that factors exactly into a LoRA pair,
``ΔW = scale · B A`` (:meth:`~lowrank_runner.methods.base.Adapter.lora_factors`, float32,
at each module's active rank; docs/export.md gives the algebra per method). Each pair is
checked against the method's own ``ΔW`` before PEFT sees it. PEFT itself writes the files;
they are loaded back with ``PeftModel.from_pretrained`` and must reproduce our adapter
model on the probe batch (both on the backbone loaded in float32, whatever the run's
dtype), or nothing is written.

Needs the optional dependency ``peft`` (``pip install 'lowrank-runner[peft]'``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.card import TASK_TYPES
from lowrank_runner.export.common import backbone_checked, check_tolerance, provenance, staged_output, write_export_files
from lowrank_runner.export.probe import compare_outputs, model_outputs, probe_batch, reference_outputs
from lowrank_runner.export.source import (load_trained_model, loaded_backbone, preflight, read_run, refuse_unmergeable,
                                          source_tokenizer)
from lowrank_runner.quiet import quiet_libraries

# A factor pair must give the method's own ΔW within this, relative to max(1, max |ΔW|).
FACTOR_TOLERANCE = 1e-5
# The dtype both models are compared in: PEFT's LoRA layers add their float32 update to a
# half-precision layer's output before rounding, ours after, so on a bfloat16/float16 backbone
# they differ by roundings however right the pairs are; in float32 they agree to --tolerance.
CHECK_DTYPE = "float32"


def _require_peft():
    try:
        import peft
    except ImportError:
        raise UsageError("--peft needs the peft package: pip install 'lowrank-runner[peft]'") from None
    return peft


@dataclass
class Pair:
    """One module's LoRA pair as PEFT stores it: ``ΔW = (alpha / r) · B A``."""

    b: "object"
    a: "object"
    alpha: float

    def __post_init__(self):
        if float(self.alpha).is_integer():  # written as an integer (engines such as vLLM read an int)
            self.alpha = int(self.alpha)

    @property
    def r(self) -> int:
        return int(self.a.shape[0])


def lora_pairs(model, source: Path) -> tuple[dict[str, Pair], float]:
    """Every adapted module's pair (modules whose active rank is 0 are left out: ΔW = 0),
    each checked against the method's ``ΔW``; and the largest factorisation error."""
    import torch

    from lowrank_runner.methods.base import weight_out_in
    from lowrank_runner.methods.inject import AdaptedLayer

    pairs, worst = {}, 0.0
    for path, module in model.named_modules():
        if not isinstance(module, AdaptedLayer):
            continue
        w0 = weight_out_in(module.base_layer, module.info.fan_in_fan_out).detach()
        with torch.no_grad():
            try:
                b, a, scale = module.lrr_adapter.lora_factors(w0)
            except NotImplementedError as exc:
                raise UsageError(f"--peft: {path}: {exc}; export with --merge or --adapter") from None
            delta = module.lrr_adapter.delta_weight(w0).float()
            error = float((scale * (b @ a) - delta).abs().max()) if delta.numel() else 0.0
        if not error <= FACTOR_TOLERANCE * max(1.0, float(delta.abs().max())):
            raise ExportError(f"{source}: {path}: the LoRA pair differs from the method's ΔW by {error:.3g}; nothing written")
        worst = max(worst, error)
        if a.shape[0]:
            pairs[path] = Pair(b.contiguous(), a.contiguous(), float(scale) * a.shape[0])
    return pairs, worst


def unit_scale(pairs: dict[str, Pair]) -> dict[str, Pair]:
    """Pairs that differ in rank or scale, with the scale folded into ``B`` (``alpha = r``:
    scale 1 for every module), so an engine that reads only the config's ``r`` and
    ``lora_alpha`` (not PEFT's per-module patterns) still scales every module right."""
    if len({(p.r, p.alpha) for p in pairs.values()}) <= 1:
        return pairs
    return {path: Pair(p.b * (p.alpha / p.r), p.a, float(p.r)) for path, p in pairs.items()}


def peft_config(peft, pairs: dict[str, Pair], head_modules: list[str], fan_in_fan_out: bool, dropout: float):
    """The most common (rank, alpha) is the config's ``r``/``lora_alpha``; modules that
    differ get ``rank_pattern``/``alpha_pattern`` entries."""
    (r, alpha), _ = Counter((p.r, p.alpha) for p in pairs.values()).most_common(1)[0]
    ranks = {path: p.r for path, p in pairs.items() if p.r != r}  # full paths: PEFT matches each to its module
    alphas = {path: p.alpha for path, p in pairs.items() if p.alpha != alpha}
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, rank_pattern=ranks, alpha_pattern=alphas, lora_dropout=dropout,
        target_modules=sorted(pairs), modules_to_save=head_modules or None,
        fan_in_fan_out=fan_in_fan_out, bias="none", init_lora_weights=True,
    )


def _refuse_unsupported(adapter_cfg: dict) -> None:
    if adapter_cfg.get("base"):
        raise UsageError(f"--peft: this run used '{adapter_cfg['method']['name']}', which trains the backbone's own "
                         "parameters (adapter_config.json 'base'), and PEFT has no adapter type for that; export the "
                         "trained model with --merge (or a bundle with --adapter)")


def _into_peft(peft, ours, pairs: dict[str, Pair], config):
    """Our model with our adapter layers taken off and PEFT's put on, holding our pairs."""
    from lowrank_runner.methods.inject import remove_adapters

    peft_model = peft.get_peft_model(remove_adapters(ours), config).eval()
    mapping = {}
    for path, pair in pairs.items():
        mapping[f"base_model.model.{path}.lora_A.default.weight"] = pair.a
        mapping[f"base_model.model.{path}.lora_B.default.weight"] = pair.b
    own = peft_model.state_dict()
    missing = sorted(set(mapping) - set(own))
    if missing:
        raise ExportError(f"PEFT's model has no parameter for {missing[:2]}; nothing written")
    bad = [k for k, v in mapping.items() if own[k].shape != v.shape]
    if bad:
        raise ExportError(f"PEFT's model expects {tuple(own[bad[0]].shape)} for {bad[0]}, the pair has "
                          f"{tuple(mapping[bad[0]].shape)}; nothing written")
    peft_model.load_state_dict(mapping, strict=False)
    return peft_model


def export_peft(source: Path, out: Path, tolerance: float = 1e-4, backbone: str | None = None,
                base_model: str | None = None) -> dict:
    """One backbone load serves the three models involved: ours (the reference), the
    same backbone with our adapter layers taken off and PEFT's put on (our pairs loaded
    into them), and, after PEFT's layers are unloaded again and the head is zeroed (so the
    head must come from the written files), the written adapter loaded back. The
    backbone is loaded in float32 (CHECK_DTYPE) whatever the run's ``backbone.dtype``, so
    both comparisons hold to ``tolerance`` (the pairs and the written adapter are float32).
    ``base_model``: the hub id the adapter names as its base model (default:
    :func:`base_name`; a ``pkg:`` backbone whose package declares none is refused before
    anything is loaded: :func:`package_hub_id`)."""
    quiet_libraries()
    peft = _require_peft()
    source, out = Path(source), Path(out)
    tolerance = check_tolerance(tolerance)
    preflight(source, out)
    refuse_unmergeable(source, "--peft")
    config, adapter_cfg, _, head_state = read_run(source, backbone)
    _refuse_unsupported(adapter_cfg)
    base_model = base_model or package_hub_id(adapter_cfg["backbone"]["name"], backbone)
    ours, adapted, _, _ = load_trained_model(source, backbone=backbone, dtype=CHECK_DTYPE)
    used = backbone_checked(loaded_backbone(source, adapter_cfg, adapted.backbone, backbone))
    tokenizer = source_tokenizer(source, adapted.backbone, config)
    batch = probe_batch(tokenizer, config["task"]["max_length"])
    expected = reference_outputs(ours, batch, source)
    pairs, factor_error = lora_pairs(ours, source)
    pairs = unit_scale(pairs)
    fan_in_fan_out = any(info.fan_in_fan_out for info in adapted.injection.layers.values())
    head_modules = sorted({name.split(".")[0] for name in adapted.head_names})
    lora_config = peft_config(peft, pairs, head_modules, fan_in_fan_out, float(adapter_cfg["method"].get("dropout", 0.0)))
    del adapted

    peft_model = _into_peft(peft, ours, pairs, lora_config)
    diff, _ = compare_outputs(expected, model_outputs(peft_model, batch))
    if not diff <= tolerance:
        raise ExportError(f"PEFT's model differs from ours by {diff:.3g} on the probe batch (tolerance {tolerance:g}); "
                          "nothing written")
    name = base_name(adapter_cfg["backbone"]["name"], used, base_model)
    task_type = TASK_TYPES.get(adapter_cfg["task"]["model_class"])  # what AutoPeftModelFor<Task> checks
    with staged_output(out) as tmp:
        peft_model.save_pretrained(tmp)
        _set_base_and_task(tmp, name, task_type)
        tokenizer.save_pretrained(tmp)
        reload_diff = _reload_check(peft, peft_model, head_state, tmp, batch, expected, tolerance)
        info = {
            **provenance(source, adapter_cfg, "peft-lora", used, base_model),
            "base_model": name,
            "task_type": task_type,
            "head_config": {k: v for k, v in adapter_cfg["task"].items() if k not in ("name", "model_class")},
            "modules": len(pairs),
            "rank_pattern": {path: pair.r for path, pair in pairs.items()},
            "factorisation_max_abs_diff": factor_error,
            "outputs_compared": sorted(expected),
            "max_abs_logit_diff": diff,
            "reloaded_max_abs_logit_diff": reload_diff,
            "tolerance": tolerance,
            "check_dtype": CHECK_DTYPE,
            "peft": peft.__version__,
        }
        write_export_files(tmp, info)
    return info


def base_name(recipe_name: str, used: dict, base_model: str | None) -> str:
    """How the adapter names its base model: ``--base-model`` (or the hub id a ``pkg:``
    backbone's package declares: :func:`package_hub_id`), else a hub backbone's id, else
    the absolute directory the export loaded (a local backbone: loadable on this machine;
    ``--base-model`` names the hub model it is a copy of)."""
    if base_model is not None:
        return base_model
    return used["resolved"] if used.get("source") != "hub" else recipe_name


def package_hub_id(recipe_name: str, override: str | None) -> str | None:
    """A ``pkg:`` backbone (and no ``--backbone``): the hub id its package declares
    (:func:`~lowrank_runner.export.common.declared_hub_id`); a package that declares none
    is refused before anything is loaded, naming ``--base-model HUB_ID`` (PEFT cannot
    download ``pkg:``, and the directory inside the virtual environment is no name to
    publish). None for any other backbone."""
    from lowrank_runner.export.common import declared_hub_id, described_hub_ids
    from lowrank_runner.resources import is_pkg_path

    if override is not None or not is_pkg_path(recipe_name):
        return None
    package = recipe_name[len("pkg:"):].split("/", 1)[0]
    found = declared_hub_id(package)
    if found is not None:
        return found
    hints = described_hub_ids(package)
    hint = (f"; the package describes itself as a copy of {' or '.join(hints)}: if that is the model, pass "
            f"--base-model {hints[0]}") if hints else ""
    raise UsageError(f"--peft: the backbone {recipe_name} is a model directory inside the Python package {package!r}, "
                     "which declares no Hugging Face hub id, and PEFT (AutoPeftModel, vLLM) cannot load a pkg: path: "
                     f"name the hub model it is a copy of with --base-model HUB_ID{hint}; nothing written")


def _reload_check(peft, peft_model, head_state: dict, tmp: Path, batch, expected: dict, tolerance: float) -> float:
    """Unload PEFT's layers, zero the head (the written files must carry it), load the
    written adapter back and compare with our model."""
    import torch

    base = peft_model.unload()
    with torch.no_grad():
        for name in head_state:
            base.get_parameter(name).zero_()
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp)).eval()
    reload_diff, _ = compare_outputs(expected, model_outputs(reloaded, batch))
    if not reload_diff <= tolerance:
        raise ExportError(f"the written PEFT adapter, reloaded, differs from ours by {reload_diff:.3g} (tolerance "
                          f"{tolerance:g}); nothing written")
    return reload_diff


def _set_base_and_task(directory: Path, base: str, task_type: str | None) -> None:
    """adapter_config.json's ``base_model_name_or_path`` and ``task_type`` (what
    ``AutoPeftModelFor<Task>`` reads): written after PEFT saved the adapter, so the model
    PEFT checks is the plain one it was built as."""
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg["task_type"] = task_type
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
