"""Quantized bases (``backbone.quantization``): bitsandbytes through transformers'
``BitsAndBytesConfig``, the task head left unquantized, the device checked first; and
the way back for a merge (:func:`dequantize_model`, :func:`restore_source_layers`)."""

from __future__ import annotations

import re

from lowrank_runner.backbones.head import outside_body_parameters
from lowrank_runner.backbones.resolve import one_line
from lowrank_runner.errors import RecipeKeyError

QUANT_KEY = "backbone.quantization"
QUANT_FIX = "pip install 'lowrank-runner[quantization]' (bitsandbytes), or set backbone.quantization: null"


class QuantizationError(RecipeKeyError):
    """bitsandbytes is missing or cannot run the quantized layers on this machine."""

    def __init__(self, message: str):
        super().__init__(f"{QUANT_KEY}: {message}", QUANT_KEY)


def quantization_settings(quant: dict | None) -> dict | None:
    """``backbone.quantization`` with the schema's defaults for its ``bits`` filled in
    (the 4-bit and the 8-bit settings differ, so the schema keeps them per branch)."""
    if not quant:
        return None
    from lowrank_runner.recipe.schema import property_schema

    node = property_schema("backbone", "quantization")
    branch = node["then"] if quant.get("bits") == 8 else node["else"]
    defaults = {k: v["default"] for k, v in branch["properties"].items() if "default" in v}
    return {**defaults, **quant}


def import_bitsandbytes():
    """bitsandbytes, its notes about optional kernels silenced (the CPU backend falls
    back to its own kernels when the ``kernels`` package is absent; LLM.int8() says it
    casts float32 inputs to float16 on every call)."""
    from lowrank_runner.quiet import quiet_bitsandbytes

    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationError(f"bitsandbytes cannot be imported ({one_line(exc)}); {QUANT_FIX}") from None
    return bitsandbytes


def training_device():
    """The device this process trains on (Accelerate's: ``cuda:LOCAL_RANK``, else the CPU):
    a quantized model is placed there while loading, as Accelerate requires."""
    from accelerate import PartialState

    return PartialState().device


def check_quantized_runs(quant: dict, device) -> None:
    """Quantize one small layer and run it forward on ``device``: bitsandbytes without a
    backend for this device (an old release on a machine without a CUDA GPU) fails here,
    before any weight is read, with the recipe key and the fix."""
    import torch

    bnb = import_bitsandbytes()
    q = quantization_settings(quant)
    try:
        if q["bits"] == 8:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=float(q["threshold"]))
            dtype = torch.float16
        else:
            dtype = getattr(torch, q["compute_dtype"])
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=dtype, quant_type=q["type"],
                                      compress_statistics=q["double_quant"])
        layer = layer.to(device)
        out = layer(torch.ones(2, 64, device=device, dtype=dtype))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
    except Exception as exc:  # noqa: BLE001 - any failure of the backend means: cannot run here
        raise QuantizationError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {q['bits']}-bit layers on {device} "
            f"({type(exc).__name__}: {one_line(exc, 200)}); use a CUDA GPU, or a bitsandbytes with a backend for this "
            "device (recent releases have a CPU backend: pip install -U bitsandbytes), or set "
            "backbone.quantization: null") from None


def quantized_skip_modules(skeleton) -> list[str]:
    """Modules left unquantized: the task head (new and trained: it stays a float
    ``nn.Linear``, as PEFT's ``modules_to_save`` keeps it) and what transformers skips by
    default (the output embeddings ``lm_head``, tied weights, the last module). Passing
    ``llm_int8_skip_modules`` replaces transformers' defaults, so both are named here,
    as regular expressions anchored at module boundaries (transformers' matching).
    ``skeleton``: the model on the meta device."""
    from transformers.quantizers.base import get_keys_to_not_convert

    head = {name.rpartition(".")[0] for name in outside_body_parameters(skeleton)}
    names = sorted((head - {""}) | set(get_keys_to_not_convert(skeleton)))
    return [re.escape(name) for name in names]


def quantized_load_options(skeleton, quant: dict) -> dict:
    """``from_pretrained`` options quantizing the backbone with bitsandbytes as it loads
    (transformers' ``BitsAndBytesConfig``), placed on the training device; ``skeleton``:
    the model on the meta device (what stays unquantized: :func:`quantized_skip_modules`)."""
    import torch
    from transformers import BitsAndBytesConfig

    q = quantization_settings(quant)
    device = training_device()
    check_quantized_runs(q, device)
    skip = quantized_skip_modules(skeleton)
    if q["bits"] == 8:
        bnb_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(q["threshold"]),
                                        llm_int8_skip_modules=skip)
    else:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["type"],
                                        bnb_4bit_use_double_quant=q["double_quant"],
                                        bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]),
                                        llm_int8_skip_modules=skip)
    return {"quantization_config": bnb_config, "device_map": {"": device}}


def keep_standard_layout(model) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight in place, into a layout of its
    own, on the first forward without gradients in eval mode (on CPUs with AVX512-BF16):
    that fails for layers whose output size is not a multiple of 32 and leaves a weight
    that dequantizes and saves only through the inverse repacking. A model that is
    evaluated between training steps, dequantized (CondLoRA's W0, the merge export) and
    compared keeps the standard layout: the repacking is switched off (it only speeds up
    CPU inference)."""
    for module in model.modules():
        if is_quantized_layer(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized_layer(module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (an ``nn.Linear`` subclass)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def dequantize_model(model, dtype: str = "float32"):
    """Replace every bitsandbytes layer of ``model`` (adapted or not) by a plain
    ``nn.Linear`` holding its dequantized weight in ``dtype`` (transformers'
    ``dequantize``, which also drops the quantization config, so ``save_pretrained``
    writes a plain checkpoint). The weights are those the adapter was trained against."""
    import torch

    if getattr(model, "hf_quantizer", None) is None:
        return model
    import_bitsandbytes()
    from lowrank_runner.quiet import quiet_libraries

    quiet_libraries()  # transformers notes the dtype it dequantizes to
    layers = {name: getattr(module, "source_cls", None) for name, module in model.named_modules()
              if is_quantized_layer(module)}
    model = model.dequantize(dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, source_cls in layers.items():
            module = model.get_submodule(name)
            if module.bias is not None:  # bitsandbytes casts a 4-bit layer's bias to its compute dtype in its forward
                module.bias.data = module.bias.data.to(getattr(torch, dtype))
            module.lrr_source_cls = source_cls  # GPT-2's Conv1D: restored after the merge (restore_source_layers)
    return model


def restore_source_layers(model):
    """Turn the ``nn.Linear`` layers :func:`dequantize_model` made of quantized GPT-2
    ``Conv1D`` layers (transformers quantizes those as ``out x in`` linear layers) back
    into ``Conv1D`` (weight stored ``in x out``), so the model saves the checkpoint layout
    its class loads. Call it after merging: the adapters were built on the linear form."""
    import torch
    from torch import nn

    for name, module in list(model.named_modules()):
        source_cls = getattr(module, "lrr_source_cls", None)
        if type(module) is not nn.Linear or source_cls is None or source_cls is nn.Linear:
            continue
        conv = source_cls(module.out_features, module.in_features)  # Conv1D(nf, nx)
        with torch.no_grad():
            conv.weight = nn.Parameter(module.weight.T.contiguous(), requires_grad=False)
            if module.bias is not None:
                conv.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, conv.to(module.weight.device))
    return model


