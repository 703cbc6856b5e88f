"""Everyday ergonomics of the command line: version, help text, shell completion, and
the last-resort handler that turns a bug into one line plus a traceback file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowrank_runner import __version__
from lowrank_runner.cli import app

COMMANDS = ["validate", "methods", "tasks", "report", "inspect", "run", "export"]


def invoke(*args, env=None):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "160", **(env or {})})


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"lowrank-runner {__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_what_to_type_not_python_types(command):
    res = invoke(*([command] if command else []), "--help")
    assert res.exit_code == 0, res.output
    assert not re.search(r"<(bool|path|str|int|float|int range|list\[str\])>", res.output), res.output
    usage = next(line for line in res.output.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage


def test_help_names_values_by_what_they_are():
    out = invoke("export", "--help").output
    assert re.search(r"--out\s+DIR\b", out) and re.search(r"--tolerance\s+FLOAT\b", out)
    assert re.search(r"Usage: .*export \[OPTIONS\] RUN_DIR", out)
    out = invoke("run", "--help").output
    assert re.search(r"--output\s+-o\s+RUN_DIR\b", out) and re.search(r"--stop-after-step\s+STEP\b", out)
    assert re.search(r"--resume\s+Continue", out)  # a flag shows no type


def test_shell_completion_is_offered_and_completes_recipe_keys():
    assert "--install-completion" in invoke("--help").output
    env = {**os.environ, "_LRR_COMPLETE": "complete_bash", "COMP_WORDS": "lrr run r.yaml --set training.learn",
           "COMP_CWORD": "4"}
    lrr = str(Path(sys.executable).with_name("lrr"))  # the installed command: completion is keyed by its name
    proc = subprocess.run([lrr], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["training.learning_rate="]
    env["COMP_WORDS"] = "lrr inspect r.yaml --set method.target_ra"
    proc = subprocess.run([lrr], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["method.target_rank="]  # a method parameter, from its schema fragment


def test_a_bug_is_one_line_and_a_traceback_file(monkeypatch, tmp_path):
    import lowrank_runner.commands.validate as command

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(command, "validate_file", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    res = invoke("validate", str(recipe))
    assert res.exit_code == 70
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: internal error in lowrank-runner (ZeroDivisionError: boom); this is a bug")
    (saved,) = tmp_path.glob("lrr-traceback-*.txt")
    assert saved.name in line
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: boom" in text
    res = invoke("validate", str(recipe), env={"LRR_DEBUG": "1"})
    assert res.exit_code == 70 and "Traceback (most recent call last)" in res.stderr


def test_commands_exit_with_their_own_codes(tmp_path):
    """typer.Exit inside a command is the command's answer, not a bug for the last resort."""
    assert invoke("validate", "recipes/quickstart.yaml").exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    res = invoke("validate", str(bad))
    assert res.exit_code == 1 and "internal error" not in res.output
    res = invoke("inspect", "--processes", "0", "recipes/quickstart.yaml")
    assert res.exit_code == 2 and "internal error" not in res.output


CLOSED_PIPE = """
import sys
from lowrank_runner import cli

@cli.command("write-to-closed-pipe")
@cli.friendly
def write_to_closed_pipe():
    raise BrokenPipeError(32, "Broken pipe")  # what print() raises once `| head` has left

sys.argv = ["lrr", "write-to-closed-pipe"]
cli.main()
"""


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """`lrr methods | head`: the reader left; exit 0 and nothing on stderr (the handler is
    exercised directly: a real pipe only breaks once the output outgrows its buffer)."""
    script = tmp_path / "pipe.py"
    script.write_text(CLOSED_PIPE)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_full_disk_is_said_plainly(monkeypatch, tmp_path):
    import errno

    import lowrank_runner.commands.validate as command

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "state.json"))

    monkeypatch.setattr(command, "validate_file", full)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    res = invoke("validate", str(recipe))
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        f"error: No space left on device ({tmp_path / 'run' / 'state.json'}): free some space, then run the command "
        "again (a run continues with --resume)"]


SLOW_EXPORT = """
import sys, time
from pathlib import Path
from lowrank_runner import cli, outputs

@cli.command("slow-export")
@cli.friendly
def slow_export(out: Path):
    with outputs.staged_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        print("writing", flush=True)
        time.sleep(60)

sys.argv = ["lrr", "slow-export", sys.argv[1]]
cli.main()
"""


def test_sigterm_ends_any_command_like_ctrl_c_and_leaves_nothing_half_written(tmp_path):
    import signal

    script = tmp_path / "slow.py"
    script.write_text(SLOW_EXPORT)
    out = tmp_path / "exports" / "merged"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "interrupted"
    assert list((tmp_path / "exports").iterdir()) == []  # the staged directory is gone, no half export
