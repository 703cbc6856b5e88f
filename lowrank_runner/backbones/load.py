"""Loading a backbone through transformers: its config, tokenizer and weights, and its
skeleton on the meta device. Every load passes ``trust_remote_code`` explicitly (so
transformers never prompts on standard input); pickled weights (``pytorch_model.bin``)
are read only with torch's ``weights_only`` loader; whatever the libraries raise for a
broken file is said in one line naming it (:func:`load_errors`)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from lowrank_runner.backbones.quantization import keep_standard_layout, quantized_load_options
from lowrank_runner.backbones.resolve import (CONFIG_FILE, TOKENIZER_CONFIG_FILE, BackboneRef, backbone_file, one_line,
                                              read_config_dict, read_json, refuse_custom_code, resolve, shown_path)
from lowrank_runner.backbones.weights import check_weight_files
from lowrank_runner.errors import BackboneError

def load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, safetensors, torch and huggingface_hub raise for bad model files
    (a config value of the wrong type or size fails deep in a model's ``__init__``: an
    AttributeError for ``dtype: bogus``, a ZeroDivisionError for ``hidden_size: 0``)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, AssertionError,
            RuntimeError, EOFError, ImportError, pickle.UnpicklingError, SafetensorError, StrictDataclassError)


def _from_pretrained(fn, ref: BackboneRef, what: str, **kwargs):
    try:
        return fn(ref.location, revision=ref.revision, trust_remote_code=ref.trust_remote_code, **kwargs)
    except BackboneError:
        raise
    except load_errors() as exc:
        if isinstance(exc, pickle.UnpicklingError):
            raise BackboneError(_pickle_refused(ref, exc)) from None
        if isinstance(exc, json.JSONDecodeError) and ref.local:
            for path in sorted(Path(ref.location).glob("*.json")):
                read_json(path)  # names the broken file with its line and column
        raise BackboneError(f"cannot load the {what} of backbone '{ref.name}' from {ref.describe()}: "
                            f"{type(exc).__name__}: {one_line(exc)}") from None


def _pickle_refused(ref: BackboneRef, exc: BaseException) -> str:
    """torch's weights_only loader refused a pickle: objects other than tensors (code
    could run), or bytes that are no checkpoint at all. Never advise weights_only=False."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    where = f"backbone '{ref.name}': {ref.describe()}: its pytorch_model.bin"
    blocked = next((m.group(1) for m in map(re.compile(r"GLOBAL (\S+)").search, lines) if m), None)
    if blocked is None:
        reason = next((ln for ln in lines if ln.startswith("Unsupported") or "invalid load key" in ln), lines[-1] if lines else "")
        return (f"{where} is not a PyTorch checkpoint torch's weights_only loader can read ({reason}); it may be "
                "corrupted or not a checkpoint: copy or download it again")
    return (f"{where} is a pickle holding more than tensors, and lrr reads pickles only with torch's weights_only "
            f"loader, which refused it (it calls the Python object {blocked}); if you trust the file, convert it to "
            "safetensors once: "
            "python -c \"from transformers import AutoModel; "
            "AutoModel.from_pretrained('DIR', weights_only=False).save_pretrained('DIR', safe_serialization=True)\"")


def load_config(ref: BackboneRef, **kwargs):
    from transformers import AutoConfig

    read_config_dict(ref)
    return _from_pretrained(AutoConfig.from_pretrained, ref, "config.json", **kwargs)


def load_tokenizer(ref: BackboneRef, tokenizer: str | None = None):
    """The backbone's tokenizer (or ``backbone.tokenizer``'s), able to pad batches:
    decoder-only models without a pad token (GPT-2, LLaMA) pad with their EOS token."""
    from transformers import AutoTokenizer

    backbone = ref
    if tokenizer:
        ref = resolve({"name": tokenizer, "trust_remote_code": ref.trust_remote_code}, need_config=False)
    for filename in (TOKENIZER_CONFIG_FILE, CONFIG_FILE):
        path = backbone_file(ref, filename)
        if path is not None:
            refuse_custom_code(ref, read_json(path, shown_path(ref, path)), shown_path(ref, path))
    tok = _from_pretrained(AutoTokenizer.from_pretrained, ref, "tokenizer")
    _check_vocabulary(ref, tok)
    _check_fits_model(backbone, ref, tok)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _check_vocabulary(ref: BackboneRef, tok) -> None:
    """transformers builds a tokenizer of special tokens only when the files are missing:
    every word would become [UNK]. Refuse it."""
    special = set(tok.all_special_tokens)
    if not any(token not in special for token in tok.get_vocab()):
        raise BackboneError(
            f"backbone '{ref.name}': {ref.describe()} holds no tokenizer (no tokenizer.json, tokenizer_config.json or "
            "vocabulary file: its vocabulary would be the special tokens only); copy the tokenizer files next to "
            "config.json or set backbone.tokenizer to where they are"
        )


def _check_fits_model(backbone: BackboneRef, ref: BackboneRef, tok) -> None:
    """A tokenizer with more tokens than the model's embeddings (another model's) would
    index past them in the first batch: refuse it, naming both sizes."""
    path = backbone_file(backbone, CONFIG_FILE)
    vocab = read_json(path, shown_path(backbone, path)).get("vocab_size") if path is not None else None
    if isinstance(vocab, int) and not isinstance(vocab, bool) and len(tok) > vocab:
        raise BackboneError(
            f"backbone '{backbone.name}': the tokenizer of {ref.describe()} has {len(tok)} tokens, the model only {vocab} "
            f"(vocab_size in {shown_path(backbone, path)}): token ids from {vocab} on would index past its embeddings; use "
            "the tokenizer the model was trained with (backbone.tokenizer)"
        )


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)  # float32 | bfloat16 | float16 (schema enum)


def build_empty(model_cls, config, ref: BackboneRef | None = None):
    """The model's skeleton on the meta device: shapes only, no memory, no weights."""
    import torch

    trust = bool(ref and ref.trust_remote_code)
    mapping = getattr(model_cls, "_model_mapping", None)  # an Auto class: the architectures it has
    if mapping is not None and not trust and type(config) not in mapping:
        name = f"backbone '{ref.name}'" if ref else "the backbone"
        raise BackboneError(f"{name} is a '{config.model_type}' model, and transformers has no {model_cls.__name__} "
                            f"for that architecture, which the task needs; choose a backbone of another architecture")
    try:
        with torch.device("meta"):
            return model_cls.from_config(config, trust_remote_code=trust)
    except load_errors() as exc:
        name = f"backbone '{ref.name}': {Path(ref.location) / CONFIG_FILE if ref.local else ref.describe()}" if ref else "config"
        raise BackboneError(f"{name} describes a model that {model_cls.__name__} cannot build "
                            f"({type(exc).__name__}: {one_line(exc)}); fix config.json") from None


def load_model(model_cls, ref: BackboneRef, config, dtype: str = "float32", quantization: dict | None = None):
    """Load pretrained weights; parameters absent from the checkpoint (the new task head)
    are initialised by transformers and reported in ``missing_keys``, tensors whose shape
    differs from the config's model in ``mismatched_keys`` (``(name, checkpoint shape,
    model shape)``; the caller decides). Pickles are read with ``weights_only`` only.
    ``quantization`` (``backbone.quantization``): the linear layers are quantized by
    bitsandbytes while loading (:func:`quantized_load_options`)."""
    if ref.local:
        check_weight_files(ref)
    extra = quantized_load_options(build_empty(model_cls, config, ref), quantization) if quantization else {}
    model, info = _from_pretrained(
        model_cls.from_pretrained, ref, "weights", config=config, dtype=torch_dtype(dtype), output_loading_info=True,
        weights_only=True, ignore_mismatched_sizes=True, **extra,
    )
    if quantization:
        keep_standard_layout(model)
    return model, info


