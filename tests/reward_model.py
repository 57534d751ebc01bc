"""A scalar head on a Llama that the module holds, as a reward model is: it scores, generates nothing, and has no
switch of its own (the tests of default evaluators and of switches on wrapped models build their trainers on it)."""

import jax
from flax import nnx

from easytrain.models import LlamaForCausalLM


class RewardModel(nnx.Module):
    """A scalar head on the last token's hidden state: scores, generates nothing."""

    def __init__(self, llama: LlamaForCausalLM, rngs: nnx.Rngs):
        self.llama = llama
        self.head = nnx.Linear(llama.config.hidden_size, 1, rngs=rngs)

    @property
    def config(self):
        return self.llama.config

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        B, T = ids_BT.shape
        return self.head(self.llama.hidden_states(ids_BT).reshape(B, T, -1)[:, -1])[:, 0]
