"""DPOTrainer end to end: ln 2 at the start, the three kinds of reference, padding invariance, layouts and
accumulation, TR-DPO, the CLI and the metrics."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpo_fixtures import stopped_copy
from easytrain import TrainingArguments
from easytrain.checkpoint import CheckpointManager
from easytrain.cli import main
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import child_env, logged, long_training_env, xla_flags

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=8, eval_batch_size=8,
                  max_steps=3, learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=32, max_eval_samples=8)
    values.update(overrides)
    return TrainingArguments(**values)


def live_bytes() -> int:
    gc.collect()  # trainers of earlier tests hold device arrays until collected
    return sum(array.nbytes for array in jax.live_arrays())


def test_starts_at_ln2_and_online_and_precomputed_references_agree(tmp_path):
    online = DPOTrainer(tiny_args(tmp_path / "online"))
    online_logs = online.train()
    assert set(METRICS) <= set(online_logs)
    assert "reference" in online.state.frozen
    precomputed = DPOTrainer(tiny_args(tmp_path / "pre"), DPOArguments(precompute_ref_log_probs=True))
    assert precomputed.state.frozen == {}, "no reference parameters in the train state"
    precomputed.train()
    first, second = logged(tmp_path / "online" / "run"), logged(tmp_path / "pre" / "run")
    assert first[1] == pytest.approx(np.log(2), abs=1e-6)
    for step in first:
        assert second[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6), step


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_precomputed_log_probs_are_cached_reused_and_free_the_reference(tmp_path):
    first = DPOTrainer(tiny_args(tmp_path / "b"), DPOArguments(precompute_ref_log_probs=True))
    baseline = live_bytes()
    first.setup()
    without_reference = live_bytes() - baseline
    frozen = DPOTrainer(tiny_args(tmp_path / "a"))
    baseline = live_bytes()
    frozen.setup()
    with_reference = live_bytes() - baseline
    params = sum(leaf.nbytes for leaf in jax.tree.leaves(first.state.params))
    assert with_reference - without_reference >= 0.9 * params, (with_reference, without_reference, params)
    assert first.reference_logps_cached == {"train": False, "validation": False}
    again = DPOTrainer(tiny_args(tmp_path / "b", overwrite_output_dir=True),
                       DPOArguments(precompute_ref_log_probs=True))
    again.setup()
    assert again.reference_logps_cached == {"train": True, "validation": True}, "same data and reference: cached"
    other = DPOTrainer(tiny_args(tmp_path / "b", overwrite_output_dir=True, max_train_samples=24),
                       DPOArguments(precompute_ref_log_probs=True))
    other.setup()
    assert other.reference_logps_cached == {"train": False, "validation": True}, "other data: recomputed"


def test_cached_log_probs_are_not_reused_under_another_compute_dtype(tmp_path):
    """Reference log-probs computed in float32 are not those of the bfloat16 reference a bfloat16 run has."""
    first = DPOTrainer(tiny_args(tmp_path), DPOArguments(precompute_ref_log_probs=True))
    first.setup()
    assert first.reference_logps_cached == {"train": False, "validation": False}
    half = DPOTrainer(tiny_args(tmp_path, overwrite_output_dir=True, dtype="bfloat16"),
                      DPOArguments(precompute_ref_log_probs=True))
    half.setup()
    assert half.reference_logps_cached == {"train": False, "validation": False}, "other compute dtype: recomputed"


def test_pair_log_probs_do_not_depend_on_padding_or_batch_company(tmp_path):
    import datasets

    turn = lambda role, content: [{"role": role, "content": content}]
    pairs = [{"prompt": turn("user", "12+3"), "chosen": turn("assistant", "15"), "rejected": turn("assistant", "16")},
             {"prompt": turn("user", "1" * 30 + "+1"), "chosen": turn("assistant", "2"),
              "rejected": turn("assistant", "3")}] * 8
    trainer = DPOTrainer(tiny_args(tmp_path, max_length=64, max_train_samples=None, validation_split_percentage=0,
                                   eval_strategy="no"), dataset_train=datasets.Dataset.from_list(pairs),
                         tokenizer=build_arithmetic_chat_tokenizer())
    rows = trainer.dataset_train
    alone = trainer.collate(rows[[0]], np.array([0]))
    longest = int(np.argmax(rows["length"]))
    together = trainer.collate(rows[[0, longest]], np.array([0, longest]))
    assert together["input_ids"].shape[-1] > alone["input_ids"].shape[-1], "the company pads pair 0 further"
    model = trainer.model
    a = np.asarray(trainer.pair_logps(model, alone)[0])[0]
    b = np.asarray(trainer.pair_logps(model, together)[0])[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


#: Every layout the two mesh tests compare, as `DATA,FSDP,TENSOR,ACCUMULATION[,LORA_RANK]`.
LAYOUTS = ("1,1,1,1", "2,2,2,4", "1,1,1,4", "1,1,1,1,4", "2,2,2,2,4")
#: Also run by that process: the small eval set on 8 devices (`small_set`).
WORKER_RUNS = (*LAYOUTS, "small-set")


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict]:
    """Three DPO steps on each layout, and the small eval set, all in one 8-device process
    (tests/workers/dpo_layout.py)."""
    env = child_env(XLA_FLAGS=xla_flags(8))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "dpo_layout.py"), *WORKER_RUNS],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    return {result["layout"]: {key: np.asarray(value) if key == "values" else value for key, value in result.items()}
            for result in results}


@pytest.mark.slow
def test_a_mesh_and_accumulation_give_the_full_batch_curve(layouts):
    reference = layouts["1,1,1,1"]
    assert reference["devices"] == 1 and layouts["2,2,2,4"]["devices"] == 8
    assert not np.allclose(reference["values"][0], reference["values"][-1]), "the steps must move the model"
    for layout in ("2,2,2,4", "1,1,1,4"):
        np.testing.assert_allclose(layouts[layout]["values"], reference["values"], rtol=1e-4, atol=1e-5,
                                   err_msg=layout)


@pytest.mark.slow
def test_lora_dpo_on_fsdp_and_tensor_mesh_gives_the_one_device_curve_with_adapters_split_like_their_kernel(layouts):
    reference, layout = layouts["1,1,1,1,4"], layouts["2,2,2,2,4"]
    assert not np.allclose(reference["values"][0], reference["values"][-1]), "the steps must move the adapters"
    np.testing.assert_allclose(layout["values"], reference["values"], rtol=1e-4, atol=1e-5)
    assert layout["specs"] == {"kernel": str(P("fsdp", "tensor")), "lora_a": str(P("fsdp", None)),
                               "lora_b": str(P(None, "tensor")), "frozen": []}


def test_tr_dpo_moves_the_reference_inside_the_compiled_train_step(tmp_path):
    """One program per update: the memory plan, and anyone calling `functions.train_step`, get the sync too."""
    options = DPOArguments(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.25)
    trainer = DPOTrainer(tiny_args(tmp_path), options)
    initial = jax.tree.map(np.asarray, trainer.state.frozen["reference"])
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    state, _ = trainer.functions.train_step(trainer.state, batch)  # update 1: the reference stays
    for r, r0 in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(r), r0)
    state, _ = trainer.functions.train_step(state, batch)  # update 2: reference <- 0.25 policy + 0.75 reference
    moved = [np.asarray(r) for r in jax.tree.leaves(state.frozen["reference"])]
    for p, r, r0 in zip(jax.tree.leaves(state.params), moved, jax.tree.leaves(initial)):
        np.testing.assert_allclose(r, 0.25 * np.asarray(p) + 0.75 * r0, rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(r, r0) for r, r0 in zip(moved, jax.tree.leaves(initial)))


def test_tr_dpo_resumes_exactly_between_two_syncs(tmp_path):
    """Cut at step 3 (synced at 2, next at 4): the checkpoint must hold the moved reference."""
    common = dict(max_steps=5, save_strategy="steps", save_steps=3)
    options = DPOArguments(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    straight = DPOTrainer(tiny_args(tmp_path / "straight", **common), options)
    straight.train()
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=3)
    keys = CheckpointManager(tmp_path / "cut" / "run" / "checkpoints").stored_signature(3)
    assert any(key.startswith("frozen.reference.") for key in keys)
    resumed = DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common), options)
    resumed.train()
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")
    for ours, theirs in zip(jax.tree.leaves(resumed.state.frozen["reference"]),
                            jax.tree.leaves(straight.state.frozen["reference"])):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_resume_with_a_precomputed_reference_never_recomputes(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    options = DPOArguments(precompute_ref_log_probs=True)
    DPOTrainer(tiny_args(tmp_path / "straight", **common), options).train()
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=2)
    resumed = DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common), options)
    resumed.train()
    assert resumed.reference_logps_cached == {"train": True, "validation": True}
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")


def test_the_cli_runs_a_weighted_loss_combination(tmp_path, capsys):
    assert main(["train", "--task", "dpo", "--help"]) == 0
    assert "--loss_type" in capsys.readouterr().out
    status = main(["train", "--task", "dpo", "--output_dir", str(tmp_path), "--max_steps", "2", "--max_length", "16",
                   "--train_batch_size", "8", "--max_train_samples", "16", "--max_eval_samples", "8",
                   "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5", "--beta", "0.2",
                   "--report_to", "none", "--disable_progress_bar", "--no_save_pretrained_at_end"])
    assert status == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert all(f"eval_{name}" in summary for name in METRICS)


def test_bad_options_fail_with_the_field_named():
    from easytrain import ArgumentError

    with pytest.raises(ArgumentError, match="loss_type.*unknown loss"):
        DPOArguments(loss_type=["sigmod"])
    with pytest.raises(ArgumentError, match="loss_weights"):
        DPOArguments(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ArgumentError, match="sync_ref_model"):
        DPOArguments(sync_ref_model=True, precompute_ref_log_probs=True)


def test_long_pairs_fill_all_max_length_positions_after_a_prompt_of_max_prompt_length(tmp_path):
    """max_length counts positions: a long sequence keeps max_length + 1 tokens, max_length (input, target) pairs
    (TRL's max_length N is `--max_length N-1`, docs/dpo.md), and its prompt is cut to max_prompt_length though
    max_length has room for more. Checked on the batch, without a model."""
    rows = datasets.Dataset.from_list([{"prompt": "1+2=3 " * 10, "chosen": "4" * 30, "rejected": "5" * 30}] * 8)
    trainer = DPOTrainer(tiny_args(tmp_path, validation_split_percentage=0), DPOArguments(max_prompt_length=4),
                         tokenizer=build_arithmetic_chat_tokenizer(), dataset_train=rows)
    train, _ = trainer.prepare_datasets()
    assert set(train["prompt_length"]) == {4}
    batch = trainer.collate(train[:2], np.arange(2))
    assert batch["input_ids"].shape == (2, 2, 16) and batch["attention_mask"].all()
    assert (batch["loss_mask"][..., :3] == 0).all() and batch["loss_mask"][..., 3:].all()  # target 3: token 4


def test_the_example_raises_reward_accuracy_and_margins(tmp_path):
    # SFT long enough that the policy has learnt the task whatever the seed (TrainingArguments' seed: the initial
    # weights' draws), or DPO cannot keep an exact match it never had; and a policy that has learnt it all gives
    # DPO's reward accuracy and margins room above the thresholds. 450 steps of 16 rows left the exact match at
    # 0.59-0.66 for seed 5 and seed 4's reward accuracy at 0.69 (margin 0.03); 8 rows a step learn more per row
    # (seed 5 at 0.99 token accuracy after 700 steps), and at 900 steps of 8 + 200 DPO steps over seeds 1-7 and 42:
    # exact match 1.0 before and after DPO, reward accuracy 0.84-0.97, margins 0.105-0.23 (2026-12-08).
    # In a child compiled at -O1 with the fusion emitters (tests/runs.py): at the suite's -O0 it steps twice as slow.
    # Each model the example reports is evaluated once: the SFT model (DPO's start), and DPO's last update.
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "example_evaluations.py"),
                           str(ROOT / "examples" / "dpo_arithmetic.py"), "--output_dir", str(tmp_path),
                           "--sft_steps", "900", "--sft_batch_size", "8", "--dpo_steps", "200",
                           "--eval_samples", "32"],
                          capture_output=True, text=True, env=long_training_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reward_accuracy_before"] == 0.0 and result["margin_before"] == 0.0  # policy == reference
    assert result["reward_accuracy_after"] > 0.75 and result["margin_after"] > 0.04
    assert result["exact_match_after"] > 0.75  # the SFT term keeps right answers likely
    assert result["evaluated"] == [["DPOTrainer", 0], ["DPOTrainer", 200]], result["evaluated"]


def test_lora_dpo_from_a_trained_adapter_starts_at_the_initial_policy(tmp_path):
    """`lora_adapter_path` (SFT adapter, then DPO): the reference is the base with that adapter as loaded, online
    (a copy of the adapter's values, kept over a resume) and precomputed, so the first step is ln 2 with no reward."""
    from easytrain import lora
    from easytrain.models import from_pretrained
    from easytrain.models.peft_io import save_peft_adapter
    from lora_models import randomise_adapters
    from test_lora_trainer import write_base

    base = write_base(tmp_path / "base")
    config = lora.LoRAConfig(rank=4, alpha=8)
    model = lora.apply_lora(from_pretrained(base), config, rngs=1)
    randomise_adapters(model, scale=0.3)
    adapter = str(save_peft_adapter(tmp_path / "sft_adapter", model, config, str(base)))
    common = dict(model_name_or_path=str(base), lora_adapter_path=adapter, max_steps=3, save_strategy="steps",
                  save_steps=1)
    online = DPOTrainer(tiny_args(tmp_path / "online", **common))
    online.train()
    precomputed = tiny_args(tmp_path / "pre", **{**common, "max_steps": 1})
    DPOTrainer(precomputed, DPOArguments(precompute_ref_log_probs=True)).train()
    for run in ("online", "pre"):
        assert logged(tmp_path / run / "run")[1] == pytest.approx(np.log(2), abs=1e-6), run
        for name in ("rewards/chosen", "rewards/rejected"):
            assert logged(tmp_path / run / "run", name)[1] == pytest.approx(0.0, abs=1e-6), (run, name)
    assert set(online.state.frozen) == {"initial_adapters"}, "no second copy of the base, only of the adapter"
    stopped_copy(tmp_path / "online" / "run", tmp_path / "cut" / "run", step=1)
    DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common)).train()
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "online" / "run")


@pytest.mark.slow
def test_precomputed_reference_log_probs_of_a_set_smaller_than_a_batch_on_a_mesh(layouts):
    """12 eval rows, eval_batch_size 16, 8 data-parallel devices: the precomputing pass shrank its batch to the 12
    rows, which 8 devices cannot split (IndivisibleError); the trainer's own eval batches pad to a multiple of 8.
    Run in the 8-device process of `layouts` (tests/workers/dpo_layout.py `small_set`)."""
    result = layouts["small-set"]
    assert "error" not in result, result.get("error")
    losses = result["losses"]
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)


def test_a_new_eval_set_after_training_a_given_module_is_refused_not_scored_against_the_policy(tmp_path):
    """Precomputed reference log-probs of a set first seen after training need the initial policy; the module passed
    as `model=` holds the trained weights by then, so scoring against a copy of it made every reward 0 (eval loss
    ln 2 exactly): refused, naming the fixes."""
    import datasets

    from easytrain import ArgumentError
    from easytrain.models.llama import init_model
    from model_configs import tiny_config

    trainer = DPOTrainer(tiny_args(tmp_path, max_steps=2), DPOArguments(precompute_ref_log_probs=True),
                         model=init_model(tiny_config(), seed=7))
    trainer.train()
    later = datasets.Dataset.from_dict({"prompt": ["12+7=", "3+4="], "chosen": ["19", "7"], "rejected": ["91", "8"]})
    with pytest.raises(ArgumentError, match=r"model=.*trained weights.*dataset_eval"):
        trainer.evaluate(later)
