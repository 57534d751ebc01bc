"""The image classifier's export holds everything its module needs in eval mode (BatchNorm's running statistics too),
so a fresh module loaded from it evaluates as `trainer.evaluate()` does."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx, traverse_util

from easytrain import TrainingArguments
from script_modules import load_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_classifier.py"


def _eval_loss(module, rows) -> float:
    logits = module(jnp.asarray(rows["image"])).astype(jnp.float32)
    nll = -jax.nn.log_softmax(logits)[np.arange(len(rows["label"])), rows["label"]]
    return float(nll.mean())


def test_exported_model_evaluates_as_the_trainer_does(tmp_path):
    example = load_script("image_classifier", EXAMPLE)

    class Small(example.ImageClassifierTrainer):
        train_size, eval_size = 64, 32

        def create_module(self):
            return example.ConvClassifier(nnx.Rngs(self.arguments.seed), width=4)

    trainer = Small(TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, train_batch_size=16, eval_batch_size=32, learning_rate=3e-2,
        warmup_steps=0, eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True))
    trainer.train()
    expected = trainer.evaluate()["eval_loss"]
    directory = tmp_path / "final_model"
    arrays = safetensors.numpy.load_file(str(directory / "model.safetensors"))

    with nnx.use_eager_sharding(False):  # a fresh module, outside any mesh: every exported array loaded into it
        fresh = example.ConvClassifier(nnx.Rngs(0), width=4)
    state = nnx.state(fresh)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep=".")
    flat.update({name: value for name, value in arrays.items() if name in flat})
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat, sep="."))
    nnx.update(fresh, state)
    fresh.eval()
    rows = trainer.dataset_eval
    loss = _eval_loss(fresh, rows)
    assert np.isclose(loss, expected, rtol=1e-5, atol=1e-6), (loss, expected, sorted(arrays))
    assert not [name for name in arrays if "rngs" in name.split(".")], sorted(arrays)  # no RNG state exported

    loaded = example.load_exported(directory)  # the example's own recipe, in eval mode
    assert loaded.norm.use_running_average and loaded.dropout.deterministic
    assert np.isclose(_eval_loss(loaded, rows), expected, rtol=1e-5, atol=1e-6)
