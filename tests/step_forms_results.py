"""Checks every `benchmarks.step_forms.compare` result shares, for the smoke tests of the benchmarks built on it."""

import json
from pathlib import Path


def check_compare_result(result: dict, out: Path, forms: set[str], rounds: int = 2) -> None:
    """The JSON written to `out` is the result returned; each form has a positive step time; one speedup per timed
    round and a positive paired median."""
    assert json.loads(out.read_text()) == result
    assert set(result["ms_per_step"]) == forms and all(v > 0 for v in result["ms_per_step"].values())
    assert len(result["speedup_per_round"]) == result["rounds"] == rounds and result["speedup_paired_median"] > 0
