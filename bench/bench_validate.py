"""Wall time of ``lrr validate recipes/`` (every shipped recipe checked, described), each
a fresh process, and where one process spends it (composing the YAML, checking, the
learning-rate warnings, what the recipes read and write). Not a test: numbers go to
docs/benchmarks.md.

``--vs DIR`` times the same command of another checkout of lowrank-runner (e.g. a
``git worktree`` of an earlier commit) in turn with this one, A B A B …, and prints the
ratio of the medians: this checkout / the other.

    python bench/bench_validate.py [--repeat 7] [--vs /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BREAKDOWN = """
import glob, time
from lowrank_runner.plan.recipe_warnings import planned_step_problems
from lowrank_runner.recipe.compose import load_document
from lowrank_runner.recipe.expand import expand_runs, one_per_seed
from lowrank_runner.recipe.load import check_document
from lowrank_runner.recipe.paths import recipe_io
files = [p for p in sorted(glob.glob("recipes/*.yaml")) if not p.split("/")[-1].startswith("_")]
spent = dict(compose=0.0, check=0.0, planned_steps=0.0, io=0.0)
for f in files:
    t = time.perf_counter(); doc = load_document(f); spent["compose"] += time.perf_counter() - t
    t = time.perf_counter(); check_document(doc); spent["check"] += time.perf_counter() - t
    t = time.perf_counter(); planned_step_problems(one_per_seed(expand_runs(doc))); spent["planned_steps"] += time.perf_counter() - t
    t = time.perf_counter(); recipe_io(doc); spent["io"] += time.perf_counter() - t
print(len(files), " ".join(f"{k}={v:.3f}s" for k, v in spent.items()))
"""


def once(checkout: Path) -> float:
    """Seconds of one ``python -m lowrank_runner validate recipes/`` of ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowrank_runner", "validate", "recipes/"], cwd=checkout, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def alternate(once, repeat: int, vs: Path | None, digits: int = 3) -> None:
    """``once(checkout)`` (its seconds) of this checkout and of ``vs`` in turn, A B A B …,
    ``repeat`` times each; prints the medians and their ratio (this checkout / ``vs``).
    Shared by the benchmarks that time a command against another checkout."""
    mine, theirs = [], []
    for _ in range(repeat):
        mine.append(once(REPO))
        if vs is not None:
            theirs.append(once(vs))
    print(f"this checkout: median {statistics.median(mine):.{digits}f} s (min {min(mine):.{digits}f}, "
          f"max {max(mine):.{digits}f}), {repeat} runs")
    if theirs:
        print(f"{vs}: median {statistics.median(theirs):.{digits}f} s (min {min(theirs):.{digits}f}, "
              f"max {max(theirs):.{digits}f}); ratio {statistics.median(mine) / statistics.median(theirs):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--vs", type=Path, default=None, help="another checkout of lowrank-runner")
    args = parser.parse_args()
    once(REPO)  # warm-up: the file system cache
    alternate(once, args.repeat, args.vs)
    out = subprocess.run([sys.executable, "-c", BREAKDOWN], cwd=REPO, capture_output=True, text=True, check=True)
    print(f"in one process, recipes and seconds: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
