"""runtime.CpuThreads: torch's CPU threads left to what other processes do not use.

    python -m pytest tests/test_threads.py -q

The decision is tested on synthetic /proc readings (exact), the reading itself against processes this
test starts (a busy process is seen as busy, this process's own work is not counted as another's).
"""
import os
import subprocess
import sys
import time

import pytest
import torch

import runtime

LINUX = os.path.exists("/proc/stat") and hasattr(os, "sched_getaffinity")


@pytest.fixture
def adaptive(monkeypatch):
    """No fixed count from the environment (conftest fixes one for the other tests); torch's count restored."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class FakeProc:
    """/proc readings as the test says: `others` busy cores of `cpus` since the last reading, this process
    `own` cores, each reading one second of ticks (100 a second and CPU)."""

    def __init__(self, cpus: int):
        self.cpus, self.busy, self.total, self.own_total = cpus, 0, 0, 0
        self.others = self.own = 0.0

    def cpu_ticks(self, _cpus):
        self.busy += round(100 * (self.others + self.own))
        self.total += 100 * self.cpus
        return self.busy, self.total

    def own_ticks(self):
        self.own_total += round(100 * self.own)
        return self.own_total


@pytest.mark.skipif(not LINUX, reason="reads /proc (Linux)")
def test_the_count_is_the_cores_other_processes_leave(adaptive, monkeypatch):
    fake = FakeProc(cpus=8)
    monkeypatch.setattr(runtime, "_cpu_ticks", fake.cpu_ticks)
    monkeypatch.setattr(runtime, "_own_ticks", fake.own_ticks)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    torch.set_num_threads(6)  # torch's default here: the most it may use
    threads = runtime.CpuThreads(interval=0)
    assert threads.adapt and threads.most == 6
    chosen = []
    # idle; two busy processes; this process busy on its 6 threads (its own use is not another's);
    # 2.6 cores busy elsewhere (round(5.4) = 5); everything busy (at least one); idle again
    for others, own in [(0, 0), (2, 0), (0, 6), (2.6, 3), (8, 0), (0, 0)]:
        fake.others, fake.own = others, own
        threads.tick()
        chosen.append(torch.get_num_threads())
    assert chosen == [6, 6, 6, 5, 1, 6]
    fake.others = 7
    threads.tick()
    assert torch.get_num_threads() == 1


def test_a_chosen_count_stays(adaptive, monkeypatch):
    """--threads N, OMP_NUM_THREADS and torchrun's processes fix the count: tick() never changes it."""
    threads = runtime.CpuThreads(1, interval=0)
    assert not threads.adapt and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not runtime.CpuThreads(interval=0).adapt
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("RANK", "0")
    assert not runtime.CpuThreads(interval=0).adapt


@pytest.mark.skipif(not LINUX or len(os.sched_getaffinity(0)) < 2, reason="reads /proc; needs 2 CPUs")
def test_busy_processes_are_seen_and_this_ones_own_work_is_not(adaptive):
    cpus = len(os.sched_getaffinity(0))
    threads = runtime.CpuThreads(interval=0)
    time.sleep(0.5)
    quiet = threads.others()
    # this process busy on one thread: its own time is taken off what the machine spent
    t0 = time.monotonic()
    x = torch.randn(256, 256)
    torch.set_num_threads(1)
    while time.monotonic() - t0 < 0.5:
        x = torch.tanh(x @ x)
    assert threads.others() < quiet + 0.5
    # as many busy processes as CPUs: while this one sleeps they have them all
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        time.sleep(0.5)
        threads.others()  # the readings start with the spinners running
        time.sleep(1.0)
        busy = threads.others()
        assert busy > 0.6 * cpus, (busy, quiet)
        time.sleep(1.0)
        threads.tick()
        assert torch.get_num_threads() == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
