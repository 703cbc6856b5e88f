"""Learning-rate guidance: is the planned schedule's learning rate far below what the
method needs to learn at this budget, or its peak above what the method was measured to
train at? (torch-free; ``lrr inspect``, ``lrr run`` and ``lrr validate`` warn.)

The budget is the *integrated learning rate*, the sum of the scheduler's learning rate
over the planned optimizer steps (plan/schedule.py: :func:`integrated_learning_rate`):
Adam moves each parameter by about the learning rate per step, so a method whose update
starts small (LoRA2's product of five factors, TriAdaptLoRA's Gaussian start) needs a
large enough sum before its update reaches a useful size, whatever the split between
steps and peak. Each method schema may declare its rules (measured, docs/benchmarks.md,
"Learning-rate guidance"):

``"x-lr-guidance": [{"when": {"init": "gaussian"}, "min_integrated_lr": 0.6,
"evidence": "...", "fix": "..."}]``

A rule may instead set a ceiling on the peak learning rate, above which the method
diverged or collapsed in the measurements (it needs no planned steps):

``{"max_learning_rate": 3e-3, "evidence": "...", "fix": "..."}``

``when`` is matched against the method's resolved parameters (absent or empty: always).
"""

from __future__ import annotations

import json

import math
from functools import lru_cache

import jsonschema

from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.plan.schedule import StepPlan, integrated_learning_rate

LR_KEY = "training.learning_rate"
DOCS = 'docs/benchmarks.md, "Learning-rate guidance"'
RULES_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["evidence", "fix"],
        "oneOf": [{"required": ["min_integrated_lr"]}, {"required": ["max_learning_rate"]}],  # a floor or a ceiling
        "additionalProperties": False,
        "properties": {
            "when": {"type": "object"},
            "min_integrated_lr": {"type": "number", "exclusiveMinimum": 0},
            "max_learning_rate": {"type": "number", "exclusiveMinimum": 0},
            "evidence": {"type": "string", "minLength": 1},
            "fix": {"type": "string", "minLength": 1},
        },
    },
}


def guidance_rules(method_name: str) -> list[dict]:
    """The method schema's ``x-lr-guidance`` rules ([] when it declares none); a
    malformed list (a plugin's) raises :class:`ValueError` naming the method."""
    schema = get_method_spec(method_name).schema
    checked = _CHECKED.get(method_name)
    if checked is not None and checked[0] is schema:  # checked once per schema (a plugin may replace it)
        return checked[1]
    rules = schema.get("x-lr-guidance", [])
    error = jsonschema.exceptions.best_match(_rules_validator().iter_errors(rules))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise ValueError(f"method '{method_name}': x-lr-guidance{where}: {error.message}")
    _CHECKED[method_name] = (schema, rules)
    return rules


_CHECKED: dict[str, tuple[dict, list]] = {}


@lru_cache(maxsize=1)
def _rules_validator() -> jsonschema.protocols.Validator:
    """A validator of :data:`RULES_SCHEMA`, built once."""
    return jsonschema.Draft202012Validator(RULES_SCHEMA)


def condition(rule: dict) -> str:
    """A rule's ``when`` in words: ``init: gaussian`` ("" for always)."""
    return ", ".join(f"{key}: {json.dumps(value) if isinstance(value, bool) else value}"
                     for key, value in (rule.get("when") or {}).items())


def matching_rules(method_config: dict) -> list[dict]:
    """The rules whose ``when`` holds for the method's parameters (its schema defaults
    under the recipe's values)."""
    name = method_config["name"]
    params = {**get_method_spec(name).defaults(), **method_config}
    return [rule for rule in guidance_rules(name)
            if all(params.get(key) == value for key, value in (rule.get("when") or {}).items())]


def describe_rule(rule: dict) -> str:
    """A rule in words, for ``lrr methods``: its floor or ceiling and its ``when``."""
    if "max_learning_rate" in rule:
        text = f"warns above a peak learning rate of {rule['max_learning_rate']:g}"
    else:
        text = f"needs an integrated learning rate of at least {rule['min_integrated_lr']:g}"
    return text + (f" with {condition(rule)}" if condition(rule) else "")


def lr_shortfalls(method_config: dict, training: dict, plan: StepPlan) -> list[str]:
    """One message (without the recipe key) per matching rule whose
    ``min_integrated_lr`` the planned schedule does not reach."""
    have = integrated_learning_rate(plan, training)
    return [_shortfall(method_config, training, plan, rule, have)
            for rule in matching_rules(method_config) if have < rule.get("min_integrated_lr", 0)]


def lr_ceilings(method_config: dict, training: dict) -> list[str]:
    """One message (without the recipe key) per matching rule whose
    ``max_learning_rate`` the peak learning rate is above."""
    peak = training["learning_rate"]
    return [_above(method_config, peak, rule)
            for rule in matching_rules(method_config) if peak > rule.get("max_learning_rate", math.inf)]


def lr_guidance(method_config: dict, training: dict, plan: StepPlan) -> list[str]:
    """The warnings ``training.learning_rate: ...`` for a learning rate far below what
    the method needs at the planned steps (:func:`lr_shortfalls`), or above its measured
    ceiling (:func:`lr_ceilings`)."""
    messages = lr_shortfalls(method_config, training, plan) + lr_ceilings(method_config, training)
    return [f"{LR_KEY}: {message}" for message in messages]


def _above(method_config: dict, peak: float, rule: dict) -> str:
    """The message for one ceiling exceeded: the peak, the ceiling, its evidence, the fix."""
    method = method_config["name"] + (f" ({condition(rule)})" if condition(rule) else "")
    return (f"a peak of {peak:g} is above {rule['max_learning_rate']:g}, the highest {method} is known to train "
            f"at ({rule['evidence']}); {rule['fix']} ({DOCS})")


def _shortfall(method_config: dict, training: dict, plan: StepPlan, rule: dict, have: float) -> str:
    """The message for one rule not reached: planned and needed integrated learning rate,
    the peak that would reach it at these steps, the fix and the docs (where the
    rule's evidence is)."""
    need, peak = rule["min_integrated_lr"], training["learning_rate"]
    method = method_config["name"] + (f" ({condition(rule)})" if condition(rule) else "")
    reach = f" (a peak of about {peak * need / have:.2g} at these steps)" if have > 0 else ""
    return (f"{peak:g} integrates to {have:.3g} over the {plan.total_steps} planned steps "
            f"({training.get('lr_scheduler', 'linear')}, warmup {plan.warmup_steps}); {method} needs at least "
            f"{need:g} to learn at this budget{reach}; {rule['fix']} ({DOCS})")
