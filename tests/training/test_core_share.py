"""CoreShare: a CPU job gives up a thread per core other processes use, and takes it back
once the cores have been free for a while."""

import os
import subprocess
import sys
import time

import pytest
import torch

from caikit_tuning.training.core_share import (
    CoreShare,
    machine_busy_seconds,
    sees_the_whole_machine,
    threads_wanted,
)


@pytest.mark.parametrize(
    ("others", "cores", "full", "expected"),
    [
        (0.0, 2, 2, 2),
        (0.4, 2, 2, 2),
        (0.6, 2, 2, 1),  # most of a core taken
        (1.9, 2, 2, 1),  # never below one
        (3.0, 16, 16, 13),
        (3.0, 16, 4, 4),  # never above the job's share
    ],
)
def test_threads_wanted(others, cores, full, expected):
    assert threads_wanted(others, cores, full) == expected


class _Machine:
    """Readings set by the test: machine busy seconds and this process's own."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def run(self, seconds: float, others: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_gives_a_thread_up_at_once_and_takes_it_back_when_calm(threads):
    m = _Machine()
    share = CoreShare(2, clock=lambda: m.now, machine=lambda: (m.busy, 2), own=lambda: m.own)
    assert share.adjust() == 2  # the first reading only starts the count
    m.run(1.0, others=1.0)
    assert share.adjust() == 1 and torch.get_num_threads() == 1
    m.run(0.5, others=0.0)
    assert share.adjust() == 1  # within the interval: not sampled
    for _ in range(3):  # free, but not yet for calm_seconds
        m.run(1.0, others=0.0)
        assert share.adjust() == 1
    m.run(1.0, others=1.0)  # busy again: the calm count starts over
    assert share.adjust() == 1
    for _ in range(3):
        m.run(1.0, others=0.1)
        share.adjust()
    assert share.threads == 1
    m.run(1.0, others=0.1)
    assert share.adjust() == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(machine_busy_seconds() is None, reason="needs /proc/stat")
def test_a_busy_process_is_seen_as_others_not_as_own(threads):
    share = CoreShare(2)
    share.adjust()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        share.adjust()
    finally:
        busy.kill()
        busy.wait()
    assert share.others >= 0.8  # a whole core, less what the reading rounds off


@pytest.mark.skipif(
    machine_busy_seconds() is None
    or len(os.sched_getaffinity(0)) < 2
    or not sees_the_whole_machine(),
    reason="needs /proc/stat and two allowed cores",
)
def test_a_process_pinned_to_fewer_cores_does_not_read_the_machine_as_its_own():
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from caikit_tuning.training.core_share import sees_the_whole_machine; "
        "print(sees_the_whole_machine())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False"], out.stderr
