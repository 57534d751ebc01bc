"""The mesh of a layout on the first devices it needs, so one 8-device worker process runs every layout."""

import jax

from easytrain import TrainingArguments
from easytrain.sharding import make_mesh


def layout_mesh(args: TrainingArguments) -> jax.sharding.Mesh:
    needed = args.data_parallel_size * args.fsdp_size * args.tensor_parallel_size
    return make_mesh(args.data_parallel_size, args.fsdp_size, args.tensor_parallel_size,
                     devices=jax.devices()[:needed])
