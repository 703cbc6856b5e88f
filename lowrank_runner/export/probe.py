"""The probe batch every export is checked on, the adapter model's outputs on it that
every export must reproduce (:func:`reference_outputs`), and a comparison of two models'
outputs that does not depend on the task head: every floating-point tensor of the
model's output (``logits`` of a classifier or causal LM, ``start_logits``/``end_logits``
of extractive QA, ...) is compared, so no output head escapes the check.
"""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import ExportError

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


VOCAB_SAMPLES, VOCAB_SAMPLE_LENGTH = 4, 12


def probe_texts(tokenizer) -> list[str]:
    """The fixed sentences plus a few made of tokens drawn (seeded) from the tokenizer's
    own vocabulary, so a model whose vocabulary lacks ordinary English words (a domain
    tokenizer, a tiny test model) still sees inputs that exercise it."""
    import random

    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    samples = [tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(rng.choices(ids, k=VOCAB_SAMPLE_LENGTH)))
               for _ in range(VOCAB_SAMPLES)] if ids else []
    return list(PROBE_TEXTS) + samples


def probe_batch(tokenizer, max_length: int):
    return tokenizer(probe_texts(tokenizer), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def model_outputs(model, batch) -> dict:
    """The model's floating-point output tensors on ``batch``, as float32 on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    tensors = {k: v.detach().float().cpu() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not tensors:
        raise ValueError(f"{type(model).__name__} returned no floating-point output to compare")
    return tensors


def non_finite(outputs: dict) -> list[str]:
    """Names of the outputs holding NaN or Inf."""
    import torch

    return [k for k, v in outputs.items() if not torch.isfinite(v).all()]


def compare_outputs(reference: dict, other: dict) -> tuple[float, float]:
    """Largest and mean absolute difference over all compared outputs (NaN anywhere gives
    NaN, which fails every ``<=`` check)."""
    import torch

    if set(reference) != set(other):
        raise ValueError(f"the models return different outputs: {sorted(reference)} vs {sorted(other)}")
    diffs = torch.cat([(reference[k] - other[k]).abs().flatten() for k in sorted(reference)])
    if torch.isnan(diffs).any():
        return float("nan"), float("nan")
    return float(diffs.max()), float(diffs.mean())


def largest_magnitude(outputs: dict) -> float:
    return max(float(v.abs().max()) for v in outputs.values())


def update_tensor(layer):
    """What an adapted module changes, as one float32 tensor: its ``ΔW``, or for an
    inserted module (``mergeable`` False: no ``ΔW``) its parameters flattened, so a
    non-finite one is caught the same way."""
    import torch

    adapter = layer.lrr_adapter
    if adapter.mergeable:
        return layer.stored_delta()
    with torch.no_grad():
        return torch.cat([p.detach().float().flatten() for p in adapter.parameters()])


def check_adapter(model, source: Path, base_updates: dict | None = None) -> dict[str, float]:
    """Every adapted module's update ΔW (float32, as it would be merged): one holding
    NaN/Inf (a corrupted or diverged adapter) stops the export naming the module, and so
    does an adapter whose every ΔW is exactly zero (the export would change nothing in
    the backbone); an inserted module is checked on its parameters (:func:`update_tensor`). ``base_updates``: the backbone tensors the method trained itself
    (export/source.py ``base_updates``: full fine-tuning, BitFit), checked the same way.
    Returns the largest |ΔW| per module (and per trained tensor)."""
    import torch

    from lowrank_runner.methods.base import Adapter
    from lowrank_runner.methods.inject import SHARED_KEY, AdaptedLayer

    largest: dict[str, float] = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            delta = update_tensor(module)
            if not torch.isfinite(delta).all():
                raise ExportError(f"{source}: {path}: the adapter's update ΔW holds NaN/Inf (a corrupted or diverged "
                                  "adapter); nothing written")
            largest[path] = float(delta.abs().max())
    shared = getattr(model, SHARED_KEY, None)
    if isinstance(shared, Adapter) and not shared.mergeable:  # a method acting on the whole model: a prefix
        with torch.no_grad():
            values = torch.cat([p.detach().float().flatten() for p in shared.parameters()])
        if not torch.isfinite(values).all():
            raise ExportError(f"{source}: {SHARED_KEY}: the method's parameters hold NaN/Inf (a corrupted or diverged "
                              "adapter); nothing written")
        largest[SHARED_KEY] = float(values.abs().max())
    for name, update in (base_updates or {}).items():
        if update["largest"] != update["largest"]:  # NaN
            raise ExportError(f"{source}: {name}: the trained tensor holds NaN/Inf (a corrupted or diverged run); "
                              "nothing written")
        largest[name] = update["largest"]
    if not any(largest.values()):
        raise ExportError(
            f"{source}: every adapted module's update ΔW is exactly zero ({len(largest)} modules): the adapter leaves "
            "the backbone's weights as they are, so the export would change nothing. Was the adapter trained "
            "(learning rate, steps) and saved? nothing written"
        )
    return largest


def reference_outputs(model, batch, source: Path, base_updates: dict | None = None) -> dict:
    """The adapter model's outputs on the probe batch, which every export must reproduce.
    The adapter is checked first (:func:`check_adapter`: NaN/Inf or all-zero ΔW, with the
    trained backbone tensors ``base_updates``), then the outputs: NaN/Inf there stops the
    export before anything is written."""
    check_adapter(model, source, base_updates)
    outputs = model_outputs(model, batch)
    bad = non_finite(outputs)
    if bad:
        raise ExportError(f"{source}: the adapter model produces NaN/Inf ({', '.join(bad)}) on the probe batch; nothing written")
    return outputs
