"""Child processes on this machine: the executor of ``lrr run --parallel N``.

Each job is one process (its own session, so a Ctrl-C in the terminal reaches the
driver only, which then stops the children itself), its stdout and stderr appended to the
job's log file. Stopping sends SIGTERM to the child's process group (an ``accelerate
launch`` child and its workers alike), waits for the runs to mark themselves
interrupted, and kills what is still there after ``grace`` seconds.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

from lowrank_runner.train.parallel.jobs import Executor, Job


class LocalExecutor(Executor):
    """Up to ``capacity`` child processes at once on this machine."""

    def __init__(self, capacity: int, grace: float = 120.0):
        self.capacity = capacity
        self.grace = grace
        self._running: dict[str, tuple[Job, subprocess.Popen, object]] = {}

    def submit(self, job: Job) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        log = job.log.open("ab")  # a resumed run's log keeps the earlier attempts
        env_words = [f"{k}={v}" for k, v in sorted(job.env.items())]
        log.write(f"$ {shlex.join(env_words + job.argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(job.argv, env={**os.environ, **job.env}, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            log.close()
            raise
        self._running[job.slug] = (job, proc, log)

    def pid(self, slug: str) -> int | None:
        """The process id of a running job (None when it is not running)."""
        entry = self._running.get(slug)
        return entry[1].pid if entry else None

    def wait_any(self, timeout: float) -> list[tuple[Job, int]]:
        deadline = time.monotonic() + timeout
        while True:
            done = [slug for slug, (_, proc, _) in self._running.items() if proc.poll() is not None]
            if done or time.monotonic() >= deadline:
                return [self._reap(slug) for slug in done]
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _reap(self, slug: str) -> tuple[Job, int]:
        job, proc, log = self._running.pop(slug)
        log.close()
        return job, proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in self._running.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for _, proc, _ in self._running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for slug in list(self._running):
            _, proc, _ = self._running[slug]
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._reap(slug)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's process group (it leads its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
