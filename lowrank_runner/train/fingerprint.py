"""Fingerprints of a run's inputs, so two reports tell whether they trained on the same
backbone and the same data (torch-free).

- Files are hashed with SHA-256. Files up to :data:`FULL_HASH_MAX_BYTES` are hashed whole;
  larger ones (multi-GB weight shards) by their size plus the first and last
  :data:`EDGE_BYTES` (``"method": "head+tail"``): this catches a different file, a
  re-download of another revision or a truncated copy (a safetensors file begins with its
  header of every tensor's name, dtype, shape and offsets), not an edit in the middle of a
  tensor. Results are memoised per process by (path, size, mtime), so the runs of one
  recipe hash a backbone once.
- A backbone from the hub is identified by the commit the hub cache resolved
  (``snapshots/<commit>``) and its files' blob ids (for weight files, stored with Git LFS,
  the blob id is the file's SHA-256); a local directory by the hashes of its config,
  weight and tokenizer files.
- Local data files (``task.data.*``, GLUE's ``task.data_dir``) are hashed; a hub dataset is
  identified by its id and the commit ``datasets`` resolved (the name of its cache
  directory). Every loaded split also records its row count and ``datasets``' own
  fingerprint (which follows ``max_*_samples`` and the held-out split).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

FULL_HASH_MAX_BYTES = 2 * 2**30
EDGE_BYTES = 64 * 2**20
_CHUNK = 2**20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# Files of a model directory that decide what the model computes.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|.*\.bin|.*\.pt|.*\.pth|.*\.ckpt|.*\.index\.json"
    r"|tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model|.*\.tiktoken)$"
)

_memo: dict[tuple, dict] = {}


def _update(h, f, remaining: int) -> None:
    while remaining > 0:
        block = f.read(min(_CHUNK, remaining))
        if not block:
            break
        h.update(block)
        remaining -= len(block)


def file_digest(path: str | Path) -> dict:
    """``{"sha256", "bytes", "method"}`` of one file (see the module docstring)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return dict(_memo[key])
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_MAX_BYTES:
            _update(h, f, st.st_size)
            method = "full"
        else:
            h.update(f"size={st.st_size};".encode())
            _update(h, f, EDGE_BYTES)
            f.seek(st.st_size - EDGE_BYTES)
            _update(h, f, EDGE_BYTES)
            method = "head+tail"
    out = {"sha256": h.hexdigest(), "bytes": st.st_size, "method": method}
    _memo[key] = out
    return dict(out)


def combine(entries: dict[str, str]) -> str:
    """One SHA-256 over ``name → digest`` pairs (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(f"{name}\t{entries[name]}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------ backbone


def directory_fingerprint(directory: str | Path) -> dict:
    """Hashes of a model directory's config, weight and tokenizer files (top level)."""
    directory = Path(directory)
    files = {p.name: file_digest(p) for p in sorted(directory.iterdir())
             if p.is_file() and _MODEL_FILE.match(p.name)}
    return {"files": files, "fingerprint": combine({n: d["sha256"] for n, d in files.items()})}


def hub_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                 repo_type: str = "model") -> dict:
    """The commit the local hub cache resolves ``revision`` (default main) to, and the blob
    id of each file of that snapshot (None values when the repo is not cached)."""
    from huggingface_hub import try_to_load_from_cache

    filename = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(repo_id, filename, revision=revision, cache_dir=cache_dir, repo_type=repo_type)
    if not isinstance(found, str):
        return {"commit": revision if revision and _COMMIT.match(revision) else None, "files": None, "fingerprint": None}
    snapshot = Path(found).parent
    files = {}
    for p in sorted(snapshot.iterdir()):
        if p.is_file():
            target = os.readlink(p) if p.is_symlink() else None
            files[p.name] = {"blob": Path(target).name if target else file_digest(p)["sha256"]}
    return {"commit": snapshot.name, "files": files, "fingerprint": combine({n: f["blob"] for n, f in files.items()})}


def backbone_fingerprint(name: str, location: str, local: bool, revision: str | None = None,
                         tokenizer: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """What identifies the backbone: ``source`` (local / package / hub), the requested and
    resolved revision, and a fingerprint of its files."""
    if local:
        out = {"name": name, "location": str(Path(location).resolve()),
               "source": "package" if name.startswith("pkg:") else "local",
               "revision": None, "commit": None, **directory_fingerprint(location)}
    else:
        out = {"name": name, "location": location, "source": "hub", "revision": revision,
               **hub_snapshot(location, revision, cache_dir)}
    if tokenizer:
        from lowrank_runner.resources import expand_user, is_pkg_path, resolve_pkg_path

        path = resolve_pkg_path(tokenizer) if is_pkg_path(tokenizer) else expand_user(tokenizer)
        out["tokenizer"] = ({"name": tokenizer, **directory_fingerprint(path)} if path.is_dir()
                            else {"name": tokenizer, **hub_snapshot(tokenizer, None, cache_dir)})
    return out


# ------------------------------------------------------------------ data


def _hub_dataset_revision(splits) -> str | None:
    """The commit ``datasets`` resolved for a hub dataset: the last directory of its cache
    path (``<name>/<config>/<version>/<commit>/``) or the ``@<commit>`` in its file URLs."""
    for ds in (splits or {}).values():
        for entry in getattr(ds, "cache_files", None) or []:
            name = Path(entry.get("filename", "")).parent.name
            if _COMMIT.match(name):
                return name
        checksums = getattr(getattr(ds, "info", None), "download_checksums", None) or {}
        for url in checksums:
            found = re.search(r"@([0-9a-f]{40})", url)
            if found:
                return found.group(1)
    return None


def data_fingerprint(task, splits=None) -> dict:
    """Identity of a run's data (``task``: a :class:`~lowrank_runner.tasks.base.Task`): hub
    id and revision, or the hashes of the local files it reads (``Task.data_files``), and
    per loaded split its rows and ``datasets`` fingerprint."""
    task_cfg = task.config
    files = [{"role": role, "path": str(path.resolve()), **file_digest(path)}
             for role, path in task.data_files().items() if path.is_file()]
    hub = not files and not task_cfg.get("data") and not task_cfg.get("data_dir") and task_cfg.get("dataset")
    out = {
        "task": task_cfg.get("name"),
        "source": "hub" if hub else "local",
        "dataset": task_cfg.get("dataset") if hub else None,
        "revision": _hub_dataset_revision(splits) if hub else None,
        "files": files,
        "fingerprint": combine({f["role"]: f["sha256"] for f in files}) if files else None,
        "splits": {name: {"rows": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)}
                   for name, ds in (splits or {}).items()},
    }
    if hub:  # no local files: the revision plus what datasets loaded
        out["fingerprint"] = combine({"revision": out["revision"] or "",
                                      **{n: s["fingerprint"] or "" for n, s in out["splits"].items()}})
    return out
