"""benchmarks/trace_summary.py: the kernel time of a `profile_steps` trace by XLA op, from the trace benchmarks/gpu.py
records with `--profile_steps` (the CPU's thunks here), and a device's streams where the trace has them."""

import gzip
import json

import pytest

from benchmarks import gpu, trace_summary


def test_a_traced_gpu_benchmark_run_reports_its_kernels_by_op():
    result = gpu.main(["--quick", "--profile_steps", "2", "--profile_start_step", "2"])
    trace = result["trace"]
    assert trace["source"] == "host thunks" and trace["traced_steps"] == [2, 3]
    ops = trace["top_ops"]
    assert ops and all(op["ms"] > 0 and op["calls"] > 0 for op in ops)
    assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
    assert 0 < sum(op["share"] for op in ops) <= 1.0001 and trace["kernel_ms"] >= ops[0]["ms"]


def test_a_devices_streams_are_summed_and_the_host_left_out(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0 (NVIDIA H200)"}},
        {"ph": "X", "name": "train", "pid": 1, "dur": 900.0, "args": {"step_num": "4"}},
        {"ph": "X", "name": "launch", "pid": 1, "dur": 50.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "name": "sm90_gemm", "pid": 2, "dur": 300.0, "args": {"hlo_op": "dot.7"}},
        {"ph": "X", "name": "sm90_gemm", "pid": 2, "dur": 200.0, "args": {"hlo_op": "dot.7"}},
        {"ph": "X", "name": "loop_add_fusion", "pid": 2, "dur": 100.0, "args": {}},
    ]
    trace = tmp_path / "plugins" / "profile" / "2026_12_05_09_00_00"
    trace.mkdir(parents=True)
    (trace / "perfetto_trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    result = trace_summary.summarize(tmp_path)
    assert result["source"] == "device" and result["traced_steps"] == [4] and result["kernel_ms"] == 0.6
    assert result["top_ops"] == [{"op": "dot.7", "ms": 0.5, "calls": 2, "share": 0.8333},
                                 {"op": "loop_add_fusion", "ms": 0.1, "calls": 1, "share": 0.1667}]


def test_a_directory_without_a_trace_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="profile_steps"):
        trace_summary.summarize(tmp_path)
