"""Output directories: refuse to overwrite, and never leave a half-written one behind."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowrank_runner.errors import UsageError


def require_free(path: Path, option: str) -> None:
    """``path`` must not exist, or be an empty directory."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{option} {path}: exists and is not an empty directory; choose a new path or remove it")


@contextmanager
def staged_directory(out: Path):
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` when the block
    succeeds, delete it when anything fails (so ``out`` is complete or absent)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
