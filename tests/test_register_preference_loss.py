"""A preference loss added by `register_preference_loss` (or to `PREFERENCE_LOSSES`, as before) is one the trainer
treats as a built-in: a reference-free one builds no reference and reports rewards as the built-in `simpo` does, one
that reads `label_smoothing` may be given it."""

import jax
import pytest

from easytrain import TrainingArguments
from easytrain import preference as P
from easytrain.trainers.dpo import DPOArguments, DPOTrainer


def my_simpo(policy_chosen_logps_B, policy_rejected_logps_B, chosen_len_B, rejected_len_B, *, beta, gamma=0.5,
             label_smoothing=0.0):
    """The built-in simpo, written again as a user would."""
    z = beta * (policy_chosen_logps_B / chosen_len_B - policy_rejected_logps_B / rejected_len_B) - gamma
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def my_margin(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, *, beta):
    return -jax.nn.log_sigmoid(beta * ((policy_chosen_logps_B - ref_chosen_logps_B)
                                       - (policy_rejected_logps_B - ref_rejected_logps_B)))


@pytest.fixture
def registry():
    """The registry as it was, restored after the test (other tests list every loss)."""
    per_token_names = getattr(P, "_PER_TOKEN_NAMES", set())
    losses, per_token = dict(P.PREFERENCE_LOSSES), set(per_token_names)
    yield
    P.PREFERENCE_LOSSES.clear()
    P.PREFERENCE_LOSSES.update(losses)
    per_token_names.clear()
    per_token_names.update(per_token)


def test_a_registered_loss_fills_every_table(registry):
    P.register_preference_loss("my_simpo", my_simpo, reference_free=True, per_token=True)
    assert "my_simpo" in P.REFERENCE_FREE and "my_simpo" in P.PER_TOKEN_LOSSES
    assert "my_simpo" in P.READS_LABEL_SMOOTHING  # from its signature, as for the built-ins
    assert P.reports_per_token(["my_simpo"]) == P.reports_per_token(["simpo"]) is True
    assert not DPOArguments(loss_type=["my_simpo"]).needs_reference
    assert DPOArguments(loss_type=["my_simpo"], label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ValueError, match="ref_model_name_or_path"):
        DPOArguments(loss_type=["my_simpo"], ref_model_name_or_path="somewhere")


def test_a_loss_added_to_the_dict_directly_is_read_from_its_signature(registry):
    P.PREFERENCE_LOSSES["my_simpo"] = my_simpo  # the route docs/dpo.md described before
    assert not DPOArguments(loss_type=["my_simpo"]).needs_reference
    DPOArguments(loss_type=["my_simpo"], label_smoothing=0.1)  # accepted: it reads label_smoothing


def test_registration_refuses_a_taken_name_and_flags_its_signature_contradicts(registry):
    with pytest.raises(ValueError, match="'simpo' is already registered.*replace=True"):
        P.register_preference_loss("simpo", my_simpo, reference_free=True, per_token=True)
    with pytest.raises(ValueError, match="reads no reference.*reference_free=True"):
        P.register_preference_loss("my_simpo", my_simpo, per_token=True)
    with pytest.raises(ValueError, match="ref_chosen_logps_B"):
        P.register_preference_loss("my_margin", my_margin, reference_free=True)
    with pytest.raises(ValueError, match="chosen_len_B"):
        P.register_preference_loss("my_margin", my_margin, per_token=True)
    with pytest.raises(ValueError, match="temperature"):
        P.register_preference_loss("hot", lambda policy_chosen_logps_B, *, temperature: policy_chosen_logps_B)
    P.register_preference_loss("my_margin", my_margin)
    assert DPOArguments(loss_type=["my_margin"]).needs_reference and "my_margin" not in P.PER_TOKEN_LOSSES
    P.register_preference_loss("my_margin", my_simpo, reference_free=True, per_token=True, replace=True)
    assert "my_margin" in P.REFERENCE_FREE and "my_margin" in P.PER_TOKEN_LOSSES


def test_a_registered_reference_free_loss_trains_as_the_built_in_simpo(tmp_path, registry):
    P.register_preference_loss("my_simpo", my_simpo, reference_free=True, per_token=True)
    logs = {}
    for name in ("my_simpo", "simpo"):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_length=16, train_batch_size=8, max_steps=1,
                                 logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                                 disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16,
                                 max_eval_samples=8)
        trainer = DPOTrainer(args, DPOArguments(loss_type=[name], beta=2.0, label_smoothing=0.1))
        trainer.setup()
        assert trainer.state.frozen == {}, f"{name}: no reference model built"
        logs[name] = trainer.train()
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert logs["my_simpo"][key] == pytest.approx(logs["simpo"][key], rel=1e-5), key
