"""A run directory has one owner (rundir/lock.py), tested with real processes and
SIGKILL: while ``lrr run`` trains, a second trainer, an export and a report of it are
refused naming it; killed, its directory is taken over by ``--resume`` with a note; the
children of a killed parallel driver stop by themselves, and the resumed driver trains
each run once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import default_sigint

pytestmark = pytest.mark.slow


def lrr_process(*args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowrank_runner", *map(str, args)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=default_sigint)


def lrr(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank_runner", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the process ended or the wait timed out (exit {proc.poll()})")
        time.sleep(0.1)


def latest_step(run_dir: Path) -> int:
    return max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*[0-9]"))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_one_trainer_per_run_directory_and_a_killed_one_is_taken_over(tiny_recipe, tmp_path):
    recipe, out = tiny_recipe(), tmp_path / "run"
    trainer = lrr_process("run", recipe, "--output", out, "--set", "training.epochs=300", "--set",
                          "training.checkpoint_every=1", log=tmp_path / "trainer.log")
    try:
        wait_for(lambda: any((out / "checkpoints").glob("step-*[0-9]")), trainer)
        said = f"process {trainer.pid} (since "
        second = lrr("run", recipe, "--output", out, "--resume")
        assert second.returncode == 2 and said in second.stderr and "is training this run directory now" in \
            second.stderr and f"kill {trainer.pid}" in second.stderr, second.stderr
        export = lrr("export", out, "--merge", "--out", tmp_path / "merged")
        assert export.returncode == 2 and said in export.stderr and "export it when it has finished" in export.stderr
        assert not (tmp_path / "merged").exists()
        report = lrr("report", out)
        assert report.returncode == 1 and f"{said}" in report.stderr and "is training it now" in report.stderr
        assert trainer.poll() is None  # nothing disturbed the owner
    finally:
        trainer.kill()
        trainer.wait()
    step = latest_step(out)
    resumed = lrr("run", recipe, "--output", out, "--resume", "--set", "training.epochs=300", "--set",
                  "training.checkpoint_every=1", "--stop-after-step", step + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"was owned by process {trainer.pid}" in resumed.stderr and "ended without giving it back" in resumed.stderr
    assert latest_step(out) == step + 1 and not (out / ".lrr-owner.json").exists()  # given back at the end
    assert not (out / ".lrr-lock").exists()  # the lock file goes with it: the directory holds its results only


def test_children_of_a_killed_driver_stop_and_the_resumed_driver_trains_each_run_once(tiny_recipe, tmp_path):
    recipe, root = tiny_recipe("", "two.yaml"), tmp_path / "runs"
    words = ["--set", "training.seed=[0, 1]", "--set", "training.epochs=300", "--set", "training.checkpoint_every=2"]
    driver = lrr_process("run", recipe, "--output", root, "--parallel", "2", *words, log=tmp_path / "driver.log")
    slugs = ["classification-seed0", "classification-seed1"]

    def progress(slug: str) -> dict:
        try:
            return json.loads((root / "logs" / f"{slug}.progress.json").read_text())
        except (OSError, ValueError):
            return {}

    wait_for(lambda: all(progress(s).get("step", 0) > 2 for s in slugs), driver)
    children = [progress(s)["pid"] for s in slugs]
    driver.send_signal(signal.SIGKILL)  # it cannot stop its children itself
    driver.wait()
    deadline = time.monotonic() + 60
    while not all(map(gone, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(gone, children)), "a child of the killed driver kept training"
    steps = {}
    for slug in slugs:  # each stopped as on SIGTERM: marked interrupted, resumable from its checkpoint
        assert json.loads((root / slug / "report.json").read_text())["status"] == "interrupted"
        steps[slug] = latest_step(root / slug)
    until = max(steps.values()) + 2
    resumed = lrr("run", recipe, "--output", root, "--resume", "--parallel", "2", *words, "--stop-after-step", until)
    assert resumed.returncode == 0, resumed.stderr
    for slug in slugs:  # one child per run and attempt: the killed driver's, then the resumed driver's
        log = (root / "logs" / f"{slug}.log").read_text()
        assert log.count(f"--only-run {slug}") == 2, log
        assert latest_step(root / slug) == until


def test_a_lock_file_removed_while_waited_on_is_not_held_twice(tmp_path, monkeypatch):
    """The owner removes the lock file as it gives it back; a process that opened the old
    file just before locks a file no name leads to, notices and locks the new one, so a
    third process is kept out (flock locks one open file, in one process as in two)."""
    from lowrank_runner.rundir import lock as lock_module

    first, second = lock_module._Lock(tmp_path), lock_module._Lock(tmp_path)
    assert first.try_acquire() and not second.try_acquire()
    real_flock, calls = lock_module.fcntl.flock, []

    def owner_leaves_meanwhile(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            first.release()  # unlinks the file `second` has just opened, then unlocks it
        return real_flock(fd, op)

    monkeypatch.setattr(lock_module.fcntl, "flock", owner_leaves_meanwhile)
    assert second.try_acquire() and len(calls) == 2  # the first flock got the removed file: tried again
    monkeypatch.setattr(lock_module.fcntl, "flock", real_flock)
    assert os.fstat(second.fd).st_ino == (tmp_path / ".lrr-lock").stat().st_ino
    assert not lock_module._Lock(tmp_path).try_acquire() and lock_module.holder(tmp_path) is not None
    second.release()
    assert not (tmp_path / ".lrr-lock").exists() and lock_module.holder(tmp_path) is None
