"""Writing and reading a run directory's files: JSON written atomically and read back
checked (:func:`read_json_file`), ``recipe.yaml`` with the header ``--resume`` reads
back, the append-only ``metrics.jsonl`` (:class:`MetricsLog`). The names are
:mod:`lowrank_runner.rundir.layout`'s."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from lowrank_runner.errors import RunFileError


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, data) -> None:
    _write_atomically(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json_file(path: Path, what: str, fix: str):
    """The JSON value of ``path``, a file lrr wrote (``what``: "run report", ...). A file
    that is missing, a directory, not UTF-8 text, empty or not valid JSON is a
    :class:`RunFileError` naming the file, what is wrong and ``fix`` (how to repair it);
    the caller checks the value's shape."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing; {fix}") from None
    except IsADirectoryError:
        raise RunFileError(f"{path}: a directory, not the {what}; {fix}") from None
    except UnicodeDecodeError as exc:
        raise RunFileError(f"{path}: not UTF-8 text (binary data at byte {exc.start}); the {what} is damaged: "
                           f"{fix}") from None
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read the {what} ({exc.strerror or exc}); make it readable, or "
                           f"{fix}") from None
    if not text.strip():
        raise RunFileError(f"{path}: empty; the {what} is damaged: {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); the {what} is damaged: "
                           f"{fix}") from None
    except RecursionError:
        raise RunFileError(f"{path}: not valid JSON (nested too deeply); the {what} is damaged: {fix}") from None


_SOURCE_LINE = "# resolved by lowrank-runner from "
_HASH_LINE = re.compile(r"^# recipe hash (\S+); this run's config hash (\S+)$")
_OVERRIDES_LINE = "# --set overrides: "


def write_recipe(path: Path, config: dict, recipe_hash: str, config_hash: str, source: str,
                 overrides: tuple[str, ...] | list[str] = (), exclusive: bool = False) -> None:
    """The run's resolved recipe, with a header naming its source, hashes and the
    command's ``--set`` overrides (what ``--resume`` reads back). A file already there for
    the same config hash is kept (it records how the run was started), unless its body is
    not that config (truncated or edited: rewritten, with the recorded source and
    overrides); ``exclusive``: fail with FileExistsError if the file exists at all
    (claiming a new run directory)."""
    if not exclusive:
        recorded = read_recipe_header(path)
        if recorded is not None and recorded["config_hash"] == config_hash:
            if _recorded_config(path) == config:
                return
            source, overrides = recorded["source"], recorded["overrides"]
    header = f"{_SOURCE_LINE}{source}\n# recipe hash {recipe_hash}; this run's config hash {config_hash}\n"
    if overrides:
        header += _OVERRIDES_LINE + json.dumps(list(overrides), ensure_ascii=False) + "\n"
    text = header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    with path.open("x" if exclusive else "w", encoding="utf-8") as f:
        f.write(text)


def _recorded_config(path: Path):
    """The config :func:`write_recipe` wrote below the header (None: not readable YAML)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def read_recipe_header(path: Path) -> dict | None:
    """What :func:`write_recipe` recorded: ``source``, ``recipe_hash``, ``config_hash`` and
    ``overrides``; None when the file is missing or has no such header."""
    try:
        with path.open(encoding="utf-8") as f:
            lines = [f.readline().rstrip("\n") for _ in range(3)]
    except (OSError, UnicodeDecodeError):
        return None
    match = _HASH_LINE.match(lines[1])
    if not lines[0].startswith(_SOURCE_LINE) or match is None:
        return None
    overrides: list[str] = []
    if lines[2].startswith(_OVERRIDES_LINE):
        try:
            overrides = json.loads(lines[2][len(_OVERRIDES_LINE):])
        except ValueError:
            return None
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            return None
    return {"source": lines[0][len(_SOURCE_LINE):], "recipe_hash": match[1], "config_hash": match[2],
            "overrides": overrides}


def _kept_lines(path: Path, keep: int) -> list[str]:
    """The first ``keep`` lines of a resumed run's ``metrics.jsonl``, each checked to be a
    JSON object (checked before training goes on, not when the report reads them)."""
    from lowrank_runner.errors import CheckpointError

    if keep == 0:
        return []
    fix = "restore the file from a copy, or start the run again in a new directory"
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, but the checkpoint was written after {keep} lines of it; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc}); {fix}") from None
    if len(lines) < keep:
        raise CheckpointError(f"{path}: {len(lines)} lines, but the checkpoint was written after {keep}; the log was "
                              f"truncated: {fix}")
    for number, line in enumerate(lines, 1):
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError as exc:
            raise CheckpointError(f"{path}:{number}: not a JSON object ({exc}); the log is damaged: {fix}") from None
        if not ok:
            raise CheckpointError(f"{path}:{number}: not a JSON object; the log is damaged: {fix}")
    return lines


class MetricsLog:
    """Append-only ``metrics.jsonl`` (flushed per line so a crash loses nothing). A resumed
    run keeps the first ``keep_lines`` lines (those written up to its checkpoint) and drops
    the rest, so no step is logged twice."""

    def __init__(self, path: Path, keep_lines: int = 0):
        kept = _kept_lines(path, keep_lines)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
        self.lines = len(kept)
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()
        self.lines += 1

    def close(self) -> None:
        self._f.close()
