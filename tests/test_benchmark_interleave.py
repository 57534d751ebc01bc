"""benchmarks/interleave.py: contenders' processes start one at a time, then time their windows one at a time in
turns whose order rotates; a child that fails is reported with its stderr."""

import os
import sys
from pathlib import Path

import pytest

from benchmarks.interleave import take_turns

ROOT = Path(__file__).resolve().parents[1]
#: A contender that records, on the machine's monotonic clock, when it started and each window's gate and span.
CHILD = """
import json, sys, time
from benchmarks.interleave import Gate
gate = Gate.parse(sys.argv[sys.argv.index("--gate") + 1])
started, windows = time.monotonic(), []
if sys.argv[1] == "fail":
    sys.exit("no model for you")
for _ in range(int(sys.argv[1])):
    ready = time.monotonic()
    gate.wait()
    begin = time.monotonic()
    time.sleep(0.03)
    windows.append((ready, begin, time.monotonic()))
print("a log line first")
print(json.dumps({"started": started, "windows": windows}))
"""


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "contender.py"
    script.write_text(CHILD)
    return lambda *args: [sys.executable, str(script), *args]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_windows_take_turns_in_rotating_order_and_never_overlap(child):
    names, windows = ["a", "b", "c"], 4
    results = take_turns({name: child(str(windows)) for name in names}, windows, first=1, env=env())
    assert set(results) == set(names)
    spans = sorted((begin, end, name) for name in names for _, begin, end in results[name]["windows"])
    assert len(spans) == len(names) * windows
    assert all(end <= next_begin for (_, end, _), (next_begin, _, _) in zip(spans, spans[1:]))  # one at a time
    for turn in range(windows):
        order = sorted(names, key=lambda name: results[name]["windows"][turn][1])
        start = (1 + turn) % len(names)
        assert order == names[start:] + names[:start]
    for before, after in zip(names, names[1:]):  # each starts once the one before waits at its first gate
        assert results[after]["started"] >= results[before]["windows"][0][0]


def test_a_child_that_fails_is_reported_and_the_others_stopped(child):
    with pytest.raises(RuntimeError, match=r"(?s)exit 1.*no model for you"):
        take_turns({"good": child("3"), "bad": child("fail")}, 3, env=env())
