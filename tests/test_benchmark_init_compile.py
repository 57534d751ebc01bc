"""Smoke test of benchmarks/init_compile.py at a tiny size (no timing asserted)."""

import json

from benchmarks import init_compile, run


def test_init_compile_benchmark_smoke(tmp_path):
    out = tmp_path / "init_compile.json"
    # The fresh-state ways at one depth: each is a child process of its own, and one depth runs every way.
    result = init_compile.main(["--quick", "--fresh_depths", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for depth in ("2", "3"):
        row = result["depths"][depth]
        assert set(row) == set(init_compile.WAYS)
        assert all(way["compile_seconds"] > 0 and way["lower_seconds"] > 0 for way in row.values())
        # The ways differ in what they trace: each weight drawn, one key per weight, or neither.
        assert row["draws"]["fusions"] > row["keys_only"]["fusions"] > row["no_random"]["fusions"]
    assert result["depths"]["3"]["draws"]["fusions"] > result["depths"]["2"]["draws"]["fusions"]
    # Layers built stacked: one vmapped layer whatever the depth.
    assert result["depths"]["3"]["stacked"]["fusions"] == result["depths"]["2"]["stacked"]["fusions"]
    assert set(result["compile_seconds_per_layer"]) == set(init_compile.WAYS)
    fresh = result["fresh_state"]["depths"]
    assert set(fresh) == {"2"} and all(set(row) == set(init_compile.FRESH_WAYS) for row in fresh.values())
    assert all(way["seconds"] > 0 and way["peak_rss_gib"] > 0 for row in fresh.values() for way in row.values())
    assert all(h.value is not None for h in run.BENCHMARKS["init_compile"].headlines(result))


def test_the_ways_keep_the_models_initialiser_outside_their_own_compile():
    from easytrain.models import layers

    original = layers._normal
    init_compile.compile_once(init_compile.llama(1, 64, 256), "no_random")
    assert layers._normal is original
