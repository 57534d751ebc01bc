"""Per-device memory and step time of one model on several meshes of 8 CPU devices.

    python benchmarks/scaling.py [--steps 6]

The 6.3M-parameter Llama of `benchmarks/overhead.py`, global batch 16 × 256 tokens, AdamW. For each
mesh: bytes of parameters + optimizer state held by one device, and steady-state step time (the
second logging window; the first holds compilation). Prints one JSON line. On 2 physical cores the
8 "devices" share the same cores, so step times show the cost of each layout's communication and
layout changes, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from easytrain import BaseTrainer, TrainingArguments  # noqa: E402
from easytrain.models import init_model  # noqa: E402
from easytrain.tasks import build_arithmetic_tokenizer  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2)]
BATCH, LENGTH = 16, 256


def per_device_bytes(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def measure(mesh: tuple[int, int, int], blocks: np.ndarray, steps: int) -> dict:
    data, fsdp, tensor = mesh
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="easytrain-scaling-"), max_length=LENGTH, train_batch_size=BATCH,
        max_steps=2 * steps, logging_steps=steps, learning_rate=3e-4, lr_scheduler_type="constant",
        eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
        save_pretrained_at_end=False, validation_split_percentage=0,
        data_parallel_size=data, fsdp_size=fsdp, tensor_parallel_size=tensor)
    trainer = BaseTrainer(arguments, model=init_model(transformers.LlamaConfig(**CONFIG)),
                          tokenizer=build_arithmetic_tokenizer(),
                          dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}))
    logs = trainer.train()
    state = trainer.state
    return {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
            "param_bytes_total": sum(leaf.nbytes for leaf in jax.tree.leaves(state.params)),
            "opt_bytes_total": sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state)),
            "param_bytes_per_device": per_device_bytes(state.params),
            "opt_bytes_per_device": per_device_bytes(state.opt_state),
            "step_seconds": round(BATCH * LENGTH / logs["tokens_per_second"], 4),
            "first_step_seconds": round(trainer.loop.compile_seconds, 2), "loss": round(logs["loss"], 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    options = parser.parse_args(argv)
    blocks = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (BATCH * 8, LENGTH + 1)).astype(np.int32)
    results = [measure(mesh, blocks, options.steps) for mesh in MESHES]
    output = {"benchmark": "scaling", "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
              "meshes": results}
    print(json.dumps(output))
    return output


if __name__ == "__main__":
    main()
