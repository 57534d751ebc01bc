"""Change the objective by overriding one method: `compute_loss`.

    python examples/custom_loss.py --output_dir runs/zloss

Adds the auxiliary z-loss (a penalty on log Z, the log of the softmax normaliser, which keeps
logits from drifting) to next-token cross-entropy, and logs it as its own metric. Everything else
(accumulation, sharding, checkpoints, logging) is inherited.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from easytrain import BaseTrainer, LossOutput, TrainingArguments, token_cross_entropy_sums
from easytrain.losses import model_logits
from easytrain.metrics import Mean, Sum


class ZLossTrainer(BaseTrainer):
    """Cross-entropy + `z_weight * log(Z)^2`, both summed over supervised tokens."""

    z_weight = 1e-4

    def compute_loss(self, model, batch, rng, train: bool, frozen) -> LossOutput:
        logits_BTV = model_logits(model, batch)
        loss_sum, count, correct = token_cross_entropy_sums(logits_BTV, batch["targets"], batch["loss_mask"])
        log_z_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
        z_sum = jnp.sum(jnp.square(log_z_BT) * batch["loss_mask"])
        metrics = {"num_tokens": Sum(count), "accuracy": Mean(correct, count), "z_loss": Mean(z_sum, count)}
        return LossOutput(loss_sum + self.z_weight * z_sum, count, metrics)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/zloss")
    parser.add_argument("--max_steps", type=int, default=300)
    options = parser.parse_args(argv)
    arguments = TrainingArguments(output_dir=options.output_dir, max_steps=options.max_steps, learning_rate=3e-3,
                                  train_batch_size=16, warmup_steps=20, overwrite_output_dir=True)
    logs = ZLossTrainer(arguments).train()  # the embedded arithmetic task: no dataset needed
    weight, mean_square_log_z = ZLossTrainer.z_weight, logs["z_loss"]  # the metric is log(Z)^2, unweighted
    print(f"loss {logs['loss']:.3f} per token, of which the z-term {weight:g} x mean log(Z)^2 "
          f"{mean_square_log_z:.2f} = {weight * mean_square_log_z:.5f}")
    return logs


if __name__ == "__main__":
    main()
