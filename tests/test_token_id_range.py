"""Token ids the model has no row for: an EOS (BOS, decoder start) at or past ``vocab_size`` in a checkpoint's
``generation_config.json`` (or, without one, ``config.json``) loaded without a word, and ``generate`` then never
stopped; ``generate`` took such ids passed to it too. A model built from a config holding an EOS of -1 (or one past
the vocabulary) exported a ``generation_config.json`` that the load refuses. A pad past the vocabulary is kept at
load (real configs hold one: a pad added to the tokenizer after training) and dropped from a config at ``generate``
with a warning, as a negative one is."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers

from easytrain.generation import GenerationError, generate, generate_traced
from easytrain.models import from_pretrained, init_model
from easytrain.models.families import ConfigError
from easytrain.models.hf_io import CheckpointError, save_pretrained
from easytrain.models.hf_load import generation_config_of, read_generation_config

from model_configs import VOCAB, tiny_config

PROMPT = [5, 9, 3, 7]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_ids")
    model = init_model(tiny_config(), seed=0)
    save_pretrained(root / "whole", model, model.config)
    return root / "whole"


def _copy(saved, tmp_path, generation_fields: dict | None = None, config_changes: dict | None = None):
    directory = shutil.copytree(saved, tmp_path / "copy")
    if generation_fields is None:
        (directory / "generation_config.json").unlink()
    else:
        (directory / "generation_config.json").write_text(json.dumps(generation_fields))
    if config_changes:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | config_changes))
    return directory


@pytest.mark.parametrize("field, value", [
    ("eos_token_id", VOCAB),  # was: loaded; generate never stopped
    ("eos_token_id", [2, VOCAB + 5]),
    ("bos_token_id", VOCAB),
    ("decoder_start_token_id", 10 * VOCAB),
])
def test_an_id_past_the_vocabulary_in_generation_config_is_refused_when_read(saved, tmp_path, field, value):
    directory = _copy(saved, tmp_path, {"bos_token_id": 1, "eos_token_id": 2} | {field: value})
    path = directory / "generation_config.json"
    match = (rf"{path} sets '{field}' to {json.dumps(value).replace('[', '.')}: \d+ is outside the model's "
             rf"vocabulary \[0, {VOCAB}\) \(vocab_size {VOCAB}\).*Fix generation_config.json: set '{field}' to the id "
             "the tokenizer uses.*or null")
    with pytest.raises(CheckpointError, match=match):
        read_generation_config(directory)
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(directory)


def test_an_eos_past_the_vocabulary_in_config_json_is_refused_without_a_generation_config(saved, tmp_path):
    directory = _copy(saved, tmp_path, None, {"eos_token_id": VOCAB})
    with pytest.raises(CheckpointError, match=rf"config\.json sets 'eos_token_id' to {VOCAB}: .*never stop"):
        from_pretrained(directory)


def test_ids_under_the_vocabulary_load(saved, tmp_path):
    directory = _copy(saved, tmp_path, {"bos_token_id": 0, "eos_token_id": [VOCAB - 1, 2], "pad_token_id": 1})
    assert generation_config_of(from_pretrained(directory)).eos_token_id == [VOCAB - 1, 2]


def test_a_pad_at_the_vocabulary_size_loads_and_generate_drops_it_with_a_warning(saved, tmp_path, caplog):
    """A pad added to the tokenizer after training sits at vocab_size; transformers' generate feeds it back for a
    finished row (IndexError). Loaded, and generate fills finished rows with the first EOS id instead."""
    directory = _copy(saved, tmp_path, {"eos_token_id": 2, "pad_token_id": VOCAB})
    model = from_pretrained(directory)
    config = generation_config_of(model)
    assert config.pad_token_id == VOCAB
    ids = np.array([PROMPT, PROMPT[::-1]])
    eos = int(generate(model, ids, max_new_tokens=1)[0, 0])  # row 0 ends at its first token
    with caplog.at_level("WARNING", logger="easytrain"):
        got = generate(model, ids, max_new_tokens=4, generation_config={"eos_token_id": eos, "pad_token_id": VOCAB})
    assert (got < VOCAB).all(), got
    np.testing.assert_array_equal(got, generate(model, ids, max_new_tokens=4, eos_token_id=eos))
    assert f"pad_token_id={VOCAB}" in caplog.text


@pytest.mark.parametrize("arguments, match", [
    (dict(eos_token_id=VOCAB), rf"eos_token_id = \[{VOCAB}\] holds {VOCAB}, outside the model's vocabulary"),
    (dict(eos_token_id=[2, VOCAB + 1]), rf"holds {VOCAB + 1}, outside .*never stop"),
    (dict(eos_token_id=2, pad_token_id=VOCAB), rf"pad_token_id = {VOCAB} is outside the model's vocabulary"),
    (dict(generation_config={"eos_token_id": VOCAB}), rf"eos_token_id = \[{VOCAB}\] holds {VOCAB}"),
])
def test_generate_refuses_eos_and_pad_ids_past_the_vocabulary(arguments, match):
    """Was: an EOS past the vocabulary decoded to max_new_tokens, never stopping; such a pad was emitted."""
    model = init_model(tiny_config(), seed=0)
    with pytest.raises(GenerationError, match=match):
        generate(model, np.array([PROMPT]), max_new_tokens=2, **arguments)
    with pytest.raises(GenerationError, match=match):
        generate_traced(model, np.array([PROMPT]), None, np.zeros(2, np.uint32), max_new_tokens=2, **arguments)


@pytest.mark.parametrize("field, value", [("eos_token_id", -1), ("eos_token_id", VOCAB), ("bos_token_id", VOCAB)])
def test_init_model_refuses_a_config_whose_export_would_not_load(field, value):
    """Was: built, and its export's generation_config.json (derived from the config) refused by the reload."""
    with pytest.raises(ConfigError, match=rf"the config sets '{field}' to {value}.*Set config\.{field} to the id "
                                          "the tokenizer uses"):
        init_model(tiny_config(**{field: value}))


@pytest.mark.parametrize("fields", [dict(), dict(pad_token_id=-1), dict(pad_token_id=VOCAB),
                                    dict(eos_token_id=[2, VOCAB - 1], bos_token_id=None)])
def test_init_save_and_load_round_trip(tmp_path, fields):
    model = init_model(tiny_config(**fields), seed=0)
    directory = save_pretrained(tmp_path / "export", model, model.config)
    written = json.loads((directory / "generation_config.json").read_text())
    loaded = generation_config_of(from_pretrained(directory))
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert written.get(field) == getattr(loaded, field) == getattr(model.config, field), field


def test_an_export_refuses_ids_the_load_would_refuse_before_any_file(tmp_path):
    """A params dict with a config (or a generation config) init_model never saw."""
    model = init_model(tiny_config(), seed=0)
    config = tiny_config(eos_token_id=-1)
    with pytest.raises(CheckpointError, match=r"config \(written to generation_config\.json\) sets 'eos_token_id' "
                                              r"to -1, which is no token id.*Set config\.eos_token_id"):
        save_pretrained(tmp_path / "export", model, config)
    generation_config = transformers.GenerationConfig(eos_token_id=[2, VOCAB])
    with pytest.raises(CheckpointError, match=rf"generation_config sets 'eos_token_id' to \[2, {VOCAB}\]: "):
        save_pretrained(tmp_path / "export", model, model.config, generation_config=generation_config)
    assert not (tmp_path / "export").exists()
