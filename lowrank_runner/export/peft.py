"""``lrr export --peft``: a ``lora`` run as a Hugging Face PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), written by the ``peft`` library
itself so the format is PEFT's own, then loaded back with ``PeftModel.from_pretrained`` and
checked against our adapter model on the probe batch before anything is written.

Needs the optional dependency ``peft`` (``pip install 'lowrank-runner[peft]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.common import EXPORT_INFO, backbone_checked, check_tolerance, provenance, staged_output
from lowrank_runner.export.probe import compare_outputs, model_outputs, probe_batch, reference_outputs
from lowrank_runner.export.source import load_trained_model, loaded_backbone, preflight, read_run, source_tokenizer
from lowrank_runner.quiet import quiet_libraries


def _require_peft():
    try:
        import peft
    except ImportError:
        raise UsageError("--peft needs the peft package: pip install 'lowrank-runner[peft]'") from None
    return peft


def _peft_config(peft, adapter_cfg: dict, head_modules: list[str], fan_in_fan_out: bool):
    from lowrank_runner.methods.registry import get_method_spec

    method = {**get_method_spec("lora").defaults(), **adapter_cfg["method"]}  # a resolved recipe has them all
    grouped = [m["path"] for m in adapter_cfg["modules"] if m["groups"]]
    if grouped:
        raise ExportError(
            f"PEFT's LoRA has no per-group form for fused q/k/v projections ({grouped[0]}, ...): "
            "train with an explicit module pattern (e.g. targets: [attn.c_attn]) to adapt the whole projection"
        )
    return peft.LoraConfig(
        r=method["r"], lora_alpha=method["alpha"], lora_dropout=method["dropout"], use_rslora=method["rslora"],
        target_modules=[m["path"] for m in adapter_cfg["modules"]], modules_to_save=head_modules or None,
        fan_in_fan_out=fan_in_fan_out, bias="none", init_lora_weights=True,
    )


def export_peft(source: Path, out: Path, tolerance: float = 1e-4, backbone: str | None = None) -> dict:
    """One backbone load serves the three models involved: ours (the reference), the
    same backbone with our adapter layers taken off and PEFT's put on (our weights
    loaded into them), and, after PEFT's layers are unloaded again and the head is zeroed
    (so the head must come from the written files), the written adapter loaded back."""
    import torch

    quiet_libraries()
    peft = _require_peft()
    from lowrank_runner.methods.inject import remove_adapters

    source, out = Path(source), Path(out)
    tolerance = check_tolerance(tolerance)
    preflight(source, out)
    config, adapter_cfg, adapter_state, head_state = read_run(source, backbone)
    if adapter_cfg.get("base"):
        raise UsageError(f"--peft: this run used '{adapter_cfg['method']['name']}', which trains the backbone's own "
                         "parameters (adapter_config.json 'base'), and PEFT has no adapter type for that; export the "
                         "trained model with --merge (or a bundle with --adapter)")
    if adapter_cfg["method"]["name"] != "lora":
        raise UsageError(f"--peft exports 'lora' runs; this run used '{adapter_cfg['method']['name']}' (use --merge or --adapter)")
    ours, adapted, _, _ = load_trained_model(source, backbone=backbone)
    used = backbone_checked(loaded_backbone(source, adapter_cfg, adapted.backbone, backbone))
    tokenizer = source_tokenizer(source, adapted.backbone, config)
    batch = probe_batch(tokenizer, config["task"]["max_length"])
    expected = reference_outputs(ours, batch, source)
    location = adapted.backbone.location
    fan_in_fan_out = any(info.fan_in_fan_out for info in adapted.injection.layers.values())
    head_modules = sorted({name.split(".")[0] for name in adapted.head_names})
    peft_config = _peft_config(peft, adapter_cfg, head_modules, fan_in_fan_out)
    del adapted

    # The plain backbone with the trained head, wrapped by PEFT, receiving our LoRA weights.
    peft_model = peft.get_peft_model(remove_adapters(ours), peft_config).eval()
    mapping = {}
    for key, value in adapter_state.items():
        module, _, param = key.partition(".lrr_adapter.")
        mapping[f"base_model.model.{module}.{param}.default.weight"] = value
    missing = set(mapping) - set(peft_model.state_dict())
    if missing:
        raise ExportError(f"PEFT's model has no parameter for {sorted(missing)[:2]}; nothing written")
    peft_model.load_state_dict(mapping, strict=False)
    diff, _ = compare_outputs(expected, model_outputs(peft_model, batch))
    if not diff <= tolerance:
        raise ExportError(f"PEFT's model differs from ours by {diff:.3g} on the probe batch; nothing written")

    with staged_output(out) as tmp:
        peft_model.save_pretrained(tmp)
        _set_base_path(tmp, location)
        tokenizer.save_pretrained(tmp)
        base = peft_model.unload()
        del peft_model
        with torch.no_grad():
            for name in head_state:
                base.get_parameter(name).zero_()  # the written adapter must carry the head
        reloaded = peft.PeftModel.from_pretrained(base, str(tmp)).eval()
        reload_diff, _ = compare_outputs(expected, model_outputs(reloaded, batch))
        if not reload_diff <= tolerance:
            raise ExportError(f"the written PEFT adapter, reloaded, differs from ours by {reload_diff:.3g}; nothing written")
        task = adapter_cfg["task"]
        info = {
            **provenance(source, adapter_cfg, "peft-lora", used),
            "base_model": location,
            "head_config": {k: v for k, v in task.items() if k not in ("name", "model_class")},
            "outputs_compared": sorted(expected),
            "max_abs_logit_diff": diff,
            "reloaded_max_abs_logit_diff": reload_diff,
            "torch": torch.__version__,
            "peft": peft.__version__,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _set_base_path(directory: Path, base: str) -> None:
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
