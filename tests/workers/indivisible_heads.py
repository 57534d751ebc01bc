"""Train 3 steps of a model whose attention heads tensor parallelism does not divide (6 query / 2 key-value heads
on tensor=4, the projections' width 96 divisible all the same), on one device and on tensor=4, and print as JSON
the losses of both, the attention kernels' specs and the all-gathers in the compiled tensor=4 train step.

    python indivisible_heads.py

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_indivisible_sharding.py.
"""

import json
import re
import sys
import tempfile
from pathlib import Path

import jax

from easytrain import BaseTrainer, Callback, TrainingArguments
from easytrain.sharding import make_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_configs import tiny_config  # noqa: E402

GATHER = re.compile(r"= \S+ all-gather(?:-start)?\(")


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_log(self, trainer, step, logs):
        if "loss" in logs:
            self.losses.append(logs["loss"])


def run(config_path: str, tensor: int, output_dir: str) -> dict:
    args = TrainingArguments(
        output_dir=output_dir, model_config=config_path, save_strategy="no", max_steps=3, max_length=16,
        train_batch_size=8, logging_steps=1, eval_strategy="no", report_to=["none"], disable_progress_bar=True,
        save_pretrained_at_end=False, max_train_samples=32, warmup_steps=0, optimizer="sgd", learning_rate=0.3,
        data_parallel_size=1, fsdp_size=1, tensor_parallel_size=tensor)

    class Trainer(BaseTrainer):
        def configure_mesh(self):
            return make_mesh(1, 1, tensor, devices=jax.devices()[:tensor])

    trainer = Trainer(args)
    losses = Losses()
    trainer.callbacks.add(losses)
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    hlo = trainer.functions.train_step.lower(trainer.state, batch).compile().as_text()
    specs = {jax.tree_util.keystr(path, simple=True, separator="."): str(leaf.sharding.spec)
             for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.state.params) if "self_attn" in str(path)}
    trainer.train()
    return {"losses": losses.losses, "all_gathers": len(GATHER.findall(hlo)), "specs": specs}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                             num_hidden_layers=1).to_dict()
        config.pop("vocab_size")  # the tokenizer's
        path = Path(tmp, "config.json")
        path.write_text(json.dumps(config))
        one = run(str(path), 1, str(Path(tmp, "one")))
        four = run(str(path), 4, str(Path(tmp, "four")))
    print(json.dumps({"one": one, "four": four}))


if __name__ == "__main__":
    main()
