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
from lowrank_runner.export.probe import (compare_outputs, largest_magnitude, model_outputs, non_finite, probe_batch,
                                         reference_outputs)
from lowrank_runner.export.source import load_trained_model, loaded_backbone, preflight, source_tokenizer
from lowrank_runner.quiet import quiet_libraries

# Half-precision casts change the outputs by rounding; allowed: this many units of the
# dtype's machine epsilon, relative to the largest reference output (at least 1).
CAST_EPS_UNITS = 8
# A quantized base (backbone.quantization): its layers multiply in the compute dtype (LLM.int8():
# int8 activations); allowed against the merged float32 model: this many such roundings (export docs).
QUANT_EPS_UNITS = 8
DEFAULT_MAX_SHARD_SIZE = "5GB"


def backbone_dtype(ref) -> str:
    """The dtype the backbone checkpoint declares (``dtype``/``torch_dtype`` in its
    config), float32 when it declares none or one we do not export."""
    from lowrank_runner.backbones import load_config

    cfg = load_config(ref)
    declared = getattr(cfg, "dtype", None) or cfg.to_dict().get("torch_dtype")
    name = str(declared).replace("torch.", "") if declared is not None else "float32"
    return name if name in DTYPES else "float32"


def export_dtype(requested: str | None, recipe_dtype: str, ref) -> str:
    if requested is not None:
        if requested not in DTYPES:
            raise UsageError(f"--dtype {requested}: choose one of {', '.join(DTYPES)}")
        return requested
    if recipe_dtype in ("bfloat16", "float16"):
        return recipe_dtype
    return backbone_dtype(ref)


def check_max_shard_size(size) -> int:
    """``--max-shard-size``: 5GB, 500MB, 2KiB or a number of bytes; returns the bytes."""
    return check_size(size, "--max-shard-size", "5GB, 500MB")


def tied_weights(model) -> dict[str, list[str]]:
    """Parameter names grouped by the tensor they share (only groups of two or more)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values() if len(names) > 1}


def refuse_tied_targets(model) -> None:
    """Merging into a weight shared with another module would change both: refuse."""
    from lowrank_runner.methods.inject import AdaptedLayer

    shared = {n: names for names in tied_weights(model).values() for n in names}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            key = f"{path}.base_layer.weight"
            if key in shared:
                others = [n for n in shared[key] if n != key]
                raise ExportError(
                    f"{path}: its weight is tied to {', '.join(others)} (tie_word_embeddings); merging ΔW into it would "
                    "change that tensor too and the merged model would no longer be the adapter model. Train without "
                    f"adapting {path}, or export the adapter instead (--adapter, or --peft for lora); nothing written"
                )


def embeddings_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(out, "weight", None)
    return weight is not None and inp is not None and weight is getattr(inp, "weight", None)



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


def cast_allowed(target: str, reference: dict, cast_tolerance: float | None) -> float:
    """The largest difference allowed to the adapter model after a cast to ``target``:
    ``cast_tolerance`` (default: CAST_EPS_UNITS machine epsilons) × max(1, max |reference|)."""
    import torch

    bound = CAST_EPS_UNITS * torch.finfo(getattr(torch, target)).eps if cast_tolerance is None else cast_tolerance
    return bound * max(1.0, largest_magnitude(reference))


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


def reloaded_outputs(model_class, tmp: Path, target: str, tied: bool, batch) -> dict:
    """The written checkpoint reloaded as a user would (``from_pretrained``, dtype
    "auto"): its parameters must be in ``target`` and its embeddings tied when the
    backbone's are. Returns its outputs on ``batch``; the model is freed."""
    reloaded = model_class.from_pretrained(tmp, dtype="auto").eval()
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in reloaded.parameters() if p.is_floating_point()})
    if dtypes != [target]:
        raise ExportError(f"the written checkpoint reloads as {', '.join(dtypes)}, not {target}; nothing written")
    if tied and not embeddings_tied(reloaded):
        raise ExportError("the backbone's tied input/output embeddings came back untied from the written checkpoint; nothing written")
    return model_outputs(reloaded, batch)


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

