"""Output that reads well in a terminal and in a log: consoles as wide as the terminal
or unlimited, short `lrr methods`, `lrr methods NAME` in full, the training progress as
a bar on a terminal and plain step lines off one (lowrank_runner/console.py,
commands/render.py, train/progress.py)."""

from __future__ import annotations

import io

from typer.testing import CliRunner

from lowrank_runner.cli import app
from lowrank_runner.console import make_console
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.train.progress import SetupPhases, TrainingProgress
from tests.conftest import tiny_recipe_text

LONG = "loss=0.123456 " * 30  # 420 characters


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_console_into_a_pipe_does_not_wrap_and_one_on_a_terminal_follows_its_width():
    piped = make_console(file=io.StringIO())
    piped.print(LONG)
    assert piped.file.getvalue() == LONG + "\n"
    terminal = make_console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
    terminal.print(LONG)
    assert all(len(line) <= 100 for line in terminal.file.getvalue().splitlines())


def test_lrr_methods_is_a_short_overview_naming_every_method():
    res = invoke("methods")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) < 40 and "lrr methods NAME" in lines[0]
    for name, spec in method_specs().items():
        assert any(line.split()[0] == name for line in lines[1:]), name


def test_lrr_methods_name_shows_the_parameters_paper_and_guidance():
    res = invoke("methods", "lora")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "Hu et al., LoRA" in out
    for param in ("r", "alpha", "dropout", "rslora"):
        assert any(line.split()[:1] == [param] for line in out.splitlines()), param
    assert "Rank of the update B A." in out and "integer" in out
    assert "integrated learning rate: the sum of the scheduler's learning rate over the planned optimizer steps" in out


def test_a_method_without_parameters_has_no_empty_table_and_an_unknown_one_is_named():
    for name in ("bitfit", "full"):
        res = invoke("methods", name)
        assert res.exit_code == 0 and "parameters: none" in res.stdout and "┃" not in res.stdout
    res = invoke("methods", "lorra")
    assert res.exit_code == 2 and "no method named 'lorra'" in res.output and "lora" in res.output


def test_lrr_tasks_is_one_line_per_task():
    res = invoke("tasks")
    assert res.exit_code == 0
    assert sum(line.lstrip().startswith(("cola ", "squad_v2 ")) for line in res.stdout.splitlines()) == 2


def test_lrr_inspect_into_a_pipe_keeps_long_paths_on_one_line(tmp_path, tiny_bert, sentiment_data):
    backbone = tmp_path / ("a_rather_long_directory_name_for_the_backbone_" * 3) / "tiny-bert"
    backbone.parent.mkdir()
    backbone.symlink_to(tiny_bert, target_is_directory=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(backbone, sentiment_data))
    res = invoke("inspect", recipe)
    assert res.exit_code == 0, res.output
    assert any(str(backbone) in line for line in res.stdout.splitlines())
    assert "integrated learning rate: the sum" in res.stdout


def test_off_a_terminal_progress_is_plain_step_lines_every_tenth_and_no_bar():
    console, clock = make_console(file=io.StringIO()), FakeClock()
    with TrainingProgress(50, enabled=True, metric="accuracy", console=console, clock=clock) as progress:
        progress.start_at(0)
        for step in range(1, 51):
            clock.now += 1.0
            if step % 10 == 0:
                progress.update_train(step, 0.5, 1e-4)
            progress.advance(step)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "training (50 optimizer steps): first step …"
    assert lines[1] == "training: first step 1.0 s"
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/50", *(f"{s}/50" for s in range(5, 51, 5))]
    assert steps[2] == "step 10/50 (20%)  loss 0.5000  lr 1.00e-04  elapsed 0:00:10  ETA 0:00:40"
    assert "━" not in console.file.getvalue()  # no bar


def test_off_a_terminal_a_slow_run_prints_a_step_line_every_30_seconds():
    console, clock = make_console(file=io.StringIO()), FakeClock()
    progress = TrainingProgress(1000, enabled=True, metric="accuracy", console=console, clock=clock)
    progress.start_at(0)
    for step in range(1, 8):
        clock.now += 10.0
        progress.advance(step)
    steps = [line.split()[1] for line in console.file.getvalue().splitlines() if line.startswith("step ")]
    assert steps == ["1/1000", "4/1000", "7/1000"]


def test_on_a_terminal_the_bar_advances_at_every_step():
    console = make_console(file=io.StringIO(), force_terminal=True, width=120)
    with TrainingProgress(5, enabled=True, metric="accuracy", console=console, clock=FakeClock()) as progress:
        progress.start_at(0)
        for step in range(1, 6):
            progress.advance(step)
            assert progress.completed == step
    out = console.file.getvalue()
    assert "5/5" in out and "first step" in out and "step 5/5 (" not in out  # the bar, not step lines


def test_setup_phases_say_when_they_start_and_how_long_they_took():
    console, clock = make_console(file=io.StringIO()), FakeClock()
    phases = SetupPhases(enabled=True, console=console, clock=clock)
    with phases.phase("loading backbone"):
        clock.now += 2.5
    assert console.file.getvalue().splitlines() == ["loading backbone …", "loading backbone: 2.5 s"]


def test_a_tiny_run_logs_its_phases_and_step_lines(tiny_recipe, tmp_path):
    res = invoke("run", tiny_recipe(), "--output", tmp_path / "run")
    assert res.exit_code == 0, res.output
    err = res.stderr
    for line in ("loading and tokenising the data …", "loading backbone …", "preparing optimizer and devices …",
                 "first step …", "training: first step "):
        assert line in err, line
    steps = [line for line in err.splitlines() if line.startswith("step ") and "eval" not in line]
    assert steps and all("loss " in line and "ETA " in line for line in steps)
    assert not any(line.startswith("train ") for line in err.splitlines())  # no bar
