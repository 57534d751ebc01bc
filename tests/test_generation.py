"""Generation: KV-cache decoding against the full forward pass and transformers, sampling against NumPy."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from easytrain.generation import (
    GenerationError,
    filter_logits,
    generate,
    greedy_complete,
    pad_prompts,
    sample_logits,
)
from easytrain.models import LlamaForCausalLM, init_model, load_pretrained

from model_configs import VOCAB, family_config, tiny_config

torch = pytest.importorskip("torch")

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [11, 4], [70, 23, 9, 120, 33], [88]]
PAD = 0


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory) -> tuple[object, LlamaForCausalLM]:
    """A randomised PyTorch Llama and the same weights loaded into ours through safetensors."""
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # Large perturbations give peaked logits: no near-ties for argmax to flip on.
        for param in reference.parameters():
            param.add_(0.5 * torch.randn_like(param))
    reference.generation_config.eos_token_id = None
    reference.generation_config.bos_token_id = None
    path = tmp_path_factory.mktemp("tiny_llama")
    reference.save_pretrained(path)
    return reference, load_pretrained(path)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return init_model(tiny_config(initializer_range=0.2), seed=0)  # Logits of order 1, not 0.1.


def hf_generate(reference, ids_BL: np.ndarray, mask_BL: np.ndarray, new: int, eos: int | None) -> np.ndarray:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(ids_BL, dtype=torch.long), attention_mask=torch.tensor(mask_BL), max_new_tokens=new,
            do_sample=False, eos_token_id=eos, pad_token_id=PAD,
        )
    return out[:, ids_BL.shape[1]:].numpy()


def with_pad_tail(tokens_BN: np.ndarray, width: int) -> np.ndarray:
    """transformers stops the batch once every row is done; pad its output to the full width."""
    return np.pad(tokens_BN, ((0, 0), (0, width - tokens_BN.shape[1])), constant_values=PAD)


def test_greedy_matches_transformers_with_left_padding_and_eos(hf_pair):
    reference, ours = hf_pair
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD, side="left")
    free_BN = hf_generate(reference, ids_BL, mask_BL, 10, eos=None)
    eos = int(free_BN[1, 3])  # Row 1 emits it at step 3 and not before: stopping is exercised.
    assert eos not in free_BN[1, :3] and eos != PAD
    expected_BN = with_pad_tail(hf_generate(reference, ids_BL, mask_BL, 10, eos=eos), 10)
    actual_BN = generate(ours, ids_BL, mask_BL, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(actual_BN, expected_BN)
    assert (actual_BN[1, 4:] == PAD).all() and not (actual_BN[1, :4] == PAD).any()
    unstopped = [row for row in range(len(PROMPTS)) if eos not in actual_BN[row]]
    assert unstopped, "at least one row must run the full 10 tokens"
    np.testing.assert_array_equal(actual_BN[unstopped], free_BN[unstopped])


@nnx.jit
def full_forward(model: LlamaForCausalLM, ids_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return model(ids_BT, attention_mask_BT=mask_BT)


@nnx.jit
def cached_decode(model: LlamaForCausalLM, ids_BT: jax.Array, cache, mask_BT: jax.Array):
    return model.decode(ids_BT, cache, attention_mask_BT=mask_BT)


def naive_greedy(model: LlamaForCausalLM, prompt: list[int], new: int, width: int = 16) -> list[int]:
    """The no-cache reference: the whole right-padded sequence is re-run for every new token."""
    tokens = list(prompt)
    for _ in range(new):
        ids_1W, mask_1W = pad_prompts([tokens + [PAD] * (width - len(tokens))], PAD, side="right")
        mask_1W[0, len(tokens):] = 0
        tokens.append(int(jnp.argmax(full_forward(model, ids_1W, mask_1W)[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_left_right_and_unpadded_generation_agree(model):
    expected = np.array([naive_greedy(model, p, 6) for p in PROMPTS])
    for side in ("left", "right"):
        ids_BL, mask_BL = pad_prompts(PROMPTS, PAD, side=side, multiple=16)
        np.testing.assert_array_equal(generate(model, ids_BL, mask_BL, max_new_tokens=6), expected, err_msg=side)
    np.testing.assert_array_equal(greedy_complete(model, PROMPTS, 6, PAD), expected)


def decoding_config(case: str) -> transformers.PretrainedConfig:
    """`llama` and `mistral_window_3`: the tiny Llama's sizes (the second as a Mistral whose every layer attends to
    the last 3 positions); a family name: that family's distinguishing switches (`family_config`)."""
    config = tiny_config(initializer_range=0.2)
    if case == "mistral_window_3":
        sizes = {k: v for k, v in config.to_diff_dict().items() if k != "model_type"}
        return transformers.MistralConfig(**sizes, sliding_window=3)
    return config if case == "llama" else family_config(case, initializer_range=0.2)


@pytest.mark.parametrize("case", ["llama", "mistral_window_3", "mistral", "qwen2", "qwen3"])
def test_cached_decoding_logits_equal_full_forward(case):
    """The cached path applies what the full forward applies: windows on every layer or one (Mistral, Qwen2,
    Qwen3), Mistral's head_dim apart from hidden / heads, and Qwen3's q/k norms on every decoded token too."""
    model = init_model(decoding_config(case), seed=1)
    if case == "mistral_window_3":
        assert model.features.windows == (3, 3)
    rng = np.random.RandomState(0)
    rows = [rng.randint(1, VOCAB, n).tolist() for n in (9, 6, 8)]  # Each row: prompt, then 4 decoded tokens.
    prompts = [row[:-4] for row in rows]
    full_ids_BT, full_mask_BT = pad_prompts(rows, PAD, side="right")
    expected_BTV = np.asarray(full_forward(model, full_ids_BT, full_mask_BT))
    # Cached path: prefill with row 1 right-padded and row 2 left-padded, then one token per step.
    ids_BL, mask_BL = pad_prompts(prompts, PAD, side="left")
    right_ids_BL, right_mask_BL = pad_prompts(prompts, PAD, side="right")
    ids_BL[1], mask_BL[1] = right_ids_BL[1], right_mask_BL[1]
    cache = model.init_cache(3, ids_BL.shape[1] + 4)
    logits_BLV, cache = cached_decode(model, ids_BL, cache, mask_BL)
    cached = [[logits_BLV[b][mask_BL[b] == 1]] for b in range(3)]
    for t in range(4):
        token_B1 = jnp.asarray([[row[len(prompt) + t]] for row, prompt in zip(rows, prompts)])
        logits_B1V, cache = cached_decode(model, token_B1, cache, jnp.ones_like(token_B1))
        for b in range(3):
            cached[b].append(logits_B1V[b])
    worst = max(
        np.abs(np.concatenate(cached[b]) - expected_BTV[b, : len(row)]).max() for b, row in enumerate(rows)
    )
    print(f"max |cached - full| = {worst:.2e}")
    assert worst < 2e-5, worst


def test_second_call_with_same_shapes_does_not_recompile(model, caplog):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    ids_BL, mask_BL = pad_prompts(prompts, PAD)
    sample = dict(max_new_tokens=5, do_sample=True, top_p=0.9)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        first = generate(model, ids_BL, mask_BL, seed=0, **sample)
        compiles_after_first = sum("Compiling jit(_generate)" in r.getMessage() for r in caplog.records)
        again = generate(model, ids_BL, mask_BL, seed=0, **sample)
        other_seed = generate(model, ids_BL, mask_BL, seed=1, **sample)
        other_prompts = generate(model, pad_prompts([[7, 7, 7], [8, 8, 8, 8, 8]], PAD)[0], seed=0, **sample)
    compiles = sum("Compiling jit(_generate)" in r.getMessage() for r in caplog.records)
    assert compiles_after_first == 1 and compiles == 1
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert other_prompts.shape == first.shape == (2, 5)


def numpy_keep(logits_V: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Reference filter: top-k by sorting, then the smallest most-likely set holding top_p of the mass."""
    keep_V = np.ones(logits_V.shape, bool)
    if top_k is not None:
        keep_V &= logits_V >= np.sort(logits_V)[::-1][top_k - 1]
    if top_p is not None:
        masked_V = np.where(keep_V, logits_V.astype(np.float64), -np.inf)
        probs_V = np.exp(masked_V - masked_V.max())
        probs_V /= probs_V.sum()
        nucleus, mass = np.zeros_like(keep_V), 0.0
        for token in np.argsort(-probs_V, kind="stable"):
            if mass >= top_p:
                break
            nucleus[token], mass = True, mass + probs_V[token]
        keep_V &= nucleus
    return keep_V


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.3), (None, 0.9), (8, 0.5), (1, None), (None, 1e-6)])
def test_filter_logits_keeps_exactly_the_numpy_reference_set(top_k, top_p):
    logits_BV = np.random.RandomState(0).standard_normal((6, 40)).astype(np.float32) * 2
    filtered_BV = np.asarray(filter_logits(jnp.asarray(logits_BV), top_k, top_p))
    for logits_V, got_V in zip(logits_BV, filtered_BV):
        keep_V = numpy_keep(logits_V, top_k, top_p)
        assert 0 < keep_V.sum() < logits_V.size
        np.testing.assert_array_equal(np.isfinite(got_V), keep_V)
        np.testing.assert_array_equal(got_V[keep_V], logits_V[keep_V])


def test_sampling_follows_the_filtered_distribution():
    logits_V = jnp.asarray(np.random.RandomState(1).standard_normal(10).astype(np.float32))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: sample_logits(logits_V[None], k, temperature=0.7, top_k=4))(keys)[:, 0]
    expected_V = np.exp(np.asarray(filter_logits(logits_V[None] / 0.7, top_k=4))[0])
    expected_V /= expected_V.sum()
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=10) / len(keys), expected_V, atol=0.015)


sample_jit = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))


def test_top_k_1_and_tiny_temperature_are_greedy():
    logits_BV = jnp.asarray(np.random.RandomState(2).standard_normal((8, 64)).astype(np.float32))
    greedy_B = np.argmax(np.asarray(logits_BV), axis=-1)
    for seed in range(5):
        rng = jax.random.key(seed)
        np.testing.assert_array_equal(sample_jit(logits_BV, rng, top_k=1), greedy_B)
        np.testing.assert_array_equal(sample_jit(logits_BV, rng, temperature=1e-4), greedy_B)
        np.testing.assert_array_equal(sample_jit(logits_BV, rng, top_p=1e-6), greedy_B)
    hot = [np.asarray(sample_jit(logits_BV, jax.random.key(s), temperature=1.0)) for s in range(5)]
    assert any((h != greedy_B).any() for h in hot), "temperature 1 sampling should not always be greedy"


def test_pad_prompts_layout():
    ids_NL, mask_NL = pad_prompts([[1, 2, 3], [4]], pad_id=9, side="left", multiple=4)
    np.testing.assert_array_equal(ids_NL, [[9, 1, 2, 3], [9, 9, 9, 4]])
    np.testing.assert_array_equal(mask_NL, [[0, 1, 1, 1], [0, 0, 0, 1]])
    ids_NL, mask_NL = pad_prompts([[1, 2, 3], [4]], pad_id=9, side="right")
    np.testing.assert_array_equal(ids_NL, [[1, 2, 3], [4, 9, 9]])
    np.testing.assert_array_equal(mask_NL, [[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2, top_k=3), "do_sample=True"),
        (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature"),
        (dict(max_new_tokens=2, do_sample=True, top_p=1.5), "top_p"),
        (dict(max_new_tokens=2, do_sample=True, top_k=0), "top_k"),
        (dict(max_new_tokens=2, attention_mask=np.array([[1, 1], [0, 0]])), "rows \\[1\\]"),
        (dict(max_new_tokens=2, attention_mask=np.ones((2, 3))), "attention_mask has shape"),
        (dict(max_new_tokens=2.0), "max_new_tokens = 2.0 must be an int"),
        (dict(max_new_tokens=True), "max_new_tokens = True must be an int"),
        (dict(max_new_tokens=2, do_sample=True, top_k=2.5), "top_k = 2.5 must be an int"),
        (dict(max_new_tokens=2, do_sample=True, top_k=True), "top_k = True must be an int"),
        (dict(max_new_tokens=2, do_sample=True, temperature="hot"), "temperature = 'hot' must be a number"),
        (dict(max_new_tokens=2, eos_token_id=2.5), "eos_token_id"),
        (dict(max_new_tokens=2, pad_token_id=0.5), "pad_token_id = 0.5 must be an int"),
    ],
)
def test_bad_settings_name_the_field(model, kwargs, field):
    with pytest.raises(GenerationError, match=field):
        generate(model, np.array([[1, 2], [3, 4]]), **kwargs)


def test_integral_settings_of_any_integer_type_are_accepted(model):
    expected = generate(model, np.array([[1, 2]]), max_new_tokens=3, eos_token_id=5)
    got = generate(model, np.array([[1, 2]]), max_new_tokens=np.int64(3), eos_token_id=np.int32(5))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 10, -3])
def test_prompt_ids_outside_the_vocabulary_are_refused_before_compute(model, bad_id):
    """An id past the table gave NaN logits and all-zero tokens, a negative one wrapped around: both silent."""
    ids_BL, mask_BL = pad_prompts([[5, 17, 99], [4, bad_id, 8]], PAD)
    expected = rf"row 1, position 1 holds token id {bad_id},.*vocab_size {VOCAB}.*tokenizer"
    with pytest.raises(GenerationError, match=expected):
        generate(model, ids_BL, mask_BL, max_new_tokens=2)


def test_padding_ids_are_never_read(model):
    """Padding is not attended, so its ids do not matter, even ones outside the vocabulary (a NaN embedding
    there would reach the real tokens through the zero attention weights: 0 * NaN)."""
    ids_BL, mask_BL = pad_prompts([[5, 17, 99], [4]], PAD)
    expected = generate(model, ids_BL, mask_BL, max_new_tokens=3)
    for pad in (VOCAB + 10, -3):
        got = generate(model, np.where(mask_BL == 1, ids_BL, pad), mask_BL, max_new_tokens=3)
        np.testing.assert_array_equal(got, expected)


def test_generation_runs_in_eval_mode_even_for_a_module_in_train_mode():
    """Decoding is inference: dropout (here on LoRA adapters, p=0.5) must be off, whatever mode the module is
    in, so greedy tokens equal those of the merged model, which has no dropout at all."""
    from easytrain import lora

    adapted = lora.apply_lora(init_model(tiny_config(initializer_range=0.2), seed=0),
                              lora.LoRAConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(0))
    for module in lora.lora_modules(adapted).values():
        module.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(2), module.lora_b.shape)
    adapted.train()
    merged = lora.merge_lora(adapted)
    merged.eval()
    expected = np.array([naive_greedy(merged, p, 6) for p in PROMPTS])
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD, side="left", multiple=16)
    np.testing.assert_array_equal(generate(adapted, ids_BL, mask_BL, max_new_tokens=6), expected)


def test_top_p_keeps_every_token_tied_at_the_boundary():
    """The nucleus reaches 0.5 inside a tie of two 0.2 tokens: both are kept (transformers keeps one, the one its
    sort puts first), and nothing below them."""
    logits_BV = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.1, 0.1]], jnp.float32))
    kept_V = np.isfinite(np.asarray(filter_logits(logits_BV, top_p=0.5)))[0]
    np.testing.assert_array_equal(kept_V, [True, True, True, False, False])
