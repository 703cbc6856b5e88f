"""Wall time of a short ``lrr run`` as its own process, the cost every ``--parallel`` child
and every search trial's child pays around its steps: the quickstart (real MiniLM-L6,
1,000 sentences) for 2 optimizer steps and one evaluation, from the process's start to
its exit. Then, for one run of this checkout, where the time goes: the set-up phases lrr
prints, the steps and the evaluation, and the time from the last line to the exit. Not a
test: numbers go to docs/benchmarks.md.

``--vs DIR`` times the same command of another checkout (e.g. a ``git worktree`` of an
earlier commit) in turn with this one, A B A B …, and prints the ratio of the medians.

    python bench/bench_child_start.py [--repeat 7] [--vs /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_validate import alternate  # noqa: E402  (the A B A B timing against another checkout)
SETS = ["training.max_steps=2", "training.eval_every=2", "training.warmup_ratio=0"]


def command(out: Path) -> list[str]:
    words = [sys.executable, "-m", "lowrank_runner", "run", "recipes/quickstart.yaml", "--output", str(out)]
    for s in SETS:
        words += ["--set", s]
    return words


def once(checkout: Path, lines: list | None = None) -> float:
    """Seconds of one run of ``checkout``; ``lines`` gets (seconds since the start, line)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen(command(Path(tmp) / "run"), cwd=checkout, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if lines is not None and line.strip():
                lines.append((time.perf_counter() - start, line.rstrip()))
        if proc.wait() != 0:
            raise SystemExit(f"{checkout}: the run failed (exit {proc.returncode})")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--vs", type=Path, default=None, help="another checkout of lowrank-runner")
    args = parser.parse_args()
    once(REPO)  # warm-up: the file system cache, the tokenised splits in datasets' cache
    alternate(once, args.repeat, args.vs, digits=2)
    lines: list = []
    total = once(REPO, lines)
    print(f"one run of this checkout, {total:.2f} s:")
    for at, line in lines:
        if line.endswith(" s") or " s (" in line or line.startswith(("run directory", "step 2:", "done ")):
            print(f"  {at:6.2f} s  {line[:110]}")
    print(f"  {total:6.2f} s  exit ({total - lines[-1][0]:.2f} s after the last line)")


if __name__ == "__main__":
    main()
