"""A recipe document: plain data plus where every key and value came from.

YAML is composed with PyYAML's *safe* loader (no tags that build Python objects), and
the node tree is walked once to record, for each recipe path, the position of its key
and of its value. Merging (``extends``, per-task overrides) and ``--set`` overrides
carry those origins along, so an error found after merging still names the file, line
and column the user has to edit.

Whatever a file holds, reading it is bounded: at most :data:`MAX_BYTES` of UTF-8 (or
UTF-16/32 with a byte-order mark) text, values nested at most :data:`MAX_DEPTH` deep,
and at most :data:`MAX_VALUES` values once aliases are expanded (an alias "bomb" fails
at once instead of hanging); an alias inside the value it names is refused. YAML merge
keys (``<<: *base``) are expanded here, the merged values keeping their own lines.
"""

from __future__ import annotations

import codecs
import copy
import re
import stat
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
    sources: tuple[str, ...] = ()  # every file read to make it (the recipe and what it extends)

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
        return Document(copy.deepcopy(self.data), dict(self.origins), self.file, self.sources)


MAX_BYTES = 1 << 20  # a recipe is a few kilobytes; anything larger is the wrong file
MAX_DEPTH = 64  # recipes nest about 6 levels deep
MAX_VALUES = 100_000  # values after alias expansion (a real recipe has a few hundred)
MERGE_TAG = "tag:yaml.org,2002:merge"


class LimitError(yaml.MarkedYAMLError):
    """A YAML document beyond the loader's bounds (depth, size, self-reference)."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats: ``1e-3`` and ``5E4`` are numbers
    (YAML 1.1 needs a dot and a signed exponent, and would read them as strings), and
    bounded composition: nesting depth, alias expansion and self-referencing aliases
    are checked while the node tree is built, before anything walks it."""

    def __init__(self, stream):
        super().__init__(stream)
        self._open_anchors: list = []  # anchors of the nodes being composed
        self._sizes: dict[int, int] = {}  # id(node) -> values in it once aliases are expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise LimitError(None, None, f"the alias *{event.anchor} is inside the value its anchor "
                                 f"&{event.anchor} names (a value cannot contain itself)", event.start_mark)
            return super().compose_node(parent, index)
        if len(self._open_anchors) >= MAX_DEPTH:
            raise LimitError(None, None, f"values are nested more than {MAX_DEPTH} levels deep here "
                             "(a recipe needs about 6)", event.start_mark)
        self._open_anchors.append(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()
        self._count(node)
        return node

    def _count(self, node) -> None:
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_VALUES:
            raise LimitError(None, None, f"this value holds more than {MAX_VALUES:,} values once its aliases are "
                             "expanded (each *alias repeats the whole value it names): an alias bomb?",
                             node.start_mark)
        self._sizes[id(node)] = size


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


if hasattr(yaml, "CSafeLoader"):
    class FastRecipeLoader(yaml.CSafeLoader):
        """:class:`RecipeLoader`'s YAML 1.2 floats on libyaml's parser and composer (the
        bounds are checked on its events first: :func:`_check_bounds`)."""

    FastRecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))
else:  # PyYAML built without libyaml
    FastRecipeLoader = None


def safe_load(text: str):
    """``yaml.safe_load`` with :class:`RecipeLoader` (for ``--set`` values)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def _fail(source: str, message: str, line: int | None = None, column: int | None = None):
    raise RecipeError([Problem(Location(source, line, column), "", message)]) from None


def load_yaml(path: Path) -> Document:
    """Read one YAML file into a :class:`Document` (positions 1-based)."""
    source = str(path)
    return parse_yaml(read_text(path, source), source)


def read_text(path: Path, source: str) -> str:
    """The text of a recipe file: a regular file of at most :data:`MAX_BYTES`, UTF-8
    (a UTF-8, UTF-16 or UTF-32 byte-order mark is honoured)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        _fail(source, "file not found")
    except OSError as exc:
        _fail(source, f"cannot read: {exc.strerror or exc}")
    if stat.S_ISDIR(info.st_mode):
        _fail(source, "is a directory, not a recipe file")
    if not stat.S_ISREG(info.st_mode):
        _fail(source, "is not a regular file (a device, pipe or socket?); give a recipe file")
    too_big = f"a recipe has at most {MAX_BYTES:,} bytes (is this the right file?)"
    if info.st_size > MAX_BYTES:
        _fail(source, f"the file has {info.st_size:,} bytes; {too_big}")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # a file may be longer than its size says (/proc)
    except OSError as exc:
        _fail(source, f"cannot read: {exc.strerror or exc}")
    if len(raw) > MAX_BYTES:
        _fail(source, f"the file has more than {MAX_BYTES:,} bytes; {too_big}")
    return decode(raw, source)


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode(raw: bytes, source: str) -> str:
    """UTF-8 text, or UTF-16/32 text with a byte-order mark; an error names the line and
    column of the first byte that is not."""
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        if encoding != "utf-8":
            _fail(source, f"not valid {encoding.upper()} text although the file starts with its byte-order mark; "
                          "save the recipe as UTF-8")
        before = raw[: exc.start].decode("utf-8")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        hint = " (this looks like a binary file)" if b"\0" in raw[:8192] else ""
        _fail(source, f"not UTF-8 text: byte 0x{raw[exc.start]:02x} is not valid UTF-8 here{hint}; "
                      "save the recipe as UTF-8", line, column)


def parse_yaml(text: str, source: str) -> Document:
    """A :class:`Document` of YAML ``text`` read from ``source``: composed by libyaml
    (PyYAML's C parser, with the same marks) once the bounds are checked on its event
    stream; PyYAML's pure-Python loader composes it where libyaml is missing, and says
    what is wrong with a document that does not parse (its messages are the ones users
    get)."""
    node = _compose(text, source)
    if node is None:
        raise RecipeError([Problem(Location(source, 1, 1), "", "the recipe is empty")])
    origins: dict[PathT, Origin] = {}
    problems: list[Problem] = []
    data = _build(node, (), source, origins, problems, None)
    if problems:
        raise RecipeError(list({str(p): p for p in problems}.values()))
    return Document(data, origins, source, (source,))


def _compose(text: str, source: str):
    """The node tree of ``text`` (None for an empty document); every error a
    :class:`RecipeError` at its line and column."""
    try:
        yaml.reader.Reader(text)  # every character checked, positions in characters
        if FastRecipeLoader is not None and "\t" not in text:  # libyaml takes tabs PyYAML refuses: a: <tab>b
            try:
                return _fast_compose(text)
            except yaml.YAMLError:
                pass  # said below, in the pure-Python loader's words
        loader = RecipeLoader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        what = ("a NUL byte: a binary file, or UTF-16 without a byte-order mark?" if exc.character == 0
                else "control characters cannot appear in YAML")
        _fail(source, f"character U+{exc.character:04X} is not allowed in a recipe ({what})", line, column)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        raise RecipeError([Problem(loc, "", _yaml_message(exc))]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(Location(source), "", f"invalid YAML: {exc}")]) from None


def _fast_compose(text: str):
    """libyaml's node tree of ``text``, after :func:`_check_bounds` on its events (the C
    composer recurses without the Python loader's checks)."""
    _check_bounds(yaml.parse(text, Loader=FastRecipeLoader))
    loader = FastRecipeLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _check_bounds(events) -> None:
    """What :class:`RecipeLoader` checks while composing, on an event stream: nesting
    depth, an alias inside the value its anchor names, and the values once aliases are
    expanded."""
    open_nodes: list[list] = []  # per open collection: [anchor, start mark, values so far]
    sizes: dict[str, int] = {}  # anchor -> values in its node once aliases are expanded
    for event in events:
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, mark, size = open_nodes.pop()
            _add(open_nodes, sizes, anchor, size + 1, mark)
        elif isinstance(event, yaml.AliasEvent):
            if any(node[0] == event.anchor for node in open_nodes):
                raise LimitError(None, None, f"the alias *{event.anchor} is inside the value its anchor "
                                 f"&{event.anchor} names (a value cannot contain itself)", event.start_mark)
            _add(open_nodes, sizes, None, sizes.get(event.anchor, 1), event.start_mark)
        elif isinstance(event, yaml.NodeEvent):
            if len(open_nodes) >= MAX_DEPTH:
                raise LimitError(None, None, f"values are nested more than {MAX_DEPTH} levels deep here "
                                 "(a recipe needs about 6)", event.start_mark)
            if isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append([event.anchor, event.start_mark, 0])
            else:
                _add(open_nodes, sizes, event.anchor, 1, event.start_mark)


def _add(open_nodes: list[list], sizes: dict, anchor, size: int, mark) -> None:
    """A node of ``size`` values closed (or an alias read) inside the innermost open one."""
    if size > MAX_VALUES:
        raise LimitError(None, None, f"this value holds more than {MAX_VALUES:,} values once its aliases are "
                         "expanded (each *alias repeats the whole value it names): an alias bomb?", mark)
    if anchor is not None:
        sizes[anchor] = size
    if open_nodes:
        open_nodes[-1][2] += size


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    """One line for a YAML error (PyYAML's messages span several)."""
    if isinstance(exc, LimitError):
        return exc.problem
    problem = exc.problem or str(exc).splitlines()[0]
    if problem == "but found another document":
        return "a recipe is one YAML document, and a second one starts here; remove this '---' or split the file"
    if "'\\t'" in problem:
        return f"invalid YAML: {problem} (indent with spaces: YAML does not allow tabs)"
    return f"invalid YAML: {problem}"


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
        return {
            key: _build(value_node, path + (key,), source, origins, problems, _loc(source, key_node))
            for key, key_node, value_node in _entries(node, path, source, problems)
        }
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), source, origins, problems, None) for i, item in enumerate(node.value)]
    return _scalar(node, source, path)


def _entries(node: yaml.MappingNode, path: PathT, source: str, problems: list) -> list[tuple]:
    """``(key, key node, value node)`` of a mapping, with merge keys expanded as YAML
    defines them: ``<<: *base`` (or ``<<: [*a, *b]``, the first winning) adds the keys
    of the named mappings that the mapping does not set itself."""
    own: dict = {}
    merged: dict = {}
    merge_at = None
    for key_node, value_node in node.value:
        if key_node.tag == MERGE_TAG:
            if merge_at is not None:  # PyYAML would keep the last one silently
                problems.append(Problem(_loc(source, key_node), dotted(path),
                                        f"duplicate merge key '<<' (first written at line {merge_at}); merge several "
                                        "mappings with one: <<: [*a, *b]"))
                continue
            merge_at = key_node.start_mark.line + 1
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    problems.append(Problem(_loc(source, key_node), dotted(path),
                                            "'<<' merges mappings: write <<: *name (or <<: [*a, *b]) with the "
                                            "anchor (&name) of a mapping"))
                    continue
                # a merged mapping's own problems are reported where it is written
                for key, k, v in _entries(src, path, source, []):
                    merged.setdefault(key, (k, v))
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(Problem(_loc(source, key_node), dotted(path), "keys must be plain scalars"))
            continue
        key = str(_scalar(key_node, source, path))
        if key in own:
            first = own[key][0].start_mark.line + 1
            problems.append(Problem(_loc(source, key_node), dotted(path + (key,)),
                                    f"duplicate key '{key}' (first written at line {first})"))
            continue
        own[key] = (key_node, value_node)
    return [(key, k, v) for key, (k, v) in {**merged, **own}.items()]


def _scalar(node: yaml.ScalarNode, source: str, path: PathT = ()):
    """Construct a scalar exactly as ``yaml.safe_load`` would (safe tags only)."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise RecipeError(
            [Problem(_loc(source, node), dotted(path), f"unsupported YAML value (only plain YAML is read): {exc.problem}")]
        ) from None
    except (ValueError, TypeError, OverflowError, KeyError) as exc:  # an explicit tag the text does not fit: !!float abc
        tag = node.tag.rsplit(":", 1)[-1]
        raise RecipeError([Problem(_loc(source, node), dotted(path),
                                   f"{node.value!r} is not a valid !!{tag} ({exc}); remove the tag or fix the value")]) from None


# --------------------------------------------------------------------------- merging


def merge(base: Document, over: Document, at: PathT = ()) -> Document:
    """Deep-merge ``over`` onto ``base`` at ``at``: mappings merge, anything else replaces.

    Origins follow the values: a replaced subtree loses its old origins.
    """
    out = base.copy()
    out.sources = tuple(dict.fromkeys(base.sources + over.sources))
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
        if isinstance(parent, dict) and not isinstance(parent.get(key), (dict, list)):
            parent[key] = {}  # a missing (or null) mapping on the way is created
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
    """Parse ``dotted.path=value``; the value is YAML (safe), so ``[Wq,Wv]`` is a list.

    Path parts that are whole numbers become ``int`` (list indexes); whether a part
    indexes a list or names a key is decided against the recipe (:func:`apply_override`).
    """
    from lowrank_runner.errors import UsageError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise UsageError(f"--set {text!r}: expected dotted.path=value, e.g. --set training.learning_rate=1e-3")
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {text!r}: the value is not valid YAML ({_set_yaml_problem(exc)}); "
                         "quote it if it is text, e.g. --set 'name=\"a: b\"'") from None
    path = tuple(int(p) if p.strip().isdigit() else p.strip() for p in key.split("."))
    return path, value


def _set_yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        where = f" at column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        return f"{exc.problem or exc.context}{where}"
    return str(exc).splitlines()[0]


# Mappings whose keys are dotted recipe keys (``sweep: {method.r: [...]}``): a dotted --set
# path cannot tell such a key from the path into it. What they are, and how to set them.
DOTTED_KEYED = {
    ("sweep",): ("a sweep's", "--sweep KEY=V1,V2 (e.g. --sweep method.r=2,4) or --set 'sweep={method.r: [2, 4]}'"),
    ("search", "space"): ("the search space's", "--set 'search.space={training.epochs: {int: [1, 3]}}' (it adds the "
                                                "key to the space)"),
}


def apply_override(doc: Document, text: str) -> Document:
    """``doc`` with one ``--set dotted.path=value`` applied: mappings on the way are
    created as needed; a list item must exist; nothing can be set inside a scalar.
    ``--set '~dotted.path'`` removes the key (as Hydra writes it), e.g. ``~task.data``
    to switch a recipe from your files to a hub task."""
    if text.startswith("~"):
        return _remove_override(doc, text)
    parts, value = parse_override(text)
    loc = Location(f"--set {text}")
    if parts[0] == "extends":
        raise RecipeError([Problem(loc, "extends", "cannot be set with --set: the recipe's files are composed "
                                                   "before overrides apply; write extends in the recipe")])
    for keyed, (what, fix) in DOTTED_KEYED.items():
        if tuple(parts[:len(keyed)]) == keyed and len(parts) > len(keyed):
            raise RecipeError([Problem(loc, dotted(keyed), f"{what} keys are dotted recipe keys themselves, so --set "
                                                           f"cannot reach inside it: write {fix}")])
    path = _override_path(doc.data, parts, loc)
    over = Document(value, {(): Origin(loc, loc, path)}, loc.source)
    if isinstance(value, (dict, list)):
        _fill_origins(value, (), loc, path, over.origins)
    out = merge(doc, over, path)
    for i in range(1, len(path)):  # mappings the override created point at it
        out.origins.setdefault(path[:i], Origin(loc, loc, path[:i]))
    return out


def _remove_override(doc: Document, text: str) -> Document:
    from lowrank_runner.errors import UsageError

    key = text[1:].strip()
    if not key or "=" in key or any(not part.strip() for part in key.split(".")):
        raise UsageError(f"--set {text!r}: expected ~dotted.path (no value) to remove a key, e.g. --set '~task.data'")
    loc = Location(f"--set {text}")
    parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    path = _override_path(doc.data, parts, loc)
    parent = _get(doc.data, path[:-1])
    if not isinstance(parent, dict) or path[-1] not in parent:
        raise RecipeError([Problem(loc, dotted(path), "the recipe does not set this key, so there is nothing to remove")])
    out = doc.copy()
    delete(out, path)
    return out


def _override_path(data, parts: PathT, loc: Location) -> PathT:
    """The recipe path ``parts`` names in ``data``: numbers index lists, anything else
    names mapping keys (a number names a key in a mapping: keys are strings)."""
    path: tuple = ()
    node = data
    for part in parts:
        problem = _step_problem(node, part, path)
        if problem:
            raise RecipeError([Problem(loc, dotted(path + (part,)), problem)])
        key = part if isinstance(node, list) else str(part)
        path += (key,)
        node = node[key] if isinstance(node, list) else (node or {}).get(key)
    return path


def _step_problem(node, part, path: PathT) -> str | None:
    """Why ``part`` cannot follow ``path`` (whose value is ``node``), or None."""
    here = dotted(path)
    if isinstance(node, list):
        if not isinstance(part, int):
            last = f"0 to {len(node) - 1}" if node else "nothing: the list is empty"
            neg = "; negative indexes are not supported" if str(part).lstrip("-").isdigit() else ""
            return f"'{here}' is a list: index it with a number ({last}){neg}"
        if part >= len(node):
            return (f"index {part} is past the end of the list ({len(node)} items); set the whole list, "
                    f"e.g. --set '{here}=[...]'")
        return None
    if node is None and isinstance(part, int) and path:
        return f"'{here}' is not set, so it has no item {part}; set the whole list, e.g. --set '{here}=[...]'"
    if node is not None and not isinstance(node, dict):
        return (f"'{here}' is {_a(node)} ({node!r}), not a mapping or a list: nothing can be set inside it "
                f"(--set {here}=VALUE replaces it)")
    return None


def _a(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), f"a {type(value).__name__}")


def _fill_origins(value, path, loc, src, origins):
    origins[path] = Origin(loc, loc, src + path)
    if isinstance(value, dict):
        for k, v in value.items():
            _fill_origins(v, path + (k,), loc, src, origins)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _fill_origins(v, path + (i,), loc, src, origins)
