"""Putting a method's adapters on a model, and taking them off again (merge).

Each targeted ``nn.Linear`` or GPT-2 ``Conv1D`` is wrapped in :class:`AdaptedLayer`,
which computes ``base(x) + adapter(x)`` (a weight update), or ``h + adapter(h)`` with
``h = base(x)`` for an adapter that acts on the module's output (an inserted module:
``Adapter.acts_on == "output"``). Adapter parameters live under
``<module path>.lrr_adapter.*`` and method-wide shared parameters under ``lrr_shared.*``,
so the adapter's state dict is a plain filter on the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank_runner.backbones.head import outside_body_parameters
from lowrank_runner.methods.base import (Adapter, AdapterMethod, GroupedAdapter, LayerInfo, is_quantized_weight,
                                         weight_out_in)
from lowrank_runner.targets import FUSED_GROUPS, TargetModule

ADAPTER_KEY = "lrr_adapter"
SHARED_KEY = "lrr_shared"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_adaptable(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module``: an ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_sizes(module: nn.Module, groups: tuple[str, ...] | None = None) -> tuple[int, int]:
    """``(in_features, out_features)`` of an adaptable module; with ``groups`` (selected
    q/k/v of a fused projection) the output size of one group."""
    if isinstance(module, nn.Linear):
        in_f, out_f = module.in_features, module.out_features
    else:
        in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
    return in_f, (out_f // len(FUSED_GROUPS) if groups else out_f)


def layer_info(path: str, target: TargetModule, module: nn.Module) -> LayerInfo:
    """Sizes, orientation, device and dtype of the weight an adapter goes on. A
    bitsandbytes layer (an ``nn.Linear`` subclass holding packed 4-bit or int8 data)
    reports the dtype it computes in: its ``compute_dtype`` (4-bit), float16 (LLM.int8())."""
    if isinstance(module, nn.Linear):
        out_f, in_f, fan = module.out_features, module.in_features, False
    elif _is_conv1d(module):
        in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
        fan = True
    else:
        raise TypeError(f"{path}: cannot adapt a {type(module).__name__} (only nn.Linear and GPT-2 Conv1D)")
    return LayerInfo(path, target.symbols, in_f, out_f, fan, target.groups, module.weight.device, _compute_dtype(module))


def _compute_dtype(module: nn.Module) -> torch.dtype:
    if not is_quantized_weight(module.weight):
        return module.weight.dtype
    if type(module.weight).__name__ == "Int8Params":
        return torch.float16  # bitsandbytes' int8 matmul casts its inputs to float16
    return getattr(module, "compute_dtype", None) or torch.float32


class AdaptedLayer(nn.Module):
    """``base_layer(x) + lrr_adapter(x)``, or ``h + lrr_adapter(h)`` with ``h = base_layer(x)``
    for an adapter acting on the output (an inserted module); the base layer stays frozen
    and untouched."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter, info: LayerInfo):
        super().__init__()
        self.base_layer = base_layer
        self.lrr_adapter = adapter
        self.info = info

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.lrr_adapter.acts_on == "output":
            return out + self.lrr_adapter(out, None).to(out.dtype)
        base = self.base_layer
        # a quantized W0 is dequantized (a copy) only for adapters that read it (CondLoRA)
        needed = self.lrr_adapter.reads_w0 or not is_quantized_weight(base.weight)
        w0 = weight_out_in(base, self.info.fan_in_fan_out) if needed else None
        return out + self.lrr_adapter(x, w0).to(out.dtype)

    def stored_delta(self) -> torch.Tensor:
        """``ΔW`` in float32, in the orientation the base layer stores its weight; an
        inserted module (``mergeable`` False) has none: :class:`NotMergeable`."""
        if not self.lrr_adapter.mergeable:
            raise NotMergeable(f"{self.info.path}: {type(self.lrr_adapter).__name__} is a module inserted after the "
                               "layer, not an update of its weight: it cannot be merged")
        base = self.base_layer
        with torch.no_grad():
            delta = self.lrr_adapter.delta_weight(weight_out_in(base, self.info.fan_in_fan_out)).float()
        return (delta.T if self.info.fan_in_fan_out else delta).to(base.weight.device)

    def merged_base(self, delta: torch.Tensor | None = None) -> nn.Module:
        """The base layer with ``ΔW`` folded into its weight in place (the sum computed in
        float32, then stored in the weight's dtype). ``delta``: a precomputed
        :meth:`stored_delta`."""
        base = self.base_layer
        if is_quantized_weight(base.weight):
            raise TypeError(f"{self.info.path}: cannot merge into a quantized weight; dequantize the model first "
                            "(lowrank_runner.backbones.dequantize_model)")
        delta = self.stored_delta() if delta is None else delta
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


class NotMergeable(TypeError):
    """An inserted module asked for a ``ΔW`` (a merge): it has none."""


@dataclass
class Injection:
    """What :func:`inject` did: the adapters by module path, the method object and the
    backbone parameters the method trains itself (:meth:`AdapterMethod.trainable_base_parameters`)."""

    method: AdapterMethod
    adapters: dict[str, Adapter]
    layers: dict[str, LayerInfo]
    base_names: list[str] = field(default_factory=list)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def inject(model: nn.Module, method: AdapterMethod, targets: list[TargetModule]) -> Injection:
    """Wrap every target module of ``model`` (in place) with the method's adapter."""
    adapters, layers, found = {}, {}, []
    for target in targets:
        parent, attr = _parent(model, target.path)
        module = getattr(parent, attr)
        if isinstance(module, AdaptedLayer) or any(t.path == target.path for t, *_ in found):
            raise ValueError(f"{target.path} is already adapted")
        found.append((target, parent, attr, module, layer_info(target.path, target, module)))
    method.before_adapters([leaf for *_, info in found
                            for leaf in ([info.for_group(g) for g in info.groups] if info.groups else [info])])
    for target, parent, attr, module, info in found:
        w0 = weight_out_in(module, info.fan_in_fan_out).detach()
        if info.groups is not None:
            adapter = method.create_fused_adapter(info, w0)
        else:
            adapter = method.create_adapter(info, w0)
        setattr(parent, attr, AdaptedLayer(module, adapter, info))
        adapters[target.path] = adapter
        layers[target.path] = info
    shared = method.shared_modules()
    whole = method.attach(model)
    if shared is not None and whole is not None:
        raise ValueError(f"method '{method.name}' returned modules from both shared_modules() and attach()")
    if (shared or whole) is not None:
        model.add_module(SHARED_KEY, shared if shared is not None else whole)
    return Injection(method, adapters, layers, list(method.trainable_base_parameters(model)))


def is_adapter_param(name: str) -> bool:
    return f".{ADAPTER_KEY}." in name or name.startswith(f"{SHARED_KEY}.")


def head_parameter_names(model) -> list[str]:
    """The task head: parameters outside the backbone body and its output embeddings
    (:func:`~lowrank_runner.backbones.head.outside_body_parameters`: ``classifier``,
    ``score``, DeBERTa's pooler, exactly the modules PEFT keeps trainable with
    ``modules_to_save``), but not adapter parameters registered at the top (CondLoRA's
    shared ``lrr_shared``)."""
    return [name for name in outside_body_parameters(model) if not is_adapter_param(name)]


def mark_trainable(model: nn.Module, head_names: list[str] = ()) -> list[str]:
    """Freeze everything but adapter parameters and the named ones (the task head, and the
    backbone parameters a method trains itself: :attr:`Injection.base_names`)."""
    head = set(head_names)
    trainable = []
    for name, param in model.named_parameters():
        on = is_adapter_param(name) or name in head
        param.requires_grad_(on)
        if on:
            trainable.append(name)
    return trainable


def adapter_state_dict(model: nn.Module, compact: bool = False, base_names=()) -> dict[str, torch.Tensor]:
    """The adapter's tensors (parameters and buffers), and the trained backbone
    parameters ``base_names`` (:attr:`Injection.base_names`: full fine-tuning, BitFit).
    ``compact=True`` stores dynamic-rank adapters at their active ranks only (what a
    finished run saves); the full state, capacity included, is what checkpoints keep."""
    base = set(base_names)
    state = {k: v for k, v in model.state_dict().items() if is_adapter_param(k) or k in base}
    if compact:
        for name, module in model.named_modules():
            small = module.compact_state() if isinstance(module, Adapter) else None
            if small is not None:
                prefix = f"{name}."
                state = {k: v for k, v in state.items() if not k.startswith(prefix)}
                state.update({prefix + k: v for k, v in small.items()})
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load adapter tensors saved by :func:`adapter_state_dict` (compact or full) and
    return the model's adapter keys that got no value."""
    state = dict(state)
    loaded = set()
    own = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, Adapter) or module.compact_state() is None:
            continue
        prefix = f"{name}."
        mine = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        full = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
        if mine and module.is_compact(mine):
            module.load_compact_state(mine)
            loaded.update(prefix + k for k in [*full, *module.state_dict()])
        else:
            state.update({prefix + k: v for k, v in mine.items()})
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"unexpected adapter tensors: {result.unexpected_keys[:3]}")
    return [k for k in result.missing_keys if is_adapter_param(k) and k not in loaded]


def compact_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` that an adapter of ``model`` takes as its compact state (a prefix
    saved without its reparameterisation): :func:`load_adapter_state` loads them, although
    the model, as built for training, has other tensors there."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            prefix = f"{name}."
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if mine and module.compact_state() is not None and module.is_compact(mine):
                out += [prefix + k for k in mine]
    return out


def count_adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))


def merge_adapters(model: nn.Module, check=None) -> nn.Module:
    """Fold every adapter into its base weight, module by module and in place, and
    restore the plain module tree. ``check(path, delta, weight)``, if given, sees each
    module's float32 ``ΔW`` and the base weight (both as stored) before the sum is
    written (and may raise to stop the merge)."""
    shared = getattr(model, SHARED_KEY, None)
    if isinstance(shared, Adapter) and not shared.mergeable:
        raise NotMergeable(f"{type(shared).__name__} acts on the whole model, not as an update of a weight: "
                           "it cannot be merged")

    def merged(path: str, module: AdaptedLayer) -> nn.Module:
        delta = module.stored_delta()
        if check is not None:
            check(path, delta, module.base_layer.weight)
        return module.merged_base(delta)

    return _unwrap(model, merged)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take the adapters off without merging: the plain module tree with the untouched
    base weights (and whatever head the model holds)."""
    return _unwrap(model, lambda path, module: module.base_layer)


def _unwrap(model: nn.Module, replacement) -> nn.Module:
    """Replace every adapted layer by ``replacement(path, layer)``, one at a time (so a
    merge holds one module's ΔW at once), and drop the shared method modules."""
    for path, module in list(model.named_modules()):
        if isinstance(module, AdaptedLayer):
            parent, attr = _parent(model, path)
            setattr(parent, attr, replacement(path, module))
    if hasattr(model, SHARED_KEY):
        shared = getattr(model, SHARED_KEY)
        if isinstance(shared, Adapter):
            shared.release()
        delattr(model, SHARED_KEY)
    return model


def factor_norm_sq(adapter: Adapter, w0: torch.Tensor | None, weight=None) -> float:
    """``‖ΔW‖²_F`` of one adapter from its LoRA pair (``ΔW = s·B A``):
    ``s²·tr((BᵀB)(AAᵀ))``, two ``r × r`` Gram matrices, never the ``out × in`` product
    (computed in float64 so the trace does not lose digits). An adapter without a pair
    (:meth:`Adapter.lora_factors` raises ``NotImplementedError``) falls back to
    ``‖delta_weight(w0)‖²`` (``weight()`` gives ``W0`` there when ``w0`` is None)."""
    try:
        b, a, scale = adapter.lora_factors(w0)
    except NotImplementedError:
        w0 = weight() if w0 is None and weight is not None else w0
        return float(adapter.delta_weight(w0).double().pow(2).sum())
    return pair_norm_sq(b, a, scale)


def pair_norm_sq(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """``‖s·B A‖²_F = s²·tr((BᵀB)(AAᵀ))`` for ``B`` (out × r) and ``A`` (r × in), in
    float64 from the two ``r × r`` Gram matrices (also what bench/quality.py reads of
    PEFT's LoRA layers)."""
    b, a = b.detach().double(), a.detach().double()
    return max(float((b.T @ b * (a @ a.T)).sum()) * float(scale) ** 2, 0.0)


def _frozen_w0(layer: AdaptedLayer) -> torch.Tensor:
    """The module's ``W0`` (out × in), as a merge reads it (a quantized base dequantized);
    under FSDP the frozen weight is a sharded DTensor: gathered whole (a collective every
    process takes, as every process logs the same steps)."""
    w0 = weight_out_in(layer.base_layer, layer.info.fan_in_fan_out).detach()
    full = getattr(w0, "full_tensor", None)
    return full() if callable(full) else w0


def _group_norm_sq(layer: AdaptedLayer, group: str, leaf: Adapter, w0: torch.Tensor | None) -> float:
    """:func:`factor_norm_sq` of one q/k/v group's adapter of a fused projection."""
    rows = layer.info.group_slice(group)
    return factor_norm_sq(leaf, None if w0 is None else w0[rows], lambda: _frozen_w0(layer)[rows])


def update_norms(model: nn.Module) -> dict[str, float] | None:
    """How far training has moved the adapted modules: ``update_norm`` =
    ``sqrt(Σ_m ‖ΔW_m‖²_F)`` over every adapted module and ``update_norm_max`` = the
    largest per-module ``‖ΔW_m‖_F`` (float32 values), from :func:`factor_norm_sq` (``W0``
    read only for adapters with ``reads_w0``: CondLoRA). None when no module is adapted
    (full fine-tuning, BitFit) or every adapted module is an inserted one (no ``ΔW``:
    Houlsby, Pfeiffer). What ``training.log_update_norm`` logs."""
    per_module = []
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, AdaptedLayer) or not module.lrr_adapter.mergeable:
                continue
            adapter = module.lrr_adapter
            w0 = _frozen_w0(module) if adapter.reads_w0 else None
            if isinstance(adapter, GroupedAdapter):  # the groups' rows are disjoint: their squares add
                sq = sum(_group_norm_sq(module, g, leaf, w0) for g, leaf in adapter.groups.items())
            else:
                sq = factor_norm_sq(adapter, w0, lambda m=module: _frozen_w0(m))
            per_module.append(sq)
    if not per_module:
        return None
    # host-side arithmetic on Python floats (float32, as logged): on the CPU by intent, whatever the weights' device
    return {"update_norm": float(torch.tensor(sum(per_module), device="cpu").sqrt().float()),
            "update_norm_max": float(torch.tensor(max(per_module), device="cpu").sqrt().float())}
