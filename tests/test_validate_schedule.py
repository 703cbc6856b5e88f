"""``lrr validate`` applies each method's schedule checks (its schema's ``x-schedule``)
where the planned steps are known without data (``training.max_steps``, a hub GLUE task's
official size): a schedule that cannot act is an error at its line, also per sweep point,
one that acts only partly a warning; ``inspect``/``run`` say the same from the data."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.commands.validate import validate_file
from lowrank_runner.methods.registry import method_specs

RECIPE = """\
name: sched
backbone: {name: bert-base-uncased}
targets: [Wq, Wv]
method: METHOD
task: {name: sst2}
training: {learning_rate: 1.0e-3, max_steps: STEPS, batch_size: 16, eval_every: 5}
"""
CASES = {  # method, steps where it cannot act (error at key), steps where it acts once (warning at key)
    "triadaptlora": ("{name: triadaptlora, r: 1, r_ref: 4, growth: linear, t_init: 10, grow_interval: 10}",
                     (15, "t_init"), (25, "grow_interval")),
    "lora2": ("{name: lora2, r: 4, target_rank: 2, t_init: 10, t_final: 10, mask_interval: 10}",
              (20, "t_init"), (25, "mask_interval")),
    "adalora": ("{name: adalora, init_r: 4, target_r: 2, tinit: 10, tfinal: 10, deltaT: 10}",
                (20, "tinit"), (25, "deltaT")),
    "increlora": ("{name: increlora, r: 1, target_rank: 2, top_h: 2, incre_rank_num: 1, init_warmup: 10, "
                  "incre_interval: 10}", (15, "init_warmup"), (25, "incre_interval")),
}


def write(tmp_path, method: str, steps: int, extra: str = ""):
    path = tmp_path / "sched.yaml"
    path.write_text(RECIPE.replace("METHOD", method).replace("STEPS", str(steps)) + extra)
    return path


def line_of(path, text: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if text in ln)


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_refuses_a_schedule_that_cannot_act_and_warns_on_one_that_acts_once(tmp_path, name):
    method, (never, error_key), (once, warning_key) = CASES[name]
    path = write(tmp_path, method, never)
    checked = validate_file(path)
    [error] = [p for p in checked.problems if p.severity == "error"]
    assert not checked.valid and error.path == f"method.{error_key}" and error.location.line == line_of(path, "method:")
    assert f"{never} optimizer steps" in error.message and error.message.endswith("(task sst2)")
    assert error.message == next(p for p in method_specs()[name].schedule_problems(
        {**method_specs()[name].defaults(), **_params(method)}, never)).message + " (task sst2)"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and f"{path}:{line_of(path, 'method:')}:" in result.output
    checked = validate_file(write(tmp_path, method, once))
    assert checked.valid and [p.path for p in checked.problems if p.severity == "warning" and
                              p.path.startswith("method.")] == [f"method.{warning_key}"]
    assert not [p for p in validate_file(write(tmp_path, method, 400)).problems if p.path.startswith("method.")]


def _params(flow: str) -> dict:
    import yaml

    return {k: v for k, v in yaml.safe_load(flow).items() if k != "name"}


def test_a_sweep_point_whose_schedule_cannot_act_is_named_at_its_value(tmp_path):
    method = CASES["triadaptlora"][0]
    path = write(tmp_path, method, 100, "sweep:\n  method.t_init: [10, 95]\n")
    [error] = [p for p in validate_file(path).problems if p.severity == "error"]
    assert error.path == "sweep.method.t_init.1" and error.location.line == line_of(path, "method.t_init: [10, 95]")
    assert "t_init 95 + grow_interval 10" in error.message and error.message.endswith("(task sst2, sweep point t_init=95)")
    steps = write(tmp_path, method, 100, "sweep:\n  training.max_steps: [15, 100]\n")
    [error] = [p for p in validate_file(steps).problems if p.severity == "error"]
    assert error.path == "method.t_init" and error.message.endswith("(task sst2, sweep point max_steps=15)")


def test_validate_says_nothing_where_the_steps_need_the_data(tmp_path, sentiment_data):
    method, (train, validation) = CASES["triadaptlora"][0], sentiment_data
    local = textwrap.dedent(f"""\
        task: {{name: classification, data: {{train: {train}, validation: {validation}}}, labels: [negative, positive]}}
        """)
    path = write(tmp_path, method, 15)
    text = path.read_text().replace("task: {name: sst2}\n", local).replace("max_steps: 15", "epochs: 1")
    path.write_text(text)
    assert validate_file(path).valid  # inspect and run plan it on the data (tests/test_triadaptlora_growth.py)
