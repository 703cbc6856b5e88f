"""The slow start as a number: ‖ΔW‖ and the dev metric over the first steps, per method, against PEFT's LoRA.

On real SST-2 (the raw GLUE directory ``../shared/data/glue`` beside the project, or
``--data-dir`` / ``$LRR_GLUE_DIR``; the script exits with a message, and status 0, when it
is absent), MiniLM-L6 (the quickstart backbone, as bench/quality.py), the first
``--train-samples`` training sentences, batch 32, 64 tokens, r 8, alpha 16, all six
matrices (Wq, Wk, Wv, Wa, Wm, Wo), each configuration trains ``--steps`` optimizer steps
and logs, every ``--log-every`` steps, ``update_norm`` = sqrt(Σ_m ‖ΔW_m‖²_F) over the
adapted modules, and evaluates on the official dev set every ``--eval-every`` steps.

Our methods run through the real ``lrr run`` path (a recipe with
``training.log_update_norm: true``, ``max_steps``, ``log_every`` and ``eval_every``; see
docs/recipes.md), PEFT's LoRA through bench/quality.py's minimal loop (``peft_run``: the
same recipe, data, optimizer, scheduler, seed and evaluation points; its update norm from
PEFT's ``lora_A``/``lora_B`` by the same formula). Everything but the adapter is shared,
so a configuration's ``update_norm`` divided by PEFT LoRA's at the same step says how much
slower (< 1) or faster (> 1) it moves the weights. Configurations (``--configs``):
bench/quality.py's methods and this script's variants of them (:data:`VARIANTS`), or
any name of a ``--settings`` file (bench/quality.py's format, e.g.
``lora2: {training: {learning_rate: 1.0e-2}}``).

    python bench/bench_start.py                                  # the eight configurations, 250 steps, lr 2e-3
    python bench/bench_start.py --configs peft-lora,lora2,lora2-orthonormal --lr 5e-4 --json start.json
    python bench/bench_start.py --train-samples 200 --steps 10 --configs peft-lora,lora,lora2   # a smoke test

Output: per configuration, ``update_norm`` at the steps of ``--report-steps`` that were
logged (and its ratio to PEFT LoRA's), the dev metric at every evaluation, and a JSON
file (OUT/start.json, and ``--json``) with every logged line, the settings and the
environment. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: recipes, the lrr run and PEFT paths, data checks)

TASK = "sst2"
# Variants of bench/quality.py's configurations (its --settings format): the documented inits
VARIANTS = {
    "lora2-orthonormal": {"base": "lora2", "method": {"init": "orthonormal"}},
    "triadaptlora-fan_in": {"base": "triadaptlora", "method": {"init": "fan_in"}},
}
CONFIGS = ["peft-lora", "lora", "mtlora", "lora2", "lora2-orthonormal", "triadaptlora", "triadaptlora-fan_in", "condlora"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LRR_GLUE_DIR", str(quality.DEFAULT_DATA)),
                    help="raw GLUE TSV directory (SST-2/); default $LRR_GLUE_DIR or ../shared/data/glue")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated: {', '.join(quality.METHODS)}, {', '.join(VARIANTS)} or --settings names")
    ap.add_argument("--settings", default=None, help="bench/quality.py settings YAML (per configuration overrides)")
    ap.add_argument("--train-samples", type=int, default=4000, help="first N training sentences; 0 = all")
    ap.add_argument("--eval-samples", type=int, default=0, help="first N dev sentences; 0 = the official 872")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps (training.max_steps)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate of every configuration (--settings may override)")
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--log-every", type=int, default=1, help="log the update norm every N steps (1: step 1 too)")
    ap.add_argument("--eval-every", type=int, default=25, help="evaluate on the dev set every N steps")
    ap.add_argument("--report-steps", default="1,5,25,50,100,250", help="steps shown in the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=quality.BACKBONE)
    ap.add_argument("--out", default=None, help="directory for recipes and runs (default runs/bench-start/<time>)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.epochs, args.tasks = 1, TASK  # what bench/quality.py's helpers read
    return args


def configs(args) -> list[quality.Config]:
    """The configurations, each trained ``--steps`` steps with the update norm logged."""
    settings = {**VARIANTS, **quality.load_settings(args.settings)}
    built = quality.build_configs(args.configs.split(","), settings, {})
    fixed = {"max_steps": args.steps, "log_update_norm": True, "log_every": args.log_every,
             "eval_every": args.eval_every}
    for config in built:
        config.training = {**config.training, **fixed}
    return built


def run_config(config: quality.Config, args) -> dict:
    """One configuration's row (bench/quality.py's, with ``history`` and ``evals``)."""
    rows = quality.peft_run(args, [TASK], config) if config.is_peft else quality.ours(config, args, [TASK])
    return rows[0]


def norms_by_step(row: dict) -> dict[int, float]:
    return {ln["step"]: ln["update_norm"] for ln in row.get("history", []) if "update_norm" in ln}


def norm_table(rows: list[dict], steps: list[int]) -> list[str]:
    """``update_norm`` per configuration at the report steps, with its ratio to PEFT LoRA's."""
    ref = next((norms_by_step(r) for r in rows if r.get("base") == "peft-lora"), {})
    shown = [s for s in steps if any(s in norms_by_step(r) for r in rows)]
    lines = ["update_norm = sqrt(sum_m ||dW_m||_F^2) (x PEFT LoRA's at the same step):",
             "| config | trainable params | " + " | ".join(f"step {s}" for s in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''} |")
            continue
        norms, cells = norms_by_step(r), []
        for s in shown:
            value = norms.get(s)
            ratio = f" ({value / ref[s]:.3g}x)" if value is not None and ref.get(s) else ""
            cells.append("" if value is None else f"{value:.3g}{ratio}")
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | " + " | ".join(cells) + " |")
    return lines


def metric_table(rows: list[dict]) -> list[str]:
    """The dev metric of every configuration at every evaluation."""
    done = [r for r in rows if "error" not in r]
    steps = sorted({e["step"] for r in done for e in r["evals"]})
    metric = done[0]["metric"] if done else "metric"
    lines = [f"dev {metric} at each evaluation:", "| config | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for r in done:
        at = {e["step"]: e[metric] for e in r["evals"]}
        lines.append(f"| {r['method']} | " + " | ".join(f"{at[s]:.4f}" if s in at else "" for s in steps) + " |")
    return lines


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        built = configs(args)
        args.out = args.out or str(quality.REPO / "runs" / "bench-start" / time.strftime("%Y%m%d-%H%M%S"))
        data = quality.prepare_data(args, [TASK], "bench/bench_start.py")
    except quality.BenchError as exc:
        print(f"bench/bench_start.py: {exc}", file=sys.stderr)
        return 2
    if data is None:
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.data_dir = str(data)
    print(f"SST-2, backbone {args.backbone}, targets {','.join(quality.TARGETS)}, r={args.r}, alpha={args.alpha}, "
          f"lr {args.lr}, batch {args.batch}, {args.steps} steps, max_length {args.max_length}, train samples "
          f"{args.train_samples or 'all'}, seed {args.seed}; runs under {args.out}", flush=True)
    rows = []
    for config in built:
        t = time.time()
        rows.append(run_config(config, args))
        print(f"{config.name} done in {time.time() - t:.0f}s", flush=True)
    report_steps = [int(s) for s in args.report_steps.split(",") if s.strip()]
    lines = norm_table(rows, report_steps) + [""] + metric_table(rows)
    print("\n".join(lines))
    result = {"command": ["python", "bench/bench_start.py", *(sys.argv[1:] if argv is None else argv)],
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "task": TASK,
              "targets": quality.TARGETS, "configs": {c.name: vars(c) for c in built},
              "methods": {c.name: (quality.method_config(c, args) if not c.is_peft else "peft.LoraConfig") for c in built},
              "machine": platform.node(), "environment": quality.environment(), "tables": lines, "rows": rows}
    return quality.write_result(result, Path(args.out) / "start.json", args.json)


if __name__ == "__main__":
    sys.exit(main())
