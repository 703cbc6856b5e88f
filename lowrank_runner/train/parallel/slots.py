"""Where the children of ``lrr run --parallel N`` run: the options checked, the devices
divided into groups of ``--gpus-per-run`` and the CPU cores divided among the N runs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lowrank_runner.errors import UsageError


@dataclass(frozen=True)
class ParallelOptions:
    """``--parallel N --devices IDS --gpus-per-run K --executor local|ray --address ADDR``."""

    parallel: int = 1
    devices: str | None = None  # "0,1,2,3" as given
    gpus_per_run: int | None = None
    executor: str = "local"
    address: str | None = None

    @property
    def sequential(self) -> bool:
        """Today's path: one run after another in this process."""
        return (self.parallel == 1 and self.executor == "local" and not self.gpus_per_run and self.devices is None
                and self.address is None)

    def words(self) -> list[str]:
        """The options as given, for the command a batch records (and prints to resume it)."""
        words = ["--parallel", str(self.parallel)]
        words += ["--devices", self.devices] if self.devices is not None else []
        words += ["--gpus-per-run", str(self.gpus_per_run)] if self.gpus_per_run else []
        words += ["--executor", self.executor] if self.executor != "local" else []
        words += ["--address", self.address] if self.address else []
        return words


@dataclass(frozen=True)
class Slots:
    """What each child gets: a device group (``groups``, () on a CPU machine or a
    cluster), its GPU count and its CPU threads."""

    groups: tuple[tuple[str, ...], ...]
    gpus: int
    cpus: int

    def where(self, group: tuple[str, ...]) -> str:
        return f"cuda {','.join(group)}" if group else f"cpu ({self.cpus} thread{'s' if self.cpus > 1 else ''})"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_devices() -> list[str]:
    """The CUDA devices this process may use, by the ids a child's CUDA_VISIBLE_DEVICES
    takes (those of CUDA_VISIBLE_DEVICES when it is set); [] on a CPU-only machine."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [d.strip() for d in given.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def plan_slots(options: ParallelOptions) -> Slots:
    """The device groups and threads per child; a usage error for options that do not fit."""
    n = options.parallel
    if n < 1:
        raise UsageError(f"--parallel {n}: give the number of runs at once, 1 or more")
    if options.executor not in ("local", "ray"):
        raise UsageError(f"--executor {options.executor}: choose local (processes on this machine) or ray (a Ray cluster)")
    if options.address is not None and options.executor != "ray":
        raise UsageError("--address is the Ray cluster's address: it goes with --executor ray")
    if options.executor == "ray":
        if options.devices is not None:
            raise UsageError("--devices chooses this machine's GPUs; with --executor ray each run asks the cluster "
                             "for --gpus-per-run GPUs instead: drop --devices")
        return Slots(groups=((),), gpus=options.gpus_per_run or 0, cpus=1)
    cpus = max(1, cpu_cores() // n)
    visible = visible_devices()
    devices = _given_devices(options.devices, visible) if options.devices is not None else visible
    k = options.gpus_per_run
    if not devices:
        if k:
            raise UsageError(f"--gpus-per-run {k}: no CUDA device is visible on this machine; drop --gpus-per-run "
                             f"to run {n} CPU processes")
        return Slots(groups=((),), gpus=0, cpus=cpus)
    k = k or 1
    if k > len(devices):
        raise UsageError(f"--gpus-per-run {k}: more than the {len(devices)} device(s) to use ({','.join(devices)}); "
                         f"give at most {len(devices)}, or more --devices")
    groups = tuple(tuple(devices[i:i + k]) for i in range(0, len(devices) - k + 1, k))
    return Slots(groups=groups, gpus=k, cpus=cpus)


def _given_devices(text: str, visible: list[str]) -> list[str]:
    """``--devices 0,1,2``: each id visible here, none twice."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UsageError(f"--devices {text!r}: give CUDA device ids separated by commas, e.g. --devices 0,1")
    twice = next((d for i, d in enumerate(devices) if d in devices[:i]), None)
    if twice is not None:
        raise UsageError(f"--devices {text}: device {twice} is given twice; give each device once")
    unknown = [d for d in devices if d not in visible]
    if unknown:
        have = (f"the visible devices are {','.join(visible)}" if visible
                else "no CUDA device is visible on this machine (CPU only): drop --devices to run CPU processes")
        raise UsageError(f"--devices {text}: no CUDA device {','.join(unknown)}; {have}")
    return devices
