"""CPU time of each thread of this process, from Linux's /proc/self/task/*/stat: what tells, on a machine with
few cores, whether a contender's own threads (a loader, a logger, a watcher) take CPU from the compute threads.

    before = thread_times.snapshot()
    ...  # the timed work
    thread_times.by_name(before, thread_times.snapshot())  # {thread name: CPU seconds in between}
"""

from __future__ import annotations

import os
from collections import defaultdict

#: The thread's name field and its user and kernel CPU time, in clock ticks (proc(5): fields 2, 14 and 15).
Times = dict[int, tuple[str, int, int]]


def snapshot() -> Times:
    """`{thread id: (name, user ticks, system ticks)}` of every thread alive now; {} where there is no /proc."""
    times: Times = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return times
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                line = stat.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = line[line.index("(") + 1:line.rindex(")")]
        name = f"main ({name})" if int(tid) == os.getpid() else name
        fields = line[line.rindex(")") + 2:].split()  # from field 3 on: state, ppid, ...
        times[int(tid)] = (name, int(fields[11]), int(fields[12]))
    return times


def by_name(before: Times, after: Times) -> dict[str, dict[str, float]]:
    """User and system CPU seconds each thread name spent between two snapshots, summed over the threads of that
    name (a thread started in between counts from zero; one that ended is missed), busiest first."""
    tick = os.sysconf("SC_CLK_TCK")
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for tid, (name, user, system) in after.items():
        _, user0, system0 = before.get(tid, (name, 0, 0))
        if user - user0 or system - system0:
            entry = spent[name]
            entry[0] += (user - user0) / tick
            entry[1] += (system - system0) / tick
            entry[2] += 1
    ranked = sorted(spent.items(), key=lambda item: -(item[1][0] + item[1][1]))
    return {name: {"user": round(u, 2), "system": round(s, 2), "threads": int(n)} for name, (u, s, n) in ranked}
