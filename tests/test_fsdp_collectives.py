"""FSDP with bfloat16 compute and float32 parameters gathers every weight in bfloat16 (half the bytes),
read from the trainer's compiled train step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices."""

from pathlib import Path

import pytest

from runs import facts_on_eight_devices

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = "2,2,2"


@pytest.fixture(scope="module")
def step() -> dict:
    return facts_on_eight_devices(ROOT / "tests" / "workers" / "fsdp_collectives.py", LAYOUT)[LAYOUT]


def weight_collectives(run: dict, kind: str, shapes: dict) -> list[dict]:
    """The `kind` collectives whose result is a weight as computed with (gathered over data and fsdp)."""
    return [c for c in run["collectives"] if c["kind"] == kind and c["shape"] in shapes.values()]


def matrices(step: dict) -> dict:
    return {name: shape for name, shape in step["param_shapes"].items() if len(shape) == 2}


@pytest.mark.slow
def test_every_weight_is_gathered_once_in_bfloat16(step):
    gathers = weight_collectives(step["pinned"], "all-gather", matrices(step))
    # 2 layers x 7 projections, the embedding table and the lm_head, each once (forward; kept for backward).
    assert len(gathers) == 16, gathers
    assert {g["dtype"] for g in gathers} == {"bf16"}, [g for g in gathers if g["dtype"] != "bf16"]
    # The tensor-parallel split stays: q_proj [128, 128] is gathered as [128, 64] on tensor=2.
    assert step["param_shapes"]["['layers'][0]['self_attn']['q_proj']['kernel']"] == [128, 64]
    # Left to the partitioner, the embedding table and the lm_head's backward re-gather move float32:
    # what the check above guards against.
    plain = weight_collectives(step["plain"], "all-gather", matrices(step))
    assert "f32" in {g["dtype"] for g in plain}
    assert sum(g["bytes"] for g in gathers) < sum(g["bytes"] for g in plain)


@pytest.mark.slow
def test_gradients_reduce_in_the_dtype_they_are_computed_in(step):
    """Decoder weights' gradients come out of bfloat16 dots and are reduced in bfloat16; the embedding's
    (a float32 scatter-add) and the lm_head's (from float32 logits, reduced as [V, D]) in float32."""
    shapes = matrices(step)
    vocab = [shapes["['embed_tokens']['embedding']"]]
    decoder = [shape for name, shape in shapes.items() if name.startswith("['layers']")]
    reductions = [r for r in step["pinned"]["collectives"] if r["kind"] == "all-reduce"]
    assert {r["dtype"] for r in reductions if r["shape"] in decoder} == {"bf16"}
    assert [r["dtype"] for r in reductions if r["shape"] in vocab] == ["f32", "f32"]


@pytest.mark.slow
def test_pinning_changes_no_value(step):
    """Same loss and, after one SGD step at learning rate 1, the same weights up to bfloat16 rounding of the
    gradient reductions (their grouping over the mesh axes differs)."""
    assert step["pinned"]["loss"] == pytest.approx(step["plain"]["loss"], rel=1e-6)
    assert step["max_param_difference"] < 1e-3
