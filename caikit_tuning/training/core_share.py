"""Fewer OpenMP threads while other processes keep this machine's cores busy.

A training job on the CPU runs one OpenMP thread per core it was given, and between
parallel regions its threads spin before they sleep (libgomp's default, which makes a
step of many small kernels fast). When another process needs one of those cores (the
server answering inference requests beside the job it started), a spinning team waits
for its descheduled member at every barrier, and the job slows several-fold. A short
spin avoids that but costs the job a third of its speed when the cores are free.

So a server's CPU training workers keep libgomp's default spin, and `CoreShare` gives up
a thread for each core others are using: it reads the machine's busy time (/proc/stat)
less this process's own, and sets torch's thread count to the cores left (at least one,
at most the job's share). The worker reads once as it starts, and the training loop
again every second; threads come back only after the cores have been free for
`calm_seconds`. It must be called from the training thread: OpenMP's thread count
belongs to the thread that sets it. The worker pool asks for it only where /proc/stat
describes the worker's own cores (`sees_the_whole_machine`); in a container with a CPU
limit it shows the host's, and workers keep the server's short spin there.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import alog
import torch

log = alog.use_channel("CORES")

ENV = "CAIKIT_TUNING_SHARE_CORES"  # set by the worker pool for its CPU slots
FIRST_READING_SECONDS = 0.25
_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq (not idle, iowait, steal)


def machine_busy_seconds() -> tuple[float, int] | None:
    """CPU seconds every core of the machine has spent busy since boot, and how many
    cores there are; None where /proc/stat is not there to read."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
        busy = sum(fields[i] for i in _BUSY_FIELDS) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # absent, or not Linux's format
        return None
    cores = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return (busy, cores) if cores else None


def _cgroup_quota_files() -> list[Path]:
    """Where this process's CPU quota may be: cgroup v2's cpu.max and v1's
    cpu.cfs_quota_us, at the mount's root (a container's own) and at its cgroup's path."""
    roots = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")]
    paths = [""]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                paths.append(path.lstrip("/"))
    names = ("cpu.max", "cpu.cfs_quota_us")
    return list(dict.fromkeys(root / p / name for root in roots for p in paths for name in names))


def sees_the_whole_machine() -> bool:
    """Whether /proc/stat describes the cores this process runs on: every core of the
    machine is allowed to it and no cgroup caps its CPU time (in a container with a CPU
    limit, /proc/stat shows the host, and others' use there says nothing about ours)."""
    sample = machine_busy_seconds()
    if sample is None or sample[1] != len(os.sched_getaffinity(0)):
        return False
    for file in _cgroup_quota_files():
        with contextlib.suppress(OSError, IndexError):
            quota = file.read_text().split()[0]
            if quota not in ("max", "-1"):
                return False
    return True


def own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def threads_wanted(others: float, cores: int, full: int) -> int:
    """Threads for a job whose share is `full` threads while other processes use
    `others` cores of `cores`: the cores left, rounded to the nearest, within [1, full]."""
    return max(1, min(full, int(cores - others + 0.5)))


class CoreShare:
    def __init__(
        self,
        full: int,
        interval: float = 1.0,
        calm_seconds: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        machine: Callable[[], tuple[float, int] | None] = machine_busy_seconds,
        own: Callable[[], float] = own_seconds,
    ):
        self.full, self.threads = full, full
        self.interval, self.calm_seconds = interval, calm_seconds
        self.clock, self.machine, self.own = clock, machine, own
        self.last: tuple[float, float, float] | None = None  # when, machine busy, own
        self.calm_since: float | None = None
        self.others = 0.0

    def adjust(self) -> int:
        """Sample the cores (at most once per interval) and set the thread count; returns it."""
        now = self.clock()
        if self.last is not None and now - self.last[0] < self.interval:
            return self.threads
        sample = self.machine()
        if sample is None:
            return self.threads
        busy, cores = sample
        own = self.own()
        if self.last is not None:
            when, busy_before, own_before = self.last
            others = ((busy - busy_before) - (own - own_before)) / (now - when)
            self.others = max(0.0, others)
            self._set(threads_wanted(self.others, cores, self.full), now)
        self.last = (now, busy, own)
        return self.threads

    def _set(self, wanted: int, now: float) -> None:
        if wanted >= self.threads:
            # More threads only once the cores have stayed free for calm_seconds.
            if wanted == self.threads:
                self.calm_since = None
                return
            if self.calm_since is None:
                self.calm_since = now
            if now - self.calm_since < self.calm_seconds:
                return
        self.calm_since = None
        log.info(
            "other processes use %.1f cores: %d training threads, from %d",
            self.others,
            wanted,
            self.threads,
        )
        self.threads = wanted
        torch.set_num_threads(wanted)


_shared: CoreShare | None = None


def shared_cores() -> CoreShare | None:
    """This process's CoreShare where the worker pool asked for one (CAIKIT_TUNING_SHARE_CORES=1)
    and /proc/stat can be read, else None. The first call sets the thread count from a
    quarter-second reading, before the job loads its model."""
    global _shared
    if _shared is None and os.environ.get(ENV) == "1" and machine_busy_seconds() is not None:
        share = CoreShare(torch.get_num_threads(), interval=FIRST_READING_SECONDS)
        share.adjust()
        time.sleep(FIRST_READING_SECONDS)
        share.adjust()
        share.interval = 1.0
        _shared = share
    return _shared
