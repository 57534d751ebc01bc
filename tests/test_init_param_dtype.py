"""The storage dtype does not change which weights a seed gives: a bfloat16 model starts from the float32 model's
weights, rounded. Otherwise a float32 and a bfloat16 run with one seed start from different weights, and their
losses differ for a reason that has nothing to do with precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.models import LlamaForCausalLM
from easytrain.models.presets import llama_config


def _params(param_dtype, scan_layers: bool) -> dict[str, np.ndarray]:
    config = llama_config("tiny", vocab_size=64)
    config.tie_word_embeddings = False  # an lm_head too
    with nnx.use_eager_sharding(False):
        model = LlamaForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                 scan_layers=scan_layers)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_low_precision_init_is_the_float32_init_rounded(param_dtype, scan_layers):
    wide, narrow = _params(jnp.float32, scan_layers), _params(param_dtype, scan_layers)
    assert wide.keys() == narrow.keys()
    names = " ".join(wide)
    assert all(part in names for part in ("embed_tokens", "q_proj", "o_proj", "gate_proj", "down_proj", "lm_head"))
    for name, weights in wide.items():
        assert narrow[name].dtype == np.dtype(param_dtype), name
        np.testing.assert_array_equal(narrow[name], weights.astype(param_dtype), err_msg=name)
