"""`saved`: one tiny model's checkpoint directories, for the tests that copy and damage or edit them. A test module
takes the fixture as `saved = saved_checkpoints.saved` (a test's argument of that name would otherwise redefine an
import, ruff F811)."""

from pathlib import Path

import pytest

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import init_model, save_pretrained
from easytrain.models.peft_io import save_peft_adapter

from model_configs import tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A root holding one tiny model (float32, seed 0) saved whole (`whole/`), in shards of 20 kB (`sharded/`),
    and as a LoRA adapter on q_proj (`adapter/`)."""
    root = tmp_path_factory.mktemp("saved")
    model = init_model(tiny_config(), seed=0)
    save_pretrained(root / "whole", model, model.config)
    save_pretrained(root / "sharded", model, model.config, max_shard_size=20000)
    config = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"])
    save_peft_adapter(root / "adapter", lora.apply_lora(model, config), config)
    return root
