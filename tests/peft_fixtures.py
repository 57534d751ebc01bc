"""The bases and PEFT-side helpers of the PEFT interop tests: tiny randomised Llama and tied Qwen3 directories (as
module-scoped fixtures: a test module takes them as `llama_dir = peft_fixtures.llama_dir`, so that a test's argument
of that name does not redefine an import, ruff F811), adapters made and moved in PEFT, and the round trip an adapter
exported by easytrain must survive in PEFT and back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import from_pretrained
from easytrain.models.peft_io import ADAPTER_WEIGHTS_NAME, load_peft_adapter, read_peft_config, save_peft_adapter

from lora_models import LLAMA, QWEN3_TIED, logits, torch_logits, torch_model, write_base


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("llama"), LLAMA)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("qwen3"), QWEN3_TIED, seed=1)


def peft_names(directory: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of the adapter saved in `directory`."""
    from safetensors import safe_open

    with safe_open(directory / ADAPTER_WEIGHTS_NAME, framework="numpy") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def change_fully_trained(model, config: LoRAConfig) -> None:
    """Move the modules trained in full (embeddings, norms, a head in `modules_to_save`) off the base's values."""
    for variable in jax.tree.leaves(nnx.state(model, nnx.All(lora.lora_trainable(config), nnx.Not(nnx.LoRAParam))),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable.set_value(variable.get_value() + 0.05)


def check_peft_round_trip(peft, model, config: LoRAConfig, base_dir, ids, tmp_path) -> None:
    """`model`'s exported adapter holds the names and shapes PEFT itself writes for its config, PEFT computes
    `model`'s logits from it, and the same directory restores the same model in easytrain."""
    ours = logits(model, ids)
    save_peft_adapter(tmp_path / "adapter", model, config, str(base_dir))
    own = peft.get_peft_model(torch_model(base_dir), peft.PeftConfig.from_pretrained(tmp_path / "adapter"))
    own.save_pretrained(tmp_path / "peft_own")
    assert peft_names(tmp_path / "adapter") == peft_names(tmp_path / "peft_own")
    reloaded = peft.PeftModel.from_pretrained(torch_model(base_dir), tmp_path / "adapter").eval()
    assert np.abs(torch_logits(reloaded, ids) - ours).max() <= 1e-4
    again = load_peft_adapter(tmp_path / "adapter", from_pretrained(base_dir), verify_base=True)
    assert np.abs(logits(again, ids) - ours).max() <= 1e-5
    assert read_peft_config(tmp_path / "adapter")[0] == config


def moved_peft_model(base_dir: Path, *, lora_alpha: float, scale: float, **fields) -> Any:
    """A PEFT model of rank 4 on `base_dir` whose adapters (and modules to save) were trained: randomly moved."""
    peft = pytest.importorskip("peft")
    import torch

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(torch_model(base_dir), peft.LoraConfig(r=4, lora_alpha=lora_alpha, **fields))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(scale * torch.randn_like(param))
    return peft_model


def peft_adapter(base_dir: Path, directory: Path, **fields) -> Path:
    """An adapter made and trained (randomly moved) in PEFT, saved to `directory`."""
    moved_peft_model(base_dir, lora_alpha=8, scale=0.05, **fields).save_pretrained(directory)
    return directory
