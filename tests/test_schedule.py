"""Optimizer-step planning, by hand."""

import pytest

from lowrank_runner.plan.schedule import plan_steps

T = {"batch_size": 32, "gradient_accumulation_steps": 1, "epochs": 3, "max_steps": None, "warmup_steps": 0, "warmup_ratio": 0.0}


@pytest.mark.parametrize("n,over,processes,steps_per_epoch,total,warmup", [
    (2490, {}, 1, 78, 234, 0),  # RTE: ceil(2490/32) = 78
    (2490, {"gradient_accumulation_steps": 4}, 1, 78, 234, 0),  # 8 per device x 4: ceil(ceil(2490/8)/4), as 32 x 1
    (2490, {"gradient_accumulation_steps": 4, "batch_size_per": "device"}, 1, 20, 60, 0),  # 32 x 4: ceil(78/4)
    (2490, {}, 2, 78, 234, 0),  # batch_size is the effective batch: 16 per device x 2 processes, as on 1
    (2490, {"batch_size_per": "device"}, 2, 39, 117, 0),  # 32 per device: ceil(2490/64)
    (100, {"epochs": 2.5}, 1, 4, 10, 0),
    (100, {"max_steps": 7, "warmup_ratio": 0.3}, 1, 4, 7, 3),  # ceil(2.1)
    (100, {"warmup_steps": 2, "warmup_ratio": 0.5}, 1, 4, 12, 2),  # steps win over ratio
])
def test_plan(n, over, processes, steps_per_epoch, total, warmup):
    plan = plan_steps(n, {**T, **over}, processes)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (steps_per_epoch, total, warmup)
