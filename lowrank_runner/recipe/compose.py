"""Compose a recipe document: a YAML file, the files it ``extends`` (merged in order,
the recipe's own keys last), then the ``--set`` overrides, every value keeping the file,
line and column it came from (:mod:`lowrank_runner.recipe.document`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lowrank_runner.errors import Problem, RecipeError
from lowrank_runner.recipe.document import Document, apply_override, delete, load_yaml, merge
from lowrank_runner.recipe.problems import problem
from lowrank_runner.resources import expand_user



def load_document(path: str | Path, overrides: Iterable[str] = ()) -> Document:
    doc = _load_with_extends(Path(path), ())
    for text in overrides:
        doc = apply_override(doc, text)
    if isinstance(doc.data, dict):
        for key in [k for k in doc.data if k.startswith("x-")]:  # anchors for '<<' merges live here
            delete(doc, (key,))
    return doc


RECIPE_SUFFIXES = (".yaml", ".yml")
MAX_EXTENDS_DEPTH = 32


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> Document:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise RecipeError([Problem(doc.origins[()].value, "", "a recipe must be a mapping of keys (name, backbone, ...)")])
    parents = doc.data.get("extends")
    if parents is None:
        return doc
    names = [parents] if isinstance(parents, str) else parents
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RecipeError([problem(doc, ("extends",), "expected a recipe path or a non-empty list of recipe paths")])
    chain = chain + (path.resolve(),)
    base: Document | None = None
    for i, name in enumerate(names):
        at = ("extends",) if isinstance(parents, str) else ("extends", i)
        parent = _load_with_extends(_extended_path(doc, at, path, name, chain), chain)
        base = parent if base is None else merge(base, parent)
    delete(doc, ("extends",))
    return merge(base, doc)


def _extended_path(doc: Document, at: tuple, path: Path, name: str, chain: tuple[Path, ...]) -> Path:
    """The file an ``extends`` entry names (relative to the recipe's directory; absolute
    paths and ``..`` are allowed): an existing .yaml/.yml file, not already in ``chain``."""
    def fail(message: str):
        raise RecipeError([problem(doc, at, message)])

    if not name.strip():
        fail("is empty: name a recipe file (relative to this recipe's directory)")
    parent = path.parent / expand_user(name)
    if parent.is_dir():
        fail(f"{parent} is a directory: name a recipe file in it")
    if parent.suffix.lower() not in RECIPE_SUFFIXES:
        fail(f"expected a recipe file (.yaml or .yml), not {name}")
    if not parent.is_file():
        fail(f"extended recipe not found: {parent} (paths in 'extends' are relative to {path.parent})")
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in chain + (parent.resolve(),))
        fail("this recipe extends itself" if parent.resolve() == chain[-1] else
             f"recipes extend each other in a cycle: {cycle}")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        fail(f"recipes extend each other more than {MAX_EXTENDS_DEPTH} levels deep; flatten the chain")
    return parent

