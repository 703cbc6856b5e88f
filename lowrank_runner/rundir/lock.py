"""A run directory has one owner: the process that trains or writes it.

The owner holds an operating-system lock (``flock``) on ``RUN_DIR/.lrr-lock``, released by
the kernel when the process ends, however it ends, and says who it is in
``RUN_DIR/.lrr-owner.json`` (pid, host, command, since); both files are removed when it
gives the directory back, so a finished run directory holds only its results. Another process that would
train or write the directory (a second ``lrr run --resume``, a parallel driver, a child
of one) cannot take the lock and is refused with the owner named; ``lrr export`` and
``lrr report`` ask :func:`holder` first and refuse a run that is still being trained. An
owner file left by a process that died (SIGKILL, a lost machine) is noticed when the lock
is taken over, and said.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lowrank_runner.errors import UsageError

LOCK_FILE = ".lrr-lock"
OWNER_FILE = ".lrr-owner.json"
DRIVER_ENV = "LRR_DRIVER"  # set by a parallel driver for its children: "HOST:PID"
ORPHAN_WAIT = 60.0  # seconds to wait for a child whose driver died: it notices and stops itself


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    command: str
    since: str
    driver: str | None = None  # "HOST:PID" of the parallel driver that started this process, if one did

    def describe(self) -> str:
        here = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"process {self.pid}{here} (since {self.since}: {self.command})"

    def orphaned(self) -> bool:
        """A child of a parallel driver on this host that is gone: it stops itself soon."""
        host, _, pid = (self.driver or "").rpartition(":")
        return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


class RunDirHeld(UsageError):
    """Another live process owns the run directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_owner(directory: Path) -> Owner | None:
    """What the owner file says (None: no file, or not one lrr wrote)."""
    try:
        data = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), str(data["host"]), str(data["command"]), str(data["since"]), data.get("driver"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _this_process() -> Owner:
    return Owner(os.getpid(), socket.gethostname(), " ".join(["lrr", *sys.argv[1:]])[:300],
                 time.strftime("%Y-%m-%d %H:%M:%S"), os.environ.get(DRIVER_ENV))


class _Lock:
    """An exclusive ``flock`` on ``RUN_DIR/.lrr-lock`` that removes the file when given
    back. The file is removed while still locked, so a process that opened it meanwhile
    finds, once it has the lock, that the name no longer leads to its file, and tries
    again on the file that is there now (two owners never each hold a lock)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (False: somebody does). OSError: the
        directory cannot hold a lock file (read-only, gone)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            if self._still_the_file(fd):
                self.fd = fd
                return True
            os.close(fd)  # its owner removed it as we opened it: lock the file there now

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def holder(directory: Path) -> Owner | None:
    """The live process that owns ``directory`` now (None: nobody does). Takes and gives
    back the lock to find out, so it never disturbs an owner."""
    if not (directory / LOCK_FILE).exists():
        return None
    lock = _Lock(directory)
    try:
        if not lock.try_acquire():
            return read_owner(directory) or Owner(0, "?", "an lrr process", "?")
    except OSError:  # a directory we cannot write: nobody can train there either
        return None
    lock.release()
    return None


def refuse_if_held(directory: Path, doing: str) -> None:
    """:class:`RunDirHeld` when a live process owns ``directory``: what it is, and what to do."""
    owner = holder(directory)
    if owner is not None:
        raise RunDirHeld(f"{directory}: {owner.describe()} is training this run directory now; {doing} when it has "
                         f"finished, or stop it first (Ctrl-C in its terminal, or kill {owner.pid})")


def wait_until_free(directory: Path, doing: str) -> None:
    """Return when nobody owns ``directory``: at once, or once an orphaned child of a
    parallel driver stopped (up to :data:`ORPHAN_WAIT` seconds); :class:`RunDirHeld`
    for a live owner."""
    deadline = time.monotonic() + ORPHAN_WAIT
    while (owner := holder(directory)) is not None:
        if not owner.orphaned() or time.monotonic() >= deadline:
            refuse_if_held(directory, doing)
        time.sleep(0.5)


@contextmanager
def owning(directory: Path, say=print):
    """Own ``directory`` for the block: the lock taken, the owner file written, both given
    back at the end. A live owner is :class:`RunDirHeld` (a child of a parallel driver
    that died is waited for, up to :data:`ORPHAN_WAIT` seconds: it stops itself); an
    owner file of a process that is gone is taken over, with a note (``say``)."""
    lock = _Lock(directory)
    deadline = time.monotonic() + ORPHAN_WAIT
    while not _acquired(lock, directory):
        owner = read_owner(directory)
        if owner is None or not owner.orphaned() or time.monotonic() >= deadline:
            refuse_if_held(directory, "continue it")
        time.sleep(0.5)
    try:
        _take_over(directory, say)
        (directory / OWNER_FILE).write_text(json.dumps(_this_process().__dict__) + "\n", encoding="utf-8")
        yield
    finally:
        (directory / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def _acquired(lock: _Lock, directory: Path) -> bool:
    try:
        return lock.try_acquire()
    except OSError as exc:
        raise UsageError(f"{directory}: cannot hold the run directory's lock file {LOCK_FILE} "
                         f"({exc.strerror or exc}); use a writable directory on a local or shared filesystem "
                         "that supports file locks") from None


def _take_over(directory: Path, say) -> None:
    """Say so when the owner file names a process that ended without giving the
    directory back (killed, or its machine lost)."""
    previous = read_owner(directory)
    if previous is not None and (previous.pid, previous.host) != (os.getpid(), socket.gethostname()):
        say(f"note: {directory} was owned by {previous.describe()}, which ended without giving it back "
            "(killed?); this process takes it over")
