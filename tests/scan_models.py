"""Models, layouts and arguments the `scan_layers` test modules share."""

from pathlib import Path

import jax
from flax import nnx, traverse_util

from easytrain import TrainingArguments
from easytrain.lora import LoRAConfig, apply_lora
from easytrain.models import init_model
from easytrain.models.scan import unstack_layer_dicts
from model_configs import tiny_config


def lora_model(dropout: float = 0.0) -> nnx.Module:
    """Adapters on every projection of every layer, `lora_b` random so that `lora_a` has gradients too."""
    model = apply_lora(init_model(tiny_config()), LoRAConfig(rank=4, dropout=dropout),
                       rngs=nnx.Rngs(params=1, dropout=2))
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.LoRAParam) and variable.shape[0] == 4:
            variable.set_value(jax.random.normal(jax.random.key(variable.shape[1]), variable.shape) * 0.1)
    return model



def per_layer(state: nnx.State | dict) -> dict:
    """Flat `path -> array` in the per-layer layout, whichever way the layers were stored."""
    tree = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    flat = traverse_util.flatten_dict(unstack_layer_dicts(tree))
    return {path: jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v
            for path, v in flat.items()}



def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    """A 4-step run saving every 2 steps, logging every step to jsonl."""
    return TrainingArguments(**{**dict(
        output_dir=str(output_dir), max_length=32, train_batch_size=8, max_steps=4, logging_steps=1,
        eval_strategy="no", save_strategy="steps", save_steps=2, report_to=["jsonl"], disable_progress_bar=True,
        save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8), **overrides})
