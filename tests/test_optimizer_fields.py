"""Optimizer settings the chosen optimizer does not read are warned about when the arguments are checked, the help
texts say what each optimizer reads (and what weight decay and text_column apply to), and every setting it reads
reaches optax: three updates of `build_optimizer` equal those of the optax transformation written out by hand, so
an Adam epsilon or beta2, a Lion beta2, SGD's momentum (plain, not Nesterov) or a decay mask that is dropped or
swapped on the way fails here."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easytrain import TrainingArguments
from easytrain.optim import build_optimizer, build_schedule, decay_mask

PARAMS = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "scale": jnp.linspace(0.5, 1.5, 4)}
GRADS = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 2)) * (k + 1), PARAMS) for k in range(3)]
NO_SCHEDULE = dict(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.0, lr_scheduler_type="constant",
                   warmup_steps=0)


def _help(name: str) -> str:
    (field,) = [f for f in dataclasses.fields(TrainingArguments) if f.name == name]
    return field.metadata["help"]


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "optimizer" in r.getMessage()]


@pytest.mark.parametrize("settings, unread", [
    (dict(optimizer="adafactor", adam_beta1=0.51, adam_beta2=0.52, adam_epsilon=0.1),
     ["adam_beta1", "adam_beta2", "adam_epsilon"]),
    (dict(optimizer="lion", adam_epsilon=0.11), ["adam_epsilon"]),
    (dict(optimizer="sgd", adam_beta1=0.53), ["adam_beta1"]),
    (dict(optimizer="adamw", sgd_momentum=0.12), ["sgd_momentum"]),
    (dict(optimizer="adafactor", sgd_momentum=0.13), ["sgd_momentum"]),
])
def test_fields_the_optimizer_does_not_read_are_warned_about_once(tmp_path, caplog, settings, unread):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), **settings)
        TrainingArguments(output_dir=str(tmp_path), **settings)  # checked again (a rerun's copy): not warned again
    (message,) = _warned(caplog)
    assert all(name in message for name in unread) and f"optimizer={settings['optimizer']!r}" in message, message


@pytest.mark.parametrize("settings", [dict(optimizer="lion", adam_beta1=0.54, adam_beta2=0.55),
                                      dict(optimizer="sgd", sgd_momentum=0.14), dict(optimizer="adafactor"),
                                      dict(optimizer="adamw", adam_epsilon=1e-6)])
def test_fields_the_optimizer_reads_are_not_warned_about(tmp_path, caplog, settings):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), **settings)
    assert not _warned(caplog)


def test_help_texts_say_what_each_setting_applies_to():
    optimizer = _help("optimizer")
    for name in ("adamw", "adafactor", "lion", "sgd", "adam_beta1", "adam_epsilon", "sgd_momentum", "128", "RMS"):
        assert name in optimizer, name
    decay = _help("weight_decay")
    assert "2 or more dimensions" in decay and "configure_optimizer" in decay
    text = _help("text_column")
    assert "SFT" in text and "DPO" in text and "'text'" in text


@pytest.mark.parametrize("lora", [dict(lora_rank=4), dict(lora_adapter_path="adapter")])
def test_adafactor_with_lora_is_warned_about_its_relative_step(tmp_path, caplog, lora):
    """Adafactor scales each update by the parameter's RMS (at least 1e-3): LoRA's B starts at zero, so it moves
    1000x slower than learning_rate says (30 steps at 1e-3: |B| 3e-5, against AdamW's 2.7e-2), and nothing said so."""
    from easytrain.argument_settings import warn_adafactor_lora

    warn_adafactor_lora.cache_clear()  # warned once per process: each case from a clean slate
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="adafactor", **lora)
    (message,) = [m for m in _warned(caplog) if "LoRA" in m]
    assert "optimizer='adafactor'" in message and "multiply_by_parameter_scale=False" in message, message
    assert "optimizer='adamw'" in message, message


def test_adafactor_without_lora_and_adamw_with_lora_are_not_warned_about_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="adafactor")
        TrainingArguments(output_dir=str(tmp_path), optimizer="adamw", lora_rank=4)
    assert not [m for m in _warned(caplog) if "LoRA" in m], _warned(caplog)


def three_updates(tx: optax.GradientTransformation) -> dict:
    """`PARAMS` after the three `GRADS` updates of `tx`: moments, epsilons and momenta all act by the third."""
    params, state = PARAMS, tx.init(PARAMS)
    for grads in GRADS:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("optimizer, settings, by_hand", [
    ("adamw", dict(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-2),
     lambda: optax.adamw(1e-2, b1=0.8, b2=0.95, eps=1e-2, weight_decay=0.1, mask=decay_mask)),
    ("lion", dict(adam_beta1=0.8, adam_beta2=0.95),
     lambda: optax.lion(1e-2, b1=0.8, b2=0.95, weight_decay=0.1, mask=decay_mask)),
    ("sgd", dict(sgd_momentum=0.7),
     lambda: optax.chain(optax.add_decayed_weights(0.1, mask=decay_mask), optax.sgd(1e-2, momentum=0.7))),
])
def test_every_setting_the_optimizer_reads_reaches_optax(optimizer, settings, by_hand):
    """Values away from the defaults (eps 1e-2 dominates the early Adam updates), and decay on: the vector
    `scale` is not decayed, the matrix `kernel` is."""
    args = TrainingArguments(optimizer=optimizer, **NO_SCHEDULE, **settings)
    got = three_updates(build_optimizer(args, build_schedule(args, 10)))
    want = three_updates(by_hand())
    for name in PARAMS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_sgd_weight_decay_leaves_vectors_alone():
    """SGD's L2 decay skips vectors (norm scales, biases), as AdamW's and Lion's do: with zero gradients only the
    matrix moves, by -lr * wd * w."""
    args = TrainingArguments(optimizer="sgd", sgd_momentum=0.0, **NO_SCHEDULE)
    tx = build_optimizer(args, build_schedule(args, 10))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.1 * PARAMS["kernel"], rtol=1e-6)
