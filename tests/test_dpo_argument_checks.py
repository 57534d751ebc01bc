"""`DPOArguments` refuses options the chosen losses never read, naming the field and the fix, before any data or
model work: a reference option with reference-free losses only, and `label_smoothing` with losses that ignore it."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from easytrain import preference as P
from easytrain.errors import ArgumentError
from easytrain.trainers.dpo_arguments import DPOArguments

REFERENCE_FREE_SETS = (["simpo"], ["sft"], ["orpo"], ["simpo", "sft"], ["orpo", "sft"])
REFERENCE_OPTIONS = ({"sync_ref_model": True}, {"ref_model_name_or_path": "some/model"},
                     {"precompute_ref_log_probs": True})


@pytest.mark.parametrize("losses", REFERENCE_FREE_SETS)
@pytest.mark.parametrize("option", REFERENCE_OPTIONS, ids=lambda option: next(iter(option)))
def test_a_reference_option_with_reference_free_losses_is_refused(losses, option):
    name = next(iter(option))
    with pytest.raises(ArgumentError, match="read no reference") as error:
        DPOArguments(loss_type=losses, **option)
    assert error.value.field == name
    assert "drop" in error.value.message and name in error.value.message


@pytest.mark.parametrize("option", REFERENCE_OPTIONS, ids=lambda option: next(iter(option)))
def test_a_reference_option_with_one_loss_that_reads_a_reference_is_accepted(option):
    assert DPOArguments(loss_type=["simpo", "sigmoid"], **option).needs_reference


def _reads_label_smoothing(name: str) -> bool:
    return "label_smoothing" in inspect.signature(P.PREFERENCE_LOSSES[name]).parameters


def test_the_losses_that_read_label_smoothing_are_those_whose_value_it_changes():
    inputs = P.PairLogps(*(jnp.asarray(x, jnp.float32) for x in ([-3.], [-5.], [-4.], [-4.], [3.], [4.])))
    for name in P.PREFERENCE_LOSSES:
        smooth, plain = (float(P.combined_loss([name], None, inputs, beta=0.1, label_smoothing=eps, delta=0.0)[0])
                         for eps in (0.3, 0.0))
        assert (smooth != plain) == (name in P.READS_LABEL_SMOOTHING) == _reads_label_smoothing(name), name
    assert P.READS_LABEL_SMOOTHING == {"sigmoid", "robust", "simpo"}


@pytest.mark.parametrize("losses", [[name] for name in P.PREFERENCE_LOSSES if not _reads_label_smoothing(name)]
                         + [["ipo", "sft"]])
def test_label_smoothing_with_losses_that_ignore_it_is_refused(losses):
    with pytest.raises(ArgumentError, match="sigmoid, robust, simpo") as error:
        DPOArguments(loss_type=losses, label_smoothing=0.1)
    assert error.value.field == "label_smoothing"
    assert DPOArguments(loss_type=losses).label_smoothing == 0  # the default is accepted


@pytest.mark.parametrize("losses", [["sigmoid"], ["robust"], ["simpo"], ["ipo", "sigmoid"]])
def test_label_smoothing_with_a_loss_that_reads_it_is_accepted(losses):
    assert DPOArguments(loss_type=losses, label_smoothing=0.1).label_smoothing == 0.1


def test_the_help_texts_name_the_losses_that_read_label_smoothing():
    from dataclasses import fields

    help_text = {f.name: f.metadata["help"] for f in fields(DPOArguments)}["label_smoothing"]
    assert all(name in help_text for name in P.READS_LABEL_SMOOTHING)


def test_dropout_is_off_in_the_loss_by_default():
    assert DPOArguments().disable_dropout is True


@pytest.mark.parametrize("losses, per_token", [(["ipo"], True), (["simpo"], True), (["orpo"], True),
                                               (["simpo", "sft"], True), (["sigmoid"], False), (["sft"], False),
                                               (["ipo", "sigmoid"], False), (["orpo", "bco_pair"], False)])
def test_metrics_are_of_per_token_means_exactly_when_every_loss_reads_them(losses, per_token):
    assert P.reports_per_token(losses) is per_token
    sums_B2, lengths_B2 = np.array([[-6.0, -9.0]]), np.array([[2.0, 3.0]])
    shown = np.asarray(P.reported_logps(losses, jnp.asarray(sums_B2), jnp.asarray(lengths_B2)))
    np.testing.assert_allclose(shown, sums_B2 / lengths_B2 if per_token else sums_B2)


EVAL_BATCH_OF_THREE = """
import json, tempfile
import easytrain.trainers.dpo as dpo
from easytrain import ArgumentError, TrainingArguments
from easytrain.trainers.dpo import DPOArguments, DPOTrainer

passes = []
real = dpo.precomputed_reference_logps
dpo.precomputed_reference_logps = lambda *a, **k: passes.append(1) or real(*a, **k)
facts = {}
for precompute in (False, True):
    with tempfile.TemporaryDirectory() as directory:
        args = TrainingArguments(output_dir=directory, max_length=16, train_batch_size=8, eval_batch_size=3,
                                 max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                                 disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16,
                                 max_eval_samples=8)
        try:
            DPOTrainer(args, DPOArguments(precompute_ref_log_probs=precompute)).setup()
            facts[str(precompute)] = "no error"
        except ArgumentError as error:
            facts[str(precompute)] = [error.field, error.message, len(passes)]
        except Exception as error:
            facts[str(precompute)] = [type(error).__name__, str(error)[:200], len(passes)]
print(json.dumps(facts))
"""


def test_an_eval_batch_the_devices_cannot_split_is_refused_before_the_reference_pass():
    """eval_batch_size 3 on 8 data-parallel devices: the same ArgumentError with or without precomputed reference
    log-probs, raised before the reference runs (it ran first and failed on jax's IndivisibleError)."""
    import json
    import subprocess
    import sys

    from runs import child_env, xla_flags

    done = subprocess.run([sys.executable, "-c", EVAL_BATCH_OF_THREE], capture_output=True, text=True,
                          env=child_env(XLA_FLAGS=xla_flags(8), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    message = "must be a multiple of the 8 data-parallel devices."
    assert facts["False"] == ["eval_batch_size", message, 0]
    assert facts["True"] == ["eval_batch_size", message, 0]


def test_a_text_column_is_refused_by_dpo(tmp_path):
    """DPO rows are prompt/chosen/rejected: a text_column set for them would be silently unused."""
    from easytrain import TrainingArguments
    from easytrain.trainers.dpo import DPOTrainer

    with pytest.raises(ArgumentError, match="text_column: 'body' is not read by DPO"):
        DPOTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), text_column="body"))


def test_one_loss_name_as_a_string_is_that_loss():
    """docs/dpo.md: `loss_type` is one name or a list (as TRL takes it); a string is not read letter by letter."""
    assert DPOArguments(loss_type="ipo").loss_type == ["ipo"]
    assert DPOArguments(loss_type="ipo", loss_weights=[0.5]).loss_weights == [0.5]


def test_evaluate_refuses_a_list_of_pairs_naming_the_fix(tmp_path):
    """`evaluate(dataset)` takes one `datasets.Dataset`, in DPO as in the other trainers (a list failed inside the
    tokenisation with a raw AttributeError)."""
    from easytrain import TrainingArguments
    from easytrain.data import DataError
    from easytrain.trainers.dpo import DPOTrainer

    trainer = DPOTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), model_config="tiny", max_steps=1,
                                           report_to=["none"], disable_progress_bar=True))
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
    with pytest.raises(DataError, match=r"Dataset\.from_list"):
        trainer.evaluate(pairs)
