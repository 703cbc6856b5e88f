"""Local data files read and checked line by line before ``datasets`` loads them.

``datasets`` reports a malformed file as "An error occurred while generating the
dataset"; a file checked here first fails with the file, the line (Parquet: the row) and
the column instead, and the fix. Once a file passes, ``datasets`` loads it as before
(its cache keyed by the file is kept).

* :func:`read_rows` checks a whole file's syntax and structure: UTF-8 (a leading byte
  order mark is accepted, one further in is an error: files joined together), one JSON
  object per line (blank lines are skipped, as ``datasets`` skips them) or a JSON array
  of objects, each naming a key once (``datasets`` refuses a repeated key), CSV/TSV rows
  with as many fields as the header (and not the header again), a Parquet file that
  opens; and returns the requested columns' values with the line of every row.
* :func:`check_text`, :func:`check_labels`, :func:`check_scores` check those values.
* :func:`peek_problems` is the bounded variant for ``lrr validate``: the head of each
  file only (its format, its header or first row's keys against the column settings).

Torch-free; ``pyarrow`` is imported only for Parquet files.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_runner.errors import DataError, warn

MISSING = object()  # a JSON Lines row without the key
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
PEEK_BYTES = 64 << 10  # what `lrr validate` reads of each file
_OTHER_DELIMITERS = (";", "\t", "|", ",")
_DELIMITER_NAMES = {"\t": "tab", ",": "','", ";": "';'", "|": "'|'"}


@dataclass
class Rows:
    """The checked columns of one file: values and the line of each row."""

    shown: str  # the file as messages name it
    fmt: str
    columns: list[str]  # every column the file has (header, or keys in order of appearance)
    lines: list[int] = field(default_factory=list)  # per row: its line (Parquet: its row number)
    header_line: int = 1  # CSV/TSV: the line of the header
    values: dict[str, list] = field(default_factory=dict)  # requested column -> one value per row

    def where(self, i: int, column: str | None = None) -> str:
        """``FILE:LINE: column 'C'`` for row ``i`` (0-based)."""
        at = f"{self.shown}: row {self.lines[i]}" if self.fmt == "parquet" else f"{self.shown}:{self.lines[i]}"
        return f"{at}: column '{column}'" if column else at


# ---- files -------------------------------------------------------------------------

def shown_path(value: str, path: Path) -> str:
    """How messages name a data file: as the recipe wrote it (``pkg:`` paths resolved)."""
    return str(path) if value.startswith("pkg:") else value


def data_file(value: str, role: str) -> Path:
    """The file a ``task.data`` entry names; a clear error if it is not a readable file."""
    from lowrank_runner.resources import resolve_local_path

    try:
        path = resolve_local_path(value)
    except ValueError as exc:
        raise DataError(f"task.data.{role}: {exc}") from None
    return readable_file(path, value, f"task.data.{role}")


def readable_file(path: Path, value: str, key: str) -> Path:
    """``path`` (written ``value`` at recipe key ``key``) if it is a readable regular file."""
    if not path.exists():
        raise DataError(f"{key}: file not found: {value} (relative paths are resolved against the working "
                        f"directory {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{key}: {value} is a directory; expected a data file")
    if not path.is_file():
        raise DataError(f"{key}: {value} is not a regular file (a pipe or device?); expected a data file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key}: {value}: permission denied; make the file readable")
    return path


def format_of(path: Path, declared: str, shown: str) -> str:
    """The file's format: ``task.data.format``, or from the extension (``auto``)."""
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{shown}: cannot tell the format from '{suffix or 'no extension'}'; set task.data.format "
                        "(csv, tsv, json, parquet)")
    return FORMATS[suffix]


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file look like: parquet, json, empty or text."""
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(codecs.BOM_UTF8).lstrip()
    if not text:
        return "empty"
    first = text.split(b"\n", 1)[0].strip()
    return "json" if first == b"[" or first.startswith((b"[{", b"[ {", b'{"', b"{ \"")) else "text"


def check_content_matches(head: bytes, fmt: str, shown: str) -> None:
    """A file whose content is another format than the one declared (or implied by its
    extension): say so before a parser fails on it."""
    looks = _looks_like(head)
    fix = "rename the file to its format's extension or set task.data.format"
    if looks == "empty":
        raise DataError(f"{shown}: empty file; expected a header and rows" if fmt in DELIMITERS
                        else f"{shown}: empty file; expected rows of data")
    if fmt == "parquet" and looks != "parquet":
        kind = "JSON" if looks == "json" else "text"
        raise DataError(f"{shown}: not a Parquet file (it holds {kind}); {fix}")
    if fmt != "parquet" and looks == "parquet":
        raise DataError(f"{shown}: a Parquet file, read as {fmt}; {fix}: parquet")
    if fmt in DELIMITERS and looks == "json":
        raise DataError(f"{shown}:1: the file holds JSON, read as {fmt}; {fix}: json")


def read_rows(value: str, role: str, fmt_declared: str = "auto", wanted: dict[str, str] | None = None,
              delimiter: str | None = None) -> Rows:
    """Check the file of ``task.data.<role>`` whole and return the ``wanted`` columns
    (column -> the recipe key that names it, for the message when it is missing)."""
    path = data_file(value, role)
    shown = shown_path(value, path)
    fmt = format_of(path, fmt_declared, shown)
    try:
        with path.open("rb") as f:
            check_content_matches(f.read(PEEK_BYTES), fmt, shown)
            f.seek(0)
            if fmt == "parquet":
                rows = _read_parquet(path, shown, list(wanted or {}))
            elif fmt == "json":
                rows = _read_json(f, shown, list(wanted or {}))
            else:
                rows = _read_delimited(f, shown, fmt, delimiter or DELIMITERS[fmt], list(wanted or {}))
    except OSError as exc:
        raise DataError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
    if not rows.lines:
        raise DataError(f"{shown}: no rows of data" + (" (only a header)" if fmt in DELIMITERS else ""))
    require_columns(rows, wanted or {}, delimiter or DELIMITERS.get(fmt))
    return rows


def require_columns(rows: Rows, wanted: dict[str, str], delimiter: str | None = None) -> None:
    """Every wanted column exists in the file (``wanted``: column -> recipe key)."""
    for column, key in wanted.items():
        if column in rows.columns:
            continue
        at = f"{rows.shown}:{rows.header_line}" if rows.fmt in DELIMITERS else rows.shown
        shown_columns = ", ".join(repr(c) for c in rows.columns) or "none"
        hint = _delimiter_hint(rows, delimiter)
        raise DataError(f"{at}: no column '{column}' (columns: {shown_columns}); set {key} to one of them{hint}")


def _delimiter_hint(rows: Rows, delimiter: str | None) -> str:
    if rows.fmt not in DELIMITERS or len(rows.columns) != 1:
        return ""
    other = next((d for d in _OTHER_DELIMITERS if d != delimiter and d in rows.columns[0]), None)
    if other is None:
        return ""
    if other == "\t" and delimiter == ",":
        return ", or, if the file is tab-separated, name it .tsv or set task.data.format: tsv"
    return (f", or, if the file is {_DELIMITER_NAMES[other]}-separated, set task.data.delimiter: "
            f"{json.dumps(other)}")


def decoded_lines(f, shown: str):
    """The lines of a binary file as text; a non-UTF-8 byte is an error at its line and
    column (a leading byte order mark is dropped)."""
    return (_decode(raw, shown, n) for n, raw in enumerate(f, start=1))


def _decode(raw: bytes, shown: str, line: int) -> str:
    if line == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    elif raw.startswith(codecs.BOM_UTF8):
        raise bom_inside(shown, line, 1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        utf16 = " (it is UTF-16)" if line == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else ""
        raise DataError(f"{shown}:{line}:{column}: not UTF-8 (byte 0x{raw[exc.start]:02x}){utf16}; save the file "
                        "as UTF-8") from None


def bom_inside(shown: str, line: int, column: int) -> DataError:
    """A UTF-8 byte order mark after the start of the file (files joined together)."""
    return DataError(f"{shown}:{line}:{column}: a byte order mark (U+FEFF) inside the file (files joined "
                     "together?); remove it")


class _DuplicateKey(Exception):
    """A JSON object that names a key twice (``datasets`` refuses the file)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: an object's pairs as a dict; a repeated key raises."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _duplicate(shown: str, line: int, exc: _DuplicateKey) -> DataError:
    return DataError(f"{shown}:{line}: key {json.dumps(exc.args[0], ensure_ascii=False)} is written twice in one "
                     "object; keep one of them (each key names one column)")


JSON_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _read_json(f, shown: str, wanted: list[str]) -> Rows:
    """JSON Lines (one object per line, blank lines skipped), or one JSON array of objects."""
    first = f.read(PEEK_BYTES).lstrip(codecs.BOM_UTF8).lstrip()
    f.seek(0)
    if first.startswith(b"["):
        return _read_json_array(f, shown, wanted)
    rows = Rows(shown, "json", [], values={c: [] for c in wanted})
    seen: dict[str, None] = {}
    for n, raw in enumerate(f, start=1):
        text = _decode(raw, shown, n)
        if not text.strip():
            continue
        try:
            obj = JSON_DECODER.decode(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            if exc.doc[exc.pos:exc.pos + 1] == "\ufeff":
                raise bom_inside(shown, n, exc.colno) from None
            raise DataError(f"{shown}:{n}:{exc.colno}: not valid JSON ({exc.msg}){_json_hint(text)}") from None
        except _DuplicateKey as exc:
            raise _duplicate(shown, n, exc) from None
        _add_object(rows, obj, n, wanted, seen)
    rows.columns = list(seen)
    return rows


def decode_text(raw: bytes, shown: str) -> str:
    """A whole file's bytes as text; a non-UTF-8 byte is an error at its line and column."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        start = raw.rfind(b"\n", 0, exc.start) + 1
        _decode(raw[start:].split(b"\n", 1)[0], shown, line)
        raise  # not reached: _decode raises for that line


def _json_hint(line: str) -> str:
    """Why a line of a JSON file may not parse: not JSON at all, or one JSON document
    written over several lines instead of one object per line."""
    if not line.lstrip().startswith("{"):
        return "; JSON Lines hold one object {...} per line (a CSV file? name it .csv or set task.data.format)"
    if line.rstrip().endswith("}"):
        return ""
    return ("; JSON Lines hold one whole object per line (a record written over several lines? one JSON document? "
            "write one object per line, or an array of objects [{...}, {...}])")


def _read_json_array(f, shown: str, wanted: list[str]) -> Rows:
    text = decode_text(f.read(), shown)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if text[exc.pos:exc.pos + 1] == "\ufeff":
            raise bom_inside(shown, exc.lineno, exc.colno) from None
        raise DataError(f"{shown}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    rows = Rows(shown, "json", [], values={c: [] for c in wanted})
    seen: dict[str, None] = {}
    if not isinstance(doc, list):  # "[...] trailing" cannot get here: json.loads rejects extra data
        raise DataError(f"{shown}:1: expected a JSON array of objects")
    # The line of each element: step through the (valid) array element by element.
    pos, line, counted = text.index("[") + 1, 1, 0
    for _ in doc:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = JSON_DECODER.raw_decode(text, pos)
        except _DuplicateKey as exc:
            raise _duplicate(shown, line, exc) from None
        _add_object(rows, obj, line, wanted, seen)
    rows.columns = list(seen)
    return rows


def _add_object(rows: Rows, obj, line: int, wanted: list[str], seen: dict) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{rows.shown}:{line}: a row must be a JSON object {{\"column\": value, ...}}, got "
                        f"{_kind(obj)} {_short(obj)}")
    seen.update(dict.fromkeys(obj))
    rows.lines.append(line)
    for c in wanted:
        rows.values[c].append(obj.get(c, MISSING))


def _read_delimited(f, shown: str, fmt: str, delimiter: str, wanted: list[str]) -> Rows:
    """CSV/TSV with a header row: every row has the header's number of fields (blank
    lines are skipped); TSV is read without quoting, as ``datasets`` is told to."""
    csv.field_size_limit(sys.maxsize)
    lines = decoded_lines(f, shown)
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    rows = Rows(shown, fmt, [], values={c: [] for c in wanted})
    header, header_line, end = None, 0, 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if header is None:
                header, header_line = record, start
                _check_header(header, wanted, shown, start)
                rows.columns, rows.header_line = header, start
                index = {c: header.index(c) for c in wanted if c in header}
                continue
            if record == header:  # pandas would read it as a row: a class named like the label column
                raise DataError(f"{shown}:{start}: the header (line {header_line}) again, as a row (files joined "
                                "together?); remove the line")
            if len(record) != len(header):
                fix = _ragged_fix(fmt) if end == start or fmt == "tsv" else (
                    f"the quoted field from line {start} runs on to line {end}: close its quote (\")")
                raise DataError(f"{shown}:{start}: {len(record)} field{'s' if len(record) != 1 else ''}, but the "
                                f"header (line {header_line}) has {len(header)}; {fix}")
            rows.lines.append(start)
            for c in wanted:
                rows.values[c].append(record[index[c]] if c in index else MISSING)
    except csv.Error as exc:
        raise DataError(f"{shown}:{reader.line_num}: not valid {fmt.upper()} ({exc})") from None
    return rows


def _check_header(header: list[str], wanted: list[str], shown: str, line: int) -> None:
    """A column the task reads must be named once (other repeated or empty names, such as
    the unnamed index column of pandas' ``to_csv``, are left as pandas reads them)."""
    dupes = [c for c in wanted if header.count(c) > 1]
    if dupes:
        raise DataError(f"{shown}:{line}: the header names column '{dupes[0]}' twice; give every column its own name")


def _ragged_fix(fmt: str) -> str:
    if fmt == "tsv":
        return "a TSV field cannot hold a tab (TSV files are read without quoting)"
    return "quote fields that hold the delimiter (\"a, b\"), or set task.data.delimiter if the file uses another"


def _read_parquet(path: Path, shown: str, wanted: list[str]) -> Rows:
    import pyarrow as pa

    pf = _parquet_file(path, shown)
    columns = list(pf.schema_arrow.names)
    try:
        table = pf.read(columns=[c for c in wanted if c in columns])
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{shown}: not a readable Parquet file ({str(exc).splitlines()[0]}); "
                        "write it again (e.g. pandas DataFrame.to_parquet)") from None
    data = table.to_pydict()
    rows = Rows(shown, "parquet", columns, lines=list(range(1, table.num_rows + 1)))
    rows.values = {c: data[c] if c in data else [MISSING] * table.num_rows for c in wanted}
    return rows


def _parquet_file(path: Path, shown: str):
    """The opened Parquet file (its footer: schema and row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{shown}: not a readable Parquet file ({str(exc).splitlines()[0]}); "
                        "write it again (e.g. pandas DataFrame.to_parquet)") from None


# ---- values ------------------------------------------------------------------------

def _kind(v) -> str:
    if v is None or v is MISSING:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "text"
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__


def _short(v, limit: int = 40) -> str:
    text = json.dumps(v, ensure_ascii=False, default=str) if v is not MISSING else "(none)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _absent(rows: Rows, i: int, column: str, what: str) -> DataError:
    v = rows.values[column][i]
    state = f"no '{column}' in this row" if v is MISSING else "empty" if isinstance(v, str) else "null"
    return DataError(f"{rows.where(i, column)}: {state}; every row needs {what} (fill it in or remove the row)")


def check_text(rows: Rows, column: str, key: str) -> None:
    """Every row's ``column`` holds text (a string); empty text only warns."""
    empty = []
    for i, v in enumerate(rows.values[column]):
        if v is None or v is MISSING:
            raise _absent(rows, i, column, "its text")
        if not isinstance(v, str):
            raise DataError(f"{rows.where(i, column)}: {_kind(v)} ({_short(v)}), not text; write it as a string, "
                            f"or set {key} to the column that holds the text")
        if not v.strip():
            empty.append(i)
    if empty:
        warn(f"{rows.where(empty[0], column)}: empty text ({len(empty)} row{'s' if len(empty) > 1 else ''} of "
             f"{len(rows.lines)}); the model sees only special tokens there")


def check_labels(rows: Rows, column: str) -> None:
    """Class labels: present, each a name or a number, and all of one kind (all names
    or all indices)."""
    first: tuple[int, str] | None = None
    for i, v in enumerate(rows.values[column]):
        if v is None or v is MISSING or (isinstance(v, str) and not v.strip()):
            raise _absent(rows, i, column, "a label")
        kind = _kind(v)
        if kind not in ("text", "a number", "a boolean"):
            raise DataError(f"{rows.where(i, column)}: {kind} ({_short(v)}) is not a label; a label is a class name "
                            "or a class index")
        if isinstance(v, float) and not math.isfinite(v):
            raise DataError(f"{rows.where(i, column)}: {_short(v)} is not a label; a label is a class name or a "
                            "class index")
        if first is None:
            first = (i, kind)
        elif kind != first[1]:
            raise DataError(f"{rows.where(i, column)}: {kind} label ({_short(v)}), but the label on line "
                            f"{rows.lines[first[0]]} is {first[1]} ({_short(rows.values[column][first[0]])}); "
                            "write every label the same way (all class names or all class indices)")


def check_scores(rows: Rows, column: str) -> list[float]:
    """Regression scores: present, finite numbers (or numeric text, all alike); returns them."""
    out, first = [], None
    for i, v in enumerate(rows.values[column]):
        if v is None or v is MISSING or (isinstance(v, str) and not v.strip()):
            raise _absent(rows, i, column, "a score")
        kind = _kind(v)
        try:
            if kind not in ("text", "a number"):
                raise ValueError
            score = float(v)
        except ValueError:
            raise DataError(f"{rows.where(i, column)}: {_short(v)} is not a number; a regression label is a "
                            "number (a score)") from None
        if not math.isfinite(score):
            raise DataError(f"{rows.where(i, column)}: {_short(v)} is not a finite number; fix the score or "
                            "remove the row")
        if first is None:
            first = (i, kind)
        elif kind != first[1]:
            raise DataError(f"{rows.where(i, column)}: {kind} score ({_short(v)}), but the score on line "
                            f"{rows.lines[first[0]]} is {first[1]}; write every score as a number")
        out.append(score)
    return out


# ---- lrr validate --------------------------------------------------------------------

def peek_problems(task: dict) -> list[tuple[tuple, str]]:
    """Cheap checks of the files ``task.data`` names, for ``lrr validate``: the first
    :data:`PEEK_BYTES` of each file, never the whole of it: readable, content of the
    declared format, and (CSV/TSV header, first JSON Lines row, Parquet schema) the
    columns that the column settings name (their schema defaults where unset). ``task``:
    a recipe's task section, as written or resolved. Returns (recipe path, message)
    pairs; files that do not exist are left to the recipe validator."""
    data = task.get("data")
    if not isinstance(data, dict) or not isinstance(task.get("name"), str):
        return []
    wanted = {}
    for key in ("text_column", "text_pair_column", "label_column", "source_column", "target_column"):
        column = _setting(task, key)
        if isinstance(column, str):
            wanted[column] = f"task.{key}"
    out = []
    for role in ("train", "validation", "test"):
        value = data.get(role)
        if not isinstance(value, str):
            continue
        try:
            _peek(value, role, data, wanted, task.get("format", "auto") if task["name"] == "chat" else None)
        except DataError as exc:
            out.append((("task", "data", role), str(exc)))
    return out


def _setting(task: dict, key: str):
    """``task[key]``, or the schema's default where the key applies to the task."""
    from lowrank_runner.recipe.schema import property_schema

    sub = property_schema("task")["properties"].get(key, {})
    if task["name"] not in sub.get("x-tasks", ()):
        return None
    return task.get(key, sub.get("default"))


def _peek(value: str, role: str, data: dict, wanted: dict[str, str], chat_format: str | None = None) -> None:
    """One file's head; ``chat_format``: task chat's ``task.format`` (the shape of its
    conversations, told from the columns and checked on the first row)."""
    from lowrank_runner.resources import resolve_local_path

    try:
        path = resolve_local_path(value)
    except ValueError:
        return
    try:
        if not path.is_file():
            return  # the recipe validator reports missing files and directories
    except OSError:
        return  # a name the file system refuses (too long): the recipe validator reports it
    path = data_file(value, role)
    shown = shown_path(value, path)
    fmt = format_of(path, data.get("format") or "auto", shown)
    delimiter = data.get("delimiter")
    try:
        with path.open("rb") as f:
            head = f.read(PEEK_BYTES)
    except OSError as exc:
        raise DataError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
    check_content_matches(head, fmt, shown)
    first = None
    if fmt == "parquet":
        rows = Rows(shown, fmt, list(_parquet_file(path, shown).schema_arrow.names))  # the footer only
    else:
        first = _first_line(head, fmt)
        if first is None:
            return  # a JSON array, or a first line longer than the bounded read
        f = io.BytesIO(first)
        rows = _read_json(f, shown, []) if fmt == "json" else _read_delimited(
            f, shown, fmt, delimiter or DELIMITERS[fmt], [])
        if not rows.columns:
            return
    require_columns(rows, wanted, delimiter or DELIMITERS.get(fmt))
    if chat_format is not None:
        from lowrank_runner.tasks.chat_data import peek_problem

        row = JSON_DECODER.decode(first.decode("utf-8-sig").strip().splitlines()[-1]) if fmt == "json" else None
        message = peek_problem(rows.columns, row, chat_format, shown, rows.lines[0] if rows.lines else 1)
        if message:
            raise DataError(message)


def _first_line(head: bytes, fmt: str) -> bytes | None:
    """The blank lines and the first line of data (a CSV/TSV header, a JSON Lines row)
    in the head of a file; None when there is none to check cheaply."""
    lines = head.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if not line.strip() or line.strip() == codecs.BOM_UTF8:
            continue
        if fmt == "json" and line.lstrip(codecs.BOM_UTF8).lstrip().startswith(b"["):
            return None
        if not line.endswith((b"\n", b"\r")) and len(head) >= PEEK_BYTES:
            return None  # cut by the bounded read
        if fmt == "csv" and line.count(b'"') % 2:
            return None  # a quoted header field that goes on over lines
        return b"".join(lines[: n + 1])
    return None
