"""Model FLOPs of a run whose base is frozen (LoRA): a frozen weight costs its forward and the gradient of its
input (4 per token), a trained one also its own gradient (6), checked against a hand count."""

import numpy as np
import transformers
from flax import nnx
import pytest

from easytrain import BaseTrainer, TrainingArguments, flops
from easytrain.models import init_model

LENGTH = 16
BATCH = {"input_ids": np.zeros((2, LENGTH), np.int32)}


def tiny_trainer(tmp_path, **overrides) -> BaseTrainer:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                  max_steps=2, eval_strategy="no", save_strategy="no", report_to=[], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    trainer = BaseTrainer(TrainingArguments(**(values | overrides)))
    trainer.setup()
    return trainer


def hand_counts(config, rank: int, targets: tuple[str, ...], train_head: bool) -> tuple[int, int]:
    """(trained, frozen) matmul weights, from the config's widths: NumPy shapes of every projection."""
    head_dim = config.hidden_size // config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (hidden, config.num_attention_heads * head_dim),
              "k_proj": (hidden, config.num_key_value_heads * head_dim),
              "v_proj": (hidden, config.num_key_value_heads * head_dim),
              "o_proj": (config.num_attention_heads * head_dim, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    layers = config.num_hidden_layers
    base = layers * sum(int(np.prod(shape)) for shape in shapes.values())
    adapters = layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)
    head = hidden * config.vocab_size
    assert not config.tie_word_embeddings, "the hand count assumes a separate output head"
    return (adapters + head, base) if train_head else (adapters, base + head)


def per_token(config, trained: int, frozen: int) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * LENGTH
    return 6 * trained + 4 * frozen + attention


def test_a_fully_trained_model_counts_six_flops_per_weight(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trained, frozen = hand_counts(trainer.model_config, 0, (), train_head=True)
    expected = per_token(trainer.model_config, trained + frozen, 0) * BATCH["input_ids"].size
    assert trainer.model_flops(BATCH) == expected
    assert trainer.model_flops(BATCH) == flops.training_flops_per_token(trainer.model_config, LENGTH) * 2 * LENGTH


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_a_frozen_base_costs_four_flops_per_weight_and_the_adapters_six(tmp_path, train_embeddings):
    targets = ("q_proj", "v_proj")
    trainer = tiny_trainer(tmp_path, lora_rank=4, lora_target_modules=list(targets),
                           lora_train_embeddings=train_embeddings)
    trained, frozen = hand_counts(trainer.model_config, 4, targets, train_head=train_embeddings)
    assert trainer.model_flops(BATCH) == per_token(trainer.model_config, trained, frozen) * BATCH["input_ids"].size


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_weights_split_the_configs_count_by_the_trainable_filter(tied):
    config = transformers.AutoConfig.for_model("llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=tied)
    model = init_model(config)
    everything = flops.matmul_params(config)
    assert flops.matmul_weights(model, nnx.Param, tied) == (everything, 0)
    assert flops.matmul_weights(model, nnx.Nothing, tied) == (0, everything)
    head = nnx.PathContains("embed_tokens" if tied else "lm_head")
    assert flops.matmul_weights(model, head, tied) == (80, everything - 80)
