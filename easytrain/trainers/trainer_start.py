"""What a trainer settles when it is built, inside the start every process agrees on (`run_dir.check_output_dir`,
`start_agreement`): the files its arguments name, the checkpoint to resume, then its LoRA config, mesh, compiler
options and compilation cache directory. A process that fails any of them raises its own error and the others name
it (none waits alone in a later collective), and a refused start leaves no `output_dir` it made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from easytrain import compilation_cache, compiler_options, sharding
from easytrain.trainers import adapters
from easytrain.trainers.run_dir import check_output_dir

if TYPE_CHECKING:
    from easytrain.trainers.base import BaseTrainer


def agreed_start(trainer: BaseTrainer) -> tuple[tuple[Path, int] | None, str | None]:
    """The checkpoint `trainer` resumes (None: a fresh start) and the compilation cache directory made for it (None:
    JAX's own setting), with `trainer.lora`, `trainer.mesh` and `trainer.compiler_options` set.

    In the order a single process always met them: `check_inputs` and the adapter config first (read once however
    often the processes look at their checkpoints), the `output_dir` checks, then, once, the LoRA config,
    `configure_mesh` (which may read `trainer.lora`), `check_mesh`, the compiler options and the cache directory:
    what the arguments alone refuse. The cache is `use`d by the caller once the start is agreed."""
    args = trainer.arguments
    check_lora, lora = adapters.start_check(args)
    cache: list[str | None] = []

    def read_inputs() -> None:  # what one process alone may fail to read: the others name it
        trainer.check_inputs()
        lora()  # lora_adapter_path's config

    def check_settings() -> None:
        trainer.lora = lora()  # a LoRAConfig when lora_rank > 0 or lora_adapter_path
        trainer.mesh = trainer.configure_mesh()
        sharding.check_mesh(trainer.mesh)
        trainer.compiler_options = compiler_options.for_platform(args.compiler_options,
                                                                 trainer.mesh.devices.flat[0].platform)
        cache.append(compilation_cache.make_directory(args.compilation_cache_dir))  # each host's own

    resume = check_output_dir(args, is_main_process=trainer.is_main_process, check_start=check_lora,
                              read_inputs=read_inputs, check_settings=check_settings,
                              task_arguments=trainer.task_arguments)
    return resume, cache[0]
