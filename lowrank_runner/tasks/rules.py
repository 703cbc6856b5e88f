"""What lrr knows of each task family before anything loads (torch-free): the recipe
checks of its options, its default hub dataset and that dataset's training-set size, the
files it reads beyond its data. :mod:`lowrank_runner.tasks.registry` gives every task its
rules; ``lrr validate``, the learning-rate guidance, the model card and the exports ask
them instead of testing task names, so nothing outside ``tasks/`` names a task.

A check is a :class:`RuleProblem`: the recipe path it concerns (``("task", "labels")``),
the message, and whether it is about the key (an unknown or misplaced key) rather than its
value; the recipe stage turns it into a problem at that line.
"""

from __future__ import annotations

from typing import NamedTuple

from lowrank_runner.tasks.chat_data import named_templates, template_problem
from lowrank_runner.tasks.data_check import peek_problems
from lowrank_runner.tasks.holdout import holdout_sizes

# GLUE on the hub (nyu-mll/glue): the official training sizes, so steps plan without a download.
GLUE_DATASET = "nyu-mll/glue"
GLUE_TRAIN_SIZES = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "qqp": 363_846, "stsb": 5_749, "mnli": 392_702,
                    "qnli": 104_743, "rte": 2_490}
SQUAD_DATASET = "rajpurkar/squad_v2"
SQUAD_TRAIN_SIZE = 130_319  # questions in the official training set (the hub's train split)
# Data-to-text on the hub: (dataset id, configuration) and LoRA's training sizes (pairs). E2E:
# Novikova et al. (2017); WebNLG 2017 and DART v1.1.1: the pair counts of LoRA's formatted data.
NLG_HUB = {
    "e2e": ("tuetschek/e2e_nlg", None),
    "dart": ("Yale-LILY/dart", None),
    "webnlg": ("webnlg-challenge/web_nlg", "webnlg_challenge_2017"),
}
NLG_TRAIN_PAIRS = {"e2e": 42_061, "dart": 62_659, "webnlg": 18_025}


class RuleProblem(NamedTuple):
    path: tuple  # the recipe path, e.g. ("task", "doc_stride")
    message: str
    key: bool = False  # about the key itself (point at the key, not its value)


def _capped(size: int, task: dict) -> int:
    """``size`` examples, at most ``task.max_train_samples``."""
    return min(size, task.get("max_train_samples") or size)


def _from_hub(task: dict) -> bool:
    """The task reads the hub (no ``task.data`` files, no raw ``task.data_dir``)."""
    return not task.get("data") and not task.get("data_dir")


class TaskRules:
    """A task that knows nothing beyond its spec: no checks of its own, no hub dataset."""

    def problems(self, name: str, task: dict) -> list[RuleProblem]:
        """Checks of the task's options beyond the schema (``task``: the recipe's task
        mapping, as written)."""
        return []

    def data_problems(self, task: dict) -> list[RuleProblem]:
        """The head of each file ``task.data`` names, read cheaply: format and the
        columns the settings name (the whole files are checked when the run loads them)."""
        return [RuleProblem(path, message) for path, message in peek_problems(task)]

    def hub_dataset(self, name: str, task: dict) -> tuple[str, str | None] | None:
        """The hub dataset (id, configuration) the task reads by default; None: files."""
        return None

    def hub_train_size(self, name: str, task: dict) -> int | None:
        """The training examples when the task reads its default hub dataset (the official
        size, at most ``task.max_train_samples``; no download); None otherwise."""
        return None

    def planned_train_size(self, name: str, task: dict) -> int | None:
        """The examples a run trains on when that is known without reading data: the hub
        size (:meth:`hub_train_size`) less what ``task.holdout_fraction`` holds out."""
        size = self.hub_train_size(name, task)
        if size is None or not task.get("holdout_fraction"):
            return size
        return holdout_sizes(size, task["holdout_fraction"])[0]

    def chat_template(self, task: dict) -> str | None:
        """``task.chat_template`` of a task that renders conversations with one (a shipped
        template's name or a file); None for every other task."""
        return None

    def reads(self, task: dict) -> list[tuple[str, str]]:
        """Files the task reads beyond its data, as (recipe key, path)."""
        return []


class RegressionRules(TaskRules):
    def problems(self, name: str, task: dict) -> list[RuleProblem]:
        out = super().problems(name, task)
        if task.get("labels"):
            out.append(RuleProblem(("task", "labels"), "a regression task has no class labels; remove 'labels'"))
        return out


class GlueRules(TaskRules):
    def hub_dataset(self, name: str, task: dict) -> tuple[str, str | None] | None:
        return (task.get("dataset") or GLUE_DATASET, name) if _from_hub(task) else None

    def hub_train_size(self, name: str, task: dict) -> int | None:
        if not _from_hub(task) or (task.get("dataset") or GLUE_DATASET) != GLUE_DATASET or name not in GLUE_TRAIN_SIZES:
            return None
        return _capped(GLUE_TRAIN_SIZES[name], task)


class SquadRules(TaskRules):
    def problems(self, name: str, task: dict) -> list[RuleProblem]:
        out = super().problems(name, task)
        stride, length = task.get("doc_stride"), task.get("max_length")
        if isinstance(stride, int) and isinstance(length, int) and stride >= length:
            out.append(RuleProblem(("task", "doc_stride") if "doc_stride" in task else ("task",),
                                   f"doc_stride ({stride}) must be smaller than max_length ({length}): windows of a "
                                   "long context share doc_stride tokens, and each also holds the question; lower "
                                   "doc_stride"))
        return out

    def hub_dataset(self, name: str, task: dict) -> tuple[str, str | None] | None:
        return (task.get("dataset") or SQUAD_DATASET, None) if _from_hub(task) else None

    def hub_train_size(self, name: str, task: dict) -> int | None:
        if not _from_hub(task) or (task.get("dataset") or SQUAD_DATASET) != SQUAD_DATASET:
            return None
        return _capped(SQUAD_TRAIN_SIZE, task)


class DataToTextRules(TaskRules):
    def hub_dataset(self, name: str, task: dict) -> tuple[str, str | None] | None:
        if not _from_hub(task) or name not in NLG_HUB:
            return None
        default_id, default_config = NLG_HUB[name]
        dataset = task.get("dataset") or default_id
        return dataset, task.get("dataset_config") or (default_config if dataset == default_id else None)

    def hub_train_size(self, name: str, task: dict) -> int | None:
        if not _from_hub(task) or name not in NLG_TRAIN_PAIRS or task.get("dataset") not in (None, NLG_HUB[name][0]):
            return None
        return _capped(NLG_TRAIN_PAIRS[name], task)


class ChatRules(TaskRules):
    def problems(self, name: str, task: dict) -> list[RuleProblem]:
        """Data from files or the hub (files win), a chat template that exists, and no
        data-to-text decoding key it would ignore."""
        out = super().problems(name, task)
        if "data" not in task and not task.get("dataset"):
            out.append(RuleProblem(("task",), "task 'chat' needs data: set task.data.train and task.data.validation "
                                              "(JSON Lines, JSON or Parquet files) or task.dataset (a hub dataset id)",
                                   key=True))
        if isinstance(task.get("chat_template"), str):
            message = template_problem(task["chat_template"])
            if message:
                out.append(RuleProblem(("task", "chat_template"), message))
        generation = task.get("generation")
        if isinstance(generation, dict) and generation.get("max_sources") is not None:  # resolved recipes hold null
            out.append(RuleProblem(("task", "generation", "max_sources"), "task.generation.max_sources is for the "
                                   "data-to-text tasks; task 'chat' continues task.samples conversations: set that "
                                   "instead", key=True))
        return out

    def chat_template(self, task: dict) -> str | None:
        return task.get("chat_template") or None

    def reads(self, task: dict) -> list[tuple[str, str]]:
        template = task.get("chat_template")
        if isinstance(template, str) and template not in named_templates():  # a file, not a shipped template's name
            return [("task.chat_template", template)]
        return []
