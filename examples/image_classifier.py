"""Train a small convolutional image classifier through `BaseTrainer`: not a language model.

The trainer overrides public hooks only (the rows, the batch layout, the module, the loss and the
export); sharding, accumulation, checkpoints, exact resume, evaluation and logs are inherited.
The images are generated here: 16x16 strokes (horizontal, vertical, diagonal, anti-diagonal) at
random places with noise, so chance is 25%.

    python examples/image_classifier.py --output_dir runs/shapes            # about a minute on 2 CPU cores
    python examples/image_classifier.py --max_steps 20 --train_size 512     # a quick look
    easytrain train --task image_classifier:ImageClassifierTrainer --output_dir runs/shapes \\
        --no_save_pretrained_at_end    # from the CLI, with examples/ on PYTHONPATH

The export (runs/shapes/final_model/model.safetensors) holds what the module needs in eval mode: its
parameters and BatchNorm's running mean and variance (`nnx.BatchStat`, not `nnx.Param`). To use it:

    from image_classifier import load_exported
    model = load_exported("runs/shapes/final_model")    # a fresh module, in eval mode
    logits = model(images_BHWC)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util

from easytrain import BaseTrainer, LossOutput, TrainingArguments
from easytrain.metrics import mean_over

SIZE, CLASSES = 16, 4
#: What the export holds: everything the module reads in eval mode (its RNG state only feeds dropout).
EXPORTED = nnx.Any(nnx.Param, nnx.BatchStat)


def make_images(count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` noisy images of one stroke each, and the stroke's direction as the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    images = rng.normal(0.0, 0.3, (count, SIZE, SIZE, 1)).astype(np.float32)
    offsets = rng.integers(3, SIZE - 3, (count, 2))
    steps = np.arange(-3, 4)
    for image, label, (row, col) in zip(images, labels, offsets):
        rows, cols = {0: (row + 0 * steps, col + steps), 1: (row + steps, col + 0 * steps),
                      2: (row + steps, col + steps), 3: (row + steps, col - steps)}[int(label)]
        image[rows, cols, 0] += 1.0
    return {"image": images, "label": labels.astype(np.int32)}


class ConvClassifier(nnx.Module):
    """conv -> BatchNorm -> relu -> strided conv -> relu -> mean pool -> dropout -> linear."""

    def __init__(self, rngs: nnx.Rngs, width: int = 32):
        sharded = lambda axes: nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
        self.conv1 = nnx.Conv(1, width, (3, 3), kernel_init=sharded((None, None, None, "mlp")), rngs=rngs)
        self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), strides=2, kernel_init=sharded((None, None, "mlp", None)),
                              rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(width, CLASSES, kernel_init=sharded(("mlp", None)), rngs=rngs)

    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm(self.conv1(images_BHWC)))
        x = jax.nn.relu(self.conv2(x)).mean(axis=(1, 2))
        return self.head(self.dropout(x))


class ImageClassifierTrainer(BaseTrainer):
    """Classification of generated images; every other behaviour is BaseTrainer's."""

    train_size, eval_size = 4096, 512

    def prepare_datasets(self):
        seed = self.arguments.seed
        return make_images(self.train_size, seed), make_images(self.eval_size, seed + 1)

    def collate(self, rows, example_ids):
        weight = (example_ids >= 0).astype(np.float32)  # padding rows of the last eval batch weigh nothing
        return {"image": rows["image"], "label": rows["label"], "weight": weight, "example_id": example_ids}

    def create_module(self):
        return ConvClassifier(nnx.Rngs(self.arguments.seed))

    def compute_loss(self, model, batch, rng, train, frozen):
        logits_BC = model(batch["image"]).astype(jnp.float32)
        nll_B = -jnp.take_along_axis(jax.nn.log_softmax(logits_BC), batch["label"][:, None], axis=-1)[:, 0]
        correct_B = (jnp.argmax(logits_BC, axis=-1) == batch["label"])
        return LossOutput(jnp.sum(nll_B * batch["weight"]), jnp.sum(batch["weight"]),
                          {"accuracy": mean_over(correct_B, batch["weight"])})

    def save_pretrained(self, directory):
        """Parameters and BatchNorm statistics as one safetensors file (every process gathers; process 0
        writes): without the running mean and variance the module would evaluate differently."""
        directory = Path(directory)
        variables = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(self.model, EXPORTED)), sep=".")
        arrays = {name: np.asarray(jax.experimental.multihost_utils.process_allgather(value, tiled=True))
                  for name, value in variables.items()}
        if self.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            safetensors.numpy.save_file(arrays, str(directory / "model.safetensors"))
        return directory


def load_exported(directory: str | Path) -> ConvClassifier:
    """A fresh module holding an export's arrays, in eval mode (running BatchNorm statistics, no dropout).

    Built outside a training mesh, so with eager sharding off: the kernels' logical axes ("mlp") would
    otherwise need a mesh to place them on."""
    arrays = safetensors.numpy.load_file(str(Path(directory) / "model.safetensors"))
    with nnx.use_eager_sharding(False):
        module = ConvClassifier(nnx.Rngs(0), width=arrays["conv1.kernel"].shape[-1])
    state = nnx.state(module, EXPORTED)
    expected = set(traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="."))
    if set(arrays) != expected:
        raise ValueError(f"{directory} does not hold this module's variables: missing {sorted(expected - set(arrays))}"
                         f", unexpected {sorted(set(arrays) - expected)}.")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in arrays.items()},
                                                                 sep="."))
    nnx.update(module, state)
    module.eval()
    return module


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/shapes")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--train_size", type=int, default=4096)
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint of output_dir")
    options = parser.parse_args(argv)
    arguments = TrainingArguments(
        output_dir=options.output_dir, max_steps=options.max_steps, train_batch_size=32, eval_batch_size=64,
        learning_rate=3e-3, warmup_steps=10, logging_steps=10, eval_steps=100, save_steps=100,
        overwrite_output_dir=not options.resume, resume_from_checkpoint="latest" if options.resume else None)
    trainer = ImageClassifierTrainer(arguments)
    trainer.train_size = options.train_size
    logs = trainer.train()
    result = {**logs, **trainer.evaluate()}
    print(json.dumps({key: round(value, 4) for key, value in result.items()}))
    return result


if __name__ == "__main__":
    main()
