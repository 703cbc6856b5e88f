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
    succeeds, delete it when anything fails (so ``out`` is complete or absent). The
    directory and everything in it get the modes the process umask gives new files
    (:func:`umask_modes`), not mkdtemp's 700 or safetensors' 600."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask_modes(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: Path) -> None:
    """``root`` and every directory below it 0o777, every file 0o666, less the umask
    (755/644 under the usual 022): what ``mkdir`` and ``open`` would have made."""
    import os

    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
