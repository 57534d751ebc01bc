"""One training step with per-example metrics on each of several mesh layouts, in turn in this process, and
NumPy's values for the same batch; one JSON line per layout.

    python metric_reduction.py DATA,FSDP,TENSOR,ACCUMULATION [...]

Each layout's mesh takes the first DATA x FSDP x TENSOR devices.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_extension_surface.py.
"""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from easytrain import BaseTrainer, LossOutput, TrainingArguments
from easytrain.losses import model_logits, token_cross_entropy_sums
from easytrain.metrics import Max, mean_over
from first_devices import layout_mesh


def ragged_mask(example_ids: np.ndarray, length: int) -> np.ndarray:
    """Each example supervises its last few tokens, a different number each; every 4th none."""
    supervised = (example_ids.astype(np.int64) * 7919 + 3) % (length + 1)
    supervised = np.where(example_ids % 4 == 0, 0, supervised)
    return (np.arange(length)[None, :] >= length - supervised[:, None]).astype(np.float32)


class PerExampleTrainer(BaseTrainer):
    def configure_mesh(self):
        return layout_mesh(self.arguments)

    def collate(self, rows, example_ids):
        batch = super().collate(rows, example_ids)
        batch["loss_mask"] = batch["loss_mask"] * ragged_mask(example_ids, batch["loss_mask"].shape[1])
        return batch

    def compute_loss(self, model, batch, rng, train, frozen):
        logits_BTV = model_logits(model, batch).astype(jnp.float32)
        loss_sum, count, _ = token_cross_entropy_sums(logits_BTV, batch["targets"], batch["loss_mask"])
        target_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], -1)[..., 0]
        nll_BT = jax.nn.logsumexp(logits_BTV, -1) - target_BT
        tokens_B = jnp.sum(batch["loss_mask"], -1)
        per_example_B = jnp.sum(nll_BT * batch["loss_mask"], -1) / jnp.maximum(tokens_B, 1.0)
        has_tokens_B = (tokens_B > 0).astype(jnp.float32)
        return LossOutput(loss_sum, count, {"per_example": mean_over(per_example_B, has_tokens_B),
                                            "max_example": Max(jnp.max(per_example_B))})


def run(layout: str, output_dir: str) -> dict:
    data, fsdp, tensor, accumulation = map(int, layout.split(","))
    args = TrainingArguments(output_dir=output_dir, max_length=16, train_batch_size=16, max_steps=1,
                             gradient_accumulation_steps=accumulation, data_parallel_size=data, fsdp_size=fsdp,
                             tensor_parallel_size=tensor, logging_steps=1, eval_strategy="no", save_strategy="no",
                             report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                             max_train_samples=64)
    trainer = PerExampleTrainer(args)
    batch = next(trainer.dataloaders.train.iterator(0))
    logits = np.asarray(jax.device_get(trainer.model(batch["input_ids"])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    tokens = mask.sum(-1)
    per_example = (nll * mask).sum(-1) / np.maximum(tokens, 1)
    logs = trainer.train()
    return {"layout": layout, "per_example": logs["per_example"], "max_example": logs["max_example"],
            "loss": logs["loss"], "numpy_per_example": float(per_example[tokens > 0].mean()),
            "numpy_max_example": float(per_example.max()), "numpy_per_token": float((nll * mask).sum() / mask.sum()),
            "mesh": dict(trainer.mesh.shape)}


if __name__ == "__main__":
    for layout in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(run(layout, scratch)), flush=True)
