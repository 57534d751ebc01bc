"""save_peft_adapter's dtype is one of save_pretrained's export dtypes, refused by name before anything is gathered or
written: it took any dtype numpy knows, so int8 wrote every adapter weight rounded to an integer without a word, and
'bf16' failed in numpy naming no argument."""

from __future__ import annotations

import pytest

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import init_model
from easytrain.models.hf_io import CheckpointError
from easytrain.models.peft_io import save_peft_adapter

from model_configs import tiny_config


@pytest.mark.parametrize("dtype, match", [("int8", r"dtype='int8' \(int8\) is not an export dtype"),
                                          ("bf16", "dtype='bf16' is not a dtype")])
def test_an_adapter_dtype_that_is_no_export_dtype_is_refused_by_name(tmp_path, dtype, match):
    config = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = lora.apply_lora(init_model(tiny_config(), seed=0), config)
    with pytest.raises(CheckpointError, match=match):
        save_peft_adapter(tmp_path / "adapter", model, config, dtype=dtype)
    assert not (tmp_path / "adapter").exists()
