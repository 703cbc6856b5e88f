"""The divergence guard (``training.divergence``): a run whose training loss becomes NaN
or infinite, or explodes, stops with a :class:`~lowrank_runner.errors.DivergenceError`
naming the step, its learning rate and the last good checkpoint, instead of training on.

Cheap by construction: the loop already sums the task loss on the device and reads it
once per log line (``LoopState.window_loss``). A NaN or infinity in that sum stays there,
so after every optimizer step :meth:`DivergenceGuard.after_step` only marks, on the
device, the first step at which the sum stopped being finite (no host synchronisation);
the mark is read at the next log line or checkpoint, which synchronise anyway. Steps the
fp16 loss scaler skips have inf/NaN *gradients* but a finite loss: they do not count.

The explode rule (:class:`ExplodeRule`) reads the logged losses, which are means over
all processes, so every process takes the same decision and none is left waiting.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_runner.errors import DivergenceError
from lowrank_runner.recipe.schema import fill_defaults, property_schema, recipe_schema
from lowrank_runner.rundir.layout import checkpoint_dirs, checkpoint_step


def divergence_settings(training: dict) -> dict:
    """``training.divergence`` with the schema's defaults (absent: every default, the guard on)."""
    return fill_defaults(training.get("divergence") or {}, property_schema("training", "divergence"), recipe_schema())


@dataclass
class ExplodeRule:
    """A logged loss *explodes* when it is above ``factor`` × the baseline and above the
    first logged loss (where training started); ``patience`` exploding lines in a row stop
    the run. The baseline is the median of the previous ``window`` logged losses that did
    not explode; until there are that many, the first logged loss (so a run that blows up
    at once is caught, while the noisy first steps, well under ``factor`` × the start, are not).
    Its state travels in checkpoints (:meth:`state`), so a resumed run judges as before."""

    factor: float
    window: int
    patience: int
    start: float | None = None  # the first logged loss
    calm: list = field(default_factory=list)  # the last `window` logged losses that did not explode
    streak: list = field(default_factory=list)  # the exploding lines in a row: (step, loss, lr)

    def baseline(self) -> float | None:
        """What the next loss is compared with (None before the first line)."""
        return statistics.median(self.calm) if len(self.calm) >= self.window else self.start

    def baseline_words(self) -> str:
        if len(self.calm) >= self.window:
            return f"the median of the {self.window} logged losses before"
        return "the first logged loss"

    def explodes(self, loss: float) -> bool:
        base = self.baseline()
        return base is not None and loss > self.factor * base and loss > self.start

    def state(self) -> dict:
        """What a checkpoint keeps of the rule (JSON)."""
        return {"start": self.start, "calm": list(self.calm), "streak": [list(s) for s in self.streak]}

    def restore(self, saved: dict | None) -> None:
        """Continue from :meth:`state` (None: a checkpoint written without it, start afresh)."""
        if saved:
            self.start, self.calm = saved["start"], list(saved["calm"])
            self.streak = [tuple(s) for s in saved["streak"]]

    def observe(self, step: int, loss: float, lr: float = 0.0) -> bool:
        """Take one logged (finite) loss; True when ``patience`` lines in a row exploded."""
        if self.start is None:
            self.start = loss
        if self.explodes(loss):
            self.streak.append((step, loss, lr))
            return len(self.streak) >= self.patience
        self.streak.clear()
        self.calm = [*self.calm, loss][-self.window:]
        return False


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest finished checkpoint: the guard lets none be written after a
    non-finite loss or while logged losses explode, so it is the last good one."""
    done = checkpoint_dirs(run_dir)
    return done[-1] if done else None


def checkpoint_words(checkpoint: Path | None) -> str:
    """The message's part on the checkpoint to go back to."""
    if checkpoint is None:
        return "no checkpoint was written before it"
    return f"last good checkpoint: step {checkpoint_step(checkpoint)} ({checkpoint})"


class DivergenceGuard:
    """The guard of one run (:mod:`lowrank_runner.train.divergence`); ``where`` names the
    run in messages, ``run_dir`` holds its checkpoints."""

    def __init__(self, training: dict, device, where: str, run_dir: Path):
        settings = divergence_settings(training)
        self.training, self.where, self.run_dir = training, where, run_dir
        self.rule = (ExplodeRule(settings["explode_factor"], settings["window"], settings["patience"])
                     if settings["enabled"] else None)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, on the device
        self.lrs: dict[int, float] = {}  # the learning rate of each optimizer step since the last log line

    def state(self) -> dict | None:
        """What a checkpoint keeps of the guard (``state.json``)."""
        return self.rule.state() if self.rule is not None else None

    def restore(self, saved: dict | None) -> None:
        if self.rule is not None:
            self.rule.restore(saved)

    @property
    def holds_checkpoints(self) -> bool:
        """Whether logged losses are exploding now: no periodic checkpoint is written then."""
        return bool(self.rule and self.rule.streak)

    def after_step(self, step: int, window_loss: torch.Tensor, lr: float) -> None:
        """After optimizer step ``step`` (run at learning rate ``lr``): mark it on the device
        if the loss summed since the last log line is no longer finite (no host sync)."""
        self.lrs[step] = lr
        self.first_bad.masked_fill_(torch.isfinite(window_loss).logical_not() & (self.first_bad < 0), step)

    def first_bad_step(self, accelerator) -> int | None:
        """The first step whose loss was not finite on any process (collective: every process calls it)."""
        steps = [s for s in accelerator.gather(self.first_bad.reshape(1)).tolist() if s >= 0]
        return min(steps) if steps else None

    def check_finite(self, accelerator) -> None:
        """Before a checkpoint (collective): stop if a loss since the last log line was not finite."""
        step = self.first_bad_step(accelerator)
        if step is not None:
            raise self.non_finite(step, math.nan)

    def check_logged(self, step: int, loss: float, accelerator) -> None:
        """A logged loss (the mean over all processes: the same on each): stop if it is not
        finite, naming the first step that was not (collective then, on every process alike)."""
        if not math.isfinite(loss):
            raise self.non_finite(self.first_bad_step(accelerator) or step, loss)

    def observe_logged(self, step: int, loss: float) -> None:
        """After the line is written: stop when the explode rule trips; forget the steps' rates."""
        lr = self.lrs.get(step, 0.0)
        self.lrs.clear()
        if self.rule is not None and self.rule.observe(step, loss, lr):
            raise self.exploded()

    # ------------------------------------------------------------------ the messages

    def advice(self) -> str:
        """What to change, for either cause."""
        clip = "" if self.training.get("max_grad_norm") else ", set training.max_grad_norm (e.g. 1.0)"
        return f"lower training.learning_rate (now {self.training['learning_rate']:g}){clip}"

    def non_finite(self, step: int, loss: float) -> DivergenceError:
        lr = self.lrs.get(step, math.nan)
        checkpoint = last_checkpoint(self.run_dir)
        return DivergenceError(
            f"{self.where}: training diverged at step {step} (loss {loss}; lr {lr:.1e}): the training loss is {loss}, "
            "not a finite number: the model's outputs overflowed (a learning rate too high, a float16 backbone), or the "
            f"backbone or initial adapter holds NaN/Inf weights; {checkpoint_words(checkpoint)}; {self.advice()}, use "
            "backbone.dtype float32 or bfloat16 instead of float16, or check the backbone's weights", checkpoint)

    def exploded(self) -> DivergenceError:
        rule, checkpoint = self.rule, last_checkpoint(self.run_dir)
        (step, loss, lr), steps = rule.streak[0], ", ".join(str(s) for s, _, _ in rule.streak)
        return DivergenceError(
            f"{self.where}: training diverged at step {step} (loss {loss:.4g}; lr {lr:.1e}): the logged training loss "
            f"exploded: above {rule.factor:g} x {rule.baseline():.4g} ({rule.baseline_words()}) and above where "
            f"training started ({rule.start:.4g}) at {rule.patience} logged steps in a row ({steps}); "
            f"{checkpoint_words(checkpoint)}; {self.advice()}; if the rise is expected, raise "
            "training.divergence.explode_factor or set training.divergence.enabled: false", checkpoint)
