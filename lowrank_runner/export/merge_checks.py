"""What both merges check (in memory: :mod:`.merge`; tensor by tensor: :mod:`.streamed`):
the dtype the merged checkpoint is written in, weights tied to other parameters (an
adapted one cannot be merged; tied embeddings must stay tied), the change a half-precision
cast may make, and the written checkpoint reloaded as a user would load it."""

from __future__ import annotations

from pathlib import Path

from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.common import DTYPES
from lowrank_runner.export.probe import largest_magnitude, model_outputs

# Half-precision casts change the outputs by rounding; allowed: this many units of the
# dtype's machine epsilon, relative to the largest reference output (at least 1).
CAST_EPS_UNITS = 8


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


def cast_allowed(target: str, reference: dict, cast_tolerance: float | None) -> float:
    """The largest difference allowed to the adapter model after a cast to ``target``:
    ``cast_tolerance`` (default: CAST_EPS_UNITS machine epsilons) × max(1, max |reference|)."""
    import torch

    bound = CAST_EPS_UNITS * torch.finfo(getattr(torch, target)).eps if cast_tolerance is None else cast_tolerance
    return bound * max(1.0, largest_magnitude(reference))


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


