"""The checks of one run's recipe document (one task, one seed), beyond the JSON
Schema: the method's own parameter schema and its ``x-le``/``x-lt`` rules, the task's
options (its rules: :mod:`lowrank_runner.tasks.rules`) and data paths, target symbols,
training, precision, backbone and output settings. Every problem is collected (never
only the first), each at the file, line and column to edit (:mod:`.problems`).

Torch-free by design: ``lrr validate`` must stay fast enough for CI and pre-commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from lowrank_runner.errors import Problem
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.recipe.backbone_checks import backbone_problems, quantization_problems
from lowrank_runner.recipe.document import Document, PathT
from lowrank_runner.recipe.output_checks import output_problems
from lowrank_runner.recipe.problems import describe_value, problem, schema_problems, suggest
from lowrank_runner.recipe.schema import property_schema, validator_for
from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path
from lowrank_runner.targets import SYMBOLS, is_symbol_like
from lowrank_runner.tasks.registry import TASKS


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
    out += _checkpointing_problems(doc, part("training", dict), part("method", dict))
    out += backbone_problems(doc, part("backbone", dict))
    out += quantization_problems(doc, part("backbone", dict), part("method", dict), part("training", dict))
    out += output_problems(doc, part("output", dict))
    return out


def _method_problems(doc: Document, method) -> list[Problem]:
    if not isinstance(method, dict) or "name" not in method:
        return []  # the recipe schema reports these
    if not isinstance(method["name"], str):
        return [problem(doc, ("method", "name"), f"expected a method name (a string; see 'lrr methods'), got "
                                                 f"{describe_value(method['name'])}")]
    specs = method_specs()
    name = method["name"]
    if name not in specs:
        return [problem(doc, ("method", "name"), f"unknown method '{name}'{suggest(name, specs)}; registered: {', '.join(sorted(specs))} (see 'lrr methods')")]
    out = _switched_method_hint(doc, name, schema_problems(doc, method, validator_for(specs[name].schema), ("method",)))
    fixed = specs[name].fixed_targets
    example = f"[{', '.join(fixed)}]" if fixed else "[Wq, Wv]"
    if "targets" not in doc.data and specs[name].schema.get("x-targets", True) is not False:
        out.append(problem(doc, (), f"missing required key 'targets' (the modules method '{name}' adapts, e.g. "
                                    f"targets: {example}; only {', '.join(n for n, sp in sorted(specs.items()) if sp.schema.get('x-targets', True) is False)} take none)", key=True))
    out += _fixed_target_problems(doc, name, fixed)
    # "x-le" / "x-lt": {"a": "b"} in a method schema: parameter a must not exceed (must stay below) parameter b.
    defaults = specs[name].defaults()
    for rule, fails, says in (("x-le", float.__gt__, "cannot exceed"), ("x-lt", float.__ge__, "must be below")):
        for small, large in specs[name].schema.get(rule, {}).items():
            a, b = method.get(small, defaults.get(small)), method.get(large, defaults.get(large))
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                    and fails(float(a), float(b)):
                at = ("method", small) if small in method else ("method",)
                out.append(problem(doc, at, f"{small} ({a}) {says} {large} ({b})"))
    if not any(p.severity == "error" for p in out):  # r above r_ref is an error already (x-le), not a no-op
        out += _no_op_problems(doc, method, specs[name].schema.get("x-no-op", []), defaults)
    return out + _ignored_parameters(doc, method, specs[name].schema.get("x-only-with", {}), defaults)


def _fixed_target_problems(doc: Document, name: str, fixed: list[str] | None) -> list[Problem]:
    """A method that places its modules itself (``"x-targets": [symbols]``, the bottleneck
    adapters) takes exactly those targets (as ``modeling.check_fixed_targets`` says at run time)."""
    given = doc.data.get("targets")
    if fixed is None or not isinstance(given, list) or sorted(map(str, given)) == sorted(fixed):
        return []
    return [problem(doc, ("targets",), f"method '{name}' inserts its modules at fixed places, after "
                                       f"{' and '.join(fixed)}; set targets: [{', '.join(fixed)}] (got "
                                       f"[{', '.join(map(str, given))}])")]


def _no_op_problems(doc: Document, method: dict, rules: list, defaults: dict) -> list[Problem]:
    """``"x-no-op": [{"ge": ["a", "b"], "says": TEXT, "unless": {"c": V}}]`` in a method
    schema: with parameter ``a`` at or above ``b`` (both set; ``unless`` ``c`` is ``V``) the
    method cannot act (a dynamic-rank method with nothing to grow or prune), said as a
    warning at ``method.a`` (or ``method.b``, whichever the recipe sets)."""
    out = []
    for rule in rules:
        a, b = rule["ge"]
        va, vb = method.get(a, defaults.get(a)), method.get(b, defaults.get(b))
        if not (_is_number(va) and _is_number(vb)) or va < vb:
            continue
        if any(method.get(k, defaults.get(k)) == v for k, v in rule.get("unless", {}).items()):
            continue
        at = ("method", a) if a in method else ("method", b) if b in method else ("method",)
        out.append(problem(doc, at, f"{method['name']}: {a} ({va}) is not below {b} ({vb}): {rule['says']}",
                           severity="warning"))
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ignored_parameters(doc: Document, method: dict, only_with: dict, defaults: dict) -> list[Problem]:
    """``"x-only-with": {"a": {"b": V}}`` in a method schema: parameter ``a`` acts only
    when ``b`` is ``V``; set otherwise, it is ignored, which is said (a warning)."""
    out = []
    for key, conditions in only_with.items():
        unmet = {k: v for k, v in conditions.items() if method.get(k, defaults.get(k)) != v}
        if key in method and unmet:
            needed = ", ".join(f"{k}: {v}" for k, v in conditions.items())
            actual = ", ".join(f"{k} is {method.get(k, defaults.get(k))}" for k in unmet)
            out.append(problem(doc, ("method", key), f"applies with {needed} only ({actual} here), so it is ignored; "
                                                     "remove it, or set " + needed, key=True, severity="warning"))
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
    out += [problem(doc, p.path, p.message, key=p.key) for p in spec.rules.problems(name, task)]
    out += _test_split_problems(doc, task, name)
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
        out += [problem(doc, p.path, p.message, key=p.key) for p in spec.rules.data_problems(task)]
    else:
        if "data" in task:
            out.append(problem(doc, ("task", "data"), f"task '{name}' does not read task.data: it loads from the hub "
                               "(task.dataset) or from raw files in task.data_dir; remove task.data", key=True))
        if isinstance(task.get("data_dir"), str):
            out += _path_problems(doc, ("task", "data_dir"), task["data_dir"], want_dir=True)
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


def _checkpointing_problems(doc: Document, training: dict, method: dict) -> list[Problem]:
    """``training.gradient_checkpointing`` with a method whose schema says it cannot
    (``"x-no-gradient-checkpointing": REASON``: the prefix lives in the key/value cache,
    which transformers drops from checkpointed layers)."""
    name = method.get("name")
    spec = method_specs().get(name) if isinstance(name, str) else None
    why = spec.schema.get("x-no-gradient-checkpointing") if spec is not None else None
    if not why or training.get("gradient_checkpointing") is not True:
        return []
    return [problem(doc, ("training", "gradient_checkpointing"), f"method {name} cannot train with gradient "
                                                                 f"checkpointing: {why}; set gradient_checkpointing: false")]


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
    name = method.get("name")
    spec = method_specs().get(name) if isinstance(name, str) else None
    why = spec.schema.get("x-float32-adapters") if spec is not None else None  # e.g. adalora's allocator
    if why:
        out.append(problem(doc, at, f"method {name} needs float32 adapters: {why}; use adapter_dtype float32"))
    return out
