"""One training run with Accelerate: the same code on a CPU, one GPU or under
``accelerate launch`` with several processes.

:class:`TrainingRun` holds the phases (set-up, resume, the step, evaluate-and-select,
checkpoint, finish; docs/architecture.md) and :func:`train_run` runs them in order.
The loop knows nothing about any particular method: it adds ``method.extra_loss`` to
the task loss and calls ``method.after_optimizer_step`` right after every optimizer step
(before gradients are cleared, so allocators can read them; on a step the fp16 loss
scaler skipped, with the gradients already cleared).

Under FSDP (``training.fsdp`` or ``accelerate launch --config_file fsdp.yaml``;
train/fsdp.py) Accelerate shards the frozen backbone while every trained tensor
(adapters, ``lrr_shared``, head) stays whole on each process: the loop averages their
gradients before clipping (``Sharding.average_gradients``, what DDP does), so the
method's hooks, checkpoints and the exported adapter see whole, identical tensors.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_runner.backbones.load import load_tokenizer
from lowrank_runner.backbones.resolve import resolve as resolve_backbone
from lowrank_runner.methods.inject import SHARED_KEY, adapter_state_dict, load_adapter_state, update_norms
from lowrank_runner.modeling import AdaptedModel, build_adapted_model, check_backbone_fits_task
from lowrank_runner.plan.checks import PlanError, check_method_schedule, check_schedule, plan_run, run_batch
from lowrank_runner.recipe.load import Recipe, RunSpec, at_recipe_lines
from lowrank_runner.rundir.adapter import adapter_config, save_adapter
from lowrank_runner.rundir.files import MetricsLog, write_json, write_jsonl, write_recipe
from lowrank_runner.rundir.layout import (ADAPTER_DIR, CHECKPOINTS_DIR, METRICS_FILE, METRICS_LOG, OUTPUTS_FILE,
                                          RANK_HEATMAP_FILE, RANK_PATTERN_FILE, RECIPE_FILE, REPORT_FILE)
from lowrank_runner.rundir.write import write_run_report
from lowrank_runner.tasks.base import Task
from lowrank_runner.tasks.holdout import HOLDOUT_SEED, TEST_PREFIX
from lowrank_runner.train.checkpoint import Checkpoint, restore_checkpoint, save_checkpoint
from lowrank_runner.train.data import build_dataloaders, last_reuse, prepared_data
from lowrank_runner.train.devices import has_accelerator_device, resolve_mixed_precision
from lowrank_runner.train.divergence import DivergenceGuard
from lowrank_runner.train.fsdp import Sharding
from lowrank_runner.train.memory import enable_gradient_checkpointing, keep_trainable_in
from lowrank_runner.train.optim import build_optimizer, build_scheduler
from lowrank_runner.train.progress import SetupPhases, TrainingProgress
from lowrank_runner.train.run_report import build_run_report
from lowrank_runner.train.stopping import EvaluationObserver, early_stopping
from lowrank_runner.train.tracking import Tracking


@dataclass
class RunResult:
    run_dir: Path
    best: dict
    stopped_at: int | None = None  # set when --stop-after-step ended the run early (resumable)
    test: dict | None = None  # the selected checkpoint on the test set(s) (task.holdout_fraction, task.test_split)


def evaluate_all(model, dataloaders: dict, task: Task, accelerator, splits: dict[str, str]) -> dict[str, float]:
    """The given evaluation splits, metric names suffixed per :meth:`Task.eval_splits`."""
    out = {}
    for split, suffix in splits.items():
        scores = task.evaluate(model, dataloaders[split], accelerator, split)
        out.update({f"{k}{suffix}": v for k, v in scores.items()})
    return out


def _reports_completed(run_dir: Path) -> bool:
    """Whether the run's report.json says it completed (an older one may say interrupted)."""
    try:
        return json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8")).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _trainable_state(model, adapted: AdaptedModel, compact: bool = True) -> tuple[dict, dict]:
    """Adapter (at its active ranks unless ``compact=False``, with the backbone tensors the
    method trains itself) and head tensors, on the CPU."""
    state = model.state_dict()
    adapter = {k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(model, compact, adapted.base_names).items()}
    head = {k: state[k].detach().to("cpu", copy=True) for k in adapted.head_names}
    return adapter, head


def run_adapter_config(adapted: AdaptedModel, run: RunSpec, recipe: Recipe, task: Task) -> dict:
    """The run's ``adapter_config.json`` (rundir/adapter.py)."""
    return adapter_config(
        method=run.config["method"],
        targets=run.config.get("targets", []),  # none for methods without adapters
        modules=[{"path": t.path, "symbols": list(t.symbols), "groups": list(t.groups) if t.groups else None}
                 for t in adapted.targets],
        backbone={**run.config["backbone"], "resolved": adapted.backbone.location},
        task={"name": run.task, "model_class": task.model_class_name, **task.model_config_kwargs()},
        head=adapted.head_names,
        base=adapted.base_names,  # backbone tensors the method trained (full, bitfit), in adapter.safetensors
        shared=hasattr(adapted.model, SHARED_KEY),  # the method's own parameters (CondLoRA, a prefix)
        recipe_hash=recipe.hash,
        config_hash=run.config_hash,
    )


def _split_best(tensors: dict | None, head_names: list[str]) -> tuple[dict, dict] | None:
    """A checkpoint's best tensors as (adapter, head): the head is what ``head_names`` names."""
    if tensors is None:
        return None
    head = set(head_names)
    return {k: v for k, v in tensors.items() if k not in head}, {k: v for k, v in tensors.items() if k in head}


@dataclass
class LoopState:
    """Everything the loop carries from one optimizer step to the next: what a checkpoint
    saves (with the model, optimizer, scheduler, method and RNG states) and resume restores."""

    window_loss: torch.Tensor  # summed task loss since the last log line (on the device)
    best: dict  # the selected checkpoint so far: step, metric, value, eval
    step: int = 0  # optimizer steps done
    epoch_index: int = 0
    skip_batches: int = 0  # batches of the current epoch already trained (a resumed run skips them)
    window_n: int = 0
    last_eval: dict | None = None
    best_state: tuple[dict, dict] | None = None  # adapter and head tensors of the best checkpoint
    best_outputs: dict = field(default_factory=dict)  # the task's outputs (generations, answers) at the best checkpoint
    epoch_generator: torch.Tensor | None = None  # the data order's generator state at the start of the epoch
    log_lines: int = 0  # metrics.jsonl lines written up to the checkpoint

    def checkpoint_state(self, batches_in_epoch: int, log_lines: int, config_hash: str, total_steps: int) -> dict:
        """The JSON part of a checkpoint (``state.json``)."""
        return {"step": self.step, "epoch_index": self.epoch_index, "batches_in_epoch": batches_in_epoch,
                "window_loss": float(self.window_loss), "window_n": self.window_n, "best": self.best,
                "last_eval": self.last_eval, "best_outputs": self.best_outputs, "log_lines": log_lines,
                "config_hash": config_hash, "total_steps": total_steps}

    def restore(self, saved: dict) -> None:
        """Continue from a checkpoint's ``state.json``."""
        self.step, self.epoch_index, self.skip_batches = saved["step"], saved["epoch_index"], saved["batches_in_epoch"]
        self.best, self.last_eval, self.window_n = saved["best"], saved["last_eval"], saved["window_n"]
        self.log_lines, self.best_outputs = saved["log_lines"], saved.get("best_outputs", {})
        self.window_loss.fill_(saved["window_loss"])


@dataclass
class StepOutput:
    """What one optimizer step leaves for logging."""

    method_logs: dict  # returned by ``method.after_optimizer_step``
    extra_loss: torch.Tensor | None  # the method's regulariser on the step's last micro-batch


class TrainingRun:
    """One run, in the phases a reader (and later work: trackers, parallel runs, FSDP)
    can find at once:

    ``setup()`` (Accelerator, data, model, optimizer; the method learns the planned
    steps) → ``restore()`` (``--resume``: a checkpoint's state) → ``open_outputs()``
    (run directory, ``metrics.jsonl``, progress) → ``train()``: epochs of
    ``train_window(window)`` (forward and backward of each micro-batch, optimizer step,
    the method's hook), then
    ``log_step`` / ``evaluate_and_select`` / ``save_checkpoint`` as scheduled →
    ``finish()`` (test scores, adapter, metrics, report; or the stop after
    ``--stop-after-step``). :func:`train_run` calls them in this order.
    """

    def __init__(self, recipe: Recipe, run: RunSpec, run_dir: Path, argv: list[str], resume: Checkpoint | None = None,
                 stop_after: int | None = None, init_from=None, observer: EvaluationObserver | None = None):
        self.recipe, self.run, self.run_dir, self.argv = recipe, run, run_dir, argv
        self.resume, self.stop_after, self.init_from = resume, stop_after, init_from
        self.outside_observer = observer  # a search's pruner (search/study.py)
        self.stopped_early: dict | None = None  # where and why an observer ended training
        self.cfg, self.training = run.config, run.config["training"]
        self.where = f"{recipe.source} [{run.task}, seed {run.seed}]"
        self.stopped_at: int | None = None
        self.log: MetricsLog | None = None
        self.tracking = Tracking(recipe, run, run_dir)  # output.trackers (train/tracking.py)

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Accelerator and seed, data, model (with ``training.init_from``), step plan,
        dataloaders, optimizer and scheduler, all prepared; the method learns the plan."""
        from accelerate.utils import set_seed

        self.started = time.time()
        self.mixed = resolve_mixed_precision(self.training["mixed_precision"])
        self.accelerator = self._accelerator()
        self.main = self.accelerator.is_main_process
        # training.batch_size over the processes (plan/schedule.py); checked before any data loads
        self.batch = run_batch(self.run, self.accelerator.num_processes, self.recipe.source)
        self.accelerator.gradient_accumulation_steps = self.batch.accumulation
        set_seed(self.run.seed)
        phases = SetupPhases(enabled=self.main)  # a line per phase as it starts, with its time (train/progress.py)
        with phases.phase("loading and tokenising the data") as phase:
            self._setup_data()
            phase.note = last_reuse()  # tokenised splits reused: from datasets' cache, or the previous run's
        with phases.phase("loading backbone"):
            self._setup_model()
        self.plan = plan_run(self.run, len(self.tokenized["train"]), self.accelerator.num_processes, self.recipe.source)
        check_schedule(self.plan, self.where)
        with phases.phase("preparing optimizer and devices"):
            self._setup_optimization()
        self._setup_method()
        self.state = LoopState(window_loss=torch.zeros((), device=self.accelerator.device),
                               best={"step": None, "metric": self.task.metric, "value": None, "eval": None})
        self.guard = DivergenceGuard(self.training, self.accelerator.device, self.where, self.run_dir)
        stopping = early_stopping(self.training, self.task.greater_is_better, self.task.metric)
        self.observers = [o for o in (stopping, self.outside_observer) if o is not None]

    def _accelerator(self):
        """The run's Accelerator; with FSDP (``training.fsdp`` or an accelerate config:
        train/fsdp.py) the frozen backbone is sharded and the trained tensors stay whole."""
        from accelerate import Accelerator

        self.sharding = Sharding.for_run(self.training, self.where, bool(self.training.get("gradient_checkpointing")),
                                         quantized=bool(self.cfg["backbone"].get("quantization")))
        accelerator = Accelerator(
            mixed_precision=self.mixed,
            cpu=not has_accelerator_device(),  # lets `accelerate launch`/torchrun use gloo across CPU processes
            **self.tracking.accelerator_options(),  # log_with: output.trackers
            **self.sharding.accelerator_options(),  # fsdp_plugin
        )
        self.sharding.attach(accelerator)
        return accelerator

    def _setup_data(self) -> None:
        """Tokenizer, task and tokenized splits; which splits select the best checkpoint
        (``selection``) and which are scored once at the end (``tests``)."""
        self.ref = resolve_backbone(self.cfg["backbone"])
        with at_recipe_lines(self.run):
            check_backbone_fits_task(self.cfg, self.ref)  # before any data: a causal-LM task on an encoder
        self.tokenizer = load_tokenizer(self.ref, self.cfg["backbone"].get("tokenizer"))
        with self.accelerator.main_process_first():
            self.task, self.splits, self.tokenized = prepared_data(self.cfg, self.tokenizer)
        self.holdout = self.cfg["task"].get("holdout_fraction")
        self.selection = {"validation": ""} if self.holdout else self.task.eval_splits()
        tests = {TEST_PREFIX + n: suffix for n, suffix in self.task.eval_splits().items()} if self.holdout else {}
        tests.update(self.task.test_splits())  # test sets the task loads itself (task.test_split)
        self.tests = tests

    def _setup_model(self) -> None:
        """The adapted model; its trainable non-backbone parameters (adapters, shared maps,
        head) in ``training.adapter_dtype`` and, with ``training.gradient_checkpointing``,
        activation checkpointing on (train/memory.py)."""
        task = self.task
        with at_recipe_lines(self.run):
            self.adapted = build_adapted_model(self.cfg, task.model_class, task.model_config_kwargs(), weights=True,
                                               ref=self.ref)
            own = set(self.adapted.base_names)  # full/BitFit train backbone tensors: they keep backbone.dtype
            keep_trainable_in(self.adapted.model, [n for n in self.adapted.trainable_names if n not in own],
                              self.training["adapter_dtype"])
            if self.training["gradient_checkpointing"]:
                enable_gradient_checkpointing(self.adapted.model)
        if self.init_from is not None and self.resume is None:  # a checkpoint holds the adapter already
            self.init_from.load_into(self.adapted, self.cfg)
        self.method, self.adapters = self.adapted.method, self.adapted.injection.adapters

    def _setup_optimization(self) -> None:
        """Dataloaders, optimizer and scheduler, prepared by Accelerate with the model."""
        train_dl, eval_dls, self.data_generator = build_dataloaders(
            self.tokenized, self.tokenizer, self.task, self.training, self.run.seed, self.mixed,
            {**self.selection, **self.tests}, self.plan.batch)
        optimizer = build_optimizer(self.adapted.model, self.training)
        # FSDP: the modules of trained tensors stay unsharded (train/fsdp.py)
        self.sharding.keep_whole(self.adapted.model, self.adapted.trainable_names, self.accelerator.device)
        self.scheduler = build_scheduler(optimizer, self.training["lr_scheduler"], self.plan.warmup_steps,
                                         self.plan.total_steps)
        self.model, self.optimizer, self.train_dl, *prepared = self.accelerator.prepare(
            self.adapted.model, optimizer, train_dl, *eval_dls.values())
        self.eval_dls = dict(zip(eval_dls, prepared))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sharding.check_prepared()

    def _setup_method(self) -> None:
        """The method's schedule against the planned steps (errors stop the run, warnings
        are printed, with those for a learning rate far below what the method needs at
        these steps: plan/guidance.py), then ``on_train_begin``."""
        notes = check_method_schedule(self.method, self.plan, self.where, self.cfg["method"], self.training)
        if self.main:
            for line in notes:
                print(f"warning: {line}", file=sys.stderr, flush=True)
        try:
            self.method.on_train_begin(self.plan.total_steps, adapters=self.adapters)
        except ValueError as exc:
            raise PlanError(f"{self.where}: method: {exc}") from None

    # ------------------------------------------------------------------ resume

    def restore(self) -> None:
        """``--resume``: the checkpoint's model, optimizer, scheduler, method and RNG
        states, and the loop's own state (step, data position, best so far)."""
        checkpoint = self.resume
        if checkpoint is None:
            return
        if checkpoint.state["config_hash"] != self.run.config_hash:
            raise PlanError(
                f"{checkpoint.path}: written by a different recipe (config hash {checkpoint.state['config_hash']}, "
                f"now {self.run.config_hash}); resume with the recipe and --set overrides the run started with"
            )
        planned = checkpoint.state.get("total_steps")
        if planned != self.plan.total_steps:
            raise PlanError(
                f"{checkpoint.path}: the run planned {planned} optimizer steps when this checkpoint was written and plans "
                f"{self.plan.total_steps} now: its training data changed (files edited or replaced?); resume with the "
                "same data, or start a new run in a new directory")
        try:
            best_tensors, self.state.epoch_generator = restore_checkpoint(
                checkpoint, self.accelerator, self.model, self.optimizer, self.scheduler, self.method)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        self.state.best_state = _split_best(best_tensors, self.adapted.head_names)
        self.state.restore(checkpoint.state)
        self.guard.restore(checkpoint.state.get("divergence"))  # absent from checkpoints written before the guard
        for observer in self.observers:
            if observer.name in checkpoint.state.get("observers", {}):
                observer.load_state_dict(checkpoint.state["observers"][observer.name])

    def open_outputs(self) -> None:
        """The run directory with its ``recipe.yaml``, ``metrics.jsonl`` (a resumed run
        keeps the lines up to its checkpoint), the progress display and the trackers."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_recipe(self.run_dir / RECIPE_FILE, self.cfg, self.recipe.hash, self.run.config_hash,
                             self.recipe.source)
            self.log = MetricsLog(self.run_dir / METRICS_LOG, keep_lines=self.state.log_lines)
        self.tracking.start(self.accelerator, resumed_from=self.resume.step if self.resume is not None else None)
        self.eval_every = self.training["eval_every"] or self.plan.steps_per_epoch
        self.checkpoint_every = self.training["checkpoint_every"] or self.eval_every
        self.progress = TrainingProgress(self.plan.total_steps, enabled=self.main, metric=self.task.metric)

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        """Epochs until the planned steps are done or ``--stop-after-step`` stops the run."""
        self.model.train()
        with self.progress:
            self.progress.start_at(self.state.step)
            while self.state.step < self.plan.total_steps and self.stopped_at is None:
                if self.train_epoch():
                    break

    def train_epoch(self) -> bool:
        """One pass over the training data (on resume, the rest of the interrupted one, in
        its order); True when training ends within it."""
        s = self.state
        if s.skip_batches and s.epoch_generator is not None:
            self.data_generator.set_state(s.epoch_generator)  # replay the interrupted epoch's order
        else:
            s.epoch_generator = self.data_generator.get_state()
        for window in self.accumulation_windows():
            if self.after_step(self.train_window(window), batches_in_epoch=window[-1][0] + 1):
                return True
        s.epoch_index += 1
        s.skip_batches = 0
        return False

    def accumulation_windows(self):
        """The epoch's batches, as ``(index, batch)``, one optimizer step's at a time: the
        accumulation steps' batches (fewer at the end of an epoch), in the data order;
        the batches a resumed run already trained are read and skipped."""
        window = []
        for batch_index, batch in enumerate(self.train_dl):
            if batch_index < self.state.skip_batches:
                continue
            window.append((batch_index, batch))
            if len(window) == self.batch.accumulation:
                yield window
                window = []
        if window:
            yield window

    def step_items(self, batches) -> int | None:
        """The loss items (label tokens) of one optimizer step over all its micro-batches
        and processes (``task.loss_items``), or None for a per-example mean loss."""
        counts = [self.task.loss_items(batch) for batch in batches]
        if counts[0] is None:
            return None
        local = torch.tensor(sum(counts), device=self.accelerator.device)
        return int(self.accelerator.reduce(local, reduction="sum").item())

    def train_window(self, window) -> StepOutput:
        """One optimizer step: forward and backward of each micro-batch of its window,
        gradients synchronised across processes on the last one only, then the step.
        The window is read ahead (to count its loss items), so the loop sets
        ``sync_gradients`` itself rather than ``accelerator.accumulate``, which would read
        the end of the dataloader too early (transformers' Trainer does the same)."""
        num_items = self.step_items([batch for _, batch in window])
        last = len(window) - 1
        for i, (_, batch) in enumerate(window):
            self.accelerator.sync_gradients = i == last
            with contextlib.nullcontext() if i == last else self.accelerator.no_sync(self.model):
                extra = self.train_step(batch, num_items)
        if num_items is not None:
            self.state.window_n += 1  # token-level: the window's shares add up to the step's token mean
        lr = self.scheduler.get_last_lr()[0]  # the rate this optimizer step runs at
        out = StepOutput(self.optimizer_step(), extra)
        self.guard.after_step(self.state.step, self.state.window_loss, lr)  # on the device: no sync
        return out

    def train_step(self, batch, num_items: int | None = None) -> torch.Tensor | None:
        """Forward and backward of one micro-batch; returns the method's regulariser.

        ``accelerator.backward`` divides by the accumulation steps, so the regulariser
        (added to every micro-batch) counts once per optimizer step, and per-example mean
        losses average over the micro-batches. A token-level loss (``num_items``: the
        step's label tokens, :meth:`step_items`) is this micro-batch's share of the step's
        token mean; it is scaled by the accumulation steps and the processes (whose
        gradients DDP or ``Sharding.average_gradients`` average), so the gradient is the
        full batch's token mean on any split of ``training.batch_size``."""
        out = self.model(**self.task.model_inputs(batch))
        if num_items is None:
            loss = self.task.loss(out, batch)
            self.state.window_loss += loss.detach().float()
            self.state.window_n += 1
        else:
            share = self.task.loss(out, batch, num_items=num_items)
            processes = self.accelerator.num_processes
            self.state.window_loss += share.detach().float() * processes  # reduced as a mean over processes
            loss = share * (self.batch.accumulation * processes)
        extra = self.method.extra_loss(self.adapters)
        self.accelerator.backward(loss if extra is None else loss + extra)
        return extra

    def optimizer_step(self) -> dict:
        """Clip, step the optimizer, run the method's hook, step the scheduler (unless the
        step was skipped), clear gradients; returns the hook's values to log. The hook
        sees the learning rates this step used (SoRA's threshold η_t·ξ).

        Under fp16 loss scaling a step with inf/NaN gradients is skipped by the optimizer;
        its gradients are then cleared *before* the hook, so a rank allocator never reads
        them (the schedule still advances: the hook is called with the step number)."""
        self.sharding.average_gradients(self.params)  # FSDP: the whole trained tensors' gradients, as DDP
        if self.training["max_grad_norm"]:
            self.accelerator.clip_grad_norm_(self.params, self.training["max_grad_norm"])
        self.optimizer.step()
        applied = not self.accelerator.optimizer_step_was_skipped
        if not applied:
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs = self.method.after_optimizer_step(self.state.step, self.adapters, self.optimizer) or {}
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs if applied else {**logs, "optimizer_step_skipped": 1}

    def after_step(self, out: StepOutput, batches_in_epoch: int) -> bool:
        """Log, evaluate and checkpoint as scheduled after an optimizer step; True when
        training ends here (the planned steps are done, or ``--stop-after-step``)."""
        step, total = self.state.step, self.plan.total_steps
        if step % self.training["log_every"] == 0 or step == total:
            self.log_step(out)
        self.progress.advance(step)  # the bar at every step; off a terminal, a step line when due
        if step % self.eval_every == 0 or step == total:
            self.evaluate_and_select()
        if step >= total or self.stopped_early is not None:
            return True
        if (step % self.checkpoint_every == 0 and not self.guard.holds_checkpoints) or step == self.stop_after:
            self.save_checkpoint(batches_in_epoch)
        if step == self.stop_after:
            self.stopped_at = step
            return True
        return False

    def _epoch(self) -> float:
        return round(self.state.step / self.plan.steps_per_epoch, 4)

    def log_step(self, out: StepOutput) -> None:
        """The mean loss since the last log line (over all processes), the learning rate
        and the method's values (with ``training.log_update_norm``, ``update_norm`` and
        ``update_norm_max``): a ``metrics.jsonl`` line and the progress bar. The divergence
        guard (train/divergence.py) stops the run on a non-finite loss before the line,
        and on an exploding one after it (every process sees the same reduced value: all stop)."""
        s = self.state
        mean_loss = self.accelerator.reduce(s.window_loss / max(s.window_n, 1), reduction="mean").item()
        self.guard.check_logged(s.step, mean_loss, self.accelerator)
        s.window_loss.zero_()
        s.window_n = 0
        record = {"step": s.step, "epoch": self._epoch(), "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                  **out.method_logs}
        if out.extra_loss is not None:
            record["extra_loss"] = float(out.extra_loss.detach())
        if self.training["log_update_norm"]:  # ‖ΔW‖ from the adapters' factors (methods/inject.py)
            record.update(update_norms(self.model) or {})
        if self.log:
            self.log.write(record)
        self.tracking.log_step(record)
        self.progress.update_train(s.step, mean_loss, record["lr"])
        self.guard.observe_logged(s.step, mean_loss)

    # ------------------------------------------------------------------ evaluate and select

    def evaluate_and_select(self) -> None:
        """Score the selection splits; keep the model as the best checkpoint when it
        improves the task's metric and the method allows this step."""
        s = self.state
        s.last_eval = self.evaluate(self.selection)
        improved = self.method.checkpoint_eligible(s.step) and self._improves(s.last_eval[self.task.metric])
        if improved:
            s.best.update(step=s.step, value=s.last_eval[self.task.metric], eval=s.last_eval)
            s.best_state = _trainable_state(self.accelerator.unwrap_model(self.model), self.adapted)
            s.best_outputs = {k: list(v) for k, v in self.task.outputs().items() if k in self.selection}
        if self.log:
            self.log.write({"step": s.step, "epoch": self._epoch(), "eval": s.last_eval})
        self.tracking.log_eval(s.step, s.last_eval)
        self.progress.update_eval(s.step, s.last_eval, self.task.metric, improved)
        self.observe(s.step, s.last_eval[self.task.metric])

    def observe(self, step: int, value: float) -> None:
        """Tell the observers (early stopping, a search's pruner) the evaluation; the first
        that gives a reason ends training after this step (every process decides alike: the
        metric is gathered over all of them)."""
        for observer in self.observers:
            reason = observer.after_evaluation(step, value)
            if reason is not None and self.stopped_early is None:
                self.stopped_early = {"step": step, "reason": reason, "by": observer.name}
                self.progress.note_stop(step, reason)

    def evaluate(self, splits: dict[str, str]) -> dict[str, float]:
        """Score ``splits`` (every process); under FSDP the model is then resharded on
        every process (``Sharding.after_evaluation``), as after a training step."""
        scores = evaluate_all(self.model, self.eval_dls, self.task, self.accelerator, splits)
        self.sharding.after_evaluation(self.model)
        return scores

    def _improves(self, value: float) -> bool:
        best = self.state.best["value"]
        return best is None or (value > best if self.task.greater_is_better else value < best)

    # ------------------------------------------------------------------ checkpoint

    def save_checkpoint(self, batches_in_epoch: int) -> None:
        """A resumable checkpoint after the current step (collective: every process calls it);
        none after a non-finite loss (the divergence guard stops the run instead)."""
        self.guard.check_finite(self.accelerator)
        s = self.state
        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter, head = _trainable_state(unwrapped, self.adapted, compact=False) if self.main else ({}, {})
        save_checkpoint(
            self.run_dir, self.accelerator, keep=self.training["checkpoints_kept"], optimizer=self.optimizer,
            scheduler=self.scheduler, method=self.method, data_generator=s.epoch_generator,
            trainable={**adapter, **head},
            best={**s.best_state[0], **s.best_state[1]} if s.best_state else None,
            state={**s.checkpoint_state(batches_in_epoch, self.log.lines if self.log else 0, self.run.config_hash,
                                        self.plan.total_steps), "divergence": self.guard.state(),
                   "observers": {o.name: o.state_dict() for o in self.observers}},
        )

    # ------------------------------------------------------------------ finish

    def finish(self) -> RunResult:
        """Close the log; after ``--stop-after-step`` just end (the checkpoint is there),
        else score the test sets and write the run's artifacts and report."""
        if self.log:
            self.log.close()
        self.accelerator.wait_for_everyone()
        if self.stopped_at is not None:
            self._end_trackers()
            return RunResult(self.run_dir, self.state.best, stopped_at=self.stopped_at)
        self.restore_best()
        test = self.score_tests()
        if self.main:
            self.write_artifacts(test)
        self.tracking.log_results(self.state.best, self.state.step, test)
        self.tracking.log_files(self.state.step)  # the report's plots and files, once written
        self._end_trackers()
        return RunResult(self.run_dir, self.state.best, test=test)

    def _end_trackers(self) -> None:
        """What ``accelerator.end_training()`` does but destroying the process group: the
        next run of the recipe, in this process under ``accelerate launch``, still needs it."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def restore_best(self) -> None:
        """The selected checkpoint loaded back into the model, so that the test sets, the
        rank pattern and the report's counts describe the adapter the run saves (a method
        whose ranks change to the end, SoRA, may have selected an earlier step)."""
        unwrapped, best_state = self.accelerator.unwrap_model(self.model), self.state.best_state
        if best_state is not None:
            load_adapter_state(unwrapped, best_state[0])
            unwrapped.load_state_dict(best_state[1], strict=False)

    def score_tests(self) -> dict | None:
        """The selected checkpoint (:meth:`restore_best`) on the test set(s), once."""
        if not self.tests:
            return None
        return self.evaluate(self.tests)

    def write_artifacts(self, test: dict | None) -> None:
        """Adapter, metrics, the task's outputs, rank pattern and report (main process);
        the checkpoints go: a completed run has nothing left to resume. The report is
        written last and marks the run completed; stopped before it (Ctrl-C, a full
        disk), what was written goes again, so the run resumes from its last checkpoint."""
        try:
            self._write_results(test)
        except BaseException:
            if not _reports_completed(self.run_dir):
                shutil.rmtree(self.run_dir / ADAPTER_DIR, ignore_errors=True)
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            raise
        shutil.rmtree(self.run_dir / CHECKPOINTS_DIR, ignore_errors=True)  # complete: nothing left to resume

    def _write_results(self, test: dict | None) -> None:
        s, unwrapped, run = self.state, self.accelerator.unwrap_model(self.model), self.run
        adapter_state, head_state = s.best_state or _trainable_state(unwrapped, self.adapted)
        origin = self.init_from.record() if self.init_from is not None else None  # the adapter it started from
        config = run_adapter_config(self.adapted, run, self.recipe, self.task)
        if origin is not None:
            config["init_from"] = origin
        save_adapter(self.run_dir / ADAPTER_DIR, adapter_state, head_state, config)
        final = {"task": run.task, "seed": run.seed, "metric": self.task.metric, "best": s.best,
                 "last": {"step": s.step, "eval": s.last_eval}}
        if test is not None:
            final["test"] = test  # the selected checkpoint on the test set(s)
        write_json(self.run_dir / METRICS_FILE, final)
        self._write_outputs()
        pattern = self._write_rank_pattern()
        test_examples = {k[len(TEST_PREFIX):]: len(self.tokenized[k]) for k in self.tests}
        holdout = {"fraction": self.holdout, "seed": HOLDOUT_SEED, "test_examples": test_examples} if self.holdout else None
        report = build_run_report(
            recipe=self.recipe, run=run, argv=self.argv, adapted=self.adapted, model=unwrapped, task=self.task,
            splits=self.splits, tokenized=self.tokenized, plan=self.plan, best=s.best, last_eval=s.last_eval, test=test,
            started=self.started, accelerator=self.accelerator, rank_pattern=pattern,
            resumed_from=self.resume.step if self.resume is not None else None, holdout=holdout,
            test_examples=test_examples or None, init_from=origin, optimizer=self.optimizer,
        )
        if self.stopped_early is not None:
            report["stopped_early"] = self.stopped_early  # an observer ended training: where, why, which
        if self.tracking.entries:
            report["trackers"] = self.tracking.describe()  # output.trackers and where each writes
        if self.sharding.enabled:
            report["fsdp"] = self.sharding.describe(self.accelerator)  # train/fsdp.py: what was sharded, what kept whole
        write_run_report(self.run_dir, report)

    def _write_outputs(self) -> None:
        """Generated text, answers: the selected checkpoint's on the selection splits, and
        the test sets'."""
        outputs = {**self.state.best_outputs, **{k: v for k, v in self.task.outputs().items() if k in self.tests}}
        for split, rows in outputs.items():
            write_jsonl(self.run_dir / OUTPUTS_FILE.format(split=split.replace(TEST_PREFIX, "test_")), rows)

    def _write_rank_pattern(self) -> dict | None:
        """``rank_pattern.json`` and its heatmap, for methods whose ranks change."""
        pattern = self.method.rank_pattern(self.adapters)
        if pattern is not None:
            from lowrank_runner.rundir.plots import rank_heatmap

            write_json(self.run_dir / RANK_PATTERN_FILE, pattern)
            symbols = {t.path: list(t.symbols) for t in self.adapted.targets}
            rank_heatmap(pattern, symbols, self.run_dir / RANK_HEATMAP_FILE,
                         f"{self.cfg['method']['name']} final ranks: {sum(pattern.values())} over {len(pattern)} modules")
        return pattern


def train_run(recipe: Recipe, run: RunSpec, run_dir: Path, argv: list[str], resume: Checkpoint | None = None,
              stop_after: int | None = None, init_from=None, observer: EvaluationObserver | None = None) -> RunResult:
    """Train one run into ``run_dir``; ``resume`` continues from a checkpoint of it,
    ``stop_after`` ends the run with a checkpoint after that optimizer step, and
    ``init_from`` (train/init_from.py) loads another run's adapter before training.
    The phases are :class:`TrainingRun`'s methods."""
    training = TrainingRun(recipe, run, run_dir, argv, resume=resume, stop_after=stop_after, init_from=init_from,
                           observer=observer)
    try:
        training.setup()
        training.restore()
        training.open_outputs()
        training.train()
        return training.finish()
    except BaseException as exc:  # the tracker runs end as failed (or killed: Ctrl-C, SIGTERM)
        training.tracking.abort(interrupted=isinstance(exc, KeyboardInterrupt))
        raise
