"""The recipe JSON Schema: loading, validators and defaults.

The schema files are the single source of truth for every parameter's name, type,
default and meaning; this module only reads them.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

import jsonschema
from referencing.jsonschema import DRAFT202012 as DRAFT

from lowrank_runner.resources import schemas_dir


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    return json.loads((schemas_dir() / "recipe.schema.json").read_text())


def _method_resources():
    """The method fragments, addressable by the relative ``$ref`` the recipe schema uses."""
    from referencing import Registry, Resource

    from lowrank_runner.methods.registry import method_specs

    base = recipe_schema()["$id"].rsplit("/", 1)[0]
    resources = []
    for spec in method_specs().values():
        uri = spec.schema.get("$id") or f"{base}/methods/{spec.name}.schema.json"
        resources.append((uri, Resource.from_contents(spec.schema, default_specification=DRAFT)))
    return Registry().with_resources(resources)


@lru_cache(maxsize=1)
def recipe_validator() -> jsonschema.protocols.Validator:
    """The recipe schema, with every registered method (plugins too) dispatched on name."""
    from lowrank_runner.methods.registry import method_specs

    schema = copy.deepcopy(recipe_schema())
    method = schema["$defs"]["method"]
    static = {branch["if"]["properties"]["name"]["const"] for branch in method.get("allOf", [])}
    base = schema["$id"].rsplit("/", 1)[0]
    for spec in method_specs().values():
        if spec.name not in static:
            ref = spec.schema.get("$id") or f"{base}/methods/{spec.name}.schema.json"
            method.setdefault("allOf", []).append(
                {"if": {"properties": {"name": {"const": spec.name}}, "required": ["name"]}, "then": {"$ref": ref}}
            )
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=_method_resources())


@lru_cache(maxsize=1)
def document_validator() -> jsonschema.protocols.Validator:
    """The recipe validator for a whole document whose ``method`` mappings are checked on
    their own (each run's against its method's schema: recipe/validate.py): ``method`` must
    be a mapping with a ``name`` here, nothing more. The full dispatch over every method's
    ``if``/``then`` branch and ``unevaluatedProperties`` is most of a document's validation
    time, and its errors under ``method`` would be skipped anyway (``skip=("method",)``)."""
    full = recipe_validator()
    schema = dict(full.schema)
    method = schema["$defs"]["method"]
    schema["$defs"] = {**schema["$defs"], "method": {k: v for k, v in method.items()
                                                     if k not in ("allOf", "unevaluatedProperties")}}
    return full.evolve(schema=schema)


@lru_cache(maxsize=64)
def sections_validator(sections: frozenset[str]) -> jsonschema.protocols.Validator:
    """The recipe validator for the top-level ``sections`` alone (their own schema,
    conditions inside them included; other keys and the root's requirements left out):
    what a sweep point's values can make invalid in a document already checked whole."""
    full = document_validator()
    root = full.schema
    reduced = {k: v for k, v in root.items() if k not in ("required", "if", "then", "additionalProperties", "properties")}
    reduced["properties"] = {k: v for k, v in root["properties"].items() if k in sections}
    return full.evolve(schema=reduced)


_VALIDATORS: dict[int, tuple[dict, jsonschema.protocols.Validator]] = {}


def validator_for(schema: dict) -> jsonschema.protocols.Validator:
    """A validator of ``schema`` (a method fragment), built once per schema object."""
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cached = _VALIDATORS[id(schema)] = (schema, cls(schema))
    return cached[1]


def _deref(schema: dict, root: dict) -> dict:
    while "$ref" in schema and schema["$ref"].startswith("#/"):
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def fill_defaults(data: Any, schema: dict, root: dict | None = None) -> Any:
    """Return a copy of ``data`` with every schema default filled in, recursively.

    Objects named by ``properties`` with an object default (e.g. ``training: {}``) are
    created and filled; values the user wrote are never changed. A property marked
    ``"x-tasks": [...]`` gets its default only in an object whose ``name`` is one of
    them (or has no name yet): task options stay out of other tasks' configs and hashes.
    """
    root = root or schema
    schema = _deref(schema, root)
    if not isinstance(data, dict) or "properties" not in schema:
        return copy.deepcopy(data)
    properties = schema["properties"]
    out = {key: value if key in properties and isinstance(value, dict) else copy.deepcopy(value)
           for key, value in data.items()}  # mappings the schema describes are copied by the recursion below
    for key, sub in properties.items():
        sub_r = _deref(sub, root)
        if key not in out:
            if "default" not in sub_r or _not_for(sub_r, out):
                continue
            out[key] = copy.deepcopy(sub_r["default"])
        if isinstance(out[key], dict):
            out[key] = fill_defaults(out[key], sub_r, root)
    return out


def _not_for(sub: dict, obj: dict) -> bool:
    applies, name = sub.get("x-tasks"), obj.get("name")
    return bool(applies) and isinstance(name, str) and name not in applies


def resolve(data: dict) -> dict:
    """A composed recipe (or one run of it) with every default filled in: the schema's,
    and the method's own parameters' (its fragment), ``name`` first; each task of
    ``tasks:`` a mapping. What runs see, and what the hashes are taken of."""
    from lowrank_runner.methods.registry import get_method_spec

    out = fill_defaults(data, recipe_schema())
    method = out.get("method")
    if isinstance(method, dict) and "name" in method:
        out["method"] = {**get_method_spec(method["name"]).defaults(), **method}
        out["method"] = {"name": method["name"], **{k: v for k, v in out["method"].items() if k != "name"}}
    if isinstance(out.get("tasks"), dict):
        out["tasks"] = {k: (v or {}) for k, v in out["tasks"].items()}
    return out


def property_schema(*path: str) -> dict:
    """The (dereferenced) schema of a recipe path like ("training", "learning_rate")."""
    root = recipe_schema()
    node = root
    for key in path:
        node = _deref(node, root)["properties"][key]
    return _deref(node, root)


def recipe_key_paths() -> list[str]:
    """Every settable dotted recipe key (``training.learning_rate``, ``method.r``, ...),
    from the schema and the registered methods' parameters (for shell completion)."""
    from lowrank_runner.methods.registry import method_specs

    root = recipe_schema()
    out: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        node = _deref(node, root)
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            out.append(path)
            if "properties" in _deref(sub, root):
                walk(sub, path + ".")

    walk(root, "")
    out += [f"method.{param}" for spec in method_specs().values() for param in spec.params]
    return sorted(dict.fromkeys(out))
