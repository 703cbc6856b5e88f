"""The model card every export writes: ``README.md`` in the Hugging Face model-card format
(YAML metadata, then Markdown), built with ``huggingface_hub``'s own ``ModelCard``,
``ModelCardData`` and ``EvalResult``.

Everything comes from the export's ``info`` (:func:`~lowrank_runner.export.common.provenance`
plus the export's checks) and from the source's files, read if present: a run directory's
``report.json``, ``metrics.json`` and ``recipe.yaml``; an adapter bundle's ``recipe.yaml`` (whose header names the run it was
exported from: when that still exists and has the same config hash, it gives the training
report). What is unknown is left out: a card never fails an export. The card names no
local path: a local directory by its name, a hub id or ``pkg:`` path as it is."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import yaml

from lowrank_runner.rundir.layout import ADAPTER_CONFIG, ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, REPORT_FILE

CARD_FILE = "README.md"
LIBRARY = {"peft-lora": "peft", "merged-transformers": "transformers", "lowrank-runner-bundle": "lowrank-runner"}
PIPELINE = {"AutoModelForSequenceClassification": "text-classification",
            "AutoModelForQuestionAnswering": "question-answering", "AutoModelForCausalLM": "text-generation",
            "AutoModelForTokenClassification": "token-classification",
            "AutoModelForSeq2SeqLM": "text2text-generation"}
# A PEFT adapter's task_type by the run's model class, and the class that loads it:
# AutoPeftModelFor<Task>.from_pretrained(EXPORT) loads the base model with the matching
# transformers class and checks the adapter's task_type.
TASK_TYPES = {"AutoModelForSequenceClassification": "SEQ_CLS", "AutoModelForCausalLM": "CAUSAL_LM",
              "AutoModelForQuestionAnswering": "QUESTION_ANS", "AutoModelForTokenClassification": "TOKEN_CLS",
              "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM"}
AUTO_PEFT = {"SEQ_CLS": "AutoPeftModelForSequenceClassification", "CAUSAL_LM": "AutoPeftModelForCausalLM",
             "QUESTION_ANS": "AutoPeftModelForQuestionAnswering", "TOKEN_CLS": "AutoPeftModelForTokenClassification",
             "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM"}
# The Hub's tag for a model derived from a base model (its `base_model_relation`)
RELATION = {"peft-lora": "adapter", "merged-transformers": "finetune", "lowrank-runner-bundle": "adapter"}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _dig(data, *keys):
    """``data[k1][k2]...``, None where a level is missing or not a mapping (a damaged file)."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _section(data, *keys) -> dict:
    value = _dig(data, *keys)
    return value if isinstance(value, dict) else {}


def source_record(info: dict) -> dict:
    """The source's files as dicts (``{}`` when missing or unreadable): ``report``,
    ``metrics``, ``recipe``, ``adapter`` (its adapter_config.json). A bundle has no report: the run it was exported from is
    used when it still exists and trained the same config."""
    source = Path(info.get("source_run") or ".")
    record = {"report": _json(source / REPORT_FILE), "metrics": _json(source / METRICS_FILE),
              "recipe": _yaml(source / RECIPE_FILE),
              "adapter": _json(source / ADAPTER_DIR / ADAPTER_CONFIG) or _json(source / ADAPTER_CONFIG)}
    origin = _origin(source)
    if not record["report"] and origin is not None and origin != source:
        report = _json(Path(origin) / REPORT_FILE)
        if _dig(report, "recipe", "config_hash") == info.get("config_hash"):
            record.update(report=report, metrics=_json(Path(origin) / METRICS_FILE))
    if not record["recipe"]:
        record["recipe"] = _section(record["report"], "recipe", "config")
    return record


def local_path(value) -> bool:
    """Whether a string is an absolute local path (``/home/...``, ``C:\\...``, ``~/...``)."""
    if not isinstance(value, str):
        return False
    return os.path.isabs(value) or value.startswith("~") or re.match(r"[A-Za-z]:[\\/]", value) is not None


def _origin(source: Path) -> Path | None:
    """The run a bundle was exported from: its recipe.yaml's header (the absolute run
    directory), or an older bundle's lrr_export.json ``source_run``; None if unknown."""
    from lowrank_runner.rundir.files import read_recipe_header

    for found in ((read_recipe_header(source / RECIPE_FILE) or {}).get("source"),
                  _json(source / "lrr_export.json").get("source_run")):
        if isinstance(found, str) and Path(found).is_absolute():
            return Path(found)
    return None


def shown(value) -> str | None:
    """A location as the card may publish it: a local path as its directory's name
    (``bert``), a hub id or ``pkg:`` path as it is."""
    return Path(value).name if local_path(value) else value


def shown_backbone(backbone: dict) -> str:
    """The backbone in the card's words: ``org/name``, ``pkg:PACKAGE/model``, or
    ``bert (a local directory)``."""
    name = backbone.get("name") or "?"
    return f"{shown(name)} (a local directory)" if local_path(name) else name


def base_model_id(info: dict) -> str | None:
    """The backbone's hub id: ``info["base_model_id"]`` when given, else the backbone
    loaded when it came from the hub; None for a local backbone."""
    if info.get("base_model_id"):
        return info["base_model_id"]
    backbone = info.get("backbone") or {}
    if backbone.get("source") == "hub":
        return backbone.get("resolved") or backbone.get("name")
    return None


def backbone_license(info: dict) -> str | None:
    """The ``license`` the backbone's own model card declares (its README.md: in the local
    directory, or in the hub cache; nothing is downloaded)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    backbone = info.get("backbone") or {}
    readme = None
    if backbone.get("source") == "hub" and backbone.get("resolved"):
        try:
            found = try_to_load_from_cache(backbone["resolved"], CARD_FILE, revision=backbone.get("revision"))
        except Exception:  # an odd id or cache: no license, no failure
            found = None
        readme = Path(found) if isinstance(found, str) else None
    elif backbone.get("resolved"):
        readme = Path(backbone["resolved"]) / CARD_FILE
    if readme is None or not readme.is_file():
        return None
    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.get("license")
    except Exception:  # a damaged card of the backbone: no license
        return None
    return value if isinstance(value, str) else None


def hub_dataset(record: dict) -> tuple[str, str | None] | None:
    """The hub dataset (id, config) the run trained on; None for local files."""
    data, task = _section(record["report"], "data"), _section(record["recipe"], "task")
    if data.get("source") == "hub" and data.get("dataset"):
        return data["dataset"], task.get("dataset_config")
    if not task or task.get("data") or task.get("data_dir") or data.get("files"):
        return None
    from lowrank_runner.tasks.registry import TASKS

    spec = TASKS.get(task.get("name"))
    return spec.rules.hub_dataset(spec.name, task) if spec is not None else None


def scores(record: dict) -> list[tuple[str, str, float]]:
    """(split kind, metric, value): the best checkpoint's validation scores and its test
    scores, when the run had a test set (``metrics.json``, else ``report.json``)."""
    metrics, report = record["metrics"], record["report"]
    best = _section(metrics, "best", "eval") or _section(report, "best", "eval")
    test = _section(metrics, "test") or _section(report, "test")
    out = []
    for kind, values in (("validation", best), ("test", test)):
        out += [(kind, k, float(v)) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "loss"]
    return out


def data_files(record: dict) -> list[str]:
    """The names of the local data files the run read (``task.data``; ``task.data_dir``'s
    folder; else report.json's ``data.files``), without their directories."""
    task = _section(record["recipe"], "task")
    data = task.get("data")
    if isinstance(data, dict):
        return [Path(v.split(":", 1)[-1] if v.startswith("pkg:") else v).name for k, v in data.items()
                if isinstance(v, str) and k != "format"]
    if isinstance(task.get("data_dir"), str):
        return [Path(task["data_dir"]).name + "/"]
    files = _dig(record["report"], "data", "files")
    return [Path(f["path"]).name for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)] \
        if isinstance(files, list) else []


def local_dataset(task: str, record: dict) -> str:
    """What a run on local files trained on: ``classification: train.jsonl, validation.jsonl``
    (the task and the files' names), or ``classification (local files)`` where they are unknown."""
    files = data_files(record)
    return f"{task}: {', '.join(files)}" if files else f"{task} (local files)"


def task_names(record: dict) -> tuple[str, str]:
    """The task's name and the dataset's (hub id, or the task name for local files)."""
    task = (_dig(record["recipe"], "task", "name") or _dig(record["report"], "run", "task")
            or _dig(record["adapter"], "task", "name") or "task")
    hub = hub_dataset(record)
    return task, hub[0] if hub else task


def eval_results(info: dict, record: dict) -> list:
    """The run's scores as ``huggingface_hub.EvalResult`` entries (the ``model-index``)."""
    from huggingface_hub import EvalResult

    task, dataset = task_names(record)
    hub = hub_dataset(record)
    pipeline = PIPELINE.get(info.get("model_class"), "other")
    name = f"{dataset} ({hub[1]})" if hub and hub[1] else (dataset if hub else local_dataset(task, record))
    return [EvalResult(task_type=pipeline, task_name=task, dataset_type=dataset, dataset_name=name,
                       dataset_config=hub[1] if hub else None, dataset_split=kind, metric_type=metric,
                       metric_value=value,
                       metric_name=f"{kind} {metric}" + (" (best checkpoint)" if kind == "validation" else ""))
            for kind, metric, value in scores(record)]


def model_name(info: dict, record: dict) -> str:
    recipe = _dig(record["recipe"], "name") or _dig(record["report"], "recipe", "name")
    return recipe or f"{info.get('method', {}).get('name', 'model')}-{task_names(record)[0]}"


def _low_rank(method: str) -> bool:
    """A method that adapts modules with a low-rank update (every registered method but
    those that train the backbone's own weights, ``"x-targets": false``, and those that
    insert modules, ``"x-kind": "inserted"``)."""
    from lowrank_runner.methods.registry import method_specs

    spec = method_specs().get(method)
    return spec is not None and spec.schema.get("x-targets", True) is not False and spec.kind == "update"


def card_data(info: dict, record: dict):
    """The card's YAML metadata."""
    from huggingface_hub import ModelCardData

    fmt, method = info.get("format"), (info.get("method") or {}).get("name", "")
    base = base_model_id(info)
    tags = ["lowrank-runner", method]
    if _low_rank(method):
        tags.append("lora")
    if fmt == "peft-lora":
        tags += ["peft", "transformers"]
    if base:
        tags.append(f"base_model:{RELATION.get(fmt, 'finetune')}:{base}")
    hub = hub_dataset(record)
    results = eval_results(info, record)
    return ModelCardData(
        base_model=base, library_name=LIBRARY.get(fmt), pipeline_tag=PIPELINE.get(info.get("model_class")),
        license=backbone_license(info), tags=[t for t in tags if t], datasets=[hub[0]] if hub else None,
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=model_name(info, record) if results else None,
        eval_results=results or None)


def _table(header: tuple[str, ...], rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def method_section(info: dict, record: dict) -> str:
    """What the model is: the method, its paper, the backbone and the task."""
    from lowrank_runner.methods.registry import method_specs

    method = info.get("method") or {}
    name = method.get("name", "?")
    spec = method_specs().get(name)
    paper = spec.paper if spec and spec.paper else "?"
    arxiv = f"[arXiv:{spec.arxiv}](https://arxiv.org/abs/{spec.arxiv})" if spec and spec.arxiv else "-"
    task, dataset = task_names(record)
    backbone = shown_backbone(info.get("backbone") or {})
    data = f" (`{dataset}`)" if dataset != task else (f" ({local_dataset(task, record)})" if data_files(record) else "")
    kind = {"peft-lora": "a PEFT LoRA adapter for", "merged-transformers": "a fine-tuned checkpoint of (adapter merged into)",
            "lowrank-runner-bundle": "a lowrank-runner adapter bundle for"}.get(info.get("format"), "an export of")
    params = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    return "\n\n".join([
        f"This is {kind} `{backbone}`, trained with **{name}** on the `{task}` task{data} by lowrank-runner "
        f"{info.get('lowrank_runner_version', '')}, and exported as `{info.get('format')}`.",
        "## Method\n\n" + _table(("method", "paper", "arXiv"), [(name, paper, arxiv)])
        + (f"\n\nParameters: `{params}`." if params else "")
        + (f" Targets: `{record['recipe']['targets']}`." if record["recipe"].get("targets") else ""),
    ])


def recipe_section(info: dict, record: dict) -> str:
    report = record["report"]
    backbone = info.get("backbone") or {}
    loaded = backbone.get("name") if str(backbone.get("name")).startswith("pkg:") else shown(backbone.get("resolved"))
    rows = [("recipe", model_name(info, record)), ("recipe file", shown(_dig(report, "recipe", "source"))),
            ("recipe hash", info.get("recipe_hash")), ("config hash", info.get("config_hash")),
            ("backbone (as the recipe names it)", shown_backbone(backbone)), ("backbone loaded from", loaded),
            ("backbone fingerprint", backbone.get("fingerprint"))]
    return "## Recipe\n\n" + _table(("", ""), [(k, f"`{v}`") for k, v in rows if v])


def training_section(record: dict) -> str:
    report, training = record["report"], _section(record["recipe"], "training")
    steps, best = _section(report, "steps"), _section(report, "best")
    rows = [("optimizer steps", steps.get("total")), ("epochs", steps.get("epochs") or training.get("epochs")),
            ("seed", _dig(report, "run", "seed") if _dig(report, "run", "seed") is not None else training.get("seed")),
            ("learning rate", training.get("learning_rate")), ("batch size (per optimizer step)", _dig(report, "batch", "effective") or training.get("batch_size")),
            ("processes", _dig(report, "batch", "processes")),
            ("training examples", report.get("train_examples")), ("evaluation examples", report.get("eval_examples")),
            ("trainable parameters", report.get("trainable_params")), ("adapter parameters", report.get("adapter_params")),
            ("trainable %", report.get("trainable_percent")), ("selected checkpoint (step)", best.get("step")),
            ("final total rank", _dig(report, "rank_pattern", "total_rank"))]
    rows = [(k, _number(v)) for k, v in rows if v is not None]
    return "## Training\n\n" + _table(("", ""), rows) if rows else ""


def metrics_section(record: dict) -> str:
    rows = [(kind + (" (best checkpoint)" if kind == "validation" else ""), metric, f"{value:.4f}")
            for kind, metric, value in scores(record)]
    return "## Evaluation\n\n" + _table(("split", "metric", "value"), rows) if rows else ""


CHECKS = (("max_abs_logit_diff", "largest output difference from the adapter model"),
          ("reloaded_max_abs_logit_diff", "the same, after reloading the written files"),
          ("cast_max_abs_logit_diff", "the same, after the cast to the output dtype"),
          ("factorisation_max_abs_diff", "largest difference between ΔW and the LoRA pair B A"),
          ("tolerance", "tolerance"), ("dtype", "dtype"), ("outputs_compared", "outputs compared"),
          ("probe_examples", "probe examples"))


def checks_section(info: dict) -> str:
    rows = [(label, f"`{_number(info[key])}`") for key, label in CHECKS if info.get(key) is not None]
    return ("## Export checks\n\nBefore this export was written, it was loaded back and compared with the trained "
            "adapter model on a probe batch:\n\n" + _table(("check", "value"), rows)) if rows else ""


# Where the snippets load the export from; the copy uploaded by `lrr push` names the repo id.
LOCATION = "path/to/this/export"
HEAD_KWARGS = ("num_labels", "id2label", "label2id", "problem_type")


def _base_location(info: dict) -> str:
    return shown(base_model_id(info) or info.get("base_model") or (info.get("backbone") or {}).get("name") or "BASE")


def _peft_code(info: dict, cls: str, where: str) -> str:
    """The PEFT snippet: ``AutoPeftModelFor<Task>`` (the base model named by
    adapter_config.json), or, without a task type, ``PeftModel`` on the base model."""
    head = {k: v for k, v in (info.get("head_config") or {}).items() if k in HEAD_KWARGS and v is not None}
    kwargs = "".join(f", {k}={v!r}" for k, v in head.items())
    base = _base_location(info)
    auto = AUTO_PEFT.get(TASK_TYPES.get(cls)) if info.get("task_type") else None  # older exports: no task_type
    if auto is not None:
        return (f"from peft import {auto}\nfrom transformers import AutoTokenizer\n\n"
                f"# the base model is adapter_config.json's base_model_name_or_path ({base})\n"
                f"model = {auto}.from_pretrained({where}{kwargs})\ntokenizer = AutoTokenizer.from_pretrained({where})\n"
                "# model.merge_and_unload() gives a plain transformers model")
    return (f"from peft import PeftModel\nfrom transformers import {cls}, AutoTokenizer\n\n"
            f"base = {cls}.from_pretrained({json.dumps(base)}{kwargs})\nmodel = PeftModel.from_pretrained(base, {where})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({where})\n# model.merge_and_unload() gives a plain transformers model")


def usage_section(info: dict) -> str:
    """How to load it, for this export's format and model class."""
    fmt, cls = info.get("format"), info.get("model_class") or "AutoModel"
    where = json.dumps(LOCATION)
    if fmt == "merged-transformers":
        code = (f"from transformers import {cls}, AutoTokenizer\n\nmodel = {cls}.from_pretrained({where})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({where})")
        text = "A plain transformers checkpoint (nothing of lowrank-runner needed):"
    elif fmt == "peft-lora":
        code = _peft_code(info, cls, where)
        text = "A standard PEFT LoRA adapter on its base model (nothing of lowrank-runner needed):"
    else:
        code = (f"import lowrank_runner\nfrom transformers import AutoTokenizer\n\n"
                f"model = lowrank_runner.load_adapted({where})  # backbone={json.dumps(_base_location(info))} unless it moved\n"
                f"tokenizer = AutoTokenizer.from_pretrained({where})")
        text = ("A lowrank-runner adapter bundle (`pip install lowrank-runner`); `lrr export DIR --merge` or "
                "`--peft` turns it into a plain checkpoint or a PEFT adapter:")
    out = f"## How to use\n\n{text}\n\n```python\n{code}\n```"
    if cls == "AutoModelForCausalLM" and fmt in ("peft-lora", "merged-transformers"):
        serve = (f"vllm serve {_base_location(info)} --enable-lora --lora-modules adapter={LOCATION}"
                 if fmt == "peft-lora" else f"vllm serve {LOCATION}")
        out += f"\n\nServing with vLLM:\n\n```console\n$ {serve}\n```"
    return out


def card_text(info: dict) -> str:
    """The whole card: YAML metadata and Markdown body."""
    record = source_record(info)
    data = card_data(info, record)
    sections = [f"# {model_name(info, record)}", method_section(info, record), recipe_section(info, record),
                training_section(record), metrics_section(record), checks_section(info), usage_section(info)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(directory: Path, info: dict) -> None:
    """``directory/README.md``: the export's model card (replaces any card a library
    wrote there, e.g. PEFT's template)."""
    from huggingface_hub import ModelCard

    ModelCard(card_text(info)).save(Path(directory) / CARD_FILE)
