"""benchmarks/run.py runs a quick suite at the tiniest size: every benchmark in its own process, a failing one
reported without stopping the others, a JSON summary and a PNG chart. No timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)


def load():
    spec = importlib.util.spec_from_file_location("benchmark_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quick_suite_smoke(tmp_path):
    config, out = tmp_path / "config.json", tmp_path / "results.json"
    config.write_text(json.dumps(TINY_LLAMA))
    sft_flags = (f"--model_config {config} --max_length 32 --batch_size 4 --num_conversations 48 --steps 2 "
                 "--repeats 2 --warmup_steps 1")
    # compile_cache gets a bad flag and fails; it runs between the two others, which must still run. It is the one
    # to fail because it parses its flags before importing JAX or transformers: its failure costs little.
    result = load().main(["--suite", "quick", "--only", "generation,compile_cache,sft", "--out", str(out),
                          "--extra", "generation=--batch 1 --prompt 4 --new 4 --repeats 1",
                          "--extra", f"sft={sft_flags}", "--extra", "compile_cache=--repeats not-a-number"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    machine = result["machine"]
    assert machine["cpu_count"] > 0 and machine["jax"] and machine["device_kind"]
    assert {"cpu", "cpu_family", "cpu_model", "cpu_vector_extension"} <= set(machine)
    assert machine["date"] and len(machine["load_average_at_start"]) == 3 and "git_commit" in machine

    benchmarks = result["benchmarks"]
    assert list(benchmarks) == ["generation", "compile_cache", "sft"]
    assert result["statuses"] == {"generation": "ok", "compile_cache": "failed", "sft": "ok"}
    failed = benchmarks["compile_cache"]
    assert failed["returncode"] != 0 and "invalid int value" in failed["error"] and "result" not in failed
    assert benchmarks["generation"]["result"]["benchmark"] == "generation"
    assert benchmarks["sft"]["result"]["benchmark"] == "sft_packing_vs_padding"
    assert "--quick" in benchmarks["sft"]["command"] and "--batch 1" in benchmarks["generation"]["command"]
    for name in ("generation", "sft"):
        assert benchmarks[name]["seconds"] > 0 and benchmarks[name]["returncode"] == 0

    rows = {(row["benchmark"], row["label"]): row for row in result["headlines"]}
    assert rows[("compile_cache", "failed")]["value"] is None
    ratios = [row for row in result["headlines"] if row["ratio"]]
    assert {row["benchmark"] for row in ratios} == {"generation", "sft"}
    assert all(row["value"] > 0 for row in ratios), ratios
    sft = next(row for row in ratios if row["benchmark"] == "sft")
    assert sft["low"] > 0 and sft["high"] >= sft["low"]  # the spread over its repeats

    chart = Path(result["chart"])
    assert chart == out.with_suffix(".png") and chart.stat().st_size > 0
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    image = pytest.importorskip("PIL.Image").open(chart)
    image.verify()
    assert image.size[0] > 100 and image.size[1] > 100


def test_headlines_tolerate_missing_keys(capsys):
    runner = load()
    records = {name: {"status": "ok", "seconds": 1.0, "result": {}} for name in runner.BENCHMARKS}
    rows = runner.headlines(records)
    assert {row.benchmark for row in rows} == set(runner.BENCHMARKS)
    assert all(row.value is None for row in rows)
    runner.print_table(rows, records)
    assert "n/a" in capsys.readouterr().out


def test_timeout_ends_the_benchmark(tmp_path):
    runner = load()
    record = runner.run_one(runner.BENCHMARKS["generation"], "quick", [], timeout=0.5, scratch=tmp_path)
    assert record["status"] == "timeout" and record["returncode"] != 0 and "result" not in record


def test_unknown_benchmark_is_refused():
    runner = load()
    with pytest.raises(SystemExit):
        runner.parse(["--only", "no_such_benchmark"])
    with pytest.raises(SystemExit):
        runner.parse(["--extra", "no_such_benchmark=--quick"])
    options = runner.parse(["--only", "sft", "--extra", "sft=--steps 2", "--extra", "sft=--repeats '3'"])
    assert options.names == ["sft"] and options.extras == {"sft": ["--steps", "2", "--repeats", "3"]}


def test_cpu_details_name_the_generation_and_vector_width():
    """Two machines both called "AMD EPYC" measured 119 and 502 GFLOP/s: the record tells them apart."""
    from benchmarks.machine import cpu_details

    zen5 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_details(zen5) == {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model": "2",
                                 "cpu_vector_extension": "avx512f"}
    zen3 = "cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2\n"
    assert cpu_details(zen3)["cpu_vector_extension"] == "avx2"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\n"
    assert cpu_details(arm) == {"cpu": None, "cpu_family": None, "cpu_model": None, "cpu_vector_extension": "asimd"}
    assert cpu_details("") == {"cpu": None, "cpu_family": None, "cpu_model": None, "cpu_vector_extension": None}
