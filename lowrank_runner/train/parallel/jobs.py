"""What the parallel driver hands an executor: a :class:`Job` (one run of a recipe, as
the child command that trains it), and the :class:`Executor` interface every executor
implements (local processes: :mod:`.local`; a Ray cluster: :mod:`.ray_executor`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The child's exit code (as ``lrr run`` exits): the run completed, failed, was interrupted.
COMPLETED, FAILED, INTERRUPTED = 0, 1, 130


@dataclass
class Job:
    """One run of the recipe, trained by a child process.

    ``argv`` is the full child command (``[python, -m, lowrank_runner, run, RECIPE, ...,
    --only-run SLUG]``, or ``accelerate launch --num_processes K ...`` for K > 1 GPUs);
    ``env`` is added to the child's environment (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS...);
    the child writes into ``run_dir`` and its stdout+stderr go to ``log``."""

    slug: str
    argv: list[str]
    env: dict[str, str]
    run_dir: Path
    log: Path
    gpus: int = 0
    cpus: int = 1


class Executor:
    """Runs jobs, at most ``capacity`` at once. The driver submits a job only when a slot
    is free, and calls :meth:`wait_any` to learn which finished."""

    capacity: int = 1

    def submit(self, job: Job) -> None:
        """Start ``job`` (non-blocking)."""
        raise NotImplementedError

    def wait_any(self, timeout: float) -> list[tuple[Job, int]]:
        """The jobs that finished since the last call, with their exit codes (0 completed,
        1 failed, 130 interrupted); waits up to ``timeout`` seconds for one, [] if none."""
        raise NotImplementedError

    def stop_all(self) -> None:
        """Ctrl-C: ask every running job to stop (SIGTERM to the child: it marks its run
        interrupted) and wait for them to end."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (processes, a cluster connection)."""

