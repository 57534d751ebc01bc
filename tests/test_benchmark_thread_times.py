"""benchmarks/thread_times.py: each thread's CPU time between two snapshots, by thread name (no timing asserted)."""

import os
import threading
import time

import pytest

from benchmarks import thread_times, versus_torch

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")


def spin(cpu_seconds: float) -> None:
    started = time.thread_time()
    while time.thread_time() - started < cpu_seconds:
        pass


#: Seconds a thread may wait for another on a loaded machine: a bound for a hung test, not a timing checked.
WAIT = 120.0


def cpu(times: dict[str, float]) -> float:
    return times["user"] + times["system"]


def test_the_main_thread_is_named_apart():
    before = thread_times.snapshot()
    spin(0.3)
    spent = thread_times.by_name(before, thread_times.snapshot())
    main = [name for name in spent if name.startswith("main (")]
    assert len(main) == 1 and spent[main[0]]["threads"] == 1
    assert cpu(spent[main[0]]) >= 0.2  # clock ticks of 10 ms


def test_another_thread_counts_under_its_own_name_while_the_main_thread_waits():
    """The other thread spins until it has used 0.3 s of CPU, however long a loaded machine takes to give it that,
    and stays alive (a thread that ended is missed) until the main thread, which waited meanwhile, has looked."""
    spun, looked = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (spin(0.3), spun.set(), looked.wait(WAIT)))
    before = thread_times.snapshot()  # before the thread starts: all its CPU counts (from zero)
    started = time.thread_time()
    worker.start()
    try:
        assert spun.wait(WAIT), f"the other thread did not get 0.3 s of CPU in {WAIT} s"  # the main thread sleeps
        after = thread_times.snapshot()
        main_cpu = time.thread_time() - started
    finally:
        looked.set()
        worker.join()
    assert worker.native_id in after and worker.native_id != os.getpid()
    spent = thread_times.by_name(before, after)
    others = sum(cpu(times) for name, times in spent.items() if not name.startswith("main ("))
    assert others >= 0.2 > main_cpu  # clock ticks of 10 ms
    assert list(spent) == sorted(spent, key=lambda name: -cpu(spent[name]))  # busiest first


def test_thread_ms_per_step_keeps_the_threads_over_the_bound():
    result = {"window_seconds": [1.0, 1.0], "timed_thread_seconds": {
        "tf_XLAEigen": {"user": 8.0, "system": 0.4, "threads": 2},
        "main (python)": {"user": 0.04, "system": 0.0, "threads": 1},
        "python": {"user": 0.001, "system": 0.0, "threads": 1}}}
    assert versus_torch.thread_ms_per_step(result, every=4) == {"tf_XLAEigen": 1050.0, "main (python)": 5.0}
