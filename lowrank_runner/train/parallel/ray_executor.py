"""A Ray cluster as the executor of ``lrr run --parallel N --executor ray [--address ADDR]``.

Each job is one Ray task asking for the job's GPUs and CPUs; the task runs the job's child
command on whichever node Ray places it (CUDA_VISIBLE_DEVICES: the GPUs Ray gave it), its
stdout and stderr appended to the job's log, and returns the child's exit code. Ray
retries a task whose worker or node died (the retry continues the run with ``--resume``),
never a run that failed. Stopping cancels the tasks: each forwards the cancellation to its
child as SIGTERM (the run marks itself interrupted) and waits for it. Runs write into the
recipe's output directory, so it must be on a filesystem every node sees: the first job
checks that each node reads a marker file the driver wrote there.

Ray is optional (``pip install 'lowrank-runner[ray]'``) and imported only here.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from lowrank_runner.errors import LrrError, UsageError
from lowrank_runner.train.parallel.jobs import FAILED, INTERRUPTED, Executor, Job

RETRIES = 3  # a task whose worker or node died runs again (Ray's max_retries); a failed run does not
GRACE = 120.0  # seconds a stopped child has to mark its run interrupted before it is killed
CONNECT_TIMEOUT = 5.0  # seconds to reach the cluster's address before giving up
CHECK_TIMEOUT = 120.0  # seconds for every node to answer the shared-filesystem check
MARKER_PREFIX = ".lrr-ray-check-"


def import_ray():
    """The ``ray`` module; a usage error saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed: "
                         "pip install 'lowrank-runner[ray]'") from None
    return ray


class RayExecutor(Executor):
    """Up to ``capacity`` runs at once as Ray tasks, on the cluster at ``address`` (host:port,
    ``auto``, ``ray://host:port``; None: ``RAY_ADDRESS`` if set, else a Ray instance started
    on this machine for this command and shut down by :meth:`close`)."""

    def __init__(self, address: str | None = None, capacity: int = 1, gpus_per_run: int = 0, cpus_per_run: int = 1,
                 grace: float = GRACE):
        self.ray = import_ray()
        self.capacity, self.grace = capacity, grace
        self.owned = connect(self.ray, address or os.environ.get("RAY_ADDRESS") or None,
                             local_cpus=max(_cpu_cores(), capacity * cpus_per_run))
        self._remote = self.ray.remote(run_child)
        self._running: dict = {}  # ObjectRef -> Job
        self._checked: set[Path] = set()  # output directories every node has been seen to read
        try:
            self._check_fits(gpus_per_run, cpus_per_run)
        except LrrError:
            self.close()
            raise

    def _check_fits(self, gpus: int, cpus: int) -> None:
        """A run's request fits on some node: an error on the instance started here, a
        warning on a cluster (whose autoscaler may add such a node; Ray waits until then)."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if any(r.get("GPU", 0) >= gpus and r.get("CPU", 0) >= cpus for r in nodes):
            return
        most = max((int(r.get("GPU", 0)) for r in nodes), default=0)
        problem = (f"--gpus-per-run {gpus}: no node of the Ray cluster has {gpus} GPU(s) and {cpus} CPU(s) for one "
                   f"run (the most GPUs on a node: {most})")
        if self.owned:
            raise LrrError(f"{problem}; give --gpus-per-run {most} or less" if most else
                           f"{problem}; this machine has no GPU Ray can use: drop --gpus-per-run")
        print(f"warning: {problem}; the runs wait until the cluster has such a node", file=sys.stderr)

    def submit(self, job: Job) -> None:
        self.check_shared(output_directory(job))
        job.log.parent.mkdir(parents=True, exist_ok=True)
        ref = self._remote.options(num_gpus=job.gpus, num_cpus=job.cpus, max_retries=RETRIES, retry_exceptions=False,
                                   name=f"lrr {job.slug}").remote(
            job.argv, job.env, str(job.log), str(job.run_dir), job.gpus, driver_cwd(), sys.executable, self.grace)
        self._running[ref] = job

    def wait_any(self, timeout: float) -> list[tuple[Job, int]]:
        refs = list(self._running)
        if not refs:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and every other one finished by now
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return [self._collect(ref) for ref in ready]

    def _collect(self, ref) -> tuple[Job, int]:
        """A finished task's job and exit code: the child's, 130 for a task cancelled before
        its child exited, 1 (said in the log) when Ray lost the task after its retries."""
        job = self._running.pop(ref)
        try:
            return job, int(self.ray.get(ref))
        except self.ray.exceptions.TaskCancelledError:
            return job, INTERRUPTED
        except self.ray.exceptions.RayError as exc:
            _append(job.log, f"lrr: Ray lost this run's task ({type(exc).__name__}: {str(exc).strip()[:500]})")
            return job, FAILED

    def stop_all(self) -> None:
        """Cancel every running task (its child gets SIGTERM and marks its run
        interrupted) and wait for them; a task still there after the grace time and a
        margin is force-cancelled (its worker killed)."""
        refs = list(self._running)
        if not refs:
            return
        for ref in refs:
            self.ray.cancel(ref)
        _, left = self.ray.wait(refs, num_returns=len(refs), timeout=self.grace + 30)
        for ref in left:
            self.ray.cancel(ref, force=True)
        if left:
            self.ray.wait(left, num_returns=len(left), timeout=30)

    def close(self) -> None:
        """Force-cancel what still runs, and shut down the Ray instance this executor started."""
        for ref in list(self._running):
            self.ray.cancel(ref, force=True)
        self._running.clear()
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()

    # ------------------------------------------------------------------ shared filesystem

    def check_shared(self, directory: Path) -> None:
        """Every node of the cluster reads a marker file written here into ``directory``;
        an error naming it when one cannot (the directory is not on a shared filesystem)."""
        directory = Path(directory).resolve()
        if directory in self._checked:
            return
        token = uuid.uuid4().hex
        marker = directory / f"{MARKER_PREFIX}{token}"
        marker.write_text(token, encoding="utf-8")
        try:
            answers = self._read_on_every_node(path_on_node(marker), token)
        finally:
            marker.unlink(missing_ok=True)
        blind = [node for node, seen in answers if not seen]
        if blind:
            raise LrrError(f"--executor ray: the output directory {directory} is not visible from every node of the "
                           f"Ray cluster (not seen from node {', '.join(blind)}); runs write there, so it must be on a "
                           f"shared filesystem (e.g. NFS) mounted at the same path on every node: give such a "
                           f"directory with --output")
        self._checked.add(directory)

    def _read_on_every_node(self, path: str, token: str) -> list[tuple[str, bool]]:
        """(node address, whether it read ``token`` at ``path``) for every live node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        reader = self.ray.remote(read_marker)
        refs = [reader.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(path, token) for n in nodes]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=CHECK_TIMEOUT)
        if len(ready) < len(refs):
            raise LrrError(f"--executor ray: not every node of the Ray cluster answered within {CHECK_TIMEOUT:.0f} s "
                           f"whether it sees the output directory {Path(path).parent}; check the cluster (ray status)")
        return [(n.get("NodeManagerAddress", n["NodeID"]), seen) for n, seen in zip(nodes, self.ray.get(refs))]


def output_directory(job: Job) -> Path:
    """The recipe's output directory of a job: the nearest existing directory holding both
    its run directory and its log."""
    directory = Path(os.path.commonpath([job.run_dir.resolve(), job.log.resolve()]))
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    return directory


def driver_cwd() -> str:
    """The directory the children start in: the driver's (relative paths in their command
    mean the same on every node of a shared filesystem)."""
    return os.getcwd()


def path_on_node(marker: Path) -> str:
    """The path a node reads the driver's marker at (the same: a shared filesystem is
    mounted at the same path everywhere; tests point it elsewhere)."""
    return str(marker)


def read_marker(path: str, token: str) -> bool:
    """On a node: whether the file at ``path`` holds ``token``."""
    try:
        return Path(path).read_text(encoding="utf-8") == token
    except OSError:
        return False


# ------------------------------------------------------------------ connecting


def connect(ray, address: str | None, local_cpus: int) -> bool:
    """Connect to the cluster at ``address``, or start a Ray instance on this machine (None);
    True when this call started it. An :class:`LrrError` within seconds when the cluster
    cannot be reached. A process already connected (a test, a notebook) keeps its connection."""
    if address is not None and address != "auto":
        _reachable(address)
    if ray.is_initialized():
        return False
    with _signal_handlers_kept():
        return _init(ray, address, local_cpus)


def _init(ray, address: str | None, local_cpus: int) -> bool:
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline-first: no usage report from our instance
        ray.init(address="local", num_cpus=local_cpus, object_store_memory=128 * 1024**2, **quiet)
        return True
    try:
        ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except Exception as exc:  # ConnectionError, a version mismatch (RuntimeError), a bad address (ValueError)
        raise LrrError(f"--address {address}: cannot connect to a Ray cluster ({_first_line(exc)}); start one with "
                       f"`ray start --head` and give its address (HOST:6379), or --address auto on one of its "
                       f"nodes") from None
    return False


class _signal_handlers_kept:
    """SIGINT's and SIGTERM's handlers as they were before ``ray.init``, which installs its
    own for SIGTERM (it would end the driver without stopping its runs: the CLI turns
    SIGTERM into Ctrl-C)."""

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        return False


def _reachable(address: str) -> None:
    """The cluster's host and port answer within seconds (ray.init alone would keep retrying)."""
    rest = address.split("://", 1)[-1]
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, "10001" if address.startswith("ray://") else "6379"
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except (OSError, ValueError) as exc:
        raise LrrError(f"--address {address}: no Ray cluster answers there ({exc}); start one with `ray start --head` "
                       f"on its head node and give HOST:PORT as it prints (port 6379 by default), or --address auto "
                       f"on one of its nodes") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------ on a node


def run_child(argv: list[str], env: dict, log: str, run_dir: str, gpus: int, cwd: str, driver_python: str,
              grace: float) -> int:
    """The body of a job's Ray task, on a node: run the child command, its output appended
    to ``log``, and return its exit code. A Ray cancellation (KeyboardInterrupt here) is
    forwarded to the child as SIGTERM, and the child waited for (killed after ``grace`` s)."""
    import ray

    _cancellable()
    argv = list(argv)
    if argv and argv[0] == driver_python and not os.path.exists(argv[0]):
        argv[0] = sys.executable  # the node's Python of the same environment, installed elsewhere
    if (Path(run_dir) / "recipe.yaml").is_file() and "--resume" not in argv:
        argv.append("--resume")  # Ray retried this task (its worker died): continue the run it had started
    devices = ",".join(str(i) for i in ray.get_gpu_ids()) if gpus else ""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        words = [f"{k}={v}" for k, v in sorted({**env, "CUDA_VISIBLE_DEVICES": devices}.items())]
        out.write(f"$ {shlex.join(words + argv)}  # on {socket.gethostname()} (Ray), in {cwd}\n".encode())
        if not os.path.isdir(cwd):  # the command's relative paths would point elsewhere
            out.write(f"lrr: the driver's working directory {cwd} does not exist on {socket.gethostname()}; "
                      f"start lrr from a directory on the shared filesystem\n".encode())
            return FAILED
        out.flush()
        proc = subprocess.Popen(argv, env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": devices}, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup())
        return _wait(proc, grace)


def _wait(proc: subprocess.Popen, grace: float) -> int:
    """The child's exit code; on KeyboardInterrupt (Ray's cancel) SIGTERM first, then wait.
    (A polling wait: Ray's interrupt does not end a blocking ``waitpid``.)"""
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        _signal_group(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            return proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the child's process group (an ``accelerate launch`` child and its workers)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _child_setup():
    """What the child runs before exec (POSIX; None elsewhere): SIGINT unblocked (Ray's
    workers block it) and, on Linux, SIGTERM to it when the Ray worker dies (a
    force-cancelled or lost task, a driver gone), so no run trains on unseen. Everything
    is looked up here, before the fork."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    unblock = functools.partial(signal.pthread_sigmask, signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform != "linux":
        return unblock
    import ctypes

    prctl, set_pdeathsig, sigterm = ctypes.CDLL(None, use_errno=True).prctl, 1, int(signal.SIGTERM)
    return lambda: (unblock(), prctl(set_pdeathsig, sigterm))


def _cancellable() -> None:
    """Ray cancels a task by interrupting the worker's main thread, which does nothing when
    SIGINT lacks Python's handler (a driver started with SIGINT ignored, under ``nohup`` or
    ``&``, passes that down to its local Ray's workers): give it back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _append(log: Path, line: str) -> None:
    try:
        with open(log, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    except OSError:
        pass
