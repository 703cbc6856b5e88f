"""Instruction data for the ``chat`` task: the common shapes, turned into one list of
``{role, content}`` messages per row and checked (torch-free; ``lrr validate`` uses it).

Shapes (``task.format``; ``auto`` tells them by their columns, in this order, and row by
row where a file has the columns of several):

* ``messages``: OpenAI's chat format, a ``messages`` column of ``[{role, content}, ...]``
  with roles ``system``, ``user``, ``assistant`` (HuggingFaceH4/ultrachat_200k,
  ``trl``'s conversational datasets).
* ``sharegpt``: a ``conversations`` column of ``[{from, value}, ...]``, ``from`` one of
  ``system``, ``human`` (or ``user``), ``gpt`` (or ``assistant``).
* ``alpaca``: columns ``instruction``, ``output`` and optionally ``input`` (appended to
  the instruction after a blank line) and ``system``: one user turn, one answer.

Named chat templates (``task.chat_template``) are Jinja files shipped in
``lowrank_runner/data/chat_templates``; any other value is a path to a Jinja file. A
template is data: transformers renders it in Jinja's sandbox
(``ImmutableSandboxedEnvironment``), so no recipe or data file can run Python code, and
every rendering is bounded (:func:`render_limit`: :data:`RENDER_SECONDS` and
:data:`RENDER_MAX_CHARS`), so none can hang a run either; ``lrr validate`` renders a probe
conversation under the same bounds (:func:`template_render_problem`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

SHAPES = {  # shape -> the columns that tell it (auto: the first shape whose columns all exist)
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "data" / "chat_templates"


class RowProblem(Exception):
    """What is wrong with one row: the column, and the message (the caller adds the file:line)."""

    def __init__(self, column: str, message: str):
        super().__init__(column, message)
        self.column, self.message = column, message


def named_templates() -> list[str]:
    """The chat templates shipped with lowrank-runner (``task.chat_template`` names)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def template_file(value: str) -> Path | None:
    """The Jinja file ``task.chat_template`` names: a shipped template's, or the path
    (``pkg:`` paths resolved); None when there is no such file."""
    from lowrank_runner.resources import resolve_local_path

    if value in named_templates():
        return TEMPLATES_DIR / f"{value}.jinja"
    try:
        path = resolve_local_path(value)
    except ValueError:
        return None
    return path if path.is_file() else None


def template_problem(value: str) -> str | None:
    """Why ``task.chat_template`` cannot be used (no such template, a Jinja syntax
    error at its line, a probe conversation it cannot render within the bounds), or None."""
    path = template_file(value)
    if path is not None:
        return template_syntax_problem(path) or template_render_problem(path)
    return (f"'{value}' is neither a shipped chat template ({', '.join(named_templates())}) nor a Jinja file; "
            "name one of them or give the path of a .jinja file")


def template_syntax_problem(path: Path) -> str | None:
    """A Jinja syntax error of the template file, with its line (parsed only, in
    Jinja's sandbox, never rendered), or None."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: cannot read the template ({exc}); give a readable UTF-8 .jinja file"
    try:
        ImmutableSandboxedEnvironment(extensions=[_generation_tag(), "jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as exc:
        message = (exc.message or "invalid syntax").rstrip(".")
        return f"{path}:{exc.lineno}: Jinja syntax error: {message}; fix the template"
    return None


RENDER_SECONDS = 5.0  # one conversation: a template renders one in milliseconds
RENDER_MAX_CHARS = 10_000_000  # characters of one rendered conversation (a book is about 1,000,000)
PROBE = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]  # every template renders one


class TemplateLimit(Exception):
    """Rendering a conversation went beyond :data:`RENDER_SECONDS` or :data:`RENDER_MAX_CHARS`."""


@contextmanager
def render_limit():
    """At most :data:`RENDER_SECONDS` of rendering in the block (the main thread's timer:
    a template's loops are Python, which the timer interrupts), else :class:`TemplateLimit`."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(*_):
        raise TemplateLimit(f"rendering one conversation took more than {RENDER_SECONDS:g} s (a template renders one "
                            "in milliseconds: do its loops run over large ranges?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def checked_output(text: str) -> str:
    """A rendered conversation within :data:`RENDER_MAX_CHARS`, else :class:`TemplateLimit`."""
    if len(text) > RENDER_MAX_CHARS:
        raise TemplateLimit(f"one rendered conversation has {len(text):,} characters, more than {RENDER_MAX_CHARS:,} "
                            "(does the template repeat text in a loop?)")
    return text


def template_render_problem(path: Path) -> str | None:
    """Why the template file cannot render a probe conversation (a user turn, an assistant
    turn) within the bounds, in Jinja's sandbox as transformers renders it; None when it can.
    What the template asks of the tokenizer (its special tokens) is checked when the run
    has one."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        template = env.from_string(path.read_text(encoding="utf-8"))
        with render_limit():
            for turns, prompt in ((PROBE, False), (PROBE[:1], True)):
                checked_output(template.render(messages=turns, add_generation_prompt=prompt, bos_token="<s>",
                                               eos_token="</s>"))
    except TemplateLimit as exc:
        return f"{path}: {exc}; fix the template"
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        line = getattr(exc, "lineno", None)
        return f"{path}{f':{line}' if line else ''}: cannot render a conversation ({first}); fix the template"
    return None


def _raise(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _generation_tag():
    """transformers' ``{% generation %} ... {% endgeneration %}`` tag, rendered as its content."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def detect_shape(columns: list[str], declared: str, shown: str) -> str:
    """The data shape of a file or hub split with ``columns`` (``task.format``, or by its columns)."""
    if declared != "auto":
        missing = [c for c in SHAPES[declared] if c not in columns]
        if missing:
            fits = [shape for shape, needed in SHAPES.items() if all(c in columns for c in needed)]
            hint = f"its columns are those of {fits[0]}: " if fits else ""
            raise ValueError(f"{shown}: task.format is {declared}, which needs column(s) {', '.join(missing)} "
                             f"(columns: {', '.join(columns) or 'none'}); {hint}set task.format to the data's shape "
                             f"({', '.join(SHAPES)}) or auto")
        return declared
    present = [shape for shape, needed in SHAPES.items() if all(c in columns for c in needed)]
    if present:
        return present[0] if len(present) == 1 else "auto"  # several shapes in one file: told row by row
    raise ValueError(f"{shown}: not instruction data of a known shape (columns: {', '.join(columns) or 'none'}); "
                     "expected 'messages' [{role, content}], ShareGPT 'conversations' [{from, value}] or Alpaca "
                     "'instruction'/'input'/'output' (set task.format to name the shape)")


def _text(value, column: str, what: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise RowProblem(column, f"{what} is {kind}, not text; write it as a string")
    if not value.strip():
        raise RowProblem(column, f"{what} is empty; fill it in or remove the row")
    return value


def _turns(value, column: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(value, list) or not value:
        kind = "empty" if isinstance(value, list) else "null" if value is None else type(value).__name__
        raise RowProblem(column, f"{kind}, not a list of turns; write [{{\"{role_key}\": ..., \"{content_key}\": ...}}, ...]")
    out = []
    for n, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RowProblem(column, f"turn {n} is not an object {{\"{role_key}\": ..., \"{content_key}\": ...}}")
        role = turn.get(role_key)
        if role not in roles:
            raise RowProblem(column, f"turn {n} has {role_key} {role!r}; expected one of {', '.join(roles)}")
        out.append({"role": roles[role], "content": _text(turn.get(content_key), column, f"turn {n}'s {content_key}")})
    return out


def filled_shapes(row: dict) -> list[str]:
    """The shapes whose columns the row fills."""
    return [shape for shape, needed in SHAPES.items() if all(row.get(c) is not None for c in needed)]


def row_shape(row: dict) -> str:
    """The shape of one row of a file holding several: the one whose columns it fills
    (a row filling two holds two conversations: which one to train on is not guessed)."""
    filled = filled_shapes(row)
    if len(filled) > 1:
        columns = " and ".join(f"'{SHAPES[shape][0]}'" for shape in filled)
        raise RowProblem(SHAPES[filled[1]][0], f"this row fills both {columns}: two conversations in one row; keep "
                                               "one, or set task.format to the one to train on")
    if filled:
        return filled[0]
    raise RowProblem(next(iter(row), "messages"), "none of 'messages', 'conversations' or 'instruction'/'output' "
                                                  "is filled in; fill one in or remove the row")


def _declared_shape_filled(row: dict, shape: str) -> None:
    """A row of a file read as ``task.format: SHAPE`` that holds another shape instead."""
    column = SHAPES[shape][0]
    others = [other for other in filled_shapes(row) if other != shape]
    if row.get(column) is None and others:
        raise RowProblem(column, f"this row has no '{column}': it is a {others[0]} row ('{SHAPES[others[0]][0]}'), "
                                 f"and task.format {shape} reads '{column}'; set task.format: auto to read each row by "
                                 "its own columns")


def to_messages(row: dict, shape: str) -> list[dict]:
    """One row as ``[{role, content}, ...]``, checked (:func:`check_conversation`);
    ``shape`` ``auto``: the row's own (:func:`row_shape`)."""
    if shape == "auto":
        shape = row_shape(row)
    else:
        _declared_shape_filled(row, shape)
    if shape == "messages":
        messages = _turns(row.get("messages"), "messages", "role", "content", {r: r for r in ROLES})
        column = "messages"
    elif shape == "sharegpt":
        messages = _turns(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
        column = "conversations"
    else:
        instruction = _text(row.get("instruction"), "instruction", "the instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowProblem("input", f"the input is {type(extra).__name__}, not text; write it as a string")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        system = row.get("system")
        messages = ([{"role": "system", "content": _text(system, "system", "the system message")}] if system else [])
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _text(row.get("output"), "output", "the output")}]
        column = "output"
    check_conversation(messages, column)
    return messages


def check_conversation(messages: list[dict], column: str) -> None:
    """A conversation the task can train on: at least one assistant turn, the first one
    after a user turn, system messages only at the start."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RowProblem(column, "no assistant turn: nothing to train on; add the answer or remove the row")
    first = roles.index("assistant")
    if "user" not in roles[:first]:
        raise RowProblem(column, f"turn {first + 1} is an assistant turn before any user turn; start the "
                                 "conversation with the user (or a system message and the user)")
    late = [n for n, r in enumerate(roles) if r == "system" and n > 0]
    if late:
        n = late[0]
        raise RowProblem(column, f"turn {n + 1} is a system message after the conversation started; a system "
                                 "message comes first, once")


def peek_problem(columns: list[str], first_row: dict | None, declared: str, shown: str, line: int) -> str | None:
    """``lrr validate``: the shape of a file from its columns and the first row, checked."""
    if declared != "auto" and declared not in SHAPES:
        return None  # the schema names the bad task.format
    try:
        shape = detect_shape(columns, declared, f"{shown}:{line}" if first_row is not None else shown)
    except ValueError as exc:  # a JSON Lines row names its columns itself: its line is said
        return str(exc)
    if first_row is None:
        return None
    try:
        to_messages(first_row, shape)
    except RowProblem as exc:
        return f"{shown}:{line}: column '{exc.column}': {exc.message}"
    return None
