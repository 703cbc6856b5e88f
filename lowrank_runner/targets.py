"""Target-module symbols and their resolution to module paths, per backbone family.

The symbols are the seed papers' names for a transformer block's weight matrices:

====== ======================== =========================== ============== ==================
symbol role                     BERT / RoBERTa              DeBERTa-v2/v3  GPT-2 / LLaMA-like
====== ======================== =========================== ============== ==================
Wq     attention query          attention.self.query        query_proj     c_attn[q] / q_proj
Wk     attention key            attention.self.key          key_proj       c_attn[k] / k_proj
Wv     attention value          attention.self.value        value_proj     c_attn[v] / v_proj
Wa     attention output         attention.output.dense      (same)         attn.c_proj / o_proj
Wm     MLP up (intermediate)    intermediate.dense          (same)         mlp.c_fc / up_proj+gate_proj
Wo     MLP down (layer output)  layer.N.output.dense        (same)         mlp.c_proj / down_proj
Wf     MLP weight (MTLoRA GPT-2)                                           mlp.c_fc
====== ======================== =========================== ============== ==================

GPT-2's query, key and value live in one fused ``Conv1D`` (``c_attn``); the symbols
select *groups* of its output. This module is torch-free: it works on module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYMBOLS = ("Wq", "Wk", "Wv", "Wa", "Wm", "Wo", "Wf")
SYMBOL_ROLES = {"Wq": "attention query", "Wk": "attention key", "Wv": "attention value",
                "Wa": "attention output projection", "Wm": "MLP up projection",
                "Wo": "FFN output projection, MLP down", "Wf": "MLP weight, GPT-2's c_fc"}
SYMBOL_RE = re.compile(r"^W[A-Za-z]{1,2}$")
FUSED_GROUPS = ("q", "k", "v")

_ENCODER = {
    "Wq": [r"attention\.self\.query"],
    "Wk": [r"attention\.self\.key"],
    "Wv": [r"attention\.self\.value"],
    "Wa": [r"attention\.output\.dense"],
    "Wm": [r"intermediate\.dense"],
    "Wo": [r"layer\.\d+\.output\.dense"],
}
_DEBERTA = dict(_ENCODER, Wq=[r"attention\.self\.query_proj"], Wk=[r"attention\.self\.key_proj"], Wv=[r"attention\.self\.value_proj"])
_GPT2 = {
    "Wq": [r"attn\.c_attn#q"],
    "Wk": [r"attn\.c_attn#k"],
    "Wv": [r"attn\.c_attn#v"],
    "Wa": [r"attn\.c_proj"],
    "Wm": [r"mlp\.c_fc"],
    "Wo": [r"mlp\.c_proj"],
    "Wf": [r"mlp\.c_fc"],
}
_LLAMA = {
    "Wq": [r"self_attn\.q_proj"],
    "Wk": [r"self_attn\.k_proj"],
    "Wv": [r"self_attn\.v_proj"],
    "Wa": [r"self_attn\.o_proj"],
    "Wm": [r"mlp\.up_proj", r"mlp\.gate_proj"],
    "Wo": [r"mlp\.down_proj"],
}

FAMILIES: dict[str, dict[str, list[str]]] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "electra": _ENCODER,
    "deberta-v2": _DEBERTA,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


@dataclass(frozen=True)
class TargetModule:
    """One module to adapt. ``groups`` selects outputs of a fused QKV projection."""

    path: str
    symbols: tuple[str, ...]
    groups: tuple[str, ...] | None = None


class TargetError(ValueError):
    pass


def is_symbol_like(target: str) -> bool:
    return bool(SYMBOL_RE.match(target))


def family_of(model_type: str) -> dict[str, list[str]] | None:
    return FAMILIES.get(model_type)


def _pattern_regex(target: str) -> re.Pattern:
    if target.startswith("re:"):
        return re.compile(target[3:])
    return re.compile(r"(^|\.)" + re.escape(target) + r"$")


def resolve_targets(targets: list[str], model_type: str, module_names: list[str],
                    not_adaptable: dict[str, str] | None = None) -> list[TargetModule]:
    """Map symbols and patterns to module paths (in model order), merging fused groups.

    ``not_adaptable``: module path -> class name of the modules no adapter can wrap
    (anything but a linear layer: embeddings, norms, whole blocks, the model itself); a
    target matching one is an error naming them, and a target matching nothing lists
    the modules that can be adapted."""
    family = family_of(model_type)
    found: dict[str, dict] = {}
    for target in targets:
        if target in SYMBOLS:
            if family is None:
                raise TargetError(
                    f"target symbol {target} is not defined for model_type '{model_type}' "
                    f"(families with symbols: {', '.join(sorted(FAMILIES))}); write explicit module patterns instead"
                    f"{_adaptable_hint(module_names, not_adaptable)}"
                )
            if target not in family:
                raise TargetError(
                    f"target symbol {target} is not defined for model_type '{model_type}' "
                    f"(defined: {', '.join(family)})"
                )
            matched = []
            for pattern in family[target]:
                base, _, group = pattern.partition("#")
                rx = re.compile(r"(^|\.)" + base + r"$")
                for name in module_names:
                    if rx.search(name):
                        entry = found.setdefault(name, {"symbols": [], "groups": set(), "fused": bool(group)})
                        entry["symbols"].append(target)
                        if group:
                            entry["groups"].add(group)
                        matched.append(name)
            if not matched:
                raise TargetError(f"target symbol {target} matched no module of this {model_type} model"
                                  f"{_adaptable_hint(module_names, not_adaptable)}")
            _refuse_unadaptable(f"target symbol {target}", matched, not_adaptable)
        else:
            try:
                rx = _pattern_regex(target)
            except re.error as exc:
                raise TargetError(f"target pattern '{target}' is not a valid regular expression: {exc}") from None
            names = [n for n in module_names if rx.search(n)]
            if not names:
                raise TargetError(f"target pattern '{target}' matched no module of this {model_type} model"
                                  f"{_adaptable_hint(module_names, not_adaptable)}")
            _refuse_unadaptable(f"target pattern '{target}'", names, not_adaptable)
            for name in names:
                entry = found.setdefault(name, {"symbols": [], "groups": set(), "fused": False})
                entry["symbols"].append(target)
                entry["fused"] = False  # an explicit pattern adapts the whole module
    order = {name: i for i, name in enumerate(module_names)}
    out = []
    for name in sorted(found, key=order.__getitem__):
        entry = found[name]
        groups = None
        if entry["fused"]:
            groups = tuple(g for g in FUSED_GROUPS if g in entry["groups"])
        out.append(TargetModule(name, tuple(dict.fromkeys(entry["symbols"])), groups))
    return out


def _refuse_unadaptable(what: str, names: list[str], not_adaptable: dict[str, str] | None) -> None:
    bad = [n for n in names if not_adaptable and n in not_adaptable]
    if not bad:
        return
    shown = ", ".join(f"{n or 'the whole model'} ({not_adaptable[n]})" for n in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    raise TargetError(
        f"{what} matches {len(bad)} module(s) that cannot be adapted: {shown}{more}; only linear layers (nn.Linear, "
        "GPT-2's Conv1D) can: narrow the target to them, e.g. re:\\.attention\\.self\\.(query|value)$"
    )


def _adaptable_hint(module_names: list[str], not_adaptable: dict[str, str] | None) -> str:
    """``; its adaptable modules: attention.self.query, ...`` (per-layer names without
    their layer prefix), or nothing when the module types are unknown."""
    if not_adaptable is None:
        return ""
    kinds = [re.split(r"\.\d+\.", n)[-1] for n in module_names if n not in not_adaptable]
    kinds = list(dict.fromkeys(kinds))
    if not kinds:
        return "; this model has no linear layer to adapt"
    return f"; its adaptable modules: {', '.join(kinds[:10])}{' ...' if len(kinds) > 10 else ''}"
