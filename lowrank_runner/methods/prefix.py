"""Prefix-tuning (Li & Liang, 2021), the third kind of method: trained keys and values
that every attention layer attends to before the input, the backbone left untouched.

Li & Liang §4.2: the activations of the first ``P`` positions are free parameters,
``h_i = P_θ[i, :]`` for ``i`` in the prefix, and every later position attends to them.
In a transformer this means, per layer ``l``, ``P`` key and ``P`` value vectors
prepended to the layer's own (``K_l = [P_K,l ; W_k x]``, ``V_l = [P_V,l ; W_v x]``).
§4.3 (eq. 5): trained directly ``P_θ`` is unstable, so it is reparameterised as
``P_θ[i, :] = MLP_θ(P'_θ[i, :])`` with a smaller ``P'_θ`` (here ``P × d``, ``d`` the hidden
size, as in the authors' code) and an MLP ``d → reparameterization_hidden → L·2·d``
(tanh; 512 hidden units, the authors' table-to-text setting); "once training is
complete, these reparametrization parameters can be dropped, and only the prefix
(``P_θ``) needs to be saved": a finished run saves the ``L × 2 × P × d`` table alone
(:meth:`PrefixEncoder.compact_state`), checkpoints keep ``P'`` and the MLP (exact
``--resume``).

The prefix reaches the layers through transformers' cache, as the key/value states of
``P`` positions before the input: a forward pre-hook on the base model puts them in a
``DynamicCache`` (a new one per forward; or the cache ``generate`` passes, filled at its
first step, so greedy and beam search see the prefix and reorder it with the beams),
prepends ``P`` ones to the attention mask and shifts given ``position_ids`` by ``P``
(the input's positions start after the prefix, as a cache of ``P`` positions makes the
models count them). Families whose attention reads such a cache: BERT, RoBERTa, GPT-2,
LLaMA; others (DeBERTa-v2: no cache) are refused at ``method.name``. No ``ΔW`` exists
(``"x-kind": "prompt"``, prompt learning as PEFT calls it): ``lrr export --merge``/``--peft`` refuse, the bundle and
``load_adapted`` serve it. Deviations (no initialisation from real words' activations;
dropout) are in docs/methods.md.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod

FAMILIES = ("bert", "roberta", "gpt2", "llama")  # attention that reads a key/value cache in encoder and decoder use


def attention_shape(config) -> tuple[int, int, int]:
    """``(layers, key/value heads, head size)`` of a BERT/RoBERTa/GPT-2/LLaMA config."""
    heads = config.num_attention_heads
    size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, size


class PrefixEncoder(Adapter):
    """The prefix table ``P_θ`` (``layers × 2 × P × heads × head size``): trained directly,
    or computed by ``MLP(P')`` (eq. 5) until :meth:`load_compact_state` fixes it."""

    reads_w0 = False
    acts_on = "model"  # no layer: the whole model, through its attention cache
    mergeable = False

    def __init__(self, config, length: int, hidden: int | None, dropout: float, device=None):
        super().__init__()
        self.shape = (length, *attention_shape(config))
        layers, heads, size = self.shape[1:]
        width = layers * 2 * heads * size
        if hidden:
            self.embedding = nn.Parameter(torch.empty(length, config.hidden_size, device=device))
            self.mlp = nn.Sequential(nn.Linear(config.hidden_size, hidden, device=device), nn.Tanh(),
                                     nn.Linear(hidden, width, device=device))
        else:
            self.table = nn.Parameter(torch.empty(length, width, device=device))
        for p in (self.embedding,) if hidden else (self.table,):
            if p.device.type != "meta":
                nn.init.normal_(p)  # nn.Embedding's N(0, 1), as the authors' prefix embedding
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def keys_values(self) -> torch.Tensor:
        """``P_θ`` as ``(layers, 2, heads, P, head size)``."""
        flat = self.mlp(self.embedding) if hasattr(self, "mlp") else self.table
        length, layers, heads, size = self.shape
        return self.dropout(flat).view(length, layers, 2, heads, size).permute(1, 2, 3, 0, 4)

    def compact_state(self) -> dict[str, torch.Tensor] | None:
        """The prefix alone, the reparameterisation dropped (what a finished run saves)."""
        if not hasattr(self, "mlp"):
            return None
        with torch.no_grad():
            return {"table": self.mlp(self.embedding).detach()}

    def is_compact(self, state: dict[str, torch.Tensor]) -> bool:
        return hasattr(self, "mlp") and set(state) == {"table"}

    def load_compact_state(self, state: dict[str, torch.Tensor]) -> None:
        del self.mlp, self.embedding
        self.table = nn.Parameter(state["table"].to(torch.float32))

    def release(self) -> None:
        """Take the forward hook off the base model (``remove_adapters``)."""
        if getattr(self, "hook", None) is not None:
            self.hook.remove()
            self.hook = None

    def fill(self, cache, batch: int, dtype: torch.dtype) -> None:
        """Put the prefix in ``cache`` as the key/value states of its first ``P`` positions."""
        table = self.keys_values().to(dtype)
        for layer in range(table.shape[0]):
            keys, values = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in table[layer])
            cache.update(keys, values, layer)


class Prefix(AdapterMethod):
    """Prefix-tuning: no targeted layers; the prefix encoder is registered as the model's
    ``lrr_shared`` module and fed to every attention layer by a forward pre-hook."""

    name = "prefix"

    def attach(self, model: nn.Module) -> nn.Module:
        config = model.config
        if config.model_type not in FAMILIES:
            raise ValueError(f"prefix cannot reach the attention of {config.model_type} models (it takes no key/value "
                             f"cache); prefix works with {', '.join(FAMILIES)}; choose another method for this backbone")
        p = self.params
        device = next(model.parameters()).device
        encoder = PrefixEncoder(config, p["prefix_length"], p["reparameterization_hidden"] if p["reparameterization"]
                                else None, p["dropout"], device=device)
        base = model.base_model
        names = list(inspect.signature(base.forward).parameters)
        encoder.hook = base.register_forward_pre_hook(
            lambda module, args, kwargs: _with_prefix(module, encoder, names, args, kwargs), with_kwargs=True)
        return encoder

    def extra_positions(self) -> int:
        return self.params["prefix_length"]


def _with_prefix(base: nn.Module, encoder: PrefixEncoder, names: list[str], args: tuple, kwargs: dict):
    """The base model's arguments with the prefix in its cache and attention mask."""
    from transformers import DynamicCache

    kwargs = {**dict(zip(names, args)), **kwargs}
    cache_key = "cache" if "cache" in names else "past_key_values"
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch, length = inputs.shape[:2]
    device, prefix = inputs.device, encoder.shape[0]
    cache = kwargs.get(cache_key)
    if cache is None:
        cache = kwargs[cache_key] = DynamicCache()
    if cache.get_seq_length() == 0:  # a new forward, or generate's first step: its cache starts empty
        autocast = torch.is_autocast_enabled(device.type)
        encoder.fill(cache, batch, torch.get_autocast_dtype(device.type) if autocast else base.dtype)
    mask = kwargs.get("attention_mask")
    if mask is None:  # every position seen: the cache's (generate's later steps) and the input's
        mask = torch.ones(batch, cache.get_seq_length() - prefix + length, dtype=torch.long, device=device)
    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, prefix), mask], dim=-1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + prefix
    return (), kwargs
