"""Registered tasks (torch-free, read by ``lrr validate``).

A task spec says what data a task needs, which model head it trains and which metrics
score it, and carries its rules (:mod:`lowrank_runner.tasks.rules`: its recipe checks,
hub dataset and size, extra files); its implementation (data loading, metrics) is
imported only when running.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from lowrank_runner.tasks.rules import ChatRules, DataToTextRules, GlueRules, RegressionRules, SquadRules, TaskRules

LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ter", "mse"})  # metrics that improve downwards


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    implementation: str  # "module:Class"
    metrics: tuple[str, ...]
    primary_metric: str
    needs_local_data: bool = True
    accepts_local_data: bool = False  # task.data is optional: your files instead of the hub
    display_name: str = ""  # the papers' name, in table headers ("SST-2"); "" for the task's own name
    rules: TaskRules = field(default_factory=TaskRules, compare=False)

    @property
    def shown_name(self) -> str:
        return self.display_name or self.name

    def load(self):
        module_name, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), attr)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="classification",
            description="Single-sentence or sentence-pair classification from your own CSV/TSV/JSON Lines/Parquet files.",
            implementation="lowrank_runner.tasks.local_files:Classification",
            metrics=("accuracy", "f1_macro", "matthews_correlation"),
            primary_metric="accuracy",
        ),
        TaskSpec(
            name="regression",
            description="Single-sentence or sentence-pair regression (one score per example) from your own files.",
            implementation="lowrank_runner.tasks.local_files:Regression",
            metrics=("pearson", "spearman", "mse"),
            primary_metric="pearson",
            rules=RegressionRules(),
        ),
    )
}

_GLUE = {
    "cola": ("CoLA: grammatical acceptability", ("matthews_correlation", "accuracy")),
    "sst2": ("SST-2: sentiment", ("accuracy",)),
    "mrpc": ("MRPC: paraphrase", ("accuracy", "f1")),
    "qqp": ("QQP: duplicate questions", ("accuracy", "f1")),
    "stsb": ("STS-B: semantic similarity (regression, 0-5)", ("pearson", "spearman")),
    "mnli": ("MNLI: entailment, matched and mismatched dev sets", ("accuracy", "accuracy_mm")),
    "qnli": ("QNLI: question answering as entailment", ("accuracy",)),
    "rte": ("RTE: entailment", ("accuracy",)),
}
for _name, (_what, _metrics) in _GLUE.items():
    TASKS[_name] = TaskSpec(
        name=_name,
        description=f"GLUE {_what}; from the hub (task.dataset) or raw GLUE files (task.data_dir).",
        implementation="lowrank_runner.tasks.glue:Glue",
        metrics=_metrics,
        primary_metric=_metrics[0],
        needs_local_data=False,
        display_name=_what.partition(":")[0],
        rules=GlueRules(),
    )

# Data-to-text generation on a causal LM (MTLoRA Tables 2, 5, 6; LoRA §5.5).
_NLG_METRICS = ("bleu", "nist", "rougeL", "chrf", "ter", "loss", "perplexity")
for _name, _shown, _what in (("e2e", "E2E", "E2E NLG Challenge: restaurant meaning representations to text"),
                             ("dart", "DART", "DART: open-domain triple sets to text"),
                             ("webnlg", "WebNLG", "WebNLG 2017: DBpedia triple sets to text")):
    TASKS[_name] = TaskSpec(
        name=_name,
        description=f"{_what} (causal LM, beam search, multi-reference BLEU); from the hub (task.dataset) or your files (task.data).",
        implementation="lowrank_runner.tasks.nlg:DataToText",
        metrics=_NLG_METRICS,
        primary_metric="bleu",
        needs_local_data=False,
        accepts_local_data=True,
        display_name=_shown,
        rules=DataToTextRules(),
    )
TASKS["data_to_text"] = TaskSpec(
    name="data_to_text",
    description="Data-to-text generation from your own files (a source and a target column), scored like e2e/dart/webnlg.",
    implementation="lowrank_runner.tasks.nlg:DataToText",
    metrics=_NLG_METRICS,
    primary_metric="bleu",
    rules=DataToTextRules(),
)


TASKS["squad_v2"] = TaskSpec(
    name="squad_v2",
    description="SQuAD 2.0 extractive QA with unanswerable questions (official exact match and F1); from the hub "
                "(task.dataset, default rajpurkar/squad_v2) or the official JSON files in task.data_dir.",
    implementation="lowrank_runner.tasks.squad:SquadV2",
    metrics=("f1", "exact", "best_f1", "best_exact", "HasAns_f1", "HasAns_exact", "NoAns_f1", "NoAns_exact"),
    primary_metric="f1",
    needs_local_data=False,
    display_name="SQuAD 2.0",
    rules=SquadRules(),
)

# Instruction tuning of a causal LM on conversations (tasks/chat.py).
TASKS["chat"] = TaskSpec(
    name="chat",
    description="Instruction tuning on conversations (OpenAI messages, ShareGPT, Alpaca) with the tokenizer's chat "
                "template or a named one, loss on the assistant turns; from your files (task.data) or the hub "
                "(task.dataset).",
    implementation="lowrank_runner.tasks.chat:Chat",
    metrics=("loss", "perplexity"),
    primary_metric="loss",
    needs_local_data=False,
    accepts_local_data=True,
    rules=ChatRules(),
)


def get_task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}' (registered: {', '.join(sorted(TASKS))})") from None
