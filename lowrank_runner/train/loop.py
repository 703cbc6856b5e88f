"""One training run with Accelerate: the same code on a CPU, one GPU or under
``accelerate launch`` with several processes.

The loop knows nothing about any particular method: it adds ``method.extra_loss`` to
the task loss and calls ``method.after_optimizer_step`` right after every optimizer step
(before gradients are cleared, so allocators can read them).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_runner.backbones import load_tokenizer
from lowrank_runner.backbones import resolve as resolve_backbone
from lowrank_runner.inspect import PlanError, check_schedule
from lowrank_runner.methods.inject import adapter_state_dict, is_adapter_param, load_adapter_state
from lowrank_runner.modeling import AdaptedModel, build_adapted_model
from lowrank_runner.recipe.load import Recipe, RunSpec
from lowrank_runner.report.build import build_run_report
from lowrank_runner.report.write import write_run_report
from lowrank_runner.tasks.base import Task, build_task
from lowrank_runner.tasks.holdout import HOLDOUT_SEED, TEST_PREFIX, apply_holdout
from lowrank_runner.train import artifacts as art
from lowrank_runner.train.checkpoint import CHECKPOINTS_DIR, Checkpoint, restore_checkpoint, save_checkpoint
from lowrank_runner.train.progress import TrainingProgress
from lowrank_runner.train.schedule import plan_steps


@dataclass
class RunResult:
    run_dir: Path
    best: dict
    stopped_at: int | None = None  # set when --stop-after-step ended the run early (resumable)
    test: dict | None = None  # the selected checkpoint on the test set(s) (task.holdout_fraction, task.test_split)


def has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def build_optimizer(model, training: dict) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": training["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=training["learning_rate"],
        betas=tuple(training["adam_betas"]), eps=training["adam_epsilon"],
    )


def build_dataloaders(tokenized, tokenizer, task: Task, training: dict, seed: int, mixed_precision: str, eval_splits):
    from torch.utils.data import DataLoader

    collator = task.collator(tokenizer, pad_to_multiple_of=8 if mixed_precision != "no" else None)
    generator = torch.Generator().manual_seed(seed)
    workers = training["dataloader_workers"]
    train = DataLoader(tokenized["train"], batch_size=training["batch_size"], shuffle=True, collate_fn=collator,
                       generator=generator, num_workers=workers)
    evaluation = {split: DataLoader(tokenized[split], batch_size=training["eval_batch_size"] or 2 * training["batch_size"],
                                    shuffle=False, collate_fn=collator, num_workers=workers)
                  for split in eval_splits}
    return train, evaluation, generator


def evaluate_all(model, dataloaders: dict, task: Task, accelerator, splits: dict[str, str]) -> dict[str, float]:
    """The given evaluation splits, metric names suffixed per :meth:`Task.eval_splits`."""
    out = {}
    for split, suffix in splits.items():
        scores = task.evaluate(model, dataloaders[split], accelerator, split)
        out.update({f"{k}{suffix}": v for k, v in scores.items()})
    return out


def _trainable_state(model, adapted: AdaptedModel, compact: bool = True) -> tuple[dict, dict]:
    """Adapter (at its active ranks unless ``compact=False``) and head tensors, on the CPU."""
    state = model.state_dict()
    adapter = {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(model, compact).items()}
    head = {k: state[k].detach().to("cpu", copy=True) for k in adapted.head_names}
    return adapter, head


def adapter_config(adapted: AdaptedModel, run: RunSpec, recipe: Recipe, task: Task) -> dict:
    import lowrank_runner

    return {
        "format": "lowrank-runner-adapter",
        "format_version": 1,
        "lowrank_runner_version": lowrank_runner.__version__,
        "method": run.config["method"],
        "targets": run.config["targets"],
        "modules": [{"path": t.path, "symbols": list(t.symbols), "groups": list(t.groups) if t.groups else None}
                    for t in adapted.targets],
        "backbone": {**run.config["backbone"], "resolved": adapted.backbone.location},
        "task": {"name": run.task, "model_class": task.model_class_name, **task.model_config_kwargs()},
        "head": adapted.head_names,
        "recipe_hash": recipe.hash,
        "config_hash": run.config_hash,
    }


def _split_best(tensors: dict | None) -> tuple[dict, dict] | None:
    if tensors is None:
        return None
    adapter = {k: v for k, v in tensors.items() if is_adapter_param(k)}
    return adapter, {k: v for k, v in tensors.items() if k not in adapter}


_DATA_CACHE: dict[str, tuple[Task, object, object]] = {}


def clear_data_cache() -> None:
    """Forget tokenized data (called at the start of every ``lrr run``: files may change)."""
    _DATA_CACHE.clear()


def prepared_data(cfg: dict, tokenizer) -> tuple[Task, object, object]:
    """The task, its raw splits (after any hold-out) and its tokenized splits. Runs of a
    recipe are task-major, so the seeds of a task reuse the last tokenized data of this
    invocation (datasets' fingerprint cache serves file-backed data across processes and
    invocations too)."""
    key = json.dumps({"task": cfg["task"], "backbone": cfg["backbone"], "tokenizer": tokenizer.name_or_path},
                     sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one entry: tokenized data can be large
        task = build_task(cfg["task"])
        splits = task.load_splits()
        holdout = cfg["task"].get("holdout_fraction")
        if holdout:
            splits = apply_holdout(splits, holdout, task.eval_splits())
        _DATA_CACHE[key] = (task, splits, task.tokenize(splits, tokenizer))
    return _DATA_CACHE[key]


def train_run(recipe: Recipe, run: RunSpec, run_dir: Path, argv: list[str], resume: Checkpoint | None = None,
              stop_after: int | None = None, init_from=None) -> RunResult:
    """Train one run into ``run_dir``; ``resume`` continues from a checkpoint of it,
    ``stop_after`` ends the run with a checkpoint after that optimizer step, and
    ``init_from`` (train/init_from.py) loads another run's adapter before training."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg, training = run.config, run.config["training"]
    started = time.time()
    mixed = resolve_mixed_precision(training["mixed_precision"])
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        cpu=not has_accelerator_device(),  # lets `accelerate launch`/torchrun use gloo across CPU processes
    )
    main = accelerator.is_main_process
    set_seed(run.seed)

    ref = resolve_backbone(cfg["backbone"])
    tokenizer = load_tokenizer(ref, cfg["backbone"].get("tokenizer"))
    with accelerator.main_process_first():
        task, splits, tokenized = prepared_data(cfg, tokenizer)
    holdout = cfg["task"].get("holdout_fraction")
    selection = {"validation": ""} if holdout else task.eval_splits()
    tests = {TEST_PREFIX + name: suffix for name, suffix in task.eval_splits().items()} if holdout else {}
    tests.update(task.test_splits())  # test sets the task loads itself (task.test_split)
    adapted = build_adapted_model(cfg, task.model_class, task.model_config_kwargs(), weights=True, ref=ref)
    model = adapted.model
    if init_from is not None and resume is None:  # a checkpoint holds the adapter already
        init_from.load_into(adapted, cfg)
    plan = plan_steps(len(tokenized["train"]), training, accelerator.num_processes)
    check_schedule(plan, f"{recipe.source} [{run.task}, seed {run.seed}]")

    train_dl, eval_dls, data_generator = build_dataloaders(tokenized, tokenizer, task, training, run.seed, mixed,
                                                      {**selection, **tests})
    optimizer = build_optimizer(model, training)
    scheduler = get_scheduler(training["lr_scheduler"], optimizer, plan.warmup_steps, plan.total_steps)
    model, optimizer, train_dl, *prepared = accelerator.prepare(model, optimizer, train_dl, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, prepared))
    method, adapters = adapted.method, adapted.injection.adapters
    try:
        method.on_train_begin(plan.total_steps)
    except ValueError as exc:
        raise PlanError(f"{recipe.source} [{run.task}, seed {run.seed}]: method: {exc}") from None
    params = [p for p in model.parameters() if p.requires_grad]

    higher = task.greater_is_better
    best = {"step": None, "metric": task.metric, "value": None, "eval": None}
    best_state: tuple[dict, dict] | None = None
    best_outputs: dict[str, list[dict]] = {}  # the task's outputs (generations, answers) at the best checkpoint
    last_eval: dict | None = None
    step, window_loss, window_n = 0, torch.zeros((), device=accelerator.device), 0
    epoch_index, skip_batches, epoch_generator = 0, 0, None
    log_lines = 0
    if resume is not None:
        if resume.state["config_hash"] != run.config_hash:
            raise PlanError(
                f"{resume.path}: written by a different recipe (config hash {resume.state['config_hash']}, "
                f"now {run.config_hash}); resume with the recipe and --set overrides the run started with"
            )
        try:
            best_tensors, epoch_generator = restore_checkpoint(resume, accelerator, model, optimizer, scheduler, method)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        best_state = _split_best(best_tensors)
        st = resume.state
        step, epoch_index, skip_batches = st["step"], st["epoch_index"], st["batches_in_epoch"]
        best, last_eval, window_n, log_lines = st["best"], st["last_eval"], st["window_n"], st["log_lines"]
        best_outputs = st.get("best_outputs", {})
        window_loss.fill_(st["window_loss"])

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        art.write_recipe(run_dir / art.RECIPE_FILE, cfg, recipe.hash, run.config_hash, recipe.source)
    log = art.MetricsLog(run_dir / art.METRICS_LOG, keep_lines=log_lines) if main else None
    eval_every = training["eval_every"] or plan.steps_per_epoch
    checkpoint_every = training["checkpoint_every"] or eval_every
    progress = TrainingProgress(plan.total_steps, enabled=main, metric=task.metric)
    stopped_at = None

    def checkpoint(batches_in_epoch: int) -> None:
        unwrapped = accelerator.unwrap_model(model)
        trainable = _trainable_state(unwrapped, adapted, compact=False) if main else ({}, {})
        save_checkpoint(
            run_dir, accelerator, keep=training["checkpoints_kept"], optimizer=optimizer, scheduler=scheduler,
            method=method, data_generator=epoch_generator,
            trainable={**trainable[0], **trainable[1]},
            best={**best_state[0], **best_state[1]} if best_state else None,
            state={"step": step, "epoch_index": epoch_index, "batches_in_epoch": batches_in_epoch,
                   "window_loss": float(window_loss), "window_n": window_n, "best": best, "last_eval": last_eval,
                   "best_outputs": best_outputs,
                   "log_lines": log.lines if log else 0, "config_hash": run.config_hash,
                   "total_steps": plan.total_steps},
        )

    model.train()
    with progress:
        progress.start_at(step)
        while step < plan.total_steps and stopped_at is None:
            if skip_batches and epoch_generator is not None:
                data_generator.set_state(epoch_generator)  # replay the interrupted epoch's order
            else:
                epoch_generator = data_generator.get_state()
            for batch_index, batch in enumerate(train_dl):
                if batch_index < skip_batches:
                    continue
                with accelerator.accumulate(model):
                    out = model(**task.model_inputs(batch))
                    loss = task.loss(out, batch)
                    extra = method.extra_loss(adapters)
                    total = loss if extra is None else loss + extra
                    accelerator.backward(total)
                    window_loss += loss.detach().float()
                    window_n += 1
                    if not accelerator.sync_gradients:
                        continue
                    if training["max_grad_norm"]:
                        accelerator.clip_grad_norm_(params, training["max_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    hook_logs = method.after_optimizer_step(step, adapters, optimizer) or {}
                    optimizer.zero_grad(set_to_none=True)
                epoch = step / plan.steps_per_epoch
                if step % training["log_every"] == 0 or step == plan.total_steps:
                    mean_loss = accelerator.reduce(window_loss / max(window_n, 1), reduction="mean").item()
                    window_loss.zero_()
                    window_n = 0
                    record = {"step": step, "epoch": round(epoch, 4), "loss": mean_loss,
                              "lr": scheduler.get_last_lr()[0], **hook_logs}
                    if extra is not None:
                        record["extra_loss"] = float(extra.detach())
                    if log:
                        log.write(record)
                    progress.update_train(step, mean_loss, record["lr"])
                if step % eval_every == 0 or step == plan.total_steps:
                    last_eval = evaluate_all(model, eval_dls, task, accelerator, selection)
                    value = last_eval[task.metric]
                    improved = method.checkpoint_eligible(step) and (
                        best["value"] is None or (value > best["value"] if higher else value < best["value"])
                    )
                    if improved:
                        best.update(step=step, value=value, eval=last_eval)
                        best_state = _trainable_state(accelerator.unwrap_model(model), adapted)
                        best_outputs = {k: list(v) for k, v in task.outputs().items() if k in selection}
                    if log:
                        log.write({"step": step, "epoch": round(epoch, 4), "eval": last_eval})
                    progress.update_eval(step, last_eval, task.metric, improved)
                if step >= plan.total_steps:
                    break
                if step % checkpoint_every == 0 or step == stop_after:
                    checkpoint(batch_index + 1)
                if step == stop_after:
                    stopped_at = step
                    break
            else:
                epoch_index += 1
                skip_batches = 0
                continue
            break

    if log:
        log.close()
    accelerator.wait_for_everyone()
    if stopped_at is not None:
        accelerator.end_training()
        return RunResult(run_dir, best, stopped_at=stopped_at)
    unwrapped = accelerator.unwrap_model(model)
    test = None
    if tests:  # score the selected checkpoint once on the test set(s)
        if best_state is not None:
            load_adapter_state(unwrapped, best_state[0])
            unwrapped.load_state_dict(best_state[1], strict=False)
        test = evaluate_all(model, eval_dls, task, accelerator, tests)
    if main:
        adapter_state, head_state = best_state or _trainable_state(unwrapped, adapted)
        origin = init_from.record() if init_from is not None else None  # the adapter it started from
        config = adapter_config(adapted, run, recipe, task)
        if origin is not None:
            config["init_from"] = origin
        art.save_adapter(run_dir / art.ADAPTER_DIR, adapter_state, head_state, config)
        final = {"task": run.task, "seed": run.seed, "metric": task.metric, "best": best, "last": {"step": step, "eval": last_eval}}
        if test is not None:
            final["test"] = test  # the selected checkpoint on the test set(s)
        art.write_json(run_dir / art.METRICS_FILE, final)
        outputs = {**best_outputs, **{k: v for k, v in task.outputs().items() if k in tests}}
        for split, rows in outputs.items():  # generated text, answers: the selected checkpoint's
            art.write_jsonl(run_dir / art.OUTPUTS_FILE.format(split=split.replace(TEST_PREFIX, "test_")), rows)
        test_examples = {k[len(TEST_PREFIX):]: len(tokenized[k]) for k in tests}
        pattern = method.rank_pattern(adapters)
        if pattern is not None:
            from lowrank_runner.plots import rank_heatmap

            art.write_json(run_dir / art.RANK_PATTERN_FILE, pattern)
            symbols = {t.path: list(t.symbols) for t in adapted.targets}
            total = sum(pattern.values())
            rank_heatmap(pattern, symbols, run_dir / art.RANK_HEATMAP_FILE,
                         f"{cfg['method']['name']} final ranks: {total} over {len(pattern)} modules")
        write_run_report(run_dir, build_run_report(
            recipe=recipe, run=run, argv=argv, adapted=adapted, model=unwrapped, task=task, splits=splits,
            tokenized=tokenized, plan=plan, best=best, last_eval=last_eval, test=test, started=started,
            accelerator=accelerator, rank_pattern=pattern, resumed_from=resume.step if resume is not None else None,
            holdout=({"fraction": holdout, "seed": HOLDOUT_SEED, "test_examples": test_examples} if holdout else None),
            test_examples=test_examples or None, init_from=origin,
        ))
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)  # complete: nothing left to resume
    accelerator.end_training()
    return RunResult(run_dir, best, test=test)
