"""AdaLoRA's cubic budget (used by LoRA2), against values computed by hand."""

import pytest

from lowrank_runner.methods.rank_budget import BudgetStep, cubic_budget

# M = 4 modules, r = 8 -> initial 32; target_rank 2 -> 8; T = 100, t_init = 10, t_final = 20, interval 5.
ARGS = dict(total_steps=100, initial=32, target=8, t_init=10, t_final=20, interval=5)


@pytest.mark.parametrize("step,budget,mask_now,final", [
    (1, 32, False, False),
    (10, 32, False, False),  # warm-up: full budget, no masking
    (15, 27, True, False),  # 24 * (65/70)^3 + 8 = 27.2 -> 27
    (45, 11, True, False),  # 24 * (1 - 35/70)^3 + 8 = 24 * 0.125 + 8 = 11
    (46, 10, False, False),  # 24 * (34/70)^3 + 8 = 10.75 -> 10, not a masking step
    (79, 8, False, False),  # 24 * (1/70)^3 + 8 -> 8, not a masking step
    (80, 8, True, False),  # end of the decay: the target, always masked (even off-interval)
    (81, 8, False, True),  # final phase: the mask set at step 80 stays fixed for the last t_final steps
    (100, 8, False, True),
])
def test_cubic_budget(step, budget, mask_now, final):
    b = cubic_budget(step, **ARGS)
    assert (b.budget, b.mask_now, b.final) == (budget, mask_now, final)


def test_step_15_by_hand():
    # 1 - (15 - 10) / (80 - 10) = 65/70; 24 * (65/70)^3 = 19.2157...; + 8 = 27.2157 -> int 27
    assert cubic_budget(15, **ARGS).budget == int(24 * (65 / 70) ** 3 + 8) == 27


def test_monotone_and_bounded():
    budgets = [cubic_budget(s, **ARGS).budget for s in range(1, 101)]
    assert budgets == sorted(budgets, reverse=True)
    assert max(budgets) == 32 and min(budgets) == 8


def test_masking_steps_are_the_documented_ones():
    """docs/methods.md: every interval during the decay, at its end T - t_final, then fixed
    for the last t_final steps (no extra mask at T - t_final + 1)."""
    masks = [s for s in range(1, 101) if cubic_budget(s, **ARGS).mask_now]
    assert masks == list(range(15, 80, 5)) + [80]
    assert not any(cubic_budget(s, **ARGS).mask_now for s in range(81, 101))
    # t_final = 0: the decay ends at the last step, which masks at the target
    assert cubic_budget(100, **{**ARGS, "t_final": 0}) == BudgetStep(8, True, False)
