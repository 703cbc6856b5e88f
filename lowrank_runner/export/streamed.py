"""``lrr export --merge`` in bounded memory: the merged checkpoint is written tensor by
tensor from the backbone's safetensors files, never holding the model.

What is in memory at once: the model's skeleton on the meta device (names, shapes, tied
parameters: no weights), the adapters on the CPU with their trained state (and the
trained head and backbone tensors of ``full``/``bitfit``), one backbone tensor (each
read with its own ``safe_open``, so no shard stays mapped), and the output shard being
written (at most ``--max-shard-size``). Steps:

1. plan: the adapted skeleton (targets, ranks and tied adapted weights checked, as the
   in-memory merge does), the output layout exactly as ``save_pretrained`` would write it
   (tied weights stored once, ``split_torch_state_dict_into_shards``), and each output
   tensor's source: checkpoint names mapped to the model class's as transformers'
   ``from_pretrained`` maps them (``get_model_conversion_mapping`` + ``rename_source_key``:
   legacy renames, ``base_model_prefix`` added or removed);
2. write: every tensor once: ``W0 + ΔW`` summed in float32 for an adapted weight
   (``AdaptedLayer.stored_delta``; CondLoRA's ΔW from the ``W0`` just read), the trained
   tensor for one the method trained itself, the trained head, every other backbone
   tensor unchanged; each cast to the output dtype. Per module: a non-finite ΔW stops
   the export, and the adapter's own forward ``adapter(x, W0)`` on random inputs must
   equal ``(W_merged − W0) x`` (a transposed or misplaced update fails); per tensor: a
   half-precision overflow stops it. At the end, an update that is zero everywhere, or
   below the output dtype's precision everywhere, stops it (it would change nothing);
3. verify: the written shards are read back one tensor at a time; each must be exactly
   what was computed;
4. whole model, when the adapter model in float32 fits in ``max_memory``: the adapter
   model's outputs on the probe batch (the reference), merged in memory (float32) and
   compared, then the written checkpoint reloaded with plain transformers (its dtype and
   tied embeddings checked) and compared; otherwise skipped, and ``lrr_export.json``
   says so (``outputs_checked``).

A backbone this cannot stream (no safetensors files, a weight conversion that merges
tensors, a buffer missing from the checkpoint) raises :class:`StreamUnsupported` before
anything is written; :func:`~lowrank_runner.export.merge.export_merged` then merges in
memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.errors import ExportError
from lowrank_runner.export.common import check_size

MODULE_PROBE_ROWS = 4  # random inputs per adapted module for the output check
SAFE_INDEX = "model.safetensors.index.json"


class StreamUnsupported(Exception):
    """The backbone cannot be merged tensor by tensor (the message says why)."""


def default_max_memory() -> int:
    """Half the memory available now (``MemAvailable`` of /proc/meminfo; elsewhere the
    free physical pages), in bytes."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def check_max_memory(size) -> int | None:
    """``--max-memory``: 16GB, 500MB, 2KiB or a number of bytes (None: the default)."""
    return None if size is None else check_size(size, "--max-memory", "16GB, 500MB")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# --------------------------------------------------------------------------- backbone files


def backbone_files(ref) -> list[Path]:
    """The backbone's safetensors files (one, or the shards its index names); raises
    :class:`StreamUnsupported` for a backbone with PyTorch pickles only."""
    from lowrank_runner import backbones

    if ref.local:
        backbones.check_weight_files(ref)  # damaged files are named here
    single = backbones.backbone_file(ref, "model.safetensors")
    if single is not None:
        return [single]
    index = backbones.backbone_file(ref, SAFE_INDEX)
    if index is None:
        raise StreamUnsupported(f"backbone '{ref.name}' has no safetensors weights (pytorch_model.bin only)")
    if ref.local:
        return backbones.shard_files(index)
    names = sorted(set(backbones.read_json(index).get("weight_map", {}).values()))
    return [backbones.backbone_file(ref, name) for name in names]


def checkpoint_headers(files: list[Path]) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor name of the backbone's files: its file and shape (headers only)."""
    from safetensors import safe_open

    names: dict[str, tuple[Path, list[int]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                names.setdefault(key, (path, list(f.get_slice(key).get_shape())))
    return names


def read_tensor(path: Path, key: str):
    """One tensor, its file opened for it alone (no mapping of the file stays behind)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def map_checkpoint_names(layout, names: dict) -> tuple[dict[str, tuple[Path, str, list[int]]], list]:
    """Checkpoint tensor names → the model class's, as ``from_pretrained`` renames them
    (transformers' own conversion mapping and ``rename_source_key``: legacy renames,
    ``base_model_prefix`` added or removed), and the conversions that renamed any. A
    conversion that merges or splits tensors cannot be streamed: :class:`StreamUnsupported`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no conversion mapping to follow
        raise StreamUnsupported("this transformers has no checkpoint conversion mapping (transformers 5 has)") from None

    mapping = get_model_conversion_mapping(layout)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    own, prefix = layout.state_dict(), layout.base_model_prefix
    found: dict[str, tuple[Path, str, list[int]]] = {}
    for key in sorted(names):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, own)
        if renamed not in own and key in own:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=own)
        if renamed in own and pattern is not None:
            raise StreamUnsupported(f"{type(layout).__name__} converts checkpoint tensors when loading ({key})")
        if renamed in own:
            found.setdefault(renamed, (names[key][0], key, names[key][1]))
    return found, [m for m in mapping if m.was_used()]


# --------------------------------------------------------------------------- the plan


@dataclass
class MergePlan:
    """Everything the streamed merge needs, no backbone weight read yet."""

    source: Path
    target: str  # output dtype
    model: object  # adapted skeleton: meta backbone, adapters on the CPU (trained state)
    layout: object  # plain skeleton on the meta device, in the output dtype
    layers: dict  # output weight name → (module path, AdaptedLayer)
    head: dict  # trained head tensors (output names)
    trained: dict  # backbone tensors the method trained itself (output names)
    where: dict  # output name → (file, checkpoint name, shape)
    split: object  # huggingface_hub StateDictSplit: shards and their tensors
    tied: dict = field(default_factory=dict)  # output name → the names sharing its tensor


def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _adapted_skeleton(config: dict, adapter_cfg: dict, source: Path):
    """The adapted model on the meta device (the recipe checked against it), as every
    export builds it; tied adapted weights refused."""
    from lowrank_runner.export.merge_checks import refuse_tied_targets
    from lowrank_runner.export.source import head_config_of, model_class_of
    from lowrank_runner.modeling import build_adapted_model

    build = {**config, "backbone": {**config["backbone"], "dtype": "float32"}}
    try:
        adapted = build_adapted_model(build, model_class_of(adapter_cfg), head_config_of(adapter_cfg), weights=False)
    except ValueError as exc:
        raise ExportError(f"{source / 'recipe.yaml'}: the recipe does not fit the backbone: {exc}") from None
    refuse_tied_targets(adapted.model)
    return adapted


def _cpu_adapters(adapted, config: dict, adapter: dict, source: Path):
    """The adapters re-created on the CPU around weight placeholders (a stride-0 view of
    one zero: no memory), with the trained adapter state loaded."""
    import torch
    from torch import nn

    from lowrank_runner.export.source import load_error_line
    from lowrank_runner.methods.inject import inject, is_adapter_param, load_adapter_state, remove_adapters
    from lowrank_runner.modeling import build_method

    model = remove_adapters(adapted.model)
    for target in adapted.targets:
        module = model.get_submodule(target.path)
        module.weight = nn.Parameter(torch.zeros((), dtype=torch.float32).expand(module.weight.shape), requires_grad=False)
    inject(model, build_method(config["method"]), adapted.targets)
    hint = "was it trained on another backbone? (--backbone)"
    try:
        missing = load_adapter_state(model, {k: v for k, v in adapter.items() if is_adapter_param(k)})
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise ExportError(f"{source}: the saved adapter does not fit the rebuilt model: {load_error_line(exc)}; {hint}") from None
    if missing:
        raise ExportError(f"{source}: adapter weights missing for {sorted(missing)[:3]}")
    return model.eval()


def _layout(model_class, model, target: str, ref, max_shard_size, names: dict):
    """The plain model's skeleton in the output dtype, where each of its tensors is in
    the checkpoint (``names``: :func:`checkpoint_headers`), and the tensors
    ``save_pretrained`` would write for it had ``from_pretrained`` loaded it (tied
    weights once, the conversions used on loading reverted, in its order) and their
    shards."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from lowrank_runner.backbones import build_empty

    layout = build_empty(model_class, model.config, ref).to(getattr(torch, target)).eval()
    where, used = map_checkpoint_names(layout, names)
    layout._weight_conversions = used  # what from_pretrained keeps for save_pretrained
    state = remove_tied_weights_from_state_dict(layout.state_dict(), layout)
    saved = revert_weight_conversion(layout, state)
    if set(saved) != set(state):
        raise StreamUnsupported(f"{type(layout).__name__} renames its tensors when saving")
    split = split_torch_state_dict_into_shards(saved, filename_pattern="model{suffix}.safetensors",  # bytes: one
                                               max_shard_size=check_size(max_shard_size, "--max-shard-size"))  # reading of sizes
    return layout, where, split


def plan_merge(source: Path, target: str, max_shard_size, read: tuple):
    """The :class:`MergePlan` of ``source`` (``read``: :func:`~lowrank_runner.export.source.read_run`)."""
    from lowrank_runner.backbones import resolve
    from lowrank_runner.export.merge_checks import tied_weights
    from lowrank_runner.export.source import model_class_of
    from lowrank_runner.methods.inject import AdaptedLayer

    config, adapter_cfg, adapter, head = read
    ref = resolve(config["backbone"])
    files = backbone_files(ref)  # before building: a pickle-only backbone goes the in-memory way at once
    adapted = _adapted_skeleton(config, adapter_cfg, source)
    unknown = sorted((set(adapter) | set(head)) - set(adapted.model.state_dict()))
    if unknown:
        raise ExportError(f"{source}: saved weights do not fit the rebuilt model (e.g. {unknown[:3]}); "
                          "was it trained on another backbone? (--backbone)")
    trained = {_plain_name(n): adapter[n] for n in adapted.base_names}
    model = _cpu_adapters(adapted, config, adapter, source)
    layers = {f"{p}.weight": (p, m) for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    layout, where, split = _layout(model_class_of(adapter_cfg), model, target, ref, max_shard_size,
                                   checkpoint_headers(files))
    tied = {n: names for names in tied_weights(layout).values() for n in names}
    head = _with_aliases({_plain_name(k): v for k, v in head.items()}, tied)
    plan = MergePlan(source, target, model, layout, layers, head, _with_aliases(trained, tied), where, split, tied)
    _check_sources(plan, ref)
    return plan, adapted.backbone


def _with_aliases(tensors: dict, tied: dict) -> dict:
    """``tensors`` also under the other names of the parameters they are tied to."""
    out = dict(tensors)
    for name, value in tensors.items():
        for alias in tied.get(name, []):
            out.setdefault(alias, value)
    return out


def _check_sources(plan: MergePlan, ref) -> None:
    """Every output tensor has a source of the right shape: the trained head, a trained
    backbone tensor, or the backbone checkpoint."""
    shapes = {k: list(v.shape) for k, v in plan.layout.state_dict().items()}
    params = {n for n, _ in plan.layout.named_parameters(remove_duplicate=False)}
    for name in plan.split.tensor_to_filename:
        if name in plan.head or name in plan.trained:
            continue
        found = _checkpoint_entry(plan, name)
        if found is None and name not in params:
            raise StreamUnsupported(f"the backbone checkpoint lacks the buffer {name}")
        if found is None:
            raise ExportError(f"backbone '{ref.name}' has no pretrained weights for {name}: it would stay random; "
                              "keep training.train_head: true for a task head, or use a complete checkpoint")
        if found[2] != shapes[name]:
            shape = lambda s: "x".join(map(str, s))  # noqa: E731
            raise ExportError(f"backbone '{ref.name}': {found[1]} is {shape(found[2])} in {found[0]}, "
                              f"{shape(shapes[name])} in the model its config.json describes; use the weights it belongs to")


def _checkpoint_entry(plan: MergePlan, name: str):
    for candidate in [name, *plan.tied.get(name, [])]:
        if candidate in plan.where:
            return plan.where[candidate]
    return None


# --------------------------------------------------------------------------- the tensors


class TensorSource:
    """Computes each output tensor from the plan (the same way every time it is asked,
    so the written shards can be checked against it) and records, the first time, each
    update's checks: largest |ΔW|, whether it survives the output dtype, the adapter's
    forward against the merged weight."""

    def __init__(self, plan: MergePlan, tolerance: float):
        import torch

        self.plan, self.tolerance = plan, tolerance
        self.dtype = getattr(torch, plan.target)
        self.largest: dict[str, float] = {}
        self.changed: dict[str, bool] = {}
        self.module_diff: dict[str, float] = {}
        self.meta = plan.layout.state_dict()

    def original(self, name: str):
        """The tensor the output starts from: trained head, trained backbone tensor, or
        the backbone's."""
        if name in self.plan.head:
            return self.plan.head[name]
        if name in self.plan.trained:
            return self.plan.trained[name]
        path, key, _ = _checkpoint_entry(self.plan, name)
        return read_tensor(path, key)

    def output(self, name: str):
        """The tensor written under ``name``, in the output dtype."""
        tensor = self.original(name)
        if name in self.plan.layers:
            tensor = self._merged(name, tensor.float())
        elif name in self.plan.trained and name not in self.largest:
            self._record_trained(name, tensor)
        if not tensor.is_floating_point():
            return tensor.to(self.meta[name].dtype).contiguous()
        out = tensor.float().to(self.meta[name].dtype)
        self._refuse_overflow(name, tensor, out)
        return out.contiguous()

    def _merged(self, name: str, w0):
        """``W0 + ΔW`` in float32, ``ΔW`` from the module's adapter (``stored_delta``:
        the weight's own orientation), checked the first time."""
        from torch import nn

        path, layer = self.plan.layers[name]
        placeholder = layer.base_layer.weight
        layer.base_layer.weight = nn.Parameter(w0, requires_grad=False)
        try:
            delta = layer.stored_delta()
            merged = w0 + delta
            if path not in self.largest:
                self._check_delta(path, delta, w0, merged, layer)
        finally:
            layer.base_layer.weight = placeholder
        return merged

    def _check_delta(self, path: str, delta, w0, merged, layer) -> None:
        import torch

        if not torch.isfinite(delta).all():
            raise ExportError(f"{self.plan.source}: {path}: the adapter's update ΔW holds NaN/Inf (a corrupted or "
                              "diverged adapter); nothing written")
        self.largest[path] = float(delta.abs().max())
        self.changed[path] = bool((merged.to(self.dtype) != w0.to(self.dtype)).any())
        self.module_diff[path] = module_output_check(path, layer, w0, merged, self.tolerance)

    def _record_trained(self, name: str, new) -> None:
        """A backbone tensor the method trained itself: its change from the pretrained
        one (checked finite), and whether the output dtype keeps it."""
        import torch

        entry = _checkpoint_entry(self.plan, name)
        old = read_tensor(*entry[:2]).float() if entry is not None else torch.zeros_like(new, dtype=torch.float32)
        delta = new.float() - old
        if not torch.isfinite(delta).all():
            raise ExportError(f"{self.plan.source}: {name}: the trained tensor holds NaN/Inf (a corrupted or diverged "
                              "run); nothing written")
        self.largest[name] = float(delta.abs().max()) if delta.numel() else 0.0
        self.changed[name] = bool((new.float().to(self.dtype) != old.to(self.dtype)).any())

    def _refuse_overflow(self, name: str, tensor, out) -> None:
        import torch

        if self.dtype != torch.float32 and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
            raise ExportError(f"cast to {self.plan.target}, {name} overflows (|x| up to {float(tensor.abs().max()):.3g}, "
                              f"beyond {torch.finfo(self.dtype).max:.3g}); export with --dtype float32 or bfloat16; "
                              "nothing written")


def module_output_check(path: str, layer, w0, merged, tolerance: float) -> float:
    """On a few random inputs, the adapter's own forward ``adapter(x, W0)`` must equal
    ``(W_merged − W0) x`` (both weights in the layer's stored orientation, GPT-2's
    ``Conv1D`` (in, out) included): a transposed, misplaced or mis-scaled update fails.
    Returns the largest difference, relative to max(1, max |adapter(x)|)."""
    import torch

    from lowrank_runner.methods.base import weight_out_in

    fan = layer.info.fan_in_fan_out
    out_in = lambda w: w.T if fan else w  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MODULE_PROBE_ROWS, layer.info.in_features, generator=generator)
    with torch.no_grad():
        ours = layer.lrr_adapter(x, weight_out_in(layer.base_layer, fan)).float()
        theirs = x @ out_in(merged - w0).T
    diff = float((ours - theirs).abs().max()) / max(1.0, float(ours.abs().max()))
    if not diff <= tolerance:
        raise ExportError(f"{path}: the merged weight does not reproduce the adapter's output (relative difference "
                          f"{diff:.3g} on random inputs, above --tolerance {tolerance:g}): a transposed or misplaced "
                          "update, or a tolerance below float32 rounding (the default is 1e-3); nothing written")
    return diff


def refuse_inert(tensors: TensorSource, source: Path, target: str) -> None:
    """An export that changes nothing: every update exactly zero, or below ``target``'s
    precision everywhere (the messages of the in-memory merge)."""
    largest = tensors.largest
    if not any(largest.values()):
        raise ExportError(
            f"{source}: every adapted module's update ΔW is exactly zero ({len(largest)} modules): the adapter leaves "
            "the backbone's weights as they are, so the export would change nothing. Was the adapter trained "
            "(learning rate, steps) and saved? nothing written")
    if not any(tensors.changed.values()):
        raise ExportError(
            f"{source}: every update ΔW (largest |ΔW| {max(largest.values()):.3g}) is below the precision of "
            f"{target}: the merged {target} weights would equal the backbone's, so the export would change nothing. "
            "Export in a finer dtype (--dtype float32); nothing written")


# --------------------------------------------------------------------------- writing and reading back


def write_shards(plan: MergePlan, tensors: TensorSource, tmp: Path) -> list[str]:
    """The output shards, one at a time, laid out as ``save_pretrained`` lays them out
    (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + the index)."""
    from safetensors.torch import save_file

    split = plan.split
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors.output(name) for name in names}
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": plan.layout.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(split.filename_to_tensors)


def verify_shards(plan: MergePlan, tensors: TensorSource, tmp: Path) -> int:
    """Read every written tensor back (one at a time): the shards hold exactly the planned
    names, and each tensor is exactly what was computed (merged updates) or the
    backbone's, cast. Returns the number of tensors checked."""
    import torch
    from safetensors import safe_open

    checked = 0
    for filename, names in plan.split.filename_to_tensors.items():
        with safe_open(str(tmp / filename), framework="pt") as f:
            if sorted(f.keys()) != sorted(names):
                raise ExportError(f"the written {filename} does not hold the tensors planned for it; nothing written")
            for name in names:
                written, expected = f.get_tensor(name), tensors.output(name)
                if written.dtype != expected.dtype or not torch.equal(written, expected):
                    raise ExportError(f"the written {filename} holds {name} other than computed; nothing written")
                checked += 1
    return checked


def write_configs(plan: MergePlan, ref, tmp: Path) -> None:
    """config.json as ``save_pretrained`` writes it (the head's labels, ``architectures``:
    the concrete class, ``dtype``), and the generation config of a generative model."""
    from transformers import GenerationConfig

    from lowrank_runner import backbones

    layout = plan.layout
    layout.config.dtype = plan.target
    layout.config.architectures = [type(layout).__name__]
    layout.config.save_pretrained(tmp)
    if layout.can_generate():
        found = backbones.backbone_file(ref, "generation_config.json")
        generation = GenerationConfig.from_pretrained(found.parent) if found is not None else layout.generation_config
        generation.save_pretrained(tmp)


# --------------------------------------------------------------------------- the whole-model check


def float32_bytes(plan: MergePlan) -> int:
    """What the adapter model holds in float32 (the whole-model check loads it)."""
    meta = plan.layout.state_dict()
    return sum(meta[n].numel() * (4 if meta[n].is_floating_point() else meta[n].element_size())
               for n in plan.split.tensor_to_filename)


def whole_model_reference(source: Path, backbone: str | None, batch, tolerance: float) -> tuple[dict, dict, dict]:
    """The adapter model (float32) on the probe batch: its outputs (the reference; NaN/Inf,
    or an update all zero, stop the export), then merged in memory and compared. The
    model is freed before returning."""
    import weakref

    from lowrank_runner.export.common import collect_if_alive
    from lowrank_runner.export.probe import compare_outputs, model_outputs, reference_outputs
    from lowrank_runner.export.source import load_trained_model
    from lowrank_runner.methods.inject import merge_adapters

    model, adapted, _, _ = load_trained_model(source, dtype="float32", backbone=backbone)
    updates = adapted.base_updates
    del adapted
    reference = reference_outputs(model, batch, source, updates)
    merged = model_outputs(merge_adapters(model), batch)
    alive = weakref.ref(model)
    del model
    collect_if_alive(alive)
    max_diff, mean_diff = compare_outputs(reference, merged)
    if not max_diff <= tolerance:
        raise ExportError(f"the merged model differs from the adapter model by up to {max_diff:.3g} on the probe batch "
                     f"(tolerance {tolerance:g}); nothing written")
    return reference, merged, {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": mean_diff}


def reload_checks(plan: MergePlan, tmp: Path, tied: bool, batch, reference: dict, merged: dict, tolerance: float,
                  cast_tolerance: float | None) -> dict:
    """The written checkpoint reloaded with plain transformers (dtype and tied embeddings
    checked) against the adapter model: within ``tolerance`` in float32; in half
    precision within the cast tolerance (the in-memory merge's cast check)."""
    from lowrank_runner.export.merge_checks import cast_allowed, reloaded_outputs
    from lowrank_runner.export.probe import compare_outputs, non_finite

    again = reloaded_outputs(type(plan.layout), tmp, plan.target, tied, batch)
    diff, mean = compare_outputs(reference, again)
    if plan.target == "float32":
        self_diff, _ = compare_outputs(merged, again)
        if not self_diff <= tolerance:
            raise ExportError(f"the written checkpoint, reloaded, differs from the merged model by {self_diff:.3g}; "
                              "nothing written")
        return {"reloaded_max_abs_logit_diff": diff}
    allowed = cast_allowed(plan.target, reference, cast_tolerance)
    if non_finite(again) or not diff <= allowed:
        raise ExportError(
            f"cast to {plan.target}, the merged model differs from the adapter model by up to {diff:.3g} on the "
            f"probe batch (allowed {allowed:.3g}; overflow or too coarse a dtype); export in float32 with "
            "--dtype float32 or loosen --cast-tolerance; nothing written")
    return {"cast_max_abs_logit_diff": diff, "cast_mean_abs_logit_diff": mean, "cast_allowed": allowed,
            "reloaded_max_abs_logit_diff": diff}


# --------------------------------------------------------------------------- the export


def export_streamed(source: Path, out: Path, *, tolerance: float, dtype: str | None, max_shard_size,
                    cast_tolerance: float | None, backbone: str | None, max_memory: int | None,
                    base_model: str | None = None) -> dict:
    """The merged checkpoint of ``source`` written tensor by tensor (module docstring);
    options and ``--out`` already checked. Raises :class:`StreamUnsupported` before
    anything is written when the backbone cannot be streamed."""
    from lowrank_runner.backbones import resolve
    from lowrank_runner.export.common import backbone_checked, provenance, staged_output, write_export_files
    from lowrank_runner.export.merge_checks import embeddings_tied, export_dtype
    from lowrank_runner.export.probe import probe_batch
    from lowrank_runner.export.source import loaded_backbone, read_run, source_tokenizer

    read = read_run(source, backbone)
    config, adapter_cfg = read[0], read[1]
    if config["backbone"].get("quantization"):
        raise StreamUnsupported("the run trained on a quantized base (backbone.quantization), which the merge "
                                "dequantizes as loading quantized it")
    target = export_dtype(dtype, config["backbone"]["dtype"], resolve(config["backbone"]))
    plan, ref = plan_merge(source, target, max_shard_size, read)
    used = backbone_checked(loaded_backbone(source, adapter_cfg, ref, backbone))
    tokenizer = source_tokenizer(source, ref, config)
    batch = probe_batch(tokenizer, config["task"]["max_length"])
    budget, need = max_memory or default_max_memory(), float32_bytes(plan)
    whole, checks = need <= budget, {}
    if whole:
        reference, merged, checks = whole_model_reference(source, backbone, batch, tolerance)
    tensors, tied = TensorSource(plan, tolerance), embeddings_tied(plan.layout)
    with staged_output(out) as tmp:
        shards = write_shards(plan, tensors, tmp)
        refuse_inert(tensors, source, target)
        verified = verify_shards(plan, tensors, tmp)
        write_configs(plan, ref, tmp)
        tokenizer.save_pretrained(tmp)
        if whole:
            checks.update(reload_checks(plan, tmp, tied, batch, reference, merged, tolerance, cast_tolerance))
        info = {**provenance(source, adapter_cfg, "merged-transformers", used, base_model),
                **merge_record(plan, tensors, verified),
                **outputs_record(whole, need, budget, len(batch["input_ids"]), sorted(reference) if whole else None),
                "max_abs_logit_diff": None, "mean_abs_logit_diff": None, "reloaded_max_abs_logit_diff": None, **checks,
                "tolerance": tolerance, "dtype": target, "merge_dtype": "float32", "tied_word_embeddings": tied,
                "max_shard_size": max_shard_size, "shards": shards}
        write_export_files(tmp, info)
    return info


def merge_record(plan: MergePlan, tensors: TensorSource, verified: int) -> dict:
    """What ``lrr_export.json`` says of the merge itself."""
    diffs = tensors.module_diff
    return {
        "merge": "streamed",
        "modules_merged": len(diffs),
        "base_tensors_trained": len(tensors.largest) - len(diffs),
        "modules_changed": sum(tensors.changed.values()),
        "largest_abs_delta": max(tensors.largest.values()),
        "module_outputs_checked": len(diffs),
        "module_outputs_max_diff": max(diffs.values()) if diffs else None,
        "tensors_verified": verified,
    }


def outputs_record(whole: bool, need: int, budget: int, examples: int, compared) -> dict:
    """Which output check ran (``outputs_checked``), and why the whole-model one did not."""
    skipped = None if whole else (
        f"the adapter model in float32 needs about {human(need)}, above the memory budget {human(budget)} "
        "(--max-memory; default: half the available memory); each module's output was checked instead; "
        f"give --max-memory {-(-need * 5 // 4 // 10**6)}MB or more to check the whole model")
    return {"outputs_checked": "whole model" if whole else "per module", "outputs_check_skipped": skipped,
            "max_memory": budget, "float32_model_bytes": need, "probe_examples": examples if whole else None,
            "outputs_compared": compared}
