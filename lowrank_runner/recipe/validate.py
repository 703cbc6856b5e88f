"""Recipe checks: the JSON Schema, each method's parameter schema, and semantic rules
the schema cannot express. Every problem is collected (never only the first) and
turned into a :class:`Problem` naming the file, line, column, recipe path and a fix.

Torch-free by design: ``lrr validate`` must stay fast enough for CI and pre-commit.
"""

from __future__ import annotations

import difflib
import math
import re

import jsonschema
from pathlib import Path

from lowrank_runner.errors import Location, LrrError, Problem
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.document import Document, PathT, dotted
from lowrank_runner.recipe.schema import property_schema, validator_for
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path
from lowrank_runner.targets import SYMBOLS, is_symbol_like
from lowrank_runner.tasks.registry import TASKS

_JSON_TYPES = {
    dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
    int: "an integer", float: "a number", type(None): "null",
}
_TYPE_WORDS = {
    "object": "a mapping", "array": "a list", "string": "a string", "boolean": "a boolean",
    "integer": "an integer", "number": "a number", "null": "null",
}


# Names users of HF PEFT / Trainer, torchtune and Axolotl type for our keys.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_rslora": "rslora", "lr": "learning_rate", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "micro_batch_size": "per_device_batch_size", "per_device_train_batch_size": "per_device_batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation": "gradient_accumulation_steps",
    "target_modules": "targets", "lora_target_modules": "targets", "base_model": "backbone", "model": "backbone",
    "output_dir": "output", "scheduler": "lr_scheduler", "warmup": "warmup_steps", "seeds": "seed",
    "dataset": "task", "max_seq_length": "max_length", "sequence_len": "max_length", "clip_grad_norm": "max_grad_norm",
}


def suggest(word: str, choices) -> str:
    choices = [str(c) for c in choices]
    alias = ALIASES.get(str(word))
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _where(doc: Document, path: PathT, key: bool = False) -> tuple[Location | None, str]:
    origin = doc.origin(path)
    if origin is None:
        return None, dotted(path)
    exact = doc.origins.get(tuple(path))
    shown = dotted(exact.source_path) if exact else dotted(path)
    return (origin.key if key else origin.value), shown


def problem(doc: Document, path: PathT, message: str, key: bool = False, severity="error") -> Problem:
    loc, shown = _where(doc, tuple(path), key)
    return Problem(loc, shown, message, severity)


# ----------------------------------------------------------------- schema errors


def schema_problems(doc: Document, data, validator, prefix: PathT = (), skip: tuple[str, ...] = ()) -> list[Problem]:
    """Translated schema errors; errors under a top-level key in ``skip`` are left to a
    more precise check (the method's own schema, applied per run)."""
    out: list[Problem] = []
    for error in validator.iter_errors(data):
        if error.absolute_path and error.absolute_path[0] in skip and not _about_the_key_itself(error):
            continue
        out.extend(_translate(doc, error, prefix))
    return out


def _about_the_key_itself(error) -> bool:
    """An error on a skipped key's own value (``method: lora``, a scalar where a mapping
    goes, or no ``name``) that the more precise check would not see."""
    return len(error.absolute_path) == 1 and error.validator in ("type", "required")


NON_FINITE = "must be a finite number"


def non_finite_problems(doc: Document, data, path: PathT = ()) -> list[Problem]:
    """Numbers no setting can use, wherever they are: NaN and infinities (``.nan``,
    ``.inf``, ``1e999``), and integers beyond 64 bits (what torch and NumPy hold)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite_problems(doc, v, path + (k,))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in non_finite_problems(doc, v, path + (i,))]
    if isinstance(data, float) and math.isnan(data):
        return [problem(doc, path, f"{NON_FINITE}; got nan")]
    if isinstance(data, float) and math.isinf(data):
        return [problem(doc, path, f"{NON_FINITE}; got {data} (numbers beyond ±1.8e308 read as infinite)")]
    if isinstance(data, int) and not isinstance(data, bool) and not -(2**63) <= data < 2**63:
        return [problem(doc, path, f"{data} does not fit in 64 bits; use a smaller number")]
    return []


def _describe(value) -> str:
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, (dict, list)) else _JSON_TYPES[type(value)]


def _translate(doc: Document, error, prefix: PathT) -> list[Problem]:
    path = prefix + tuple(error.absolute_path)
    kind, expected, instance, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        extras = [k for k in instance if k not in allowed]
        out = []
        for extra in extras:
            hint = suggest(extra, allowed) or (f" (allowed here: {', '.join(allowed)})" if allowed else "")
            out.append(problem(doc, path + (extra,), f"unknown key '{extra}'{hint}", key=True))
        return out
    if kind == "required":
        missing = [k for k in expected if k not in instance]
        return [problem(doc, path, f"missing required key '{k}'", key=True) for k in missing]
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        want = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return [problem(doc, path, f"expected {want}, got {_describe(instance)}")]
    if kind == "enum":
        choices = ", ".join(repr(c) for c in expected)
        same = [c for c in expected if not isinstance(c, str) and str(c) == instance]  # bits: "4" for 4
        hint = f" (write {same[0]!r} without quotes: a number, not a string)" if same else suggest(instance, expected)
        return [problem(doc, path, f"must be one of {choices}; got {instance!r}{hint}")]
    if kind == "const":
        return [problem(doc, path, f"must be {expected!r}; got {instance!r}")]
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return [problem(doc, path, f"must be {op} {expected}; got {instance!r}")]
    if kind in ("minItems", "maxItems"):
        word = "at least" if kind == "minItems" else "at most"
        return [problem(doc, path, f"must have {word} {expected} item(s); got {len(instance)}")]
    if kind == "uniqueItems":
        return [problem(doc, path, "items must be unique; some appear twice")]
    if kind == "minProperties":
        return [problem(doc, path, f"must have at least {expected} entr{'y' if expected == 1 else 'ies'}")]
    if kind == "pattern":
        return [problem(doc, path, f"{instance!r} does not match the required pattern {expected}")]
    if kind == "minLength":
        return [problem(doc, path, "must not be empty")]
    if kind == "maxLength":
        return [problem(doc, path, f"must be at most {expected} characters long; got {len(instance)}")]
    if kind in ("oneOf", "anyOf"):
        # Report the branch the value was meant for (its type matched) precisely.
        meant = [e for e in error.context if e.validator != "type" and len(e.relative_schema_path) > 1]
        if meant:
            best = jsonschema.exceptions.best_match(meant)
            return _translate(doc, best, prefix)
        desc = schema.get("description", "")
        return [problem(doc, path, f"{_describe(instance)} is not allowed here" + (f": {desc}" if desc else ""))]
    return [problem(doc, path, error.message)]


# ---------------------------------------------------------------- run checks


def run_problems(doc: Document) -> list[Problem]:
    """Checks on one expanded run (one task, one seed), after schema validation."""
    data = doc.data

    def part(key, kind):
        value = data.get(key)
        return value if isinstance(value, kind) else kind()

    out: list[Problem] = []
    out += _method_problems(doc, part("method", dict))
    out += _task_problems(doc, part("task", dict))
    out += _target_problems(doc, part("targets", list))
    out += _training_problems(doc, part("training", dict))
    out += _precision_problems(doc, part("training", dict), part("method", dict))
    out += _backbone_problems(doc, part("backbone", dict))
    out += _quantization_problems(doc, part("backbone", dict), part("method", dict), part("training", dict))
    out += _output_problems(doc, part("output", dict))
    out += _lr_guidance_problems(doc)
    if isinstance(data.get("search"), dict):  # every value a trial can take, checked like this run's
        from lowrank_runner.search.space import search_problems

        out += search_problems(doc)
    return out


def _lr_guidance_problems(doc: Document) -> list[Problem]:
    """Warnings at ``training.learning_rate`` when it is far below what the method needs
    at the planned steps (guidance.py), where the steps are known without reading data
    (:func:`_planned_steps`); a run the other checks find broken gets none."""
    from lowrank_runner.guidance import lr_shortfalls

    method, training, task = (_with_defaults(doc, key) for key in ("method", "training", "task"))
    if method.get("name") not in method_specs() or not isinstance(task.get("name"), str):
        return []
    try:
        plan = _planned_steps(task, training)
        messages = lr_shortfalls(method, training, plan) if plan is not None else []
    except (LrrError, ValueError, TypeError, KeyError, ArithmeticError):  # the schema's checks say what is wrong
        return []
    return [problem(doc, ("training", "learning_rate"), f"task {task['name']}: {m}", severity="warning")
            for m in messages]


def _with_defaults(doc: Document, key: str) -> dict:
    """The recipe's top-level mapping ``key`` with the schema's defaults ({} if not a mapping)."""
    from lowrank_runner.recipe.schema import fill_defaults, recipe_schema

    value = doc.data.get(key, {})
    return fill_defaults(value, property_schema(key), recipe_schema()) if isinstance(value, dict) else {}


def _planned_steps(task, training: dict):
    """The step plan (one process) when the training set's size is known without reading
    data: ``training.max_steps``, or a GLUE task from the hub (its official size, less
    ``task.max_train_samples`` and ``task.holdout_fraction``); None otherwise, or for a
    warmup not shorter than training (an error of its own)."""
    from lowrank_runner.train.schedule import plan_steps

    n_train = _known_train_size(task)
    if n_train is None and training.get("max_steps"):
        n_train = training["batch_size"]  # any size: max_steps sets the steps
    if n_train is None:
        return None
    plan = plan_steps(n_train, training)
    return plan if plan.warmup_steps < plan.total_steps else None


def _known_train_size(task: dict) -> int | None:
    """A hub GLUE task's training examples from the official sizes (as ``lrr inspect``
    counts them), None for any other task or data source."""
    spec = TASKS.get(task.get("name"))
    if spec is None or not spec.implementation.startswith("lowrank_runner.tasks.glue:") or task.get("data_dir"):
        return None
    from lowrank_runner.tasks.glue import DEFAULT_DATASET, TRAIN_SIZES, hub_train_size
    from lowrank_runner.tasks.holdout import holdout_sizes

    if (task.get("dataset") or DEFAULT_DATASET) != DEFAULT_DATASET or task["name"] not in TRAIN_SIZES:
        return None
    n = hub_train_size(task["name"], task.get("max_train_samples"))
    return holdout_sizes(n, task["holdout_fraction"])[0] if task.get("holdout_fraction") else n


def _tracker_problems(doc: Document, output: dict) -> list[Problem]:
    """``output.trackers``: each tracker once, and its package installed (the names and
    options are the schema's)."""
    from lowrank_runner.train.tracking import INSTALL, PACKAGES, missing_package

    trackers = output.get("trackers")
    out, seen = [], set()
    for i, item in enumerate(trackers if isinstance(trackers, list) else []):
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or name not in PACKAGES:
            continue  # the schema says what is wrong
        if name in seen:
            out.append(problem(doc, ("output", "trackers", i), f"{name} is listed twice; give each tracker once"))
        seen.add(name)
        package = missing_package(name)
        if package is not None:
            out.append(problem(doc, ("output", "trackers", i), f"{name} is not installed; {INSTALL} "
                                                               f"(or pip install {package})"))
    return out


def _output_problems(doc: Document, output: dict) -> list[Problem]:
    """``output.dir`` may be anywhere (``lrr validate`` shows where); it must not be a file.
    The trackers: :func:`_tracker_problems`."""
    out = _tracker_problems(doc, output)
    return out + _output_dir_problems(doc, output)


def _output_dir_problems(doc: Document, output: dict) -> list[Problem]:
    where = output.get("dir")
    if not isinstance(where, str) or not where:
        return []
    if where.startswith("~"):
        full = expand_user(where)
        example = f" (e.g. {full})" if str(full) != where else ""
        return [problem(doc, ("output", "dir"), f"'~' is not expanded in output.dir; write the full path{example}")]
    if Path(where).exists() and not Path(where).is_dir():
        return [problem(doc, ("output", "dir"), f"{where} is a file; output.dir is the directory runs are written in")]
    return []


def _method_problems(doc: Document, method) -> list[Problem]:
    if not isinstance(method, dict) or "name" not in method:
        return []  # the recipe schema reports these
    if not isinstance(method["name"], str):
        return [problem(doc, ("method", "name"), f"expected a method name (a string; see 'lrr methods'), got "
                                                 f"{_describe(method['name'])}")]
    specs = method_specs()
    name = method["name"]
    if name not in specs:
        return [problem(doc, ("method", "name"), f"unknown method '{name}'{suggest(name, specs)}; registered: {', '.join(sorted(specs))} (see 'lrr methods')")]
    out = _switched_method_hint(doc, name, schema_problems(doc, method, validator_for(specs[name].schema), ("method",)))
    if "targets" not in doc.data and specs[name].schema.get("x-targets", True) is not False:
        out.append(problem(doc, (), f"missing required key 'targets' (the modules method '{name}' adapts, e.g. "
                                    "targets: [Wq, Wv]; only full and bitfit take none)", key=True))
    # "x-le" / "x-lt": {"a": "b"} in a method schema: parameter a must not exceed (must stay below) parameter b.
    defaults = specs[name].defaults()
    for rule, fails, says in (("x-le", float.__gt__, "cannot exceed"), ("x-lt", float.__ge__, "must be below")):
        for small, large in specs[name].schema.get(rule, {}).items():
            a, b = method.get(small, defaults.get(small)), method.get(large, defaults.get(large))
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                    and fails(float(a), float(b)):
                at = ("method", small) if small in method else ("method",)
                out.append(problem(doc, at, f"{small} ({a}) {says} {large} ({b})"))
    return out


def _switched_method_hint(doc: Document, name: str, problems: list[Problem]) -> list[Problem]:
    """``--set method.name=full`` keeps the recipe's other method keys (``r``, ``alpha``),
    which the new method does not take: say how to replace the whole mapping."""
    origin = doc.origins.get(("method", "name"))
    if origin is None or not str(origin.value.source).startswith("--set"):
        return problems
    hint = (f" (--set method.name={name} keeps the recipe's other method keys; replace the whole mapping: "
            f"--set '~method' --set 'method={{name: {name}}}')")
    return [Problem(p.location, p.path, p.message + hint, p.severity) if p.message.startswith("unknown key") else p
            for p in problems]


def _task_problems(doc: Document, task) -> list[Problem]:
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        return []
    name = task["name"]
    if name not in TASKS:
        return [problem(doc, ("task", "name"), f"unknown task '{name}'{suggest(name, TASKS)}; registered: {', '.join(sorted(TASKS))} (see 'lrr tasks')")]
    spec = TASKS[name]
    out = []
    metric = task.get("metric")
    if metric is not None and metric not in spec.metrics:
        out.append(problem(doc, ("task", "metric"), f"task '{name}' has no metric '{metric}'{suggest(metric, spec.metrics)}; available: {', '.join(spec.metrics)}"))
    for key, sub in property_schema("task")["properties"].items():
        applies = sub.get("x-tasks")
        if key in task and applies and name not in applies:
            out.append(problem(doc, ("task", key), f"task.{key} applies to {', '.join(applies)} only, not to "
                               f"task '{name}'; remove it", key=True))
    if name == "regression" and task.get("labels"):
        out.append(problem(doc, ("task", "labels"), "a regression task has no class labels; remove 'labels'"))
    stride, length = task.get("doc_stride"), task.get("max_length")
    if name == "squad_v2" and isinstance(stride, int) and isinstance(length, int) and stride >= length:
        out.append(problem(doc, ("task", "doc_stride") if "doc_stride" in task else ("task",),
                           f"doc_stride ({stride}) must be smaller than max_length ({length}): windows of a long "
                           "context share doc_stride tokens, and each also holds the question; lower doc_stride"))
    out += _test_split_problems(doc, task, name)
    if name == "chat":
        out += _chat_problems(doc, task)
    if spec.needs_local_data or (spec.accepts_local_data and "data" in task):
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        if isinstance(data.get("test"), str):
            out += _path_problems(doc, ("task", "data", "test"), data["test"], want_dir=False)
        for split in ("train", "validation"):
            if split not in data:
                out.append(problem(doc, ("task", "data") if "data" in task else ("task",),
                                   f"task '{name}' reads your files: set task.data.{split} to a .csv/.tsv/.jsonl/.parquet file",
                                   key=True))
            elif isinstance(data[split], str):
                out += _path_problems(doc, ("task", "data", split), data[split], want_dir=False)
        from lowrank_runner.tasks.data_check import peek_problems  # the head of each file: format, columns

        out += [problem(doc, path, message) for path, message in peek_problems(task)]
    else:
        if "data" in task:
            out.append(problem(doc, ("task", "data"), f"task '{name}' does not read task.data: it loads from the hub "
                               "(task.dataset) or from raw files in task.data_dir; remove task.data", key=True))
        if isinstance(task.get("data_dir"), str):
            out += _path_problems(doc, ("task", "data_dir"), task["data_dir"], want_dir=True)
    return out


def _chat_problems(doc: Document, task: dict) -> list[Problem]:
    """Task ``chat``: data from files or the hub (files win), a chat template that
    exists, and no data-to-text decoding key it would ignore."""
    from lowrank_runner.tasks.chat_data import template_problem

    out = []
    if "data" not in task and not task.get("dataset"):
        out.append(problem(doc, ("task",), "task 'chat' needs data: set task.data.train and task.data.validation "
                                           "(JSON Lines, JSON or Parquet files) or task.dataset (a hub dataset id)",
                           key=True))
    if isinstance(task.get("chat_template"), str):
        message = template_problem(task["chat_template"])
        if message:
            out.append(problem(doc, ("task", "chat_template"), message))
    generation = task.get("generation")
    if isinstance(generation, dict) and generation.get("max_sources") is not None:  # resolved recipes hold null
        out.append(problem(doc, ("task", "generation", "max_sources"), "task.generation.max_sources is for the "
                           "data-to-text tasks; task 'chat' continues task.samples conversations: set that instead",
                           key=True))
    return out


def _test_split_problems(doc: Document, task: dict, name: str) -> list[Problem]:
    """``task.test_split`` / ``task.data.test`` (data-to-text tasks): a test set scored once
    with the selected checkpoint needs a file when the data are files, and is not combined
    with ``task.holdout_fraction`` (whose test sets are the evaluation splits)."""
    tasks = property_schema("task")["properties"]["test_split"]["x-tasks"]
    data = task.get("data") if isinstance(task.get("data"), dict) else None
    if data is not None and "test" in data and name not in tasks:
        return [problem(doc, ("task", "data", "test"), f"task.data.test applies to {', '.join(tasks)} only, not to "
                        f"task '{name}'; remove it (task.holdout_fraction makes a test set of the evaluation split)",
                        key=True)]
    wants_test = bool(task.get("test_split")) or (data is not None and "test" in data)
    out = []
    if wants_test and task.get("holdout_fraction"):
        at = ("task", "test_split") if task.get("test_split") else ("task", "data", "test")
        out.append(problem(doc, at, "task.holdout_fraction already makes the evaluation split the test set; "
                                    "remove the test set (task.test_split: null, no task.data.test) or the holdout"))
    if data is not None and task.get("test_split") and "test" not in data:
        out.append(problem(doc, ("task", "test_split"),
                           f"task.test_split ({task['test_split']!r}) names a hub split, and this task reads your "
                           "files: set task.data.test to the test file (or task.test_split: null to score no test set)"))
    return out


def _path_problems(doc: Document, path: PathT, value: str, want_dir: bool) -> list[Problem]:
    try:
        return _existing_path_problems(doc, path, value, want_dir)
    except OSError as exc:  # a name too long for the file system, a path through a file, ...
        return [problem(doc, path, f"cannot be read as a path: {exc.strerror or exc}")]


def _existing_path_problems(doc: Document, path: PathT, value: str, want_dir: bool) -> list[Problem]:
    if is_pkg_path(value):
        try:
            resolved = resolve_pkg_path(value)
        except ValueError as exc:
            return [problem(doc, path, str(exc))]
    else:
        resolved = expand_user(value)
        if not resolved.exists():
            return [problem(doc, path, f"file not found: {value} (relative paths are resolved against the working directory {Path.cwd()})")]
    if want_dir and not resolved.is_dir():
        return [problem(doc, path, f"{value} is not a directory")]
    if not want_dir and resolved.is_dir():
        return [problem(doc, path, f"{value} is a directory; expected a data file")]
    return []


def _target_problems(doc: Document, targets) -> list[Problem]:
    out = []
    for i, target in enumerate(targets or []):
        if not isinstance(target, str):
            continue
        if is_symbol_like(target) and target not in SYMBOLS:
            out.append(problem(doc, ("targets", i), f"unknown target symbol '{target}'{suggest(target, SYMBOLS)}; symbols: {', '.join(SYMBOLS)} (or write a module pattern)"))
        elif target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as exc:
                out.append(problem(doc, ("targets", i), f"invalid regular expression: {exc}"))
    return out


def _training_problems(doc: Document, training: dict) -> list[Problem]:
    out = []
    max_steps, warmup = training.get("max_steps"), training.get("warmup_steps") or 0
    if isinstance(max_steps, int) and isinstance(warmup, int) and warmup >= max_steps:
        out.append(problem(doc, ("training", "warmup_steps"), f"warmup ({warmup} steps) is not shorter than training (max_steps {max_steps}); lower warmup_steps or use warmup_ratio"))
    every = training.get("eval_every")
    if isinstance(max_steps, int) and isinstance(every, int) and every > max_steps:
        out.append(problem(doc, ("training", "eval_every"), f"evaluating every {every} steps never happens before max_steps {max_steps}; lower eval_every"))
    return out


def _precision_problems(doc: Document, training: dict, method: dict) -> list[Problem]:
    """``training.adapter_dtype: bfloat16`` where it cannot work as documented: under fp16
    mixed precision (autocast would compute the bfloat16 adapters in float16 and the loss
    scaler would unscale bfloat16 gradients: two half formats, neither the master copy),
    and with AdaLoRA (PEFT's allocator scores importance in the parameter's dtype, and
    the rank scores must be float32)."""
    if training.get("adapter_dtype") != "bfloat16":
        return []
    at = ("training", "adapter_dtype")
    out = []
    if training.get("mixed_precision") == "fp16":
        out.append(problem(doc, at, "bfloat16 adapters cannot train under training.mixed_precision fp16 (float16 "
                                    "autocast and loss scaling on bfloat16 parameters); use adapter_dtype float32, or "
                                    "mixed_precision bf16 or no"))
    if method.get("name") == "adalora":
        out.append(problem(doc, at, "method adalora needs float32 adapters: its allocator (PEFT's RankAllocator) scores "
                                    "importance in the parameters' dtype; use adapter_dtype float32"))
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _backbone_problems(doc: Document, backbone) -> list[Problem]:
    if not isinstance(backbone, dict):
        return []
    out = _tokenizer_problems(doc, backbone.get("tokenizer"))
    if not isinstance(backbone.get("name"), str):
        return out
    name, revision = backbone["name"], backbone.get("revision")
    if revision is not None and (is_pkg_path(name) or expand_user(name).is_dir()):
        out.append(problem(doc, ("backbone", "revision"), f"a local backbone has no revisions: revision "
                           f"'{revision}' is ignored for {name} (it applies to hub ids); remove it", severity="warning"))
    return out + _backbone_name_problems(doc, name)


QUANT_PATH = ("backbone", "quantization")
QUANT_INSTALL = "pip install 'lowrank-runner[quantization]' (bitsandbytes), or remove backbone.quantization"


def _quantization_problems(doc: Document, backbone: dict, method: dict, training: dict) -> list[Problem]:
    """``backbone.quantization``: bitsandbytes is installed (found without importing it,
    and so torch), has a backend beyond CUDA (else a warning: it needs a CUDA GPU, which
    loading checks), the method adapts modules instead of training the backbone's own
    weights (full, bitfit: frozen int4/int8 data cannot be trained), and FSDP is off
    (sharding bitsandbytes' packed weights needs its quantized storage dtype, not set up)."""
    quant = backbone.get("quantization")
    if not isinstance(quant, dict) or quant.get("bits") not in (4, 8):
        return []
    import importlib.util

    out = []
    fsdp = training.get("fsdp")
    if isinstance(fsdp, dict) and fsdp.get("enabled") is True:
        out.append(problem(doc, QUANT_PATH, "a quantized backbone cannot be sharded with training.fsdp here; set "
                                            "training.fsdp.enabled: false (one process per GPU holds the whole 4/8-bit "
                                            "base) or remove backbone.quantization"))
    name = method.get("name")
    spec = method_specs().get(name) if isinstance(name, str) else None
    if spec is not None and spec.schema.get("x-targets", True) is False:
        out.append(problem(doc, QUANT_PATH, f"method '{name}' trains the backbone's own weights, which "
                                            f"backbone.quantization stores as frozen {quant['bits']}-bit data; use an "
                                            "adapter method (lora, lora2, triadaptlora, condlora, mtlora, adalora) or "
                                            "remove backbone.quantization"))
    found = importlib.util.find_spec("bitsandbytes")
    if found is None:
        return out + [problem(doc, QUANT_PATH, f"bitsandbytes is not installed; {QUANT_INSTALL}")]
    version = _installed_version("bitsandbytes")
    if version is not None and version < (0, 45):
        out.append(problem(doc, QUANT_PATH, f"bitsandbytes {'.'.join(map(str, version))} is too old (0.45 or later "
                                            f"needed); pip install -U 'lowrank-runner[quantization]'"))
    elif not any((Path(d) / "backends" / "cpu").is_dir() for d in (found.submodule_search_locations or [])):
        out.append(problem(doc, QUANT_PATH, "this bitsandbytes has no CPU backend: it runs quantized layers on a CUDA "
                                            "GPU only (checked when the model loads); pip install -U bitsandbytes to "
                                            "run on the CPU too", severity="warning"))
    return out


def _installed_version(dist: str) -> tuple[int, ...] | None:
    """A distribution's version as integers (``0.50.2`` → ``(0, 50, 2)``), None if unknown."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version(dist)
    except PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3]) or None


def _tokenizer_problems(doc: Document, name) -> list[Problem]:
    """``backbone.tokenizer``: a pkg: path, a local directory or a hub id."""
    if not isinstance(name, str):
        return []
    path = ("backbone", "tokenizer")
    if is_pkg_path(name):
        try:
            resolve_pkg_path(name)
        except ValueError as exc:
            return [problem(doc, path, str(exc))]
        return []
    if not expand_user(name).exists() and (name.startswith((".", "/", "~")) or not _HUB_ID.match(name)):
        return [problem(doc, path, f"no such directory: {name} (and it is not a hub id like org/model)")]
    return []


def _backbone_name_problems(doc: Document, name: str) -> list[Problem]:
    path = ("backbone", "name")
    if is_pkg_path(name):
        try:
            resolved = resolve_pkg_path(name)
        except ValueError as exc:
            return [problem(doc, path, str(exc))]
        return [] if (resolved / "config.json").is_file() else [problem(doc, path, f"{resolved} holds no config.json")]
    local = expand_user(name)
    if local.exists() and not local.is_dir():
        return [problem(doc, path, f"{name} is a file, not a model directory; point backbone.name at the directory "
                                   "that holds config.json (or a hub id like org/model)")]
    if local.exists():
        if not (local / "config.json").is_file():
            return [problem(doc, path, f"local directory {name} holds no config.json; point backbone.name at a model directory")]
        return []
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        return [problem(doc, path, f"no such directory: {name} (and it is not a hub id like org/model)")]
    return []


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        key = (str(p.location), p.path, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)

    def order(p: Problem):
        loc = p.location
        return (loc.source if loc else "", loc.line or 0 if loc else 0, loc.column or 0 if loc else 0)

    return sorted(out, key=order)



# ------------------------------------------------------------ training.init_from


def init_from_problems(doc: Document, runs: list) -> list[Problem]:
    """``training.init_from`` of every run (``runs``: :class:`~lowrank_runner.recipe.load.Expanded`
    from expansion): a ``{task: NAME}`` reference must name another task of this
    multi-task recipe that has a run with the same seed (and sweep point), without
    cycles; a path must be a run directory (or adapter directory) that exists."""
    multi = isinstance(doc.data.get("tasks"), dict)
    seeds: dict = {}
    for r in runs:
        seeds.setdefault(r.task, []).append(r.seed)
    out, edges = [], {}
    for task, seed, run, point in runs:
        label = point.label if point else ""
        training = run.data.get("training")
        ref = training.get("init_from") if isinstance(training, dict) else None
        at = ("training", "init_from")
        if isinstance(ref, str) and ref:
            path = expand_user(ref)
            if not path.exists():
                out.append(problem(run, at, f"no such run directory: {ref} (relative paths are resolved against the "
                                            f"working directory {Path.cwd()})"))
            elif not any((p / "adapter_config.json").is_file() for p in (path / "adapter", path)):
                out.append(problem(run, at, f"{ref} holds no adapter/adapter_config.json: give the directory of a "
                                            "finished 'lrr run' run (or its adapter/ folder)"))
            continue
        if not isinstance(ref, dict) or not isinstance(ref.get("task"), str):
            continue
        at, source = at + ("task",), ref["task"]
        if not multi:
            out.append(problem(run, at, "{task: ...} names another task of a multi-task recipe ('tasks:'), and this "
                                        "recipe has none; give a run directory instead"))
        elif source == task:
            out.append(problem(run, at, f"task '{task}' cannot start from its own adapter; name another task of "
                                        f"the recipe ({', '.join(t for t in seeds if t != task)}) or a run directory"))
        elif source not in seeds:
            out.append(problem(run, at, f"task '{source}' is not in this recipe{suggest(source, seeds)}; its tasks: "
                                        f"{', '.join(seeds)}"))
        elif seed not in seeds[source]:
            out.append(problem(run, at, f"task '{source}' has no run with seed {seed} (its seeds: "
                                        f"{', '.join(map(str, seeds[source]))}); each run starts from the source "
                                        "task's run of the same seed"))
        else:
            edges[(task, label, seed)] = (source, label, seed, run)
    for start in edges:
        node, seen = start, [start]
        while node in edges:
            node = edges[node][:3]
            if node == start:
                cycle = " -> ".join(t for t, _, _ in seen + [start])
                out.append(problem(edges[start][3], ("training", "init_from", "task"),
                                   f"tasks start from each other in a cycle: {cycle}"))
                break
            if node in seen:
                break
            seen.append(node)
    docs = {(r.task, r.point.label if r.point else "", r.seed): r.doc for r in runs}
    for (task, label, seed), (source, _, _, run) in edges.items():
        differ = _method_misfit(run.data.get("method"), docs[(source, label, seed)].data.get("method"))
        if differ:
            out.append(problem(run, ("training", "init_from", "task"),
                               f"task '{task}' starts from the adapter of task '{source}', whose method differs "
                               f"({differ}): the adapter would not fit; give both tasks the same method parameters, "
                               "or remove training.init_from"))
    return out


def _method_misfit(mine, theirs) -> str | None:
    """How two tasks' methods differ in what an adapter's tensors mean (defaults filled;
    dropout may differ), or None (the same, or not comparable: other checks report it)."""
    from lowrank_runner.methods.registry import method_specs
    from lowrank_runner.train.init_from import FREE_PARAMS

    specs = method_specs()
    if not (isinstance(mine, dict) and isinstance(theirs, dict)) or not all(
            isinstance(m.get("name"), str) and m["name"] in specs for m in (mine, theirs)):
        return None
    if mine["name"] != theirs["name"]:
        return f"'{mine['name']}' here, '{theirs['name']}' there"
    defaults = specs[mine["name"]].defaults()
    mine, theirs = {**defaults, **mine}, {**defaults, **theirs}
    keys = sorted(k for k in set(mine) | set(theirs) if k not in FREE_PARAMS and mine.get(k) != theirs.get(k))
    return "; ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in keys) or None
