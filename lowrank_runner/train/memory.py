"""Memory-lean training: activation (gradient) checkpointing and the dtypes of the
trainable parameters on a low-precision frozen base.

* :func:`enable_gradient_checkpointing` is the one place checkpointing is switched on
  (``training.gradient_checkpointing``; the loop and ``bench/`` call it).
* :func:`keep_trainable_in` holds the trainable parameters (adapters, CondLoRA's shared
  maps, the task head) in their own dtype, ``training.adapter_dtype`` (float32 by
  default), when the backbone is loaded in bfloat16/float16 (``backbone.dtype``), so
  AdamW's moments (which take the parameter's dtype) are float32 too; the rank
  allocators score in float32 whatever it is (methods/lora2.py, triadaptlora.py).

The adapter dtype is a training setting, not a ``method.dtype``: it also decides the
head's dtype, which is not the method's, and a method key would have to be added to
every method's schema fragment (plugins' too: they declare ``additionalProperties:
false``) and stripped before the method's constructor. ``lrr export`` never calls
:func:`keep_trainable_in`: it rebuilds the adapters in float32 and loads the saved values.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_runner.errors import RecipeKeyError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointingError(RecipeKeyError):
    """The backbone class cannot checkpoint activations."""


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of
    keeping them (transformers' own checkpointing of its layers), non-reentrant.

    Why non-reentrant (``use_reentrant=False``) rather than the reentrant variant plus
    ``enable_input_require_grads``: with a frozen base the hidden states entering a block
    do not require gradients, and reentrant checkpointing then builds no graph at all, so
    the adapters *inside* the block (CondLoRA's ``lrr_shared`` maps, used by every block
    and combined with the ``W0`` its adapters read in ``forward``, included) would get no
    gradient. ``enable_input_require_grads`` (a hook making the input embeddings' output
    require grad) is the workaround, and a fragile one: it depends on the inputs going
    through that embedding and on a tensor input (reentrant checkpointing ignores tensors
    passed as keyword arguments). Non-reentrant checkpointing records every parameter
    used in the recomputed region whatever the inputs (float32 adapters on a bf16 base
    too), takes keyword arguments and is PyTorch's recommended mode. Dropout masks are
    replayed (the RNG state is preserved), so the gradients are those of the run without
    checkpointing (tests/test_memory_lean.py). transformers still registers the input
    hook for ``input_ids`` models; here it costs only the gradient of the first block's
    input. Checkpointing acts in train mode only: evaluation and generation run as
    without it.

    Raises :class:`CheckpointingError` at ``training.gradient_checkpointing`` for a
    model class that does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise CheckpointingError(
            f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing in "
            "transformers; set training.gradient_checkpointing: false (or use a backbone class that supports it)",
            "training.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_trainable_in(model: nn.Module, trainable_names, dtype: torch.dtype | str = torch.float32) -> None:
    """Cast the named parameters (in place, keeping them the same ``nn.Parameter``
    objects) to ``dtype`` and make the modules that own them cast their floating-point
    inputs to it (a bf16 backbone feeds bf16 hidden states to a float32 head).

    Adapter modules cast their input themselves (:func:`~lowrank_runner.methods.base.adapter_input`)
    and :class:`~lowrank_runner.methods.inject.AdaptedLayer` casts their output back to
    the base layer's, so only non-adapter owners (the task head) get the input cast.
    """
    from lowrank_runner.methods.inject import is_adapter_param

    dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    names = set(trainable_names)
    for module_name, module in model.named_modules():
        owned = [(f"{module_name}.{n}" if module_name else n, p) for n, p in module.named_parameters(recurse=False)]
        owned = [(full, p) for full, p in owned if full in names and p.is_floating_point()]
        for _, param in owned:
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
        if any(is_adapter_param(full) for full, _ in owned):  # an adapter's float buffers (LoRA2's rank mask) follow
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != dtype:
                    setattr(module, name, buffer.to(dtype))
        if any(not is_adapter_param(full) for full, _ in owned) and not getattr(module, "_lrr_input_cast", None):
            module.register_forward_pre_hook(_input_caster(dtype), with_kwargs=True)
            module._lrr_input_cast = dtype


def _input_caster(dtype: torch.dtype):
    """A forward pre-hook bringing floating-point tensor arguments to ``dtype`` (outside
    autocast; under autocast the matmuls choose the dtype)."""

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def hook(module, args, kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if not tensors or torch.is_autocast_enabled(tensors[0].device.type):
            return None
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def is_checkpointing(model) -> bool:
    """Whether the model's activation checkpointing is on (transformers 5 renamed the property)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def parameter_dtypes(model: nn.Module, names) -> str | None:
    """The dtype of the named parameters, as a string (``"float32"``; several joined by
    ``"+"``); None when there are none."""
    params = dict(model.named_parameters())
    found = sorted({str(params[n].dtype).removeprefix("torch.") for n in names if n in params})
    return "+".join(found) or None


def optimizer_state_dtypes(optimizer) -> str | None:
    """The dtype(s) of the optimizer's floating-point state tensors (AdamW's moments),
    ``"+"``-joined; None before the first step."""
    found = sorted({str(v.dtype).removeprefix("torch.") for state in optimizer.state.values() for k, v in state.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step"})
    return "+".join(found) or None


def precision_record(model: nn.Module, config: dict, trainable_names, base_names, optimizer=None) -> dict:
    """What report.json records as ``precision``, measured on the trained model: the
    frozen backbone's floating-point dtype(s), the adapters' (and shared maps'), the task
    head's, AdamW's state, the recipe's ``backbone.quantization`` with its defaults (None: not quantized)
    and whether activation checkpointing was on."""
    from lowrank_runner.backbones import quantization_settings
    from lowrank_runner.methods.inject import is_adapter_param

    params = dict(model.named_parameters())
    trainable, own = set(trainable_names), set(base_names)
    frozen = [n for n, p in params.items() if n not in trainable and p.is_floating_point()]
    return {
        "backbone_dtype": parameter_dtypes(model, frozen or list(own)),
        "adapter_dtype": parameter_dtypes(model, [n for n in params if is_adapter_param(n)] or list(own)),
        "head_dtype": parameter_dtypes(model, [n for n in trainable if not is_adapter_param(n) and n not in own]),
        "optimizer_state_dtype": optimizer_state_dtypes(optimizer) if optimizer is not None else None,
        "quantization": quantization_settings(config["backbone"].get("quantization")),  # with its defaults
        "gradient_checkpointing": is_checkpointing(model),
    }
