"""The math does not change with the layout: 1 device vs 8 CPU devices in several meshes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from easytrain import ArgumentError
from easytrain.models import init_model
from easytrain.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec, resolve_mesh_shape, with_activation_layout
from runs import child_env, xla_flags

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"1 device": (1, 1, 1, 1), "(8,1,1)": (8, 1, 1, 8), "(1,8,1)": (1, 8, 1, 8),
           "(2,4,1)": (2, 4, 1, 8), "(2,2,2)": (2, 2, 2, 8)}


def run_layouts(*layouts: tuple) -> list[dict]:
    """Each `(data, fsdp, tensor, devices, *flags)` trained in turn by one 8-device process; their results."""
    env = child_env(XLA_FLAGS=xla_flags(8), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    each = json.dumps([list(map(str, layout)) for layout in layouts])
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "mesh_equivalence.py"), "--each", each],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(layouts), result.stdout[-3000:]
    return lines


@pytest.fixture(scope="module")
def saved_on_222(tmp_path_factory) -> Path:
    """Where the `layouts` process writes a (2,2,2) run stopped and checkpointed at step 3."""
    return tmp_path_factory.mktemp("saved_on_222") / "run"


@pytest.fixture(scope="module")
def layouts(saved_on_222) -> dict[str, dict]:
    """Each layout trained 5 steps in one process; the 1-device run also evaluates and samples (the generation
    reference), the (2,2,2) one counts its step's collectives (the plain attention's, for the splash test). Also
    on (2,2,2): the splash kernel, scan_layers with the loss a few tokens at a time (the head's vocabulary split over
    tensor) with evaluation and sampling, and a run stopped at step 3 and
    checkpointed in `saved_on_222` (for the resume test: a process start costs more than its three steps)."""
    extra = {"1 device": ["--evaluate"], "(2,2,2)": ["--collectives"]}
    variants = {"(2,2,2) splash": (2, 2, 2, 8, "--attention", "splash", "--collectives"),
                "(2,2,2) scan": (2, 2, 2, 8, "--scan", "--loss-chunk-size", 5, "--evaluate"),
                "(2,2,2) stopped at 3": (2, 2, 2, 8, "--output-dir", saved_on_222, "--stop-at", 3)}
    runs = {**{name: (*shape, *extra.get(name, [])) for name, shape in LAYOUTS.items()}, **variants}
    return dict(zip(runs, run_layouts(*runs.values())))


@pytest.mark.slow
def test_losses_agree_across_layouts(layouts):
    reference = layouts["1 device"]["losses"]
    assert len(reference) == 5 and reference[0] != reference[-1]
    for name in LAYOUTS:
        result = layouts[name]
        for step, (a, b) in enumerate(zip(result["losses"], reference), start=1):
            assert a == pytest.approx(b, abs=1e-5, rel=1e-5), f"{name} step {step}: {a} vs {b}"


@pytest.mark.slow
def test_splash_attention_runs_on_each_devices_shard(layouts):
    """On (2,2,2) the splash kernel (interpreted on CPU) trains the 1-device curve, and running it on each
    device's batch and head shard adds no collective to the compiled step."""
    plain, kernel = layouts["(2,2,2)"], layouts["(2,2,2) splash"]
    assert kernel["losses"] == pytest.approx(layouts["1 device"]["losses"], abs=1e-5, rel=1e-5)
    assert kernel["collectives"] == plain["collectives"]


@pytest.mark.slow
def test_stacked_layers_train_the_same_and_stay_split_like_their_layer(layouts):
    """scan_layers with loss_chunk_size 5 on (2,2,2): the 1-device curve of whole logits; each stacked weight split as
    its layer's, the layer axis whole; evaluation and sampling (a scan over the sharded stack and a stacked cache)
    give the 1-device results."""
    scanned, reference = layouts["(2,2,2) scan"], layouts["1 device"]
    assert scanned["losses"] == pytest.approx(reference["losses"], abs=1e-5, rel=1e-5)
    assert len({tuple(row) for row in reference["sampled"]}) > 16, "samples too uniform to compare generation"
    assert scanned["sampled"] == scanned["sampled_under_mesh"] == reference["sampled"]
    assert scanned["eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-5)
    gate = "['layers']['stacked']['mlp']['gate_proj']['kernel']"
    assert scanned["specs"][gate] == str(P(None, 'fsdp', 'tensor'))
    assert scanned["shard_shapes"][gate] == [2, 64, 256]


@pytest.mark.slow
def test_parameters_are_really_sharded(layouts):
    fsdp = layouts["(1,8,1)"]
    assert fsdp["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P('fsdp', None))
    assert fsdp["shard_shapes"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == [128 // 8, 512]
    hybrid = layouts["(2,2,2)"]
    assert hybrid["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P('fsdp', 'tensor'))
    assert hybrid["shard_shapes"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == [64, 256]
    data_only = layouts["(8,1,1)"]
    assert data_only["specs"]["['layers'][0]['mlp']['gate_proj']['kernel']"] == str(P(None, None))


@pytest.mark.slow
def test_fsdp_holds_about_one_eighth_per_device(layouts):
    fsdp = layouts["(1,8,1)"]
    # Only the norm scales stay replicated.
    assert fsdp["param_bytes_per_device"] < 0.16 * fsdp["param_bytes"]
    assert fsdp["opt_bytes_per_device"] < 0.16 * fsdp["opt_bytes"]
    assert layouts["(8,1,1)"]["param_bytes_per_device"] == layouts["(8,1,1)"]["param_bytes"]


@pytest.mark.slow
def test_checkpoint_from_one_layout_resumes_on_others(layouts, later_process):
    """Saved on (2,2,2) at step 3 (by the `layouts` process); resumed, each from its own copy, on (8,1,1) and on 1
    device by one fresh process that wrote neither: the loss curve continues."""
    reference = layouts["1 device"]["losses"]
    assert layouts["(2,2,2) stopped at 3"]["losses"] == pytest.approx(reference[:3], abs=1e-5)
    for shape, result in later_process["resumed"].items():
        assert result["losses"] == pytest.approx(reference[3:], abs=1e-5, rel=1e-5), shape


RAGGED = [((1, 1, 1, 1), 4), ((2, 2, 2, 8), 4), ((8, 1, 1, 8), 2)]


@pytest.fixture(scope="module")
def later_process(layouts, saved_on_222, tmp_path_factory) -> dict:
    """One process started after the `layouts` one (a process start costs more than a few steps): with ragged loss
    masks, the 1-device run without accumulation (key `None`) and each layout of `RAGGED`, each run's results and
    its initial and final weights (`ragged`); then the (2,2,2) checkpoint of `saved_on_222`, which this process did
    not write, resumed from its own copy on (8,1,1) and on 1 device (`resumed`)."""
    directory = tmp_path_factory.mktemp("later")
    runs = {None: (1, 1, 1, 1)} | {(shape, accumulation): (*shape, "--accumulation", accumulation)
                                    for shape, accumulation in RAGGED}
    paths = {key: directory / f"params{index}.npz" for index, key in enumerate(runs)}
    resumes = {(8, 1, 1, 8): directory / "a", (1, 1, 1, 1): directory / "b"}
    for copy in resumes.values():
        shutil.copytree(saved_on_222, copy)
    results = run_layouts(*((*flags, "--ragged", "--save-params", paths[key]) for key, flags in runs.items()),
                          *((*shape, "--output-dir", copy, "--resume") for shape, copy in resumes.items()))
    ragged = {key: (result, dict(np.load(paths[key]))) for key, result in zip(runs, results)}
    return {"ragged": ragged, "resumed": dict(zip(resumes, results[len(runs):]))}


@pytest.fixture(scope="module")
def ragged_runs(later_process) -> dict[tuple, tuple[dict, dict]]:
    return later_process["ragged"]


def relative_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    squares = lambda arrays: sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)
    return (squares([a - e for a, e in zip(actual, expected)]) / squares(expected)) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("shape, accumulation", RAGGED)
def test_ragged_masks_with_accumulation_on_any_layout_match_one_device(ragged_runs, shape, accumulation):
    """Rows supervise different numbers of tokens (some none): the step divides by the global count.

    Normalising per micro-batch or per device instead moves the losses by 0.5-2% (and per micro-batch
    the weight updates by 30%; checked once by breaking `steps.py` on purpose); float32 rounding stays
    below 1e-6 on both.
    """
    reference, reference_params = ragged_runs[None]
    assert all(0 < count < 0.75 * 16 * 32 for count in reference["num_tokens"]), reference["num_tokens"]
    assert len(set(reference["num_tokens"])) > 1
    result, params = ragged_runs[(shape, accumulation)]
    assert result["num_tokens"] == reference["num_tokens"]
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-6, rel=1e-5)
    assert params.keys() == reference_params.keys()
    finals = [name for name in params if name.startswith("final")]
    for name in finals:
        assert relative_error([params[name]], [reference_params[name]]) < 1e-5, name
    # The updates over all weights at once: norm scales near 1 put a single leaf's update at float32 spacing.
    update = lambda weights: [weights[name] - weights["initial" + name[len("final"):]] for name in finals]
    assert relative_error(update(params), update(reference_params)) < 1e-5


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ArgumentError, match="needs 6 devices but 8"):
        resolve_mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ArgumentError, match="not divisible"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ArgumentError, match="only one of fsdp_size and tensor_parallel_size may be -1"):
        resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": -1}, 8)


def test_logical_rules_replicate_what_does_not_divide():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 2, "tensor": 4}

    assert str(logical_to_spec(("embed", "mlp"), (128, 512), FakeMesh())) == str(P('fsdp', 'tensor'))
    assert str(logical_to_spec(("vocab", "embed"), (18, 128), FakeMesh())) == str(P(None, 'fsdp'))
    assert str(logical_to_spec(("norm",), (128,), FakeMesh())) == str(P(None,))


def constraint_specs(fn, *args) -> list[str]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [str(eqn.params["sharding"].spec) for eqn in jaxpr.eqns if eqn.primitive.name == "sharding_constraint"]


def test_activations_are_constrained_by_the_logical_rules():
    """Traced against a (2,2,2) mesh (no devices needed): residual, heads, MLP and logits are pinned, and
    every weight in use is pinned whole over data and fsdp, split over tensor."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model, ids_BT = init_model(config), jnp.zeros((4, 8), jnp.int32)
    mesh = AbstractMesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    batch = "('data', 'fsdp')"
    split = lambda specs: ([s for s in specs if batch in s], [s for s in specs if batch not in s])
    activations, weights = split(constraint_specs(with_activation_layout(model, mesh), ids_BT))
    # Residual, q/k/v, attention output, MLP hidden, residual, logits.
    assert activations == [f"P({batch}, None)", *[f"P({batch}, None, 'tensor', None)"] * 3, f"P({batch}, 'tensor')",
                           f"P({batch}, 'tensor')", f"P({batch}, None)", f"P({batch}, 'tensor')"]
    # Embedding table, q/k/v, o, gate/up, down, lm_head.
    rows, columns = "P('tensor', None)", "P(None, 'tensor')"
    assert weights == [rows, *[columns] * 3, rows, columns, columns, rows, columns]
    custom, _ = split(constraint_specs(with_activation_layout(model, mesh, (*DEFAULT_RULES, ("mlp", None))), ids_BT))
    assert custom[5] == f"P({batch}, None)" and custom[:5] == activations[:5], "rules choose the activation layout"
    assert constraint_specs(model, ids_BT) == [], "no mesh in context: no constraints"


@pytest.mark.slow
def test_activation_constraints_reach_the_trainers_compiled_step(layouts):
    assert layouts["1 device"]["constraints"] == 0
    for name in ("(8,1,1)", "(1,8,1)", "(2,4,1)", "(2,2,2)"):
        assert layouts[name]["constraints"] > 0, (
            f"{name}: the train step was traced without the mesh in context; BaseTrainer.configure_functions "
            "must wrap the steps in sharding.with_activation_layout")


class FakeDevice:
    def __init__(self, process_index: int):
        self.process_index = process_index


class FakeMesh:
    """What the check reads of a mesh: its axis names and its devices' processes."""

    def __init__(self, shape: tuple[int, int, int], processes: int):
        per_process = int(np.prod(shape)) // processes
        self.axis_names = MESH_AXES
        self.devices = np.array([FakeDevice(i // per_process) for i in range(int(np.prod(shape)))]).reshape(shape)


@pytest.mark.parametrize("shape, processes, shared", [
    ((2, 1, 4), 2, False), ((1, 2, 4), 2, False), ((8, 1, 1), 4, False),
    ((1, 1, 8), 2, True), ((1, 2, 4), 4, True), ((2, 1, 4), 4, True)])
def test_processes_that_would_hold_one_batch_shard_are_refused(shape, processes, shared):
    """Each process loads its own rows; processes holding copies of one batch shard (tensor parallelism across
    hosts) would feed it different rows: a silently wrong batch on 2 hosts x 4 devices with tensor=8."""
    from easytrain.trainers.builders import check_batch_shards_per_process

    mesh = FakeMesh(shape, processes)
    if not shared:
        check_batch_shards_per_process(mesh)
        return
    with pytest.raises(ArgumentError, match=r"tensor_parallel_size.*batch shard.*processes"):
        check_batch_shards_per_process(mesh)
