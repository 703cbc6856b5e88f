"""Backbones: resolve ``backbone.name`` (hub id, local directory, ``pkg:``), load the
config, model and tokenizer, and fail fast and clearly when the hub is out of reach.

Model files are untrusted input: nothing from a model directory runs unless the recipe
opts in with ``backbone.trust_remote_code: true``. A ``config.json`` or
``tokenizer_config.json`` with ``auto_map`` (custom modeling code) is refused before
transformers sees it, every load passes ``trust_remote_code`` explicitly (so transformers
never prompts on standard input), and pickled weights (``pytorch_model.bin``) are read
only with torch's ``weights_only`` loader. Broken files (JSON, safetensors headers,
shards, shapes, a missing tokenizer) are reported naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lowrank_runner.errors import BackboneError, RecipeKeyError
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path

TRUST_KEY = "backbone.trust_remote_code"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class BackboneRef:
    name: str  # as written in the recipe
    location: str  # local directory or hub id, as passed to from_pretrained
    local: bool
    revision: str | None = None
    trust_remote_code: bool = False  # backbone.trust_remote_code: run the directory's own Python code

    def describe(self) -> str:
        return self.location if self.local else f"{self.location}@{self.revision or 'main'} (hub)"


def resolve(backbone: dict, need_config: bool = True) -> BackboneRef:
    """Where ``backbone.name`` points. ``need_config=False``: a tokenizer-only directory."""
    name = backbone["name"]
    trust = bool(backbone.get("trust_remote_code", False))
    if is_pkg_path(name):
        try:
            path = resolve_pkg_path(name)
        except ValueError as exc:
            raise BackboneError(f"backbone.name {name}: {exc}") from None
        return _local_ref(name, path, trust, need_config)
    local = expand_user(name)
    if local.exists() or not _is_hub_id(name):
        return _local_ref(name, local, trust, need_config)
    ref = BackboneRef(name, name, False, backbone.get("revision"), trust)
    _ensure_hub_reachable(ref)
    return ref


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local_ref(name: str, path: Path, trust: bool, need_config: bool) -> BackboneRef:
    if not path.exists():
        raise BackboneError(f"backbone.name {name}: no such directory (nor a Hugging Face hub id such as "
                            "microsoft/deberta-v3-base); point it at a model directory holding config.json")
    if not path.is_dir():
        raise BackboneError(f"backbone.name {name}: {path} is a file, not a directory; point it at the directory "
                            "holding config.json, the weights and the tokenizer")
    if need_config and not (path / CONFIG_FILE).is_file():
        what = "is empty" if not any(path.iterdir()) else "holds no config.json"
        raise BackboneError(f"backbone.name {name}: the directory {what}; point it at a model directory "
                            "(config.json, model.safetensors, tokenizer files)")
    return BackboneRef(name, str(path), True, None, trust)


def _hub_help(ref: BackboneRef, why: str) -> str:
    return (
        f"backbone '{ref.name}' is not a local directory and the Hugging Face hub cannot be used ({why}). "
        f"Download it where there is a network (e.g. `hf download {ref.name} --local-dir models/{ref.name.split('/')[-1]}`) "
        f"and point the recipe at that directory: --set backbone.name=models/{ref.name.split('/')[-1]}"
    )


def _in_cache(ref: BackboneRef) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.location, "config.json", revision=ref.revision)
    return isinstance(found, str)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or its endpoint does not
    answer within ``timeout`` seconds), or None: a check of seconds, before a library
    spends minutes retrying (models here; datasets in tasks/base.py)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} unreachable: {exc}"


def _ensure_hub_reachable(ref: BackboneRef, timeout: float = 3.0) -> None:
    """Fail in seconds (not after minutes of retries) when the hub cannot be reached."""
    if _in_cache(ref):
        return
    why = hub_unreachable(timeout)
    if why is not None:
        if why.startswith("HF_HUB_OFFLINE"):
            why += " and the model is not in the local cache"
        raise BackboneError(_hub_help(ref, why))


# --- reading the directory's JSON files ourselves (no code, positions in messages) -----------

def _file(ref: BackboneRef, filename: str) -> Path | None:
    """The backbone's ``filename`` on disk (a hub file from the cache or the hub), None if absent."""
    if ref.local:
        path = Path(ref.location) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(ref.location, filename, revision=ref.revision,
                            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except OSError as exc:
        raise BackboneError(f"backbone '{ref.name}': cannot fetch {filename} from {ref.describe()}: {_one_line(exc)}") from None
    return Path(found) if found else None


def _where(ref: BackboneRef, path: Path) -> str:
    return str(path) if ref.local else f"{ref.describe()}: {path.name}"


def read_json(path: Path, where: str | None = None) -> dict:
    """A JSON object from ``path``; a clear error with line and column otherwise."""
    where = where or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BackboneError(f"{where}: not UTF-8 text (is it a JSON file?); restore it from the model's source") from None
    except OSError as exc:
        raise BackboneError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{where}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); "
                            "fix the file or restore it from the model's source") from None
    if not isinstance(data, dict):
        raise BackboneError(f"{where}: expected a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def read_config_dict(ref: BackboneRef) -> dict:
    """``config.json`` as a dict, checked: no custom code unless trusted, a known ``model_type``."""
    path = _file(ref, CONFIG_FILE)
    if path is None:
        raise BackboneError(f"backbone '{ref.name}': {ref.describe()} has no {CONFIG_FILE}"
                            f"{'' if ref.local else ' (or it could not be downloaded)'}")
    where = _where(ref, path)
    data = read_json(path, where)
    _refuse_custom_code(ref, data, where)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BackboneError(f"{where}: no model_type (e.g. \"model_type\": \"bert\"); transformers needs it to "
                            "know the architecture: restore config.json from the model's source")
    if not (ref.trust_remote_code and "auto_map" in data) and not _known_model_type(model_type):
        import transformers

        raise BackboneError(f"{where}: model_type '{model_type}' is not an architecture transformers "
                            f"{transformers.__version__} knows; upgrade transformers or fix config.json")
    return data


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _refuse_custom_code(ref: BackboneRef, data: dict, where: str) -> None:
    """``auto_map`` names Python files of the model directory that transformers would
    import: refused unless the recipe sets backbone.trust_remote_code: true."""
    auto_map = data.get("auto_map")
    if not auto_map or ref.trust_remote_code:
        return
    modules = sorted({name.rsplit(".", 1)[0].split("--")[-1] + ".py" for name in _strings(auto_map)})
    model_type = data.get("model_type")
    builtin = (f", or delete auto_map from {Path(where).name} to use transformers' own '{model_type}' code"
               if isinstance(model_type, str) and _known_model_type(model_type) else "")
    raise BackboneError(
        f"{where}: auto_map asks to run Python code from the model ({', '.join(modules) or 'custom code'}); lrr runs no "
        f"code from model files unless the recipe sets {TRUST_KEY}: true (read that code first){builtin}"
    )


def _strings(value) -> list[str]:
    """Every string in a nested JSON value (auto_map: a mapping, or lists of class paths)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


# --- loading through transformers -------------------------------------------------------------

def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, safetensors, torch and huggingface_hub raise for bad model files
    (a config value of the wrong type or size fails deep in a model's ``__init__``: an
    AttributeError for ``dtype: bogus``, a ZeroDivisionError for ``hidden_size: 0``)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, AssertionError,
            RuntimeError, EOFError, ImportError, pickle.UnpicklingError, SafetensorError, StrictDataclassError)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _from_pretrained(fn, ref: BackboneRef, what: str, **kwargs):
    try:
        return fn(ref.location, revision=ref.revision, trust_remote_code=ref.trust_remote_code, **kwargs)
    except BackboneError:
        raise
    except _load_errors() as exc:
        if isinstance(exc, pickle.UnpicklingError):
            raise BackboneError(_pickle_refused(ref, exc)) from None
        if isinstance(exc, json.JSONDecodeError) and ref.local:
            for path in sorted(Path(ref.location).glob("*.json")):
                read_json(path)  # names the broken file with its line and column
        raise BackboneError(f"cannot load the {what} of backbone '{ref.name}' from {ref.describe()}: "
                            f"{type(exc).__name__}: {_one_line(exc)}") from None


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
        path = _file(ref, filename)
        if path is not None:
            _refuse_custom_code(ref, read_json(path, _where(ref, path)), _where(ref, path))
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
    path = _file(backbone, CONFIG_FILE)
    vocab = read_json(path, _where(backbone, path)).get("vocab_size") if path is not None else None
    if isinstance(vocab, int) and not isinstance(vocab, bool) and len(tok) > vocab:
        raise BackboneError(
            f"backbone '{backbone.name}': the tokenizer of {ref.describe()} has {len(tok)} tokens, the model only {vocab} "
            f"(vocab_size in {_where(backbone, path)}): token ids from {vocab} on would index past its embeddings; use "
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
    except _load_errors() as exc:
        name = f"backbone '{ref.name}': {Path(ref.location) / CONFIG_FILE if ref.local else ref.describe()}" if ref else "config"
        raise BackboneError(f"{name} describes a model that {model_cls.__name__} cannot build "
                            f"({type(exc).__name__}: {_one_line(exc)}); fix config.json") from None


def load_model(model_cls, ref: BackboneRef, config, dtype: str = "float32", quantization: dict | None = None):
    """Load pretrained weights; parameters absent from the checkpoint (the new task head)
    are initialised by transformers and reported in ``missing_keys``, tensors whose shape
    differs from the config's model in ``mismatched_keys`` (``(name, checkpoint shape,
    model shape)``; the caller decides). Pickles are read with ``weights_only`` only.
    ``quantization`` (``backbone.quantization``): the linear layers are quantized by
    bitsandbytes while loading (:func:`quantized_load_options`)."""
    if ref.local:
        check_weight_files(ref)
    extra = quantized_load_options(model_cls, ref, config, quantization) if quantization else {}
    model, info = _from_pretrained(
        model_cls.from_pretrained, ref, "weights", config=config, dtype=torch_dtype(dtype), output_loading_info=True,
        weights_only=True, ignore_mismatched_sizes=True, **extra,
    )
    if quantization:
        keep_standard_layout(model)
    return model, info


# --- quantized bases (backbone.quantization, bitsandbytes) -------------------------------------

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
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationError(f"bitsandbytes cannot be imported ({_one_line(exc)}); {QUANT_FIX}") from None
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
            f"({type(exc).__name__}: {_one_line(exc, 200)}); use a CUDA GPU, or a bitsandbytes with a backend for this "
            "device (recent releases have a CPU backend: pip install -U bitsandbytes), or set "
            "backbone.quantization: null") from None


def quantized_skip_modules(model_cls, ref: BackboneRef, config) -> list[str]:
    """Modules left unquantized: the task head (new and trained: it stays a float
    ``nn.Linear``, as PEFT's ``modules_to_save`` keeps it) and what transformers skips by
    default (the output embeddings ``lm_head``, tied weights, the last module). Passing
    ``llm_int8_skip_modules`` replaces transformers' defaults, so both are named here,
    as regular expressions anchored at module boundaries (transformers' matching)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skeleton = build_empty(model_cls, config, ref)
    head = {name.rpartition(".")[0] for name in head_parameter_names(skeleton)}
    names = sorted((head - {""}) | set(get_keys_to_not_convert(skeleton)))
    return [re.escape(name) for name in names]


def quantized_load_options(model_cls, ref: BackboneRef, config, quant: dict) -> dict:
    """``from_pretrained`` options quantizing the backbone with bitsandbytes as it loads
    (transformers' ``BitsAndBytesConfig``), placed on the training device."""
    import torch
    from transformers import BitsAndBytesConfig

    q = quantization_settings(quant)
    device = training_device()
    check_quantized_runs(q, device)
    skip = quantized_skip_modules(model_cls, ref, config)
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


def check_weight_files(ref: BackboneRef) -> None:
    """A local directory's weights are there and whole: safetensors headers, shards named
    by an index, PyTorch zip archives (a truncated download is named here, not deep inside
    transformers). Safetensors are preferred, as transformers does."""
    directory = Path(ref.location)
    for single, index, check in (("model.safetensors", "model.safetensors.index.json", _check_safetensors),
                                 ("pytorch_model.bin", "pytorch_model.bin.index.json", _check_torch_archive)):
        if (directory / single).is_file():
            files = [directory / single]
        elif (directory / index).is_file():
            files = _shards(directory / index)
        else:
            continue
        for path in files:
            check(path)
        return
    raise BackboneError(
        f"backbone '{ref.name}': {directory} holds no weights (model.safetensors, or model.safetensors.index.json "
        "with its shards); copy them next to config.json (lrr inspect needs only config.json)"
    )


def _shards(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BackboneError(f"{index}: no weight_map (tensor name -> shard file); restore it from the model's source")
    files = [index.parent / str(f) for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise BackboneError(f"{index} names shards that are not in {index.parent}: {', '.join(absent[:4])}"
                            f"{' ...' if len(absent) > 4 else ''}; copy or download them again")
    return files


def _damaged(path: Path, why: str) -> BackboneError:
    return BackboneError(f"{path}: {why}; it may be truncated or corrupted: copy or download it again")


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, f"not a readable safetensors file ({_one_line(exc)})") from None


def _check_torch_archive(path: Path) -> None:
    """``torch.save`` writes a zip archive (older PyTorch a bare pickle, left to the
    weights_only loader); one whose central directory is missing was cut short."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise _damaged(path, "empty")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise _damaged(path, "an incomplete PyTorch zip archive")


def head_parameter_names(model) -> list[str]:
    """Parameters outside the backbone body (``base_model_prefix``): the task head.

    For sequence classification this is ``classifier``/``score`` (and DeBERTa's pooler),
    exactly the modules PEFT keeps trainable with ``modules_to_save``.
    A language model's output projection (``lm_head``, often tied to the input
    embeddings) is pretrained, not new: it is never a head; nor are adapter parameters
    registered at the top (CondLoRA's shared ``lrr_shared``).
    """
    from lowrank_runner.methods.inject import is_adapter_param

    prefix = model.base_model_prefix + "."
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output.parameters()} if output is not None else set()
    return [n for n, p in model.named_parameters()
            if not n.startswith(prefix) and id(p) not in lm_head and not is_adapter_param(n)]  # CondLoRA's lrr_shared
