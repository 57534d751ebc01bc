"""``generate``'s and ``generate_traced``'s settings, resolved in one place: those a call passes, then a
transformers-style generation config's (a ``transformers.GenerationConfig``, or the mapping of a checkpoint's
``generation_config.json``), then the defaults.

transformers' ``generate`` samples with the checkpoint's temperature/top-k/top-p and, where they are unset,
its own defaults (top_k=50); ``generate`` applies neither unless given such a config. Fields that would change
the tokens but that ``generate`` does not implement (repetition_penalty, min_p, beams, ...) are refused by
name rather than ignored, so a config never decodes differently from what it says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from easytrain.generation import Default, GenerationConfig, GenerationError, _is_int

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import transformers

#: The settings a config can fill; each is taken from it only where the call leaves it unset.
FILLED = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")
_SAMPLING = ("temperature", "top_k", "top_p")
# Values with which transformers' generate applies nothing for the field (its defaults where a config leaves one
# unset, GenerationConfig._get_default_generation_params, and the values its logits processors skip or apply as
# no-ops: guidance_scale=1, min_new_tokens=0, min_p=0); a field at its neutral value (or None) is accepted.
_NEUTRAL = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_length": 0, "num_beams": 1, "typical_p": 1.0,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "encoder_repetition_penalty": 1.0, "num_return_sequences": 1, "remove_invalid_values": False,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "guidance_scale": 1.0, "min_new_tokens": 0, "min_p": 0.0, "penalty_alpha": 0.0, "token_healing": False,
            "use_mtp": False}
# Token lists that transformers applies as nothing when empty. Not every empty value is neutral: transformers
# refuses an empty bad_words_ids or sequence_bias, and an empty watermarking_config watermarks with its defaults.
_EMPTY_IS_NEUTRAL = frozenset({"suppress_tokens", "begin_suppress_tokens"})
# Fields that leave a single sequence's tokens as they are: ids, caching, output format, speculative decoding
# (the same tokens, drawn faster), beam-only knobs (beams themselves are refused), the length cap that
# max_new_tokens overrides, bookkeeping.
_NO_EFFECT = frozenset({
    "bos_token_id", "max_length", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "compile_config", "disable_compile", "prefill_chunk_size", "low_memory", "continuous_batching_config",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
    "renormalize_logits", "decoder_start_token_id", "early_stopping", "length_penalty", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind",
    "target_lookbehind", "speculation_type", "transformers_version", "_from_model_config"})
# Logits warpers transformers applies only when sampling.
_SAMPLING_ONLY = frozenset({"min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"})


def resolve_config(generation_config: transformers.GenerationConfig | Mapping[str, Any] | None, max_length: object,
                   vocab_size: int | None = None, **arguments: Any) -> GenerationConfig:
    """The decoding config of a call's settings: those passed (not a ``Default``), then ``generation_config``'s,
    then each ``Default``'s value. Every refusal is raised here, on the host, before anything is traced.
    `vocab_size`: the model's, which the EOS and pad ids must lie under (None: not checked)."""
    if max_length is not None:
        raise GenerationError(f"max_length = {max_length!r} is not supported; pass max_new_tokens, the number of "
                              "tokens to generate per row (transformers' max_length also counts the prompt).")
    passed = {name: value for name, value in arguments.items() if not isinstance(value, Default)}
    if generation_config is not None:
        passed = fill_settings(generation_config, passed, vocab_size)
    settings = {name: passed[name] if name in passed else value.value for name, value in arguments.items()}
    if settings["max_new_tokens"] is None:
        raise GenerationError("max_new_tokens is required: pass the number of tokens to generate per row (or set "
                              "it in generation_config).")
    config = _config(**settings)
    _check_vocabulary(config, vocab_size)
    return config


def _check_vocabulary(config: GenerationConfig, vocab_size: int | None) -> None:
    """EOS and pad ids must be ids the model has: no logit produces an EOS past its vocabulary, so rows never stop
    (transformers runs to its length cap without a word), and a finished row's pad is fed back to the model, whose
    embedding has no row for one past it (transformers fails there with an IndexError)."""
    if vocab_size is None:
        return
    bound = f"outside the model's vocabulary [0, {vocab_size}) (vocab_size {vocab_size})"
    if beyond := [token for token in config.eos_token_id if token >= vocab_size]:
        raise GenerationError(f"eos_token_id = {list(config.eos_token_id)} holds {beyond[0]}, {bound}: no logit "
                              "produces it, so rows would never stop at it. Pass the model's tokenizer's EOS id(s) "
                              "(tokenizer.eos_token_id).")
    if config.pad_token_id >= vocab_size:
        raise GenerationError(f"pad_token_id = {config.pad_token_id} is {bound}: finished rows emit it and feed it "
                              "back to the model, whose embedding has no row for it. Pass an id under vocab_size, or "
                              "leave it unset for the first EOS id.")


def _config(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> GenerationConfig:
    """The config the settings describe: pad defaults to the first EOS id, else 0."""
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())  # checked by the config
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    return GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad)


def _fields_of(generation_config: Any) -> dict[str, Any]:
    import transformers  # imported here: a call without a generation config needs none of it

    if isinstance(generation_config, transformers.GenerationConfig):
        return generation_config.to_dict()
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    raise GenerationError(
        f"generation_config = {generation_config!r} must be a transformers.GenerationConfig or a mapping of its "
        "fields (as read from generation_config.json), e.g. generation_config_of(model); or None.")


def _refuse_unimplemented(fields: dict[str, Any], sampling: bool) -> None:
    """One error naming every field set to something ``generate`` would not do. Keys transformers does not know
    are skipped, as transformers itself skips them."""
    import transformers

    known = transformers.GenerationConfig().to_dict().keys()
    refused = [
        f"{name}={value!r}" for name, value in fields.items()
        if name in known and name not in FILLED and name not in _NO_EFFECT and not _is_neutral(name, value)
        and (sampling or name not in _SAMPLING_ONLY)
    ]
    if refused:
        neutral = ", ".join(f"{item.split('=')[0]}={_NEUTRAL.get(item.split('=')[0])!r}" for item in refused)
        raise GenerationError(
            f"generation_config sets {', '.join(refused)}, which generate does not implement (it decodes greedily or "
            f"samples with temperature, top_k and top_p only). Set them to their neutral value ({neutral}) or "
            "drop them from the config to decode without them.")


def _is_neutral(name: str, value: Any) -> bool:
    """Whether transformers' ``generate`` leaves the tokens as they are with this value of the field: unset, its
    neutral value, an empty token list where that is a no-op, or a length penalty whose decay factor is 1."""
    if value is None or (name in _EMPTY_IS_NEUTRAL and isinstance(value, (list, tuple)) and not value):
        return True
    if name == "exponential_decay_length_penalty":  # (start index, decay factor): a factor of 1 adds 0 to EOS
        return isinstance(value, (list, tuple)) and len(value) == 2 and value[1] == 1
    return name in _NEUTRAL and value == _NEUTRAL[name]


def fill_settings(generation_config: Any, passed: dict[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """``passed`` (the settings the call gave), completed from the config as transformers' ``generate`` would.
    A config's pad that is no id of the model (negative, or past `vocab_size`) is dropped with a warning: real
    configs hold both (`easytrain.models.token_ids`).

    Sampling settings come from the config only when sampling, with transformers' defaults where it leaves them
    unset (temperature 1, top_k 50, top_p 1); top_k=0 and top_p=1 turn those filters off (None here).
    ``max_length`` is never read: ``generate`` needs ``max_new_tokens``.
    """
    fields = _fields_of(generation_config)
    settings = dict(passed)
    for name in ("max_new_tokens", "do_sample", "eos_token_id", "pad_token_id"):
        if name not in settings and fields.get(name) is not None:
            settings[name] = fields[name]
    if "pad_token_id" not in passed and _is_int(pad := settings.get("pad_token_id")) and (
            pad < 0 or (vocab_size is not None and pad >= vocab_size)):
        logger.warning("generation_config sets pad_token_id=%s, no token id of the model (vocab_size %s; LLaMA-1 "
                       "conversions carry -1, a pad added to the tokenizer after training vocab_size): finished rows "
                       "are filled with the default pad, the first EOS id, instead; pass pad_token_id to choose "
                       "another.", settings.pop("pad_token_id"), vocab_size)
    do_sample = settings.get("do_sample", False)
    sampling = isinstance(do_sample, (bool, np.bool_)) and bool(do_sample)  # anything else is refused later
    _refuse_unimplemented(fields, sampling)
    if sampling:
        for name in _SAMPLING:
            if name not in settings:
                settings[name] = _from_config(name, fields.get(name))
    return settings


def _from_config(name: str, value: Any) -> Any:
    """A sampling field as transformers reads it: unset takes the default; top_k=0 and top_p=1 mean no filter."""
    value = _NEUTRAL[name] if value is None else value
    if (name == "top_k" and value == 0) or (name == "top_p" and value == 1):
        return None
    return value
