"""A run that did not complete says why in its directory: ``failed`` (the reason, and
the traceback of a crash in ``error.txt``) or ``interrupted`` (where it resumes from and
the command that resumes it), in ``report.json`` and ``report.md``. What is written
here is read back by :mod:`lowrank_runner.rundir.reports` (``lrr report``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lowrank_runner.rundir.files import write_json
from lowrank_runner.rundir.layout import ERROR_FILE, REPORT_FILE, REPORT_MD, resumable_from
from lowrank_runner.rundir.markdown import run_markdown

_INTERRUPTED = "interrupted; resumable from {where} with: {command}"
_RESUMABLE = re.compile(r"resumable from (?P<where>.+?) with: (?P<command>.+)$")


def mark_status(run_dir: Path, status: str, message: str) -> None:
    """Set ``status`` (failed, interrupted) and its message in report.json and report.md."""
    report = run_dir / REPORT_FILE
    try:
        data = json.loads(report.read_text()) if report.is_file() else {}
    except ValueError:
        data = {}
    data = {**(data if isinstance(data, dict) else {}), "status": status, "error": message}
    write_json(report, data)
    (run_dir / REPORT_MD).write_text(run_markdown(data), encoding="utf-8")


def mark_failed(run_dir: Path, error: str) -> None:
    """``error.txt`` (the whole error or traceback) and the status ``failed`` with its
    last line."""
    (run_dir / ERROR_FILE).write_text(error)
    mark_status(run_dir, "failed", error.splitlines()[-1] if error else "")


def mark_interrupted(run_dir: Path, again: str) -> None:
    """The status ``interrupted``: resumable from the run's latest checkpoint (or the
    start) with the command ``again``."""
    mark_status(run_dir, "interrupted", _INTERRUPTED.format(where=resumable_from(run_dir), command=again))


def resumable_text(error) -> tuple[str, str] | None:
    """Where an interrupted run resumes from and the command, as :func:`mark_interrupted`
    recorded them (None for another message)."""
    found = _RESUMABLE.search(error) if isinstance(error, str) else None
    return (found["where"], found["command"]) if found else None
