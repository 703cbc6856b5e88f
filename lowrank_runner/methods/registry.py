"""The method registry: names, parameter schemas and implementations of adapter methods.

Deliberately free of torch: ``lrr validate`` and ``lrr methods`` read only the specs.
Built-in methods are the schema fragments in ``schemas/methods/``; each names its
implementation (``x-implementation: module:Class``), which is imported only when a
model is actually built. Third-party packages register methods through the entry-point
group ``lowrank_runner.methods``; the entry point may resolve to a :class:`MethodSpec`,
to a schema ``dict`` of the same shape as the built-in fragments, or to the path of
such a JSON file. Keep that object torch-free so validation stays fast.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from lowrank_runner.resources import schemas_dir

ENTRY_POINT_GROUP = "lowrank_runner.methods"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    schema: dict  # JSON Schema of the recipe's `method` mapping for this method
    implementation: str  # "package.module:ClassName"
    paper: str = ""
    source: str = "built-in"
    arxiv: str = ""  # the paper's arXiv id (``x-arxiv``), when known: the model card links it
    schedule: str = ""  # "module:function" (``x-schedule``): its step schedule's problems, torch-free

    @property
    def params(self) -> dict[str, dict]:
        return {k: v for k, v in self.schema.get("properties", {}).items() if k != "name"}

    @property
    def kind(self) -> str:
        """``"update"``: the method's adapters are weight updates ΔW (mergeable);
        ``"inserted"`` (``"x-kind": "inserted"``): modules inserted into the network
        (bottleneck adapters); ``"prompt"``: keys and values the attention reads before the
        input (prefix-tuning). ``lrr export --merge``/``--peft`` refuse both."""
        return self.schema.get("x-kind", "update")

    @property
    def fixed_targets(self) -> list[str] | None:
        """The target symbols a method that places its modules itself must be given
        (``"x-targets": [...]``: Houlsby's ``[Wa, Wo]``), None for the others."""
        value = self.schema.get("x-targets")
        return list(value) if isinstance(value, list) else None

    def defaults(self) -> dict[str, Any]:
        return {k: v["default"] for k, v in self.params.items() if "default" in v}

    def schedule_problems(self, params: dict, total_steps: int) -> list:
        """The problems (``errors.Problem`` at ``method.KEY``) of the method's step schedule
        at ``total_steps`` optimizer steps, from its ``x-schedule`` function (torch-free,
        so ``lrr validate`` can call it); ``params`` with the defaults filled. [] without one."""
        if not self.schedule:
            return []
        module_name, _, attr = self.schedule.partition(":")
        return getattr(importlib.import_module(module_name), attr)(params, total_steps)

    def load(self):
        module_name, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def spec_from_schema(schema: dict, source: str) -> MethodSpec:
    name = schema.get("title") or schema.get("properties", {}).get("name", {}).get("const")
    if not name or "x-implementation" not in schema:
        raise ValueError(f"method schema from {source} needs 'title' (the method name) and 'x-implementation'")
    return MethodSpec(
        name=name,
        schema=schema,
        implementation=schema["x-implementation"],
        paper=schema.get("x-paper", ""),
        source=source,
        arxiv=schema.get("x-arxiv", ""),
        schedule=schema.get("x-schedule", ""),
    )


def _builtin_specs() -> list[MethodSpec]:
    out = []
    for path in sorted((schemas_dir() / "methods").glob("*.schema.json")):
        out.append(spec_from_schema(json.loads(path.read_text()), "built-in"))
    return out


def _plugin_specs() -> tuple[list[MethodSpec], list[str]]:
    specs, problems = [], []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        source = f"{ep.dist.name if ep.dist else '?'} ({ep.value})"
        try:
            obj = ep.load()
            if isinstance(obj, MethodSpec):
                specs.append(obj)
            elif isinstance(obj, dict):
                specs.append(spec_from_schema(obj, source))
            elif isinstance(obj, (str, Path)):
                specs.append(spec_from_schema(json.loads(Path(obj).read_text()), source))
            else:
                problems.append(f"entry point {ep.name} -> {source}: expected a MethodSpec, a schema dict or a JSON path")
        except Exception as exc:  # a broken plugin must not break lrr
            problems.append(f"entry point {ep.name} -> {source}: {type(exc).__name__}: {exc}")
    return specs, problems


@lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, MethodSpec], tuple[str, ...]]:
    specs: dict[str, MethodSpec] = {}
    plugins, problems = _plugin_specs()
    for spec in _builtin_specs() + plugins:
        if spec.name in specs:
            problems.append(f"method '{spec.name}' from {spec.source} ignored: already registered by {specs[spec.name].source}")
            continue
        specs[spec.name] = spec
    return specs, tuple(problems)


def method_specs() -> dict[str, MethodSpec]:
    return _registry()[0]


def registry_problems() -> tuple[str, ...]:
    """Plugins that failed to load (reported by ``lrr methods``)."""
    return _registry()[1]


def get_method_spec(name: str) -> MethodSpec:
    try:
        return method_specs()[name]
    except KeyError:
        raise KeyError(f"unknown method '{name}' (registered: {', '.join(sorted(method_specs()))})") from None
