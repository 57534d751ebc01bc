"""A tiny model's parameters with one weight set to a chosen value, for the tests of exports to a narrower dtype
(float16, bfloat16) that must refuse a weight the cast would make inf, naming it (`DOWN`)."""

import jax.numpy as jnp
from flax import nnx

from easytrain.models import init_model

from model_configs import tiny_config

#: The exported name of the weight `params_with` sets.
DOWN = "model.layers.1.mlp.down_proj.weight"


def params_with(value: float, param_dtype=jnp.float32, scan_layers: bool = False) -> tuple[dict, object]:
    """A tiny model's parameters (and its config) with one entry of layer 1's down projection set to `value`: DOWN's
    [5, 3] as exported (the kernel is stored transposed)."""
    model = init_model(tiny_config(), seed=0, param_dtype=param_dtype, scan_layers=scan_layers)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    down = params["layers"]["stacked" if scan_layers else 1]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"].at[(1, 3, 5) if scan_layers else (3, 5)].set(value)
    return params, model.config
