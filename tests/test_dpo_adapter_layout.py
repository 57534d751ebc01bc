"""The digests of a DPO run's `lora_adapter_path` adapter (`checked_adapter_values`) do not depend on scan_layers:
each layer's tensors are digested under the same names whether the layers are stacked or not. A resume with the
other scan_layers then reaches the refusal that names the real reason (the layout), not a changed adapter; a
record of stacked names (kept before the digests were layout-free) is still compared, after converting."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from easytrain import ArgumentError
from easytrain.lora import LoRAConfig
from easytrain.trainers import initial_policy_checks as checks
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import StopAt
from test_dpo_adapter_resume import sources  # noqa: F401 (the fixture: a base and two adapters on it)
from test_dpo_trainer import tiny_args


#: The adapter config the values are read with (recorded with them, compared on resume).
CONFIG = LoRAConfig(rank=4)


def stacked(scale: float = 1.0) -> dict:
    """Adapter values of two layers, stacked along a leading axis (`layers.stacked.…`)."""
    return {"layers": {"stacked": {"q_proj": {"lora_a": scale * jnp.arange(24.0).reshape(2, 3, 4)}}}}


def per_layer(scale: float = 1.0) -> dict:
    """The same values as `stacked(scale)`, one layer at a time (`layers.0.…`, `layers.1.…`)."""
    values = stacked(scale)["layers"]["stacked"]["q_proj"]["lora_a"]
    return {"layers": {index: {"q_proj": {"lora_a": values[index]}} for index in range(2)}}


def recorded(monkeypatch, record: dict) -> None:
    """Make `record` the resumed checkpoint's `LORA_ADAPTER` entry."""
    monkeypatch.setattr(checks, "stored_record", lambda resume_from, key: dict(record))


def test_the_adapter_digests_are_the_same_in_both_layouts(monkeypatch):
    records = [checks.checked_adapter_values(values, adapter_path="a", config=CONFIG, resume_from=None)
               for values in (stacked(), per_layer())]
    assert records[0] == records[1] and "layers.1.q_proj.lora_a" in records[0]["fingerprint"]
    for values in (stacked(), per_layer()):  # a resume in either layout accepts the record of the other
        recorded(monkeypatch, records[0])
        checks.checked_adapter_values(values, adapter_path="a", config=CONFIG, resume_from=(None, 1))
    with pytest.raises(ArgumentError, match="not the one this run started from"):
        checks.checked_adapter_values(per_layer(2.0), adapter_path="a", config=CONFIG, resume_from=(None, 1))


@pytest.mark.parametrize("values", [stacked, per_layer], ids=["stacked", "per layer"])
def test_a_record_of_stacked_names_is_still_compared(monkeypatch, values):
    legacy = {"read_from": "a", "fingerprint": checks.integrity.fingerprint(
        checks.float_leaves(stacked()), checks.integrity.SMALL_ON_HOST)}
    assert "layers.stacked.q_proj.lora_a" in legacy["fingerprint"]
    recorded(monkeypatch, legacy)
    checks.checked_adapter_values(values(), adapter_path="a", config=CONFIG, resume_from=(None, 1))
    with pytest.raises(ArgumentError, match="not the one this run started from"):
        checks.checked_adapter_values(values(2.0), adapter_path="a", config=CONFIG, resume_from=(None, 1))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked then not", "not then stacked"])
def test_a_resume_with_the_other_scan_layers_is_refused_for_the_layout(sources, tmp_path, scan_layers):  # noqa: F811
    """Measured before: refused as 'the adapter read from ... is not the one this run started from', though the
    adapter was the same files."""
    common = dict(model_name_or_path=str(sources["base"]), lora_adapter_path=str(sources["a"]), max_steps=2,
                  save_strategy="steps", save_steps=1)
    DPOTrainer(tiny_args(tmp_path, **common, scan_layers=scan_layers), DPOArguments(), callbacks=[StopAt(1)]).train()
    resume = dict(common, scan_layers=not scan_layers, resume_from_checkpoint="latest")
    with pytest.raises(ArgumentError, match=f"trained with scan_layers={scan_layers}") as error:
        DPOTrainer(tiny_args(tmp_path, **resume), DPOArguments()).setup()
    assert error.value.field == "scan_layers", error.value.message
