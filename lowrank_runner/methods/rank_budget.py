"""Rank-budget schedules for dynamic-rank methods (torch-free, hand-checkable).

``cubic_budget`` is AdaLoRA's schedule, which LoRA2 adopts (LoRA2 §3.3, Algorithm 1): the
total number of active ranks stays at ``initial`` for the first ``t_init`` steps, then
decays cubically to ``target`` at step ``T - t_final``, and stays there (with the mask
fixed) for the last ``t_final`` steps. Masking happens every ``interval`` steps during the
decay and at its last step ``T - t_final`` (at the target budget, as PEFT's AdaLoRA
forces it there); then the mask stays fixed for the last ``t_final`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowrank_runner.errors import Problem


@dataclass(frozen=True)
class BudgetStep:
    budget: int  # active ranks allowed, summed over all modules
    mask_now: bool  # recompute the mask at this step
    final: bool  # in the final, fixed-mask phase


def cubic_budget(step: int, total_steps: int, initial: int, target: int, t_init: int, t_final: int, interval: int) -> BudgetStep:
    """The budget after optimizer step ``step`` (1-based) of ``total_steps``."""
    decay_end = total_steps - t_final
    if step <= t_init:
        return BudgetStep(initial, False, False)
    if step > decay_end:  # the mask was set at decay_end and stays fixed
        return BudgetStep(target, False, True)
    span = max(decay_end - t_init, 1)
    remaining = 1 - (step - t_init) / span
    budget = int((initial - target) * remaining**3 + target)
    return BudgetStep(budget, step % interval == 0 or step == decay_end, False)


def single_mask_warning(total_steps: int, t_init: int, t_final: int, interval: int, interval_key: str,
                        initial: str, target: str) -> str | None:
    """The text of a warning for a cubic decay that fits in one masking interval: it masks
    only once, at its end, so the budget drops in one step (None: it masks more often).
    ``interval_key``, ``initial``, ``target``: the method's names for them."""
    decay_end = total_steps - t_final
    if (t_init // interval + 1) * interval < decay_end:
        return None
    return (f"masks only once, at step {decay_end}: the budget drops from {initial} x modules to {target} x modules "
            f"in one step (the decay has {decay_end - t_init} steps, {interval_key} is {interval}); lower "
            f"{interval_key} or train longer")


def schedule_problem(key: str, message: str, severity: str = "error") -> Problem:
    """A problem of a method parameter's schedule, at ``method.KEY``."""
    return Problem(None, f"method.{key}", message, severity)


# The methods' schedules against the planned optimizer steps (``x-schedule`` in their schema
# fragments: ``lrr validate`` calls these where the steps are known without data, ``inspect`` and
# ``run`` through ``AdapterMethod.schedule_problems``). ``p``: the method's parameters, defaults filled.

def lora2_schedule(p: dict, total_steps: int) -> list[Problem]:
    """LoRA2 pruning needs decay steps (error); warnings for a decay that masks only once
    and for a final phase of zero steps (the model never trains at the target)."""
    if p.get("target_rank") is None:
        return []
    t_init, t_final, interval = p["t_init"], p["t_final"], p["mask_interval"]
    if t_init + t_final >= total_steps:
        return [schedule_problem("t_init", (
            f"lora2 pruning: t_init ({t_init}) + t_final ({t_final}) leave no steps to prune in {total_steps} "
            "optimizer steps; lower them or train longer"))]
    problems = []
    once = single_mask_warning(total_steps, t_init, t_final, interval, "mask_interval", "r", "target_rank")
    if once:
        problems.append(schedule_problem("mask_interval", once, "warning"))
    if t_final == 0:
        problems.append(schedule_problem("t_final", (
            f"is 0: the final mask is set after the last step ({total_steps}), so the model never trains at "
            "target_rank and only the last step can be selected; set t_final (the authors use 1800 to 50000 "
            "steps)"), "warning"))
    return problems


def triadaptlora_schedule(p: dict, total_steps: int) -> list[Problem]:
    """TriAdaptLoRA growth needs a growth step before the last step (error); a warning when
    there is only one, which allocates the whole budget at once."""
    if p.get("growth", "none") == "none" or p.get("r_ref") == p["r"]:
        return []
    t0, interval = p["t_init"], p["grow_interval"]
    first = t0 + interval
    if first > total_steps - 1:
        return [schedule_problem("t_init", (
            f"triadaptlora growth: the first growth step (t_init {t0} + grow_interval {interval}) does not come "
            f"before the end of training ({total_steps} optimizer steps); lower them or train longer"))]
    if first + interval > total_steps - 1:
        return [schedule_problem("grow_interval", (
            f"grows only once, at step {first} of {total_steps}: the whole budget (r_ref x modules) is allocated "
            f"at once; lower grow_interval ({interval}) or t_init ({t0}), or train longer"), "warning")]
    return []


def adalora_schedule(p: dict, total_steps: int) -> list[Problem]:
    """PEFT's AdaLoraConfig refuses ``tinit >= total_step - tfinal`` (error); warnings for a
    decay that masks only at its end and for ``tfinal = 0``."""
    tinit, tfinal, delta_t = p["tinit"], p["tfinal"], p["deltaT"]
    if tinit >= total_steps - tfinal:
        return [schedule_problem("tinit", (
            f"adalora: tinit ({tinit}) + tfinal ({tfinal}) leave no steps for the budget to decay in {total_steps} "
            "optimizer steps (PEFT's AdaLoraConfig refuses this schedule); lower them or train longer"))]
    problems = []
    once = single_mask_warning(total_steps, tinit, tfinal, delta_t, "deltaT", "init_r", "target_r")
    if once:
        problems.append(schedule_problem("deltaT", once, "warning"))
    if tfinal == 0:
        problems.append(schedule_problem("tfinal", (
            f"is 0: the final budget is reached at the last step ({total_steps}), so the model never trains at "
            "target_r and only the last step can be selected; set tfinal (AdaLoRA's GLUE settings use hundreds "
            "to thousands of steps)"), "warning"))
    return problems


# TriAdaptLoRA (seed 002, §III-D): the rank budget is spent by growth. R⁰ = r_ref·M;
# R(1) = R⁰ − r·M; R(t) = R(t−1) − Δr·k(t−1) (eq. 12), t counting growth evaluations.
GROWTH_MODES = ("linear", "nonlinear", "fixed_k")


def growth_count(mode: str, remaining: int, step: int, t_init: int, total_steps: int, fixed_k: int = 1) -> int:
    """k(t), how many modules grow at optimizer step ``step``: eq. 13 (linear,
    ``⌈R(t)·α(t)⌉``), eq. 14 (non-linear, ``⌈exp(α(t)·log R(t))⌉``) with
    ``α(t) = (t − t0)/(T − t0)``, or a constant (fixed-k); at least 1 (§III-D)."""
    if remaining <= 0:
        return 0
    alpha = (step - t_init) / (total_steps - t_init)
    if mode == "linear":
        k = math.ceil(remaining * alpha)
    elif mode == "nonlinear":
        k = math.ceil(math.exp(alpha * math.log(remaining)))
    elif mode == "fixed_k":
        k = fixed_k
    else:
        raise ValueError(f"unknown growth mode {mode!r} (expected one of {', '.join(GROWTH_MODES)})")
    return max(k, 1)


def growth_plan(scores: list[float], ranks: list[int], capacity: int, k: int, grow_by: int, remaining: int,
                exhaust: bool = False) -> list[int]:
    """Rank increments per module: the ``k`` highest-scoring modules with room left grow by
    ``grow_by`` (ties: module order), never beyond ``capacity`` nor the ``remaining``
    budget. ``exhaust`` (the last evaluation of the run) keeps going round the modules in
    score order until the budget is spent or every module is full."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    increments = [0] * len(scores)
    chosen = 0
    while remaining > 0:
        progressed = False
        for i in order:
            room = capacity - ranks[i] - increments[i]
            if room <= 0 or remaining <= 0:
                continue
            if not exhaust and (chosen >= k or increments[i]):
                break
            step = min(grow_by, room, remaining)
            if increments[i] == 0:
                chosen += 1
            increments[i] += step
            remaining -= step
            progressed = True
        if not exhaust or not progressed:
            break
    return increments


# IncreLoRA (Zhang et al., 2023; the reference's loralib/increlora.py RankAllocator): every
# module starts at rank r; after the optimizer step whose 0-based index g (the reference's
# global_step) has g > init_warmup and g % incre_interval == 0, the top_h most important
# modules gain incre_rank_num ranks each, until the total is target_rank x modules.

def increlora_incre_rank_num(p: dict) -> int:
    """``incre_rank_num``, or without one the reference's table ``{2: 1, 4: 2, 6: 3, 8: 4}``
    for ``target_rank`` (``rank_dic`` in ``RankAllocator.__init__``), i.e. half of it, at least 1."""
    return p.get("incre_rank_num") or max(1, p["target_rank"] // 2)


def increlora_growth_steps(total_steps: int, init_warmup: int, interval: int) -> tuple[int, int]:
    """(the first optimizer step after which a module may grow, how many such steps the run
    has): steps ``g + 1`` (1-based) with ``g > init_warmup``, ``g % interval == 0``, ``g < T``."""
    first_m = init_warmup // interval + 1
    last_m = (total_steps - 1) // interval
    return first_m * interval + 1, max(0, last_m - first_m + 1)


def increlora_events_needed(modules: int, r: int, target_rank: int, top_h: int, incre: int) -> int:
    """Growth steps needed to go from ``r x modules`` to ``target_rank x modules`` ranks when
    each adds ``incre`` ranks to ``min(top_h, modules)`` modules (the last one what is left)."""
    remaining = modules * (target_rank - r)
    return -(-remaining // (min(top_h, modules) * incre)) if remaining > 0 else 0


def increlora_schedule(p: dict, total_steps: int, modules: int | None = None) -> list[Problem]:
    """IncreLoRA's growth against the planned steps. Without the module count (``lrr
    validate``): an error when no growth step fits, or too few for even one module; a
    warning when only one fits. With it (``inspect``/``run``, the method knows its modules):
    an error when ``target_rank x modules`` cannot be reached, a warning when it is reached
    only within the last ``incre_interval`` steps."""
    r, target, top_h = p["r"], p["target_rank"], p["top_h"]
    if target <= r:
        return []
    warmup, interval, incre = p["init_warmup"], p["incre_interval"], increlora_incre_rank_num(p)
    first, count = increlora_growth_steps(total_steps, warmup, interval)
    if count == 0:
        return [schedule_problem("init_warmup", (
            f"increlora growth: the first growth step (after step {first}: the first multiple of incre_interval "
            f"{interval} above init_warmup {warmup}, plus one) does not come before the end of training "
            f"({total_steps} optimizer steps); lower init_warmup or incre_interval, or train longer"))]
    at = f"after steps {first}, {first + interval}, ..." if count > 1 else f"after step {first}"
    if modules is None:
        one = increlora_events_needed(1, r, target, top_h, incre)
        if count < one:
            return [schedule_problem("incre_interval", (
                f"increlora growth has {count} growth step(s) in {total_steps} optimizer steps ({at}); growing even "
                f"one module from r {r} to target_rank {target} by incre_rank_num {incre} needs {one}; lower "
                "incre_interval or init_warmup, raise incre_rank_num, or train longer"))]
        if count == 1:
            return [schedule_problem("incre_interval", (
                f"grows only once, after step {first} of {total_steps}: at most top_h x incre_rank_num = "
                f"{top_h * incre} ranks are added, so target_rank x modules is reached only if (target_rank - r) "
                f"x modules <= {top_h * incre}; lower incre_interval ({interval}) or init_warmup ({warmup}), or "
                "train longer"), "warning")]
        return []
    needed = increlora_events_needed(modules, r, target, top_h, incre)
    if count < needed:
        budget, remaining = target * modules, (target - r) * modules
        top = -(-remaining // (count * incre))
        fix = f"raise top_h to {top} (or incre_rank_num)" if top <= modules else "raise incre_rank_num"
        return [schedule_problem("top_h", (
            f"increlora cannot reach target_rank x modules = {target} x {modules} = {budget} ranks in "
            f"{total_steps} optimizer steps: from r x modules = {r * modules} it needs {needed} growth steps of "
            f"top_h {min(top_h, modules)} modules x incre_rank_num {incre} ranks, the schedule has {count} ({at}, "
            f"every incre_interval {interval} after init_warmup {warmup}); {fix}, lower incre_interval or "
            "init_warmup, or train longer"))]
    final = first + (needed - 1) * interval
    if final > total_steps - interval:
        return [schedule_problem("incre_interval", (
            f"reaches target_rank x modules = {target * modules} ranks only after step {final} of {total_steps}: "
            f"fewer than incre_interval ({interval}) steps train at the final ranks, and only those can give the "
            "selected checkpoint; raise top_h or incre_rank_num, lower incre_interval or init_warmup, or train "
            "longer"), "warning")]
    return []
