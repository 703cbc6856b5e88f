"""A recipe document: plain data plus where every key and value came from.

YAML is composed with PyYAML's *safe* loader (no tags that build Python objects), and
the node tree is walked once to record, for each recipe path, the position of its key
and of its value. Merging (``extends``, per-task overrides) and ``--set`` overrides
carry those origins along, so an error found after merging still names the file, line
and column the user has to edit.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowrank_runner.errors import Location, Problem, RecipeError

PathT = tuple  # a recipe path: tuple of str keys and int list indexes


def dotted(path: PathT) -> str:
    return ".".join(str(p) for p in path)


@dataclass(frozen=True)
class Origin:
    key: Location  # where the key is written (for "unknown key" errors)
    value: Location  # where the value is written
    source_path: PathT  # the path as the user wrote it (before any merge moved it)


@dataclass
class Document:
    data: Any
    origins: dict[PathT, Origin] = field(default_factory=dict)
    file: str | None = None

    def origin(self, path: PathT) -> Origin | None:
        """The origin of ``path`` or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            if path in self.origins:
                return self.origins[path]
            if not path:
                return None
            path = path[:-1]

    def copy(self) -> "Document":
        return Document(copy.deepcopy(self.data), dict(self.origins), self.file)


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats: ``1e-3`` and ``5E4`` are numbers
    (YAML 1.1 needs a dot and a signed exponent, and would read them as strings)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str):
    """``yaml.safe_load`` with :class:`RecipeLoader` (for ``--set`` values)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def load_yaml(path: Path) -> Document:
    """Read one YAML file into a :class:`Document` (positions 1-based)."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(Location(source), "", "file not found")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(Location(source), "", f"cannot read: {exc}")]) from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> Document:
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        raise RecipeError([Problem(loc, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(Location(source), "", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if node is None:
        raise RecipeError([Problem(Location(source, 1, 1), "", "the recipe is empty")])
    origins: dict[PathT, Origin] = {}
    problems: list[Problem] = []
    data = _build(node, (), source, origins, problems, None)
    if problems:
        raise RecipeError(problems)
    return Document(data, origins, source)


def _loc(source: str, node: yaml.Node) -> Location:
    return Location(source, node.start_mark.line + 1, node.start_mark.column + 1)


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _build(node, path, source, origins, problems, key_loc):
    value_loc = _loc(source, node)
    origins[path] = Origin(key_loc or value_loc, value_loc, path)
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        problems.append(Problem(value_loc, dotted(path), f"unsupported YAML tag {node.tag} (only plain YAML is read)"))
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(_loc(source, key_node), dotted(path), "keys must be plain scalars"))
                continue
            key = str(_scalar(key_node, source, path))
            if key in out:
                problems.append(
                    Problem(
                        _loc(source, key_node),
                        dotted(path + (key,)),
                        f"duplicate key '{key}' (first written at line {origins[path + (key,)].key.line})",
                    )
                )
                continue
            out[key] = _build(value_node, path + (key,), source, origins, problems, _loc(source, key_node))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), source, origins, problems, None) for i, item in enumerate(node.value)]
    return _scalar(node, source, path)


def _scalar(node: yaml.ScalarNode, source: str, path: PathT = ()):
    """Construct a scalar exactly as ``yaml.safe_load`` would (safe tags only)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise RecipeError(
            [Problem(_loc(source, node), dotted(path), f"unsupported YAML value (only plain YAML is read): {exc.problem}")]
        ) from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- merging


def merge(base: Document, over: Document, at: PathT = ()) -> Document:
    """Deep-merge ``over`` onto ``base`` at ``at``: mappings merge, anything else replaces.

    Origins follow the values: a replaced subtree loses its old origins.
    """
    out = base.copy()
    _merge_into(out, over.data, over.origins, tuple(at), ())
    return out


def _merge_into(doc: Document, value, over_origins, at: PathT, src: PathT) -> None:
    target = _get(doc.data, at)
    if isinstance(value, dict) and isinstance(target, dict):
        if src in over_origins and at not in doc.origins:
            doc.origins[at] = over_origins[src]
        for key, sub in value.items():
            _merge_into(doc, sub, over_origins, at + (key,), src + (key,))
        return
    _set(doc, at, copy.deepcopy(value))
    for p in [p for p in doc.origins if p[: len(at)] == at and len(p) > len(at)]:
        del doc.origins[p]
    for p, origin in over_origins.items():
        if p[: len(src)] == src:
            doc.origins[at + p[len(src):]] = origin


_MISSING = object()


def _get(data, path: PathT, default=_MISSING):
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None if default is _MISSING else default
    return data


def _set(doc: Document, path: PathT, value) -> None:
    if not path:
        doc.data = value
        return
    parent = doc.data
    for key in path[:-1]:
        if isinstance(parent, dict):
            parent = parent.setdefault(key, {})
        else:
            parent = parent[key]
    parent[path[-1]] = value


def delete(doc: Document, path: PathT) -> None:
    parent = _get(doc.data, path[:-1])
    if isinstance(parent, dict):
        parent.pop(path[-1], None)
    for p in [p for p in doc.origins if p[: len(path)] == path]:
        del doc.origins[p]


# ------------------------------------------------------------------------ overrides


def parse_override(text: str) -> tuple[PathT, Any]:
    """Parse ``dotted.path=value``; the value is YAML (safe), so ``[Wq,Wv]`` is a list."""
    from lowrank_runner.errors import UsageError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"--set {text!r}: expected dotted.path=value, e.g. --set training.learning_rate=1e-3")
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    return path, value


def apply_override(doc: Document, text: str) -> Document:
    path, value = parse_override(text)
    loc = Location(f"--set {text}")
    over = Document(value, {(): Origin(loc, loc, path)}, loc.source)
    if isinstance(value, (dict, list)):
        _fill_origins(value, (), loc, path, over.origins)
    parent = _get(doc.data, path[:-1])
    if isinstance(parent, list) and isinstance(path[-1], int) and path[-1] >= len(parent):
        raise RecipeError([Problem(loc, dotted(path), f"index {path[-1]} is past the end of the list ({len(parent)} items)")])
    if parent is not None and not isinstance(parent, (dict, list)):
        raise RecipeError([Problem(loc, dotted(path), f"'{dotted(path[:-1])}' is a {type(parent).__name__}, not a mapping")])
    return merge(doc, over, path)


def _fill_origins(value, path, loc, src, origins):
    origins[path] = Origin(loc, loc, src + path)
    if isinstance(value, dict):
        for k, v in value.items():
            _fill_origins(v, path + (k,), loc, src, origins)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _fill_origins(v, path + (i,), loc, src, origins)
