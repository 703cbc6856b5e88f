"""The rich consoles every command prints through: as wide as the terminal they write to,
and, writing to a file or a pipe (a log), as wide as each line needs, so log lines, paths
and numbers are never hard-wrapped at 80 columns (rich's default off a terminal)."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Off a terminal: no practical limit (tables still take only the width they need).
UNLIMITED_WIDTH = 10_000


class AdaptiveConsole(Console):
    """A :class:`rich.console.Console` whose width follows the terminal, else is unlimited.

    Decided at each print, not when the console is made: a module-level console follows
    the stream it writes to then (a test's captured output, a redirected stdout). A width
    given explicitly (argument or attribute) is kept; ``COLUMNS`` counts on a terminal only."""

    def __init__(self, *args, width: int | None = None, **kwargs):
        super().__init__(*args, width=width, **kwargs)
        self.fixed_width = width is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.fixed_width or self.is_terminal:
            return size
        return ConsoleDimensions(UNLIMITED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)
        self.fixed_width = True

    @property
    def width(self) -> int:
        return self.size.width

    @width.setter
    def width(self, width: int) -> None:
        Console.width.fset(self, width)
        self.fixed_width = True


def make_console(stderr: bool = False, **options) -> Console:
    """The package's console on stdout (or stderr): see :class:`AdaptiveConsole`."""
    return AdaptiveConsole(stderr=stderr, **options)
