"""Throughput and efficiency logs: the FLOP count against a hand count, padding efficiency against a
NumPy count, the peak table, and short runs that log step_time, padding_efficiency, mfu, tokens_per_second over
the real (unpadded) tokens only, and the epoch as the fraction of an epoch done."""

import time

import numpy as np
import pytest
import transformers
from flax import nnx

from easytrain import BaseTrainer, TrainingArguments
from easytrain import flops
from easytrain.data.packing import PaddedCollate, pack_examples, packed_collate
from easytrain.models import init_model
from easytrain.throughput import BatchCounts, token_slots, window_logs
from runs import logged


def hand_config(**overrides) -> transformers.PretrainedConfig:
    fields = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.AutoConfig.for_model(**({"model_type": "llama"} | fields | overrides))


# ------------------------------------------------------------------------------------ model FLOPs
def test_training_flops_per_token_matches_a_hand_count():
    # Per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192 (head_dim 2, 2 kv heads); MLP 3 * 8x16 = 384.
    # Two layers 1152, output head 8x10 = 80: 1232 matmul weights. Attention: 12 * 2 layers * 8 wide * 5.
    config = hand_config()
    assert flops.matmul_params(config) == 1232
    assert flops.attention_flops_per_token(config, 5) == 960
    assert flops.training_flops_per_token(config, 5) == 6 * 1232 + 960 == 8352
    # Mistral's sliding window of 3 positions: each layer attends to 3 keys, not 5.
    mistral = hand_config(model_type="mistral", sliding_window=3)
    assert flops.attention_flops_per_token(mistral, 5) == 12 * 2 * 8 * 3
    assert flops.attention_flops_per_token(mistral, 2) == 12 * 2 * 8 * 2
    # head_dim wider than hidden / heads widens every projection and the attention term.
    wide = hand_config(head_dim=3)
    assert flops.matmul_params(wide) == 2 * (2 * 8 * 12 + 2 * 8 * 6 + 384) + 80
    assert flops.attention_flops_per_token(wide, 5) == 12 * 2 * 12 * 5


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_are_the_models_kernels(tied):
    """Every kernel of the built model, plus the embedding when it doubles as the output head."""
    config = hand_config(tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
    params = nnx.to_flat_state(nnx.state(init_model(config), nnx.Param))
    kernels = sum(value.value.size for path, value in params if path[-1] == "kernel")
    embedding = config.vocab_size * config.hidden_size
    assert flops.matmul_params(config) == kernels + (embedding if tied else 0)


def test_model_flops_count_each_batch_at_its_own_length(tmp_path):
    """The per-token count depends on the sequence length (attention): a padded run's buckets differ."""
    trainer = BaseTrainer(tiny_args(tmp_path))
    trainer.model_config = hand_config()  # what setup would build; no module yet: every weight is trained
    for rows, length in ((4, 16), (2, 32), (4, 16)):
        batch = {"input_ids": np.zeros((rows, length), np.int32)}
        per_token = flops.training_flops_per_token(trainer.model_config, length)
        assert trainer.model_flops(batch) == per_token * rows * length, length


# ------------------------------------------------------------------------------------ padding efficiency
EXAMPLE_LENGTHS = np.array([5, 9, 3, 12, 7, 4])  # tokens per example: n tokens give n - 1 positions


def examples():
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 50, length).tolist() for length in EXAMPLE_LENGTHS]
    return {"input_ids": ids, "loss_mask": [[0] + [1] * (length - 1) for length in EXAMPLE_LENGTHS]}


def test_padding_efficiency_of_a_padded_batch_is_the_numpy_count():
    rows = examples()
    batch = PaddedCollate(buckets=(16,))({key: np.array(value, dtype=object) for key, value in rows.items()},
                                         np.arange(len(EXAMPLE_LENGTHS)))
    assert batch["input_ids"].shape == (6, 16)
    assert token_slots(batch) == ((EXAMPLE_LENGTHS - 1).sum(), 6 * 16) == (34, 96)


def test_padding_efficiency_of_a_packed_batch_is_the_numpy_count():
    packed = pack_examples(examples(), 16)
    batch = packed_collate(packed.rows, np.arange(len(packed.rows["input_ids"])))
    rows = batch["input_ids"].shape[0]
    assert rows < len(EXAMPLE_LENGTHS), "examples share rows"
    real, slots = token_slots(batch)
    assert (real, slots) == ((EXAMPLE_LENGTHS - 1).sum(), rows * 16)
    assert real / slots > 34 / 96, "packing wastes less than padding"


def test_token_slots_count_attended_or_supervised_positions():
    ids = np.zeros((2, 4), np.int32)
    attended = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    supervised = np.array([[0, 0, 1, 0], [0, 1, 1, 0]])  # position (0, 2) supervised but not attended
    assert token_slots({"input_ids": ids, "attention_mask": attended, "loss_mask": supervised}) == (6, 8)
    assert token_slots({"input_ids": ids}) == (8, 8), "no mask: no padding"
    assert token_slots({"x": np.ones((4, 2))}) == (0, 0), "not a token batch"


# ------------------------------------------------------------------------------------ peak and window
def test_the_peak_table_knows_the_accelerators_by_device_kind():
    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
                "NVIDIA A100-SXM4-80GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
                "TPU v5p": 459e12, "TPU v6 lite": 918e12}
    assert {kind: flops.table_peak(kind) for kind in expected} == expected
    assert flops.table_peak("NVIDIA GeForce GTX 1080") is None
    assert flops.table_peak("cpu") is None


def test_the_cpu_peak_is_a_measured_matmul_rate_measured_once():
    peak = flops.hardware_peak()
    assert peak.source == flops.MEASURED_CPU_SOURCE
    assert 1e8 < peak.flops_per_second < 1e14, peak
    assert flops.hardware_peak() is peak  # cached: the same object
    measured = flops.measured_cpu_matmul_flops.cache_info().misses
    flops.hardware_peak.cache_clear()  # looked up again: the rate is read from the first measurement
    assert flops.hardware_peak() == peak
    assert flops.measured_cpu_matmul_flops.cache_info().misses == measured >= 1


def test_window_logs_by_hand():
    counts = [BatchCounts(tokens=30, real_tokens=30, token_slots=40, model_flops=1e6)] * 4
    logs = window_logs(counts, seconds=2.0, rows_per_step=8, process_count=2, peak=lambda: flops.PeakFlops(1e7, "x"))
    assert logs == pytest.approx({"step_time": 0.5, "tokens_per_second": 4 * 30 * 2 / 2.0,
                                  "samples_per_second": 4 * 8 / 2.0, "padding_efficiency": 0.75,
                                  "mfu": 4 * 1e6 * 2 / 2.0 / 1e7})

    def no_peak():
        raise AssertionError("the peak is not needed without model FLOPs")

    assert sorted(window_logs([BatchCounts()] * 2, seconds=1.0, rows_per_step=4, process_count=1,
                              peak=no_peak)) == ["samples_per_second", "step_time"]


# ------------------------------------------------------------------------------------ a short run
def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                  max_steps=6, logging_steps=3, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                  max_eval_samples=16)
    return TrainingArguments(**(values | overrides))


class HostOnly(BaseTrainer):
    """Records the types the efficiency hooks see: host (NumPy) batches, never device arrays."""

    def __init__(self, arguments):
        super().__init__(arguments)
        self.seen: set[type] = set()

    def count_token_slots(self, batch):
        self.seen |= {type(value) for value in batch.values()}
        return super().count_token_slots(batch)

    def model_flops(self, batch):
        self.seen |= {type(value) for value in batch.values()}
        return super().model_flops(batch)


def test_a_short_run_logs_step_time_padding_efficiency_mfu_and_a_fractional_epoch(tmp_path):
    args = tiny_args(tmp_path)
    trainer = HostOnly(args)
    trainer.train()
    assert trainer.seen == {np.ndarray}, "counted on the host: no device value is read between logs"
    field = {key: logged(args.output_dir, key) for key in ("step_time", "padding_efficiency", "mfu",
                                                            "tokens_per_second", "samples_per_second", "peak_flops",
                                                            "epoch")}
    assert field["epoch"] == pytest.approx({3: 3 / 8, 6: 6 / 8}), "64 rows, 8 a step: step / 8 (docs/metrics.md)"
    assert sorted(field["mfu"]) == [3, 6]
    peak = flops.hardware_peak().flops_per_second
    assert field["peak_flops"] == {3: peak}, "the denominator, once"
    per_token = flops.training_flops_per_token(trainer.model_config, 32)
    for step in (3, 6):
        assert field["step_time"][step] > 0
        assert field["step_time"][step] * field["samples_per_second"][step] == pytest.approx(8)
        assert field["padding_efficiency"][step] == 1.0, "token blocks have no padding"
        # Below 1 on an idle CPU (about 0.3 on two cores); the bound is loose because the CPU peak is measured
        # once per process and reads low if other work shares the cores at that moment.
        assert 0 < field["mfu"][step] < 5
        assert field["mfu"][step] == pytest.approx(per_token * field["tokens_per_second"][step] / peak)


def test_evaluation_time_is_not_step_time(tmp_path):
    def slow_evaluator(trainer):
        time.sleep(0.5)
        return {}

    args = tiny_args(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=1)
    BaseTrainer(args, evaluators=[slow_evaluator]).train()
    step_times = logged(args.output_dir, "step_time")
    assert sorted(step_times) == [2, 4]
    assert all(0 < value < 0.5 for value in step_times.values()), step_times


def test_a_module_without_tokens_logs_no_token_efficiency(tmp_path):
    class NoTokens(BaseTrainer):
        def collate(self, rows, example_ids):
            batch = super().collate(rows, example_ids)
            return {"tokens": batch.pop("input_ids"), **batch}

        def compute_loss(self, model, batch, rng, train, frozen):
            return super().compute_loss(model, {**batch, "input_ids": batch["tokens"]}, rng, train, frozen)

    args = tiny_args(tmp_path, max_steps=2, logging_steps=2)
    logs = NoTokens(args).train()
    assert logs["step_time"] > 0
    assert not {"padding_efficiency", "mfu", "tokens_per_second"} & set(logs)


def test_a_padded_sft_run_logs_the_padding_and_the_real_tokens_of_its_batches(tmp_path):
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    args = tiny_args(tmp_path, max_length=64, max_steps=2, logging_steps=2)
    trainer = SFTTrainer(args, SFTArguments(packing=False))
    logs = trainer.train()
    iterator = trainer.dataloaders.train.iterator(0)
    batches = [next(iterator) for _ in range(2)]  # the same two batches, in the same order
    iterator.close()
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    slots = sum(batch["input_ids"].size for batch in batches)
    assert real < slots, "padded rows"
    assert logs["padding_efficiency"] == pytest.approx(real / slots)
    assert [trainer.count_tokens(batch) for batch in batches] == [batch["attention_mask"].sum() for batch in batches]
    assert logs["tokens_per_second"] * logs["step_time"] * 2 == pytest.approx(real), "real tokens, not slots"
    assert logs["mfu"] > 0
