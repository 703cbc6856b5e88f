"""``lrr export --merge``: fold the trained adapter into the backbone and write a plain
Hugging Face checkpoint (safetensors + config + tokenizer) that loads with
``AutoModelFor*.from_pretrained`` and nothing of ours imported.

Nothing is written unless every check passes: the merged model must reproduce the
adapter model's logits on a probe batch (largest difference recorded), and the written
checkpoint, reloaded with plain transformers, must reproduce them again. The files are
assembled in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import lowrank_runner
from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.outputs import require_free, staged_directory
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.train import artifacts as art

EXPORT_INFO = "lrr_export.json"
PROBE_TEXTS = (
    "The service was quick and the staff were friendly.",
    "It stopped working after two days and nobody answered my emails.",
    "An ordinary film: a few good scenes, a lot of filler.",
    "Absolutely wonderful.",
    "I would not recommend this to anyone, least of all my friends.",
    "The battery lasts all day, but the screen scratches easily and the case feels cheap.",
    "ok",
    "A long, winding story that somehow keeps you reading until the very last page of the book.",
)


def read_run(run_dir: Path) -> tuple[dict, dict, dict, dict]:
    """The resolved recipe and adapter (config, weights, head) of a run directory."""
    import yaml

    adapter_dir = run_dir / art.ADAPTER_DIR
    if not (adapter_dir / art.ADAPTER_CONFIG).is_file():
        subruns = sorted(p.parent.parent.name for p in run_dir.glob(f"*/{art.ADAPTER_DIR}/{art.ADAPTER_CONFIG}"))
        hint = f"; it holds several runs, export one of: {', '.join(str(run_dir / s) for s in subruns)}" if subruns else ""
        raise UsageError(f"{run_dir}: not a run directory written by 'lrr run' (no {art.ADAPTER_DIR}/{art.ADAPTER_CONFIG}){hint}")
    config = yaml.safe_load((run_dir / art.RECIPE_FILE).read_text())
    adapter_cfg, adapter, head = art.load_adapter(adapter_dir)
    return config, adapter_cfg, adapter, head


def load_trained_model(run_dir: Path, with_adapter: bool = True, head: bool = True):
    """The run's backbone in eval mode (float32) with its trained head and, unless
    ``with_adapter=False``, the trained adapter; ``head=False`` leaves the head as built."""
    import transformers

    from lowrank_runner.methods.inject import load_adapter_state
    from lowrank_runner.modeling import build_adapted_model, load_plain_model

    config, adapter_cfg, adapter, head_state = read_run(run_dir)
    task = adapter_cfg["task"]
    head_config = {k: v for k, v in task.items() if k not in ("name", "model_class")}
    if "id2label" in head_config:
        head_config["id2label"] = {int(k): v for k, v in head_config["id2label"].items()}
    model_class = getattr(transformers, task["model_class"])
    if not with_adapter:
        model, adapted = load_plain_model(config, model_class, head_config), None
        if head:
            model.load_state_dict(head_state, strict=False)
        return model.eval(), adapted, config, adapter_cfg
    adapted = build_adapted_model(config, model_class, head_config, weights=True)
    model = adapted.model
    own = set(model.state_dict())
    unknown = sorted((set(adapter) | set(head_state)) - own)
    if unknown:
        raise ExportError(f"{run_dir}: saved weights do not fit the rebuilt model (e.g. {unknown[:3]}); was the backbone changed?")
    try:
        missing = load_adapter_state(model, adapter)  # compact (final-rank) tensors included
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{run_dir}: saved adapter does not fit the rebuilt model: {exc}") from None
    if missing:
        raise ExportError(f"{run_dir}: adapter weights missing for {sorted(missing)[:3]}")
    if head:
        model.load_state_dict(head_state, strict=False)
    model.eval()
    return model, adapted, config, adapter_cfg


def probe_batch(tokenizer, max_length: int):
    return tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def _compare(reference, other) -> tuple[float, float]:
    diff = (reference - other).abs()
    return float(diff.max()), float(diff.mean())


def export_merged(run_dir: Path, out: Path, tolerance: float = 1e-3) -> dict:
    import torch

    quiet_libraries()
    from lowrank_runner.backbones import load_tokenizer, torch_dtype
    from lowrank_runner.methods.inject import merge_adapters

    run_dir, out = Path(run_dir), Path(out)
    require_free(out, "--out")
    model, adapted, config, adapter_cfg = load_trained_model(run_dir)
    tokenizer = load_tokenizer(adapted.backbone, config["backbone"].get("tokenizer"))
    batch = probe_batch(tokenizer, config["task"]["max_length"])

    reference = _logits(model, batch)
    if not torch.isfinite(reference).all():
        raise ExportError(f"{run_dir}: the adapter model produces NaN/Inf logits on the probe batch; nothing written")
    merged = merge_adapters(model)
    merged_logits = _logits(merged, batch)
    max_diff, mean_diff = _compare(reference, merged_logits)
    if not torch.isfinite(merged_logits).all() or not max_diff <= tolerance:
        raise ExportError(
            f"merged model differs from the adapter model by up to {max_diff:.3g} on the probe batch "
            f"(tolerance {tolerance:g}); nothing written"
        )
    dtype = config["backbone"]["dtype"]
    if dtype != "auto":
        merged.to(torch_dtype(dtype))

    with staged_directory(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = type(merged).from_pretrained(tmp).eval()
        reload_diff, _ = _compare(reference, _logits(reloaded, batch))
        if not reload_diff <= tolerance:
            raise ExportError(f"the written checkpoint, reloaded, differs from the adapter model by {reload_diff:.3g}; nothing written")
        info = {
            "lowrank_runner_version": lowrank_runner.__version__,
            "source_run": str(run_dir.resolve()),
            "recipe_hash": adapter_cfg.get("recipe_hash"),
            "config_hash": adapter_cfg.get("config_hash"),
            "method": adapter_cfg["method"],
            "backbone": adapter_cfg["backbone"],
            "modules_merged": len(adapter_cfg["modules"]),
            "probe_examples": len(PROBE_TEXTS),
            "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": mean_diff,
            "reloaded_max_abs_logit_diff": reload_diff,
            "tolerance": tolerance,
            "dtype": dtype,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info
