"""Backbones: resolve ``backbone.name`` (hub id, local directory, ``pkg:``), load the
config, model and tokenizer, and fail fast and clearly when the hub is out of reach.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lowrank_runner.errors import BackboneError
from lowrank_runner.resources import is_pkg_path, resolve_pkg_path


@dataclass(frozen=True)
class BackboneRef:
    name: str  # as written in the recipe
    location: str  # local directory or hub id, as passed to from_pretrained
    local: bool
    revision: str | None = None

    def describe(self) -> str:
        return self.location if self.local else f"{self.location}@{self.revision or 'main'} (hub)"


def resolve(backbone: dict) -> BackboneRef:
    name = backbone["name"]
    if is_pkg_path(name):
        try:
            path = resolve_pkg_path(name)
        except ValueError as exc:
            raise BackboneError(f"backbone.name {name}: {exc}") from None
        return BackboneRef(name, str(path), True)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BackboneError(f"backbone.name {name}: the directory holds no config.json")
        return BackboneRef(name, str(local), True)
    ref = BackboneRef(name, name, False, backbone.get("revision"))
    _ensure_hub_reachable(ref)
    return ref


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


def _ensure_hub_reachable(ref: BackboneRef, timeout: float = 3.0) -> None:
    """Fail in seconds (not after minutes of retries) when the hub cannot be reached."""
    if _in_cache(ref):
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise BackboneError(_hub_help(ref, "HF_HUB_OFFLINE is set and the model is not in the local cache"))
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BackboneError(_hub_help(ref, f"{host} unreachable: {exc}")) from None


def _from_pretrained(fn, ref: BackboneRef, what: str, **kwargs):
    try:
        return fn(ref.location, revision=ref.revision, **kwargs)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot load the {what} of backbone '{ref.name}' from {ref.describe()}: {exc}") from None


def load_config(ref: BackboneRef, **kwargs):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, ref, "config", **kwargs)


def load_tokenizer(ref: BackboneRef, tokenizer: str | None = None):
    """The backbone's tokenizer (or ``backbone.tokenizer``'s), able to pad batches:
    decoder-only models without a pad token (GPT-2, LLaMA) pad with their EOS token."""
    from transformers import AutoTokenizer

    if tokenizer:
        ref = resolve({"name": tokenizer})
    tok = _from_pretrained(AutoTokenizer.from_pretrained, ref, "tokenizer")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)  # float32 | bfloat16 | float16 (schema enum)


def build_empty(model_cls, config):
    """The model's skeleton on the meta device: shapes only, no memory, no weights."""
    import torch

    with torch.device("meta"):
        return model_cls.from_config(config)


def load_model(model_cls, ref: BackboneRef, config, dtype: str = "float32"):
    """Load pretrained weights; parameters absent from the checkpoint (the new task head)
    are initialised by transformers and reported in ``missing``."""
    model, info = _from_pretrained(
        model_cls.from_pretrained, ref, "weights", config=config, dtype=torch_dtype(dtype), output_loading_info=True
    )
    return model, info


def head_parameter_names(model) -> list[str]:
    """Parameters outside the backbone body (``base_model_prefix``): the task head.

    For sequence classification this is ``classifier``/``score`` (and DeBERTa's pooler),
    exactly the modules PEFT keeps trainable with ``modules_to_save``.
    A language model's output projection (``lm_head``, often tied to the input
    embeddings) is pretrained, not new: it is never a head.
    """
    prefix = model.base_model_prefix + "."
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output.parameters()} if output is not None else set()
    return [n for n, p in model.named_parameters() if not n.startswith(prefix) and id(p) not in lm_head]
