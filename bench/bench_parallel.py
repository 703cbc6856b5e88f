"""Wall time of a multi-run recipe trained sequentially (``lrr run``) and with
``lrr run --parallel N``, and the scheduling overhead per run (a child process's start-up:
Python, torch and transformers imported again, the recipe loaded again). Not a test:
numbers go to docs/benchmarks.md.

The recipe: one task (binary sentiment, synthetic), ``--seeds`` seeds, so every run is
independent; a random-weight BERT built from a config (``--hidden``, ``--layers``). Three
timings, each a fresh ``lrr`` process:

- sequential: ``lrr run RECIPE`` (every run in that one process);
- parallel: ``lrr run RECIPE --parallel N`` (N children at a time; on a CPU-only machine
  the cores divided among them; on a GPU machine one run per visible device);
- children one at a time: the parallel driver with one slot, so that
  (its time - sequential) / runs is what a child costs over training in-process.

``--repeat R`` times each mode R times (interleaved) and keeps the fastest: on a machine
shared with other work, the wall times vary a lot.

    python bench/bench_parallel.py [--seeds 4 --parallel 2 --epochs 2 --hidden 256 --layers 4 --train-examples 2048 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONE_SLOT = """
import sys
from pathlib import Path
from lowrank_runner.recipe.load import load_recipe
from lowrank_runner.train.parallel.driver import run_parallel
from lowrank_runner.train.parallel.slots import ParallelOptions
recipe, out = sys.argv[1], Path(sys.argv[2])
failed = run_parallel(load_recipe(Path(recipe), ()), out, ["lrr", "run", recipe], ParallelOptions(parallel=1))
sys.exit(1 if failed else 0)
"""


def build_inputs(directory: Path, hidden: int, layers: int, n_train: int) -> tuple[Path, Path, Path]:
    """A random-weight BERT backbone and the sentiment data of the tests' fixtures."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    sys.path.insert(0, str(REPO))
    from tests.conftest import SPECIAL, WORDS, write_sentiment_data

    config = transformers.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=max(1, hidden // 32), intermediate_size=hidden * 4,
                                     max_position_embeddings=64)
    backbone = directory / "backbone"
    transformers.AutoModel.from_config(config).save_pretrained(backbone)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(backbone)
    data = directory / "data"
    data.mkdir()
    train, validation = write_sentiment_data(data, n_train=n_train, n_eval=64)
    return backbone, train, validation


def write_recipe(directory: Path, backbone: Path, train: Path, validation: Path, seeds: int, epochs: int) -> Path:
    recipe = directory / "bench.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: bench-parallel
        backbone: {{name: {backbone}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 8, alpha: 16}}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          max_length: 32
        training: {{learning_rate: 1e-3, epochs: {epochs}, batch_size: 16, seed: {list(range(seeds))}, log_every: 10}}
        """).lstrip())
    return recipe


def timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and every process it
    waited for) of one command, which must succeed. The CPU time hardly depends on what
    else the machine runs; the wall time does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="runs in the recipe (one per seed)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-examples", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1, help="time each mode this often, keep the fastest")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lrr-bench-parallel-") as tmp:
        work = Path(tmp)
        recipe = write_recipe(work, *build_inputs(work, args.hidden, args.layers, args.train_examples), args.seeds,
                              args.epochs)
        lrr = [sys.executable, "-m", "lowrank_runner", "run", str(recipe)]
        commands = {"seq": [*lrr, "--output"], "par": [*lrr, "--parallel", str(args.parallel), "--output"],
                    "one": [sys.executable, "-c", ONE_SLOT, str(recipe)]}
        times = {name: [] for name in commands}
        for attempt in range(args.repeat):  # interleaved, so that a busy spell of the machine hits every mode
            for name, argv in commands.items():
                times[name].append(timed([*argv, str(work / f"{name}{attempt}")], work))
        (sequential, seq_cpu), (parallel, par_cpu), (one_slot, one_cpu) = (min(times[n]) for n in commands)
        same = (work / "seq0" / "results.md").read_text() == (work / "par0" / "results.md").read_text()
    result = {
        "runs": args.seeds, "parallel": args.parallel, "cores": len(os.sched_getaffinity(0)), "repeat": args.repeat,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "model": f"BERT hidden {args.hidden}, {args.layers} layers", "train_examples": args.train_examples,
        "epochs": args.epochs, "sequential_s": round(sequential, 1), "parallel_s": round(parallel, 1),
        "speed_up": round(sequential / parallel, 2), "children_one_at_a_time_s": round(one_slot, 1),
        "overhead_per_run_s": round((one_slot - sequential) / args.seeds, 2),
        "cpu_s": {"sequential": round(seq_cpu, 1), "parallel": round(par_cpu, 1), "one_at_a_time": round(one_cpu, 1)},
        "overhead_per_run_cpu_s": round((one_cpu - seq_cpu) / args.seeds, 2), "same_results_table": same,
    }
    print(json.dumps(result, indent=2))
    print(f"\n| runs | --parallel | sequential | parallel | speed-up | overhead per run (wall / CPU) |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {args.seeds} | {args.parallel} | {sequential:.1f} s | {parallel:.1f} s | ×{sequential / parallel:.2f} | "
          f"{result['overhead_per_run_s']:.1f} s / {result['overhead_per_run_cpu_s']:.1f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
