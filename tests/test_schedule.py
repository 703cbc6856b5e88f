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


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 10), (3, 10), (10, 10), (7, 250), (0, 333)])
def test_the_loops_schedule_is_transformers_get_scheduler_exactly(name, warmup, total):
    """train/optim.py builds torch's LambdaLR with plan/schedule.py's factor instead of
    importing transformers.optimization (which imports PEFT and bitsandbytes); the learning
    rate of every step, past the end included, equals transformers' own, bit for bit."""
    import torch
    from transformers import get_scheduler

    from lowrank_runner.train.optim import build_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        scheduler = make(optimizer)
        out = []
        for _ in range(total + 3):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out, scheduler.state_dict()

    ours, our_state = rates(lambda o: build_scheduler(o, name, warmup, total))
    theirs, their_state = rates(lambda o: get_scheduler(name, o, warmup, total))
    assert ours == theirs
    lambdas = our_state.pop("lr_lambdas"), their_state.pop("lr_lambdas")
    assert our_state == their_state and all(saved in (None, {}) for saved in lambdas[0] + lambdas[1])  # nothing of
    # the schedule itself in a checkpoint: one written before this change resumes as one written after


def test_a_run_does_not_import_peft_or_bitsandbytes(tiny_recipe, tmp_path):
    """transformers.optimization imports trainer_utils, which imports PEFT and, through it,
    bitsandbytes and torch's inductor: about 1.5 s of a run's start that a LoRA run on a
    full-precision backbone does not use. (Also: lrr run's quick exit still runs the
    process's atexit handlers, which print here.)"""
    import subprocess
    import sys

    code = ("import atexit, runpy, sys; sys.argv = ['lrr', 'run', sys.argv[1], '--output', sys.argv[2]]\n"
            "atexit.register(lambda: print('IMPORTED', sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules)))\n"
            "runpy.run_module('lowrank_runner', run_name='__main__')")  # lrr run's exit runs the atexit handlers
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_recipe()), str(tmp_path / "run")], capture_output=True,
                          text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout[-500:]
    assert (tmp_path / "run" / "metrics.json").is_file()
