"""An export into a directory that holds an earlier one leaves only what it wrote: an adapter-only export removes the
earlier merged model (transformers would load it, not the adapter), a merged export removes an earlier PEFT
`adapter/` (loaded with it, it would pass for the new model's); files that are no export's stay."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from easytrain import lora
from easytrain.models import init_model, save_pretrained
from easytrain.trainers import adapters
from model_configs import tiny_config

LORA = lora.LoRAConfig(rank=2, alpha=4)


def adapted_model():
    config = tiny_config()
    return lora.apply_lora(init_model(config), LORA, rngs=nnx.Rngs(0)), config


def export(directory: Path, how: str) -> None:
    model, config = adapted_model()
    adapters.export(directory, model, LORA, how=how, model_config=config)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_adapter_only_export_removes_an_earlier_merged_model(tmp_path):
    export(tmp_path, "both")
    (tmp_path / "notes.txt").write_text("mine")
    export(tmp_path, "adapter")
    assert names(tmp_path) == ["adapter", "notes.txt"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_an_adapter_only_export_removes_an_earlier_sharded_model(tmp_path):
    model, config = adapted_model()
    save_pretrained(tmp_path, lora.merge_lora(model), config, max_shard_size=20_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    export(tmp_path, "adapter")
    assert names(tmp_path) == ["adapter"]


def test_a_merged_or_plain_export_removes_an_earlier_adapter(tmp_path):
    export(tmp_path / "merged", "both")
    export(tmp_path / "merged", "merged")
    assert "adapter" not in names(tmp_path / "merged") and "model.safetensors" in names(tmp_path / "merged")
    export(tmp_path / "plain", "adapter")
    model = init_model(config := tiny_config())
    save_pretrained(tmp_path / "plain", model, config)
    assert names(tmp_path / "plain") == ["config.json", "generation_config.json", "model.safetensors"]


def test_files_that_are_no_export_stay(tmp_path):
    """A config.json without weights beside it is not an earlier export's; nor is an `adapter/` without PEFT's
    adapter_config.json."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("mine")
    export(tmp_path / "a", "adapter")
    (tmp_path / "a" / "config.json").write_text("{}")
    export(tmp_path / "a", "adapter")
    assert (tmp_path / "a" / "config.json").read_text() == "{}"
    model = init_model(config := tiny_config())
    save_pretrained(tmp_path, model, config)
    assert (tmp_path / "adapter" / "README.md").read_text() == "mine"
