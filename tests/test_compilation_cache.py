"""`compilation_cache_dir`: the trainer points JAX's persistent cache at a directory, and a second trainer of
the same run loads its compiled steps from there instead of compiling them."""

import json
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from easytrain import BaseTrainer, TrainingArguments, compilation_cache
from easytrain.errors import ArgumentError
import loaded_executables


@pytest.fixture
def jax_settings():
    """Restore JAX's process-wide cache settings after the test (the suite runs with a cache of its own)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_compilation_cache_max_size")
    previous = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_auto_keeps_the_directory_jax_has_else_the_users_cache(jax_settings, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "given")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "xdg" / "easytrain" / "xla")
    assert compilation_cache.resolve("") is None and compilation_cache.resolve(None) is None
    assert compilation_cache.resolve("~/somewhere") == str(Path.home() / "somewhere")


def test_an_empty_setting_leaves_jax_alone(jax_settings, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
    assert compilation_cache.enable("") == str(tmp_path / "given")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")


def test_a_directory_that_cannot_be_created_is_refused_naming_the_field(jax_settings, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ArgumentError, match="compilation_cache_dir"):
        compilation_cache.enable(str(tmp_path / "file" / "cache"))
    with pytest.raises(ArgumentError, match="compilation_cache_dir"):
        TrainingArguments(output_dir="unused", compilation_cache_dir=3)


def test_a_second_trainer_loads_the_compiled_steps(jax_settings, tmp_path):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny steps compile fast
    hits = []

    def count(event: str, **_):
        hits.append(event)

    config = tmp_path / "config.json"  # one narrow layer: less to trace and compile, twice
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64)))

    def run(name: str) -> BaseTrainer:
        args = TrainingArguments(output_dir=str(tmp_path / name), max_length=16, train_batch_size=4, max_steps=2,
                                 eval_strategy="no", save_strategy="no", report_to=["none"],
                                 disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16,
                                 max_eval_samples=4, compilation_cache_dir=str(tmp_path / "cache"),
                                 model_config=str(config))
        trainer = BaseTrainer(args)
        trainer.train()
        return trainer

    first = run("first")
    assert first.compilation_cache_dir == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())
    jax.clear_caches()  # what a new process starts from: neither JAX's in-memory caches nor the suite's memo
    loaded_executables.forget()
    jax.monitoring.register_event_listener(count)
    try:
        run("second")
    finally:
        jax.monitoring.unregister_event_listener(count)
    assert "/jax/compilation_cache/cache_hits" in hits


def test_the_cache_is_capped_unless_jax_is_given_a_size(jax_settings, monkeypatch, tmp_path):
    """Every new program (another max_steps, schedule or shape) adds an entry and JAX evicts nothing by default, so a
    cache the trainer turns on gets a size cap (least recently used entries go first); a size given to JAX stays."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    jax.config.update("jax_compilation_cache_max_size", -1)
    compilation_cache.enable(str(tmp_path / "capped"))
    assert jax.config.jax_compilation_cache_max_size == compilation_cache.DEFAULT_MAX_BYTES
    jax.config.update("jax_compilation_cache_max_size", 123 * 2**20)
    compilation_cache.enable(str(tmp_path / "given"))
    assert jax.config.jax_compilation_cache_max_size == 123 * 2**20
    jax.config.update("jax_compilation_cache_max_size", -1)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")  # "no limit", asked for explicitly
    compilation_cache.enable(str(tmp_path / "unlimited"))
    assert jax.config.jax_compilation_cache_max_size == -1


def test_a_cache_filled_without_a_cap_takes_new_programs_under_one(jax_settings, monkeypatch, tmp_path):
    """JAX's eviction reads an access-time file beside every entry, which a cache filled without a size cap never
    wrote: without one, every later write failed (a warning), so the cache stopped storing programs for good."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    jax.config.update("jax_compilation_cache_max_size", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    directory = tmp_path / "older"
    directory.mkdir()
    (directory / "jit_old-0123-cache").write_bytes(b"an entry written before the cap")
    compilation_cache.enable(str(directory))
    before = set(directory.glob("*-cache"))
    jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7.0)))
    assert any("lambda" in path.name for path in set(directory.glob("*-cache")) - before), "not stored"
    assert (directory / "jit_old-0123-atime").is_file()
