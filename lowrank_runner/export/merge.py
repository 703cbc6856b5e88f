"""``lrr export --merge``: fold the trained adapter into the backbone and write a plain
Hugging Face checkpoint (sharded safetensors + config + tokenizer) that loads with
``AutoModelFor*.from_pretrained`` and nothing of ours imported.

The source is a run directory written by ``lrr run`` or an adapter bundle written by
``lrr export --adapter`` (:mod:`lowrank_runner.export.bundle`). A backbone stored in
safetensors is merged tensor by tensor (:mod:`lowrank_runner.export.streamed`: memory of
about one output shard plus the adapter, whatever the model's size); the whole-model
output check runs there when the model fits in ``max_memory``. A backbone that cannot be
streamed (``pytorch_model.bin`` only) is merged in memory here, with one float32 copy of
the model at any time:

1. the backbone is loaded in float32 with the trained adapter and head; its outputs on a
   probe batch are the reference (NaN/Inf there: stop);
2. adapters are merged module by module, in place: ``W ← W + ΔW`` computed in float32.
   A non-finite ``ΔW`` stops the export (naming the module), so does an adapter whose
   every ``ΔW`` is zero (the export would change nothing; both checked in step 1 by
   :func:`~lowrank_runner.export.probe.check_adapter`, as every export does), so does one
   whose every ``ΔW`` is below the output dtype's precision, and so does an adapted weight
   tied to another parameter (merging would silently change both: e.g. an ``lm_head``
   tied to the input embeddings);
3. the merged model must reproduce the reference within ``tolerance``;
4. it is cast to the output dtype (``--dtype``; default: the backbone's own dtype from its
   config, unless the recipe's ``backbone.dtype`` names bfloat16/float16) and, for half
   precision, checked again within ``cast_tolerance × max(1, max |reference|)``;
5. it is saved in shards of at most ``max_shard_size``, freed, reloaded with plain
   transformers and compared once more (dtype and tied embeddings included).

Everything is written into a temporary sibling directory that is renamed into place only
when every check passed: a failed export leaves nothing behind.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from lowrank_runner.backbones import dequantize_model, restore_source_layers
from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.common import (DTYPES, backbone_checked, check_size, check_tolerance, collect_if_alive,
                                          provenance, staged_output, warn, write_export_files)
from lowrank_runner.export.merge_checks import (cast_allowed, embeddings_tied, export_dtype, refuse_tied_targets,
                                                reloaded_outputs)
from lowrank_runner.export.probe import (compare_outputs, largest_magnitude, model_outputs, non_finite, probe_batch,
                                         reference_outputs)
from lowrank_runner.export.source import (load_trained_model, loaded_backbone, preflight, refuse_unmergeable,
                                          source_tokenizer)
from lowrank_runner.quiet import quiet_libraries

# A quantized base (backbone.quantization): its layers multiply in the compute dtype (LLM.int8():
# int8 activations); allowed against the merged float32 model: this many such roundings (export docs).
QUANT_EPS_UNITS = 8
DEFAULT_MAX_SHARD_SIZE = "5GB"


def check_max_shard_size(size) -> int:
    """``--max-shard-size``: 5GB, 500MB, 2KiB or a number of bytes; returns the bytes."""
    return check_size(size, "--max-shard-size", "5GB, 500MB")


class _MergeCheck:
    """Sees each module's ΔW during the merge (already checked finite and not all zero by
    :func:`~lowrank_runner.export.probe.check_adapter`): records its size and whether the
    merged weight, stored in the output dtype, differs from the base weight stored in
    that dtype (a ΔW below that precision changes nothing)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.largest: dict[str, float] = {}
        self.changed: dict[str, bool] = {}

    def __call__(self, path: str, delta, weight) -> None:
        import torch

        self.largest[path] = float(delta.abs().max())
        with torch.no_grad():
            self.changed[path] = bool(((weight.float() + delta).to(self.dtype) != weight.to(self.dtype)).any())


def export_merged(source: Path, out: Path, tolerance: float = 1e-3, dtype: str | None = None,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, cast_tolerance: float | None = None,
                  backbone: str | None = None, max_memory: int | str | None = None, base_model: str | None = None) -> dict:
    """Merge ``source``'s adapters into its backbone and write a plain transformers
    checkpoint to ``out``: tensor by tensor from the backbone's safetensors files
    (:mod:`~lowrank_runner.export.streamed`), or in memory for a backbone that cannot be
    streamed. ``max_memory`` (bytes, or a size such as "16GB"; default: half the
    available memory): the whole-model output check runs when the adapter model in
    float32 fits in it, else each module's output is checked. ``base_model``: the hub id
    the model card names as the base model. Any failed check writes nothing."""
    from lowrank_runner.export.streamed import StreamUnsupported, check_max_memory, export_streamed

    quiet_libraries()
    source, out = Path(source), Path(out)
    tolerance, cast_tolerance = check_tolerance(tolerance), check_tolerance(cast_tolerance, "--cast-tolerance")
    check_max_shard_size(max_shard_size)
    max_memory = check_max_memory(max_memory)
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    preflight(source, out)
    refuse_unmergeable(source, "--merge")
    try:
        return export_streamed(source, out, tolerance=tolerance, dtype=dtype, max_shard_size=max_shard_size,
                               cast_tolerance=cast_tolerance, backbone=backbone, max_memory=max_memory,
                               base_model=base_model)
    except StreamUnsupported as why:
        warn(f"{why}: merging in memory instead (one float32 copy of the whole model)")
    return export_in_memory(source, out, tolerance, dtype, max_shard_size, cast_tolerance, backbone, base_model)


def merge_summary(info: dict, out: Path) -> str:
    """The one-line result of ``lrr export --merge`` (``info``: what :func:`export_merged`
    returned): the largest output difference of the whole-model check, or, where it was
    skipped (the model above ``--max-memory``), that of the per-module check."""
    head = f"merged {info['dtype']} checkpoint written to {out} in {len(info['shards'])} shard(s)"
    if info.get("max_abs_logit_diff") is not None:
        return f"{head} (max |output diff| on the probe batch: {info['max_abs_logit_diff']:.3g})"
    diff = info.get("module_outputs_max_diff")
    checked = (f"each of {info['module_outputs_checked']} adapted modules checked, max relative output diff {diff:.3g}"
               if diff is not None else f"{info['tensors_verified']} tensors read back and checked")
    return f"{head} ({checked}; whole-model check skipped: the model is above --max-memory)"


def export_in_memory(source: Path, out: Path, tolerance: float, dtype: str | None, max_shard_size,
                     cast_tolerance: float | None, backbone: str | None, base_model: str | None = None) -> dict:
    """The merge of a backbone that cannot be streamed, in phases (module docstring):
    merge in float32 (checked against the adapter model), cast to the target dtype
    (checked), write, reload and check again. Any failed check writes nothing."""
    model, adapted, config, adapter_cfg = load_trained_model(source, dtype="float32", backbone=backbone)
    ref, model_class = adapted.backbone, type(model)
    used = backbone_checked(loaded_backbone(source, adapter_cfg, ref, backbone))
    updates = adapted.base_updates  # backbone tensors trained by the method itself (full, bitfit): already in place
    del adapted  # it holds the model too; the model must be freeable before the reload
    target = export_dtype(dtype, config["backbone"]["dtype"], ref)
    tokenizer = source_tokenizer(source, ref, config)
    batch = probe_batch(tokenizer, config["task"]["max_length"])

    quantized = model_outputs(model, batch) if config["backbone"].get("quantization") else None
    model = dequantize_model(model)  # a quantized base: the weights it trained against, in float32
    reference = reference_outputs(model, batch, source, updates)
    refuse_tied_targets(model)
    tied = embeddings_tied(model)
    check = _merge(model, target, source, updates)
    model = restore_source_layers(model)  # a quantized GPT-2: its Conv1D layers again
    merged = model_outputs(model, batch)
    max_diff, mean_diff = checked_merge(reference, merged, tolerance)
    info_quant = {} if quantized is None else quantized_check(config["backbone"]["quantization"], quantized, merged,
                                                              tolerance)
    expected, info_cast = merged, {}
    if target != "float32":
        expected, info_cast = _cast(model, target, batch, reference, cast_tolerance)

    with staged_output(out) as tmp:
        shards = _write(model, tokenizer, tmp, max_shard_size)
        alive = weakref.ref(model)
        del model  # the reload needs the memory
        collect_if_alive(alive)
        reload_diff = _reload_check(model_class, tmp, target, tied, batch, expected, reference, tolerance)
        info = {
            **provenance(source, adapter_cfg, "merged-transformers", used, base_model),
            "merge": "in memory",
            "outputs_checked": "whole model",
            "modules_merged": len(check.largest) - len(updates),
            "base_tensors_trained": len(updates),
            "modules_changed": sum(check.changed.values()),
            "largest_abs_delta": max(check.largest.values()),
            "probe_examples": len(batch["input_ids"]),
            "outputs_compared": sorted(reference),
            "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": mean_diff,
            **info_cast,
            **info_quant,
            "reloaded_max_abs_logit_diff": reload_diff,
            "tolerance": tolerance,
            "dtype": target,
            "merge_dtype": "float32",
            "tied_word_embeddings": tied,
            "max_shard_size": max_shard_size,
            "shards": shards,
        }
        write_export_files(tmp, info)
    return info


def _merge(model, target: str, source: Path, base_updates: dict | None = None) -> "_MergeCheck":
    """Fold every adapter into its weight in float32; refuse a merge whose updates all
    vanish in ``target``'s precision (the export would change nothing). The backbone
    tensors a method trained itself (``base_updates``: full fine-tuning, BitFit) are in
    the model already; they count as updates of their own."""
    import torch

    from lowrank_runner.methods.inject import merge_adapters

    check = _MergeCheck(getattr(torch, target))
    merge_adapters(model, check=check)
    for name, update in (base_updates or {}).items():
        check.largest[name], check.changed[name] = update["largest"], update["changed"][target]
    if not any(check.changed.values()):
        raise ExportError(
            f"{source}: every update ΔW (largest |ΔW| {max(check.largest.values()):.3g}) is below the precision of "
            f"{target}: the merged {target} weights would equal the backbone's, so the export would change nothing. "
            "Export in a finer dtype (--dtype float32); nothing written"
        )
    return check


def quantized_allowed(quant: dict, reference: dict, tolerance: float) -> float:
    """The largest difference allowed between the adapter model on its quantized base (as
    trained: bitsandbytes multiplies in the compute dtype, LLM.int8() also rounds the
    activations to int8) and the merged float32 model holding the same dequantized weights:
    QUANT_EPS_UNITS roundings of that arithmetic (the compute dtype's machine epsilon;
    1/127 for int8) × max(1, max |reference|), plus the merge ``tolerance``."""
    import torch

    from lowrank_runner.backbones import quantization_settings

    q = quantization_settings(quant)
    eps = 1 / 127 if q["bits"] == 8 else torch.finfo(getattr(torch, q["compute_dtype"])).eps
    return QUANT_EPS_UNITS * eps * max(1.0, largest_magnitude(reference)) + tolerance


def quantized_check(quant: dict, quantized: dict, merged: dict, tolerance: float) -> dict:
    """The merged float32 model against the adapter model on its quantized base (the
    outputs it gave in training), within :func:`quantized_allowed`; what the export records."""
    allowed = quantized_allowed(quant, quantized, tolerance)
    diff, mean = compare_outputs(quantized, merged)
    if not diff <= allowed:
        raise ExportError(
            f"the merged model differs from the adapter model on its {quant['bits']}-bit base by up to {diff:.3g} on the "
            f"probe batch (allowed {allowed:.3g}: the quantized layers' arithmetic); nothing written")
    from lowrank_runner.backbones import quantization_settings

    return {"quantization": quantization_settings(quant), "quantized_max_abs_logit_diff": diff, "quantized_mean_abs_logit_diff": mean,
            "quantized_allowed": allowed}


def _cast(model, target: str, batch, reference: dict, cast_tolerance: float | None) -> tuple[dict, dict]:
    """Cast the merged model to ``target`` in place; its outputs must stay within the
    cast tolerance of the adapter model's. Returns them and the record of the check."""
    import torch

    cast_saved_tensors(model, getattr(torch, target))
    cast = model_outputs(model, batch)
    allowed = cast_allowed(target, reference, cast_tolerance)
    cast_max, cast_mean = compare_outputs(reference, cast)
    if non_finite(cast) or not cast_max <= allowed:
        raise ExportError(
            f"cast to {target}, the merged model differs from the adapter model by up to {cast_max:.3g} on the "
            f"probe batch (allowed {allowed:.3g}; overflow or too coarse a dtype); export in float32 with "
            "--dtype float32 or loosen --cast-tolerance; nothing written"
        )
    return cast, {"cast_max_abs_logit_diff": cast_max, "cast_mean_abs_logit_diff": cast_mean, "cast_allowed": allowed}


def checked_merge(reference: dict, merged: dict, tolerance: float) -> tuple[float, float]:
    """The merged model's largest and mean output difference to the adapter model on the
    probe batch; above ``tolerance``: an error, nothing written."""
    max_diff, mean_diff = compare_outputs(reference, merged)
    if not max_diff <= tolerance:
        raise ExportError(
            f"the merged model differs from the adapter model by up to {max_diff:.3g} on the probe batch "
            f"(tolerance {tolerance:g}); nothing written"
        )
    return max_diff, mean_diff


def cast_saved_tensors(model, dtype) -> None:
    """Cast, in place, what the checkpoint stores (parameters, persistent float buffers)
    and nothing else: a buffer the model computes when it is built (LLaMA's rotary
    ``inv_freq``) stays as ``from_pretrained`` makes it, float32, so the model in memory
    computes what the written checkpoint computes once reloaded (``model.to(dtype)``
    would round it to the dtype too). Tied parameters stay tied (one object each)."""
    import torch

    saved = set(model.state_dict())
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for module_name, module in model.named_modules():
            for name, buffer in list(module._buffers.items()):
                key = f"{module_name}.{name}" if module_name else name
                if buffer is not None and buffer.is_floating_point() and key in saved:
                    module._buffers[name] = buffer.to(dtype)


def _write(model, tokenizer, tmp: Path, max_shard_size) -> list[str]:
    """Save the model (sharded safetensors) and tokenizer; the shards' names."""
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=check_max_shard_size(max_shard_size))  # bytes
    tokenizer.save_pretrained(tmp)
    return sorted(p.name for p in tmp.glob("*.safetensors"))


def _reload_check(model_class, tmp: Path, target: str, tied: bool, batch, expected: dict, reference: dict,
                  tolerance: float) -> float:
    """Reload the written checkpoint as a user would: its dtype, its tied embeddings and
    its outputs must be the merged model's. Returns its largest difference to the
    adapter model."""
    again = reloaded_outputs(model_class, tmp, target, tied, batch)
    reload_self, _ = compare_outputs(expected, again)
    reload_diff, _ = compare_outputs(reference, again)
    if not reload_self <= tolerance:
        raise ExportError(f"the written checkpoint, reloaded, differs from the merged model by {reload_self:.3g}; nothing written")
    return reload_diff

