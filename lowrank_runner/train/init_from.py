"""``training.init_from``: start a run's adapter from a finished run's adapter.

LoRA's protocol, which MTLoRA follows for RoBERTa on GLUE: MRPC, RTE and STS-B start
from the adapter trained on MNLI instead of the method's initialisation. A recipe says
so per task, either with a run directory written by ``lrr run`` (or its ``adapter/``
folder), or, in a multi-task recipe, with ``{task: mnli}``: the run of that task with the
same seed, which :func:`order_runs` puts first.

Only the adapter is loaded (the source's saved adapter: its best checkpoint, as
``lrr export`` uses it). The task head never is: its shape follows the task's labels
(MNLI's 3-way classifier, RTE's and MRPC's 2-way one, STS-B's single regression output),
so each run trains a fresh head, initialised exactly as without ``init_from``.

The source must be the same method with the same parameters (``dropout`` may differ) on
the same target modules, with tensors of the same shapes; anything else is an
:class:`InitFromError` naming the recipe line, the source and the difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import LrrError, RunFileError
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.init_from import FREE_PARAMS
from lowrank_runner.resources import expand_user
from lowrank_runner.rundir.adapter import read_adapter_config, read_tensors
from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, REPORT_FILE



class InitFromError(LrrError):
    """The initial adapter cannot be used (missing, failed, or not the same adapter)."""


@dataclass(frozen=True)
class InitSource:
    """Where a run's initial adapter comes from."""

    path: Path  # a run directory, or an adapter directory
    where: str  # the recipe setting, "FILE:LINE:COL tasks.rte.training.init_from"
    run: str | None = None  # the source run's slug when it is a run of the same recipe

    @property
    def label(self) -> str:
        return f"run {self.run} of this recipe ({self.path})" if self.run else str(self.path)

    def adapter_dir(self) -> Path:
        path = expand_user(str(self.path))
        for candidate in (path / ADAPTER_DIR, path):
            if (candidate / ADAPTER_CONFIG).is_file():
                return candidate
        report = path / REPORT_FILE
        try:
            status = json.loads(report.read_text()).get("status") if report.is_file() else None
        except (ValueError, OSError, AttributeError):
            status = "unreadable report.json"
        if status and status != "completed":
            why = f"that run did not complete (status '{status}')"
        elif path.exists():
            why = f"it holds no {ADAPTER_DIR}/{ADAPTER_CONFIG} (not a finished 'lrr run' directory)"
        else:
            why = "no such directory"
        raise InitFromError(f"{self.where}: cannot start from {self.label}: {why}")

    def record(self) -> dict:
        """What a run records about its initial adapter (adapter_config.json, report.json)."""
        directory = self.adapter_dir()
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        return {"path": str(directory.resolve()), "run": self.run, "task": config.get("task", {}).get("name"),
                "recipe_hash": config.get("recipe_hash"), "config_hash": config.get("config_hash"),
                "head": "not loaded: trained fresh for this task"}

    def _read(self, directory: Path) -> tuple[dict, dict]:
        """The source's adapter_config.json and adapter tensors, checked as an export
        checks them (a damaged or missing file names itself and how to repair it)."""
        source = directory.parent if directory.name == ADAPTER_DIR else directory
        try:
            config = read_adapter_config(directory / ADAPTER_CONFIG, source, methods=method_specs())
            tensors = read_tensors(directory / ADAPTER_WEIGHTS, source)
        except RunFileError as exc:
            raise InitFromError(f"{self.where}: cannot start from {self.label}: {exc}") from None
        if tensors and all(t.is_floating_point() and not t.any() for t in tensors.values()):
            raise InitFromError(f"{self.where}: cannot start from {self.label}: every tensor of "
                                f"{directory / ADAPTER_WEIGHTS} is zero (an adapter that changes nothing, and "
                                "factors that cannot learn from zero); start from another run, or remove training.init_from")
        broken = sorted(name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all())
        if broken:
            raise InitFromError(f"{self.where}: cannot start from {self.label}: {directory / ADAPTER_WEIGHTS} holds "
                                f"NaN or Inf values ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}); the "
                                "source run diverged or the file is damaged: start from another run")
        return config, tensors

    def load_into(self, adapted, run_config: dict) -> None:
        """Load the source's adapter tensors into ``adapted.model`` (head untouched)."""
        from lowrank_runner.methods.inject import load_adapter_state

        directory = self.adapter_dir()
        config, adapter = self._read(directory)
        mine, theirs = run_config["method"], config.get("method", {})
        fix = "start from a run of the same method, parameters and targets, or remove training.init_from"
        if mine.get("name") != theirs.get("name"):
            raise InitFromError(f"{self.where}: {self.label} is a '{theirs.get('name')}' adapter; this run trains "
                                f"'{mine['name']}'; {fix}")
        differ = [f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} in the source"
                  for k in sorted(set(mine) | set(theirs)) if k not in FREE_PARAMS and mine.get(k) != theirs.get(k)]
        if differ:
            raise InitFromError(f"{self.where}: {self.label} does not fit: method {'; '.join(differ)}; {fix}")
        own = [(t.path, list(t.groups) if t.groups else None) for t in adapted.targets]
        source = [(m["path"], m.get("groups")) for m in config.get("modules", [])]
        if own != source:
            extra = [p for p, _ in own if p not in dict(source)]
            lacking = [p for p, _ in source if p not in dict(own)]
            detail = (f"not adapted in the source: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}; " if extra else "")
            detail += (f"adapted only in the source: {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}; "
                       if lacking else "")
            raise InitFromError(f"{self.where}: {self.label} does not fit: its target modules differ "
                                f"({detail or 'different q/k/v groups; '}targets {config.get('targets')} in the source, "
                                f"{run_config['targets']} here); {fix}")
        try:
            missing = load_adapter_state(adapted.model, adapter)
        except (KeyError, RuntimeError) as exc:
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")[:300]
            raise InitFromError(f"{self.where}: {self.label} does not fit: {first}; {fix}") from None
        if missing:
            raise InitFromError(f"{self.where}: {self.label} does not fit: it has no tensors for "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; {fix}")


def source_run(recipe, run):
    """The run of this recipe that ``run`` starts from (``init_from: {task: NAME}``): the
    source task's run of the same seed and sweep point, or None."""
    ref = run.config["training"].get("init_from")
    if not isinstance(ref, dict):
        return None
    found = [r for r in recipe.runs if r.task == ref["task"] and r.seed == run.seed and r.label == run.label]
    return found[0] if found else None


def init_source(recipe, run, dirs: dict[int, Path]) -> InitSource | None:
    ref = run.config["training"].get("init_from")
    if ref is None:
        return None
    where = run.init_from_at or f"{recipe.source}: training.init_from"
    if isinstance(ref, dict):
        source = source_run(recipe, run)
        if source is None:  # lrr validate reports this; kept for recipes built in code
            raise InitFromError(f"{where}: no run of task '{ref['task']}' with seed {run.seed} in this recipe")
        return InitSource(dirs[source.index], where, source.slug)
    return InitSource(Path(ref), where)


def order_runs(recipe) -> list:
    """The recipe's runs with every source run before the runs that start from it;
    otherwise the recipe's order (task-major). Cycles are rejected by validation."""
    pending, done, ordered = list(recipe.runs), set(), []
    while pending:
        for run in pending:
            source = source_run(recipe, run)
            if source is None or source.index in done:
                break
        else:  # a cycle (not reachable through lrr's loader): keep the remaining order
            ordered += pending
            break
        pending.remove(run)
        done.add(run.index)
        ordered.append(run)
    return ordered
