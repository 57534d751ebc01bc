"""Preference pairs: one shared prompt, completion-only masks, BOS/EOS, truncation, paired batches.

Pins the DPO failures of research/pain_points.md items 7 and 19: chosen and rejected whose prompt
tokens differ (a BOS before a completion, template mismatches), doubled EOS after chats, EOS masked
out when pad == eos, padding rows that weigh, and pairs split across micro-batches.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools
import json

import datasets
import numpy as np
import pytest
from chat_fixtures import CHAT, MARKED, SPECS, assistant_span, build_chat_tokenizer

from easytrain.data import DataError, EvalBatches, TrainBatches, bucket_lengths
from easytrain.data.paired_batches import PairedCollate, pair_rows
from easytrain.data.preference_data import (
    PAIR_COLUMNS,
    PREFERENCE_STATS_KEYS,
    PreferenceDataOptions,
    detect_preference_format,
    split_implicit_prompt,
    tokenize_pair,
    tokenize_preference_dataset,
)

TEXT = {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " Five."}
PROMPT = CHAT[:2]
GOOD = {"role": "assistant", "content": "Two plus two is four."}
BAD = {"role": "assistant", "content": "Five, thank you!"}
MESSAGES = {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}
IMPLICIT = {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}


@pytest.fixture(scope="module")
def toks():
    return {name: build_chat_tokenizer(name) for name in SPECS}


def supervised(tok, ids, mask):
    return tok.decode([token for token, bit in zip(ids, mask, strict=True) if bit])


def sides(pair):
    return [(pair.chosen_input_ids, pair.chosen_loss_mask), (pair.rejected_input_ids, pair.rejected_loss_mask)]


def check_shared_prompt(pair):
    """Both sequences start with the same prompt tokens, and only completion tokens are supervised."""
    n = pair.prompt_length
    assert pair.chosen_input_ids[:n] == pair.rejected_input_ids[:n]
    for ids, mask in sides(pair):
        assert len(ids) == len(mask) and mask[:n] == [0] * n and mask[n:] == [1] * (len(ids) - n)


# --- one prompt, exact completion masks -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("example", [TEXT, MESSAGES, IMPLICIT], ids=["text", "messages", "implicit"])
def test_chosen_and_rejected_share_the_prompt_tokens(toks, name, example):
    pair = tokenize_pair(example, toks[name])
    check_shared_prompt(pair)
    assert pair.prompt_length > 0 and pair.chosen_input_ids != pair.rejected_input_ids


@pytest.mark.parametrize("name", MARKED)
def test_chat_mask_is_exactly_the_rendered_completion(toks, name):
    """Supervised tokens decode to the full rendering minus the prompt rendering (+ a non-turn EOS)."""
    tok = toks[name]
    pair = tokenize_pair(MESSAGES, tok)
    prompt_text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    for (ids, mask), reply in zip(sides(pair), (GOOD, BAD), strict=True):
        full_text = tok.apply_chat_template(PROMPT + [reply], tokenize=False)
        assert full_text.startswith(prompt_text)
        extra_eos = SPECS[name].eos if SPECS[name].eos != SPECS[name].end_of_turn else ""
        assert supervised(tok, ids, mask) == full_text[len(prompt_text):] + extra_eos
        assert assistant_span(name, reply["content"]) in supervised(tok, ids, mask)
        assert tok.decode(ids[: pair.prompt_length]) == prompt_text


@pytest.mark.parametrize("name", sorted(SPECS))
def test_text_mask_is_the_completion_and_eos(toks, name):
    tok = toks[name]
    pair = tokenize_pair(TEXT, tok)
    for (ids, mask), completion in zip(sides(pair), (TEXT["chosen"], TEXT["rejected"]), strict=True):
        assert supervised(tok, ids, mask) == completion + tok.eos_token
        prompt = tok.decode(ids[: pair.prompt_length], skip_special_tokens=True)
        assert prompt == TEXT["prompt"]


def test_implicit_prompt_equals_explicit_prompt(toks):
    for name in MARKED:
        assert tokenize_pair(IMPLICIT, toks[name]) == tokenize_pair(MESSAGES, toks[name])


def test_split_implicit_prompt_takes_the_longest_common_prefix():
    later_good, later_bad = CHAT + [GOOD], CHAT + [BAD]
    prompt, chosen, rejected = split_implicit_prompt(later_good, later_bad)
    assert (prompt, chosen, rejected) == (CHAT, [GOOD], [BAD])
    # Arrow's None fields do not make equal messages differ.
    with_none = [{**m, "tool_calls": None} for m in PROMPT] + [GOOD]
    assert split_implicit_prompt(with_none, PROMPT + [BAD])[0] == with_none[:2]


@pytest.mark.parametrize("chosen, rejected, match", [
    ([GOOD], [BAD], "share no leading message"),
    (PROMPT + [GOOD], PROMPT + [GOOD], "'chosen' has no messages after the prompt"),
    (PROMPT + [GOOD], PROMPT + [GOOD, CHAT[3], BAD], "'chosen' has no messages"),
    (PROMPT + [GOOD, CHAT[3], GOOD], PROMPT + [GOOD, {"role": "user", "content": "?"}, BAD],
     "'user' message.*must start with an assistant message"),
])
def test_split_implicit_prompt_errors(chosen, rejected, match):
    with pytest.raises(DataError, match=match):
        split_implicit_prompt(chosen, rejected)


# --- special tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_bos_and_no_double_eos(toks, name):
    tok = toks[name]
    examples = [TEXT, MESSAGES, {**TEXT, "prompt": f"{tok.bos_token or ''}{TEXT['prompt']}",
                                 "chosen": TEXT["chosen"] + tok.eos_token}]
    for example in examples:
        for ids, _ in sides(tokenize_pair(example, tok)):
            if tok.bos_token_id is None:
                assert None not in ids
            else:
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, tok.decode(ids)
            completion = ids[tokenize_pair(example, tok).prompt_length:]
            assert completion.count(tok.eos_token_id) == 1, tok.decode(completion)  # ChatML: <|im_end|>\n
            last = max(i for i, token in enumerate(ids) if tok.decode([token]).strip())
            assert ids[last] == tok.eos_token_id


@pytest.mark.parametrize("name", ["mistral", "llama3_base"])  # pad == eos
def test_eos_is_a_supervised_target_when_pad_is_eos(toks, name):
    tok = toks[name]
    assert tok.pad_token_id == tok.eos_token_id
    rows = datasets.Dataset.from_list([TEXT, TEXT])
    pairs, _ = tokenize_preference_dataset(rows, tok, PreferenceDataOptions(max_length=64))
    batch = PairedCollate(bucket_lengths(64), tok.pad_token_id)(pairs.with_format("numpy")[:], np.arange(2))
    for b, side in itertools.product(range(2), range(2)):
        n = int(batch["attention_mask"][b, side].sum())
        assert batch["targets"][b, side, n - 1] == tok.eos_token_id and batch["loss_mask"][b, side, n - 1] == 1
        assert batch["loss_mask"][b, side, n:].sum() == 0
        assert (batch["input_ids"][b, side, n:] == tok.pad_token_id).all()


def test_template_whose_generation_prompt_is_not_a_prefix_is_refused(toks):
    template = SPECS["chatml"].template.replace("{{ '<|im_start|>assistant\\n' }}{% endif %}",
                                                "{{ '<|im_start|>model\\n' }}{% endif %}")
    with pytest.raises(DataError, match="not a token prefix of prompt \\+ 'chosen'"):
        tokenize_pair(MESSAGES, toks["chatml"], PreferenceDataOptions(chat_template=template))


# --- truncation -----------------------------------------------------------------------------------

def long_text(tok):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    return {"prompt": prompt, "chosen": " All that glitters is not gold. " * 3, "rejected": " Practice."}


def test_truncation_keeps_bos_prompt_end_and_completion_start(toks):
    tok = toks["mistral"]
    example = long_text(tok)
    full = tokenize_pair(example, tok, PreferenceDataOptions(max_length=None))
    prompt = full.chosen_input_ids[: full.prompt_length]
    chosen = full.chosen_input_ids[full.prompt_length:]
    assert len(prompt) > 20 and len(chosen) > 20
    cut = tokenize_pair(example, tok, PreferenceDataOptions(max_length=30))  # room 15: both cut
    check_shared_prompt(cut)
    assert cut.prompt_length == 15 and len(cut.chosen_input_ids) == 30
    assert cut.chosen_input_ids[: cut.prompt_length] == [tok.bos_token_id] + prompt[-14:]
    assert cut.chosen_input_ids[cut.prompt_length:] == chosen[:15]
    assert cut.rejected_input_ids == cut.chosen_input_ids[:15] + full.rejected_input_ids[full.prompt_length:]
    assert (cut.prompt_truncated, cut.chosen_truncated, cut.rejected_truncated) == (True, True, False)


def test_prompt_is_cut_only_when_the_completion_room_overflows(toks):
    tok = toks["mistral"]
    example = long_text(tok)
    full = tokenize_pair(example, tok, PreferenceDataOptions(max_length=None))
    prompt_len, chosen_len = full.prompt_length, len(full.chosen_input_ids) - full.prompt_length
    fits = PreferenceDataOptions(max_length=prompt_len + chosen_len)
    assert tokenize_pair(example, tok, fits) == full
    # room for 4 completion tokens: the prompt stays whole, the completions are cut.
    short_room = PreferenceDataOptions(max_length=prompt_len + 4, min_completion_length=4)
    cut = tokenize_pair(example, tok, short_room)
    assert cut.prompt_length == prompt_len and len(cut.chosen_input_ids) == prompt_len + 4
    default_room = tokenize_pair(example, tok, PreferenceDataOptions(max_length=prompt_len + 4))
    assert default_room.prompt_length == prompt_len + 4 - (prompt_len + 4) // 2  # half for the completions
    capped = tokenize_pair(example, tok, PreferenceDataOptions(max_length=None, max_prompt_length=5))
    assert capped.prompt_length == 5 and capped.chosen_input_ids[5:] == full.chosen_input_ids[prompt_len:]
    # the cap holds under a max_length with room for the whole prompt too
    assert tokenize_pair(example, tok, PreferenceDataOptions(max_length=prompt_len + chosen_len,
                                                             max_prompt_length=5)) == capped


def test_truncation_and_drops_are_counted(toks):
    tok = toks["mistral"]
    options = PreferenceDataOptions(max_length=30, add_eos=False)
    rows = [long_text(tok), TEXT, {**TEXT, "rejected": ""}, {**TEXT, "rejected": TEXT["chosen"]}]
    pairs, stats = tokenize_preference_dataset(datasets.Dataset.from_list(rows), tok, options)
    assert set(stats) == set(PREFERENCE_STATS_KEYS)
    assert stats == {**stats, "num_pairs": 4, "num_kept": 3, "prompt_truncated": 1, "completion_truncated": 1,
                     "dropped_no_supervised_tokens": 1, "identical_pairs": 1}
    assert pairs.column_names == list(PAIR_COLUMNS) and len(pairs) == 3
    lengths = [len(ids) for ids in list(pairs["chosen_input_ids"]) + list(pairs["rejected_input_ids"])]
    masks = list(pairs["chosen_loss_mask"]) + list(pairs["rejected_loss_mask"])
    assert stats["num_tokens"] == sum(lengths) and stats["num_supervised_tokens"] == sum(map(sum, masks))
    assert max(lengths) <= 30 and all(sum(mask) > 0 for mask in masks)


def test_nothing_left_is_an_error(toks):
    rows = datasets.Dataset.from_list([{**TEXT, "chosen": ""}])
    with pytest.raises(DataError, match="No preference pair is left"):
        tokenize_preference_dataset(rows, toks["mistral"], PreferenceDataOptions(add_eos=False))


def test_options_are_validated():
    with pytest.raises(DataError, match="min_completion_length"):
        PreferenceDataOptions(max_length=16, min_completion_length=16)
    with pytest.raises(DataError, match="max_prompt_length"):
        PreferenceDataOptions(max_prompt_length=0)


# --- paired batches -------------------------------------------------------------------------------

def tokenized_pairs(tok, n=5):
    rows = [{**TEXT, "chosen": TEXT["chosen"] * (i + 1)} for i in range(n)]
    return tokenize_preference_dataset(datasets.Dataset.from_list(rows), tok, PreferenceDataOptions(max_length=64))[0]


def test_batch_shapes_follow_the_buckets(toks):
    tok = toks["chatml"]
    pairs = tokenized_pairs(tok).with_format("numpy")
    collate = PairedCollate(bucket_lengths(64), tok.pad_token_id)
    for rows, bucket in (([0], 16), ([0, 1], 32), ([0, 4], 64)):
        batch = collate(pairs[rows], np.asarray(rows))
        assert {k: v.shape for k, v in batch.items()} == {
            **{k: (len(rows), 2, bucket) for k in batch if k != "example_id"}, "example_id": (len(rows),)}
        longest = max(len(pairs[i][f"{s}_input_ids"]) for i in rows for s in ("chosen", "rejected")) - 1
        assert bucket == min(b for b in collate.buckets if b >= longest)
    batch = collate(pairs[[2]], np.asarray([2]))
    for side, name in enumerate(("chosen", "rejected")):
        ids, mask = pairs[2][f"{name}_input_ids"], pairs[2][f"{name}_loss_mask"]
        n = len(ids) - 1
        np.testing.assert_array_equal(batch["input_ids"][0, side, :n], ids[:-1])
        np.testing.assert_array_equal(batch["targets"][0, side, :n], ids[1:])
        np.testing.assert_array_equal(batch["loss_mask"][0, side, :n], mask[1:])
        np.testing.assert_array_equal(batch["positions"][0, side, :n], np.arange(n))
        assert batch["attention_mask"][0, side].sum() == n


def test_eval_padding_rows_weigh_zero_and_extra_columns_pass_through(toks):
    tok = toks["llama3"]
    pairs = tokenized_pairs(tok)
    ref_N2 = np.arange(10, dtype=np.float32).reshape(5, 2) - 20.0
    rows = pair_rows(pairs, {"ref_chosen_logps": ref_N2[:, 0], "ref_rejected_logps": ref_N2[:, 1],
                             "ref_logps": ref_N2})
    rows = pair_rows(rows, {"ref_logps": ref_N2 * 2})  # recomputed: replaced, not duplicated
    collate = PairedCollate(bucket_lengths(64), tok.pad_token_id)
    batches = list(EvalBatches(rows, 4, collate=collate))
    ids = np.concatenate([b["example_id"] for b in batches])
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, -1, -1, -1])
    for batch in batches:
        real = batch["example_id"] >= 0
        assert (batch["loss_mask"].sum((1, 2)) > 0).tolist() == real.tolist()
        assert batch["ref_chosen_logps"].shape == batch["ref_rejected_logps"].shape == real.shape
        np.testing.assert_array_equal(batch["ref_chosen_logps"][real], ref_N2[batch["example_id"][real], 0])
        np.testing.assert_array_equal(batch["ref_rejected_logps"][real], ref_N2[batch["example_id"][real], 1])
        np.testing.assert_array_equal(batch["ref_logps"][real], 2 * ref_N2[batch["example_id"][real]])
        assert batch["ref_logps"].dtype == np.float32 and "prompt_length" not in batch


def test_train_batches_keep_pairs_together(toks):
    tok = toks["gemma"]
    rows = pair_rows(tokenized_pairs(tok, n=6))
    with TrainBatches(rows, 4, seed=0, collate=PairedCollate(bucket_lengths(64), tok.pad_token_id)).iterator() as it:
        batch = next(it)
    assert batch["input_ids"].shape[:2] == (4, 2) and len(set(batch["example_id"].tolist())) == 4
    first_target = batch["loss_mask"].argmax(-1)  # prompt length - 1 in each sequence
    assert (first_target[:, 0] == first_target[:, 1]).all()


def test_bad_extra_columns_are_refused(toks):
    pairs = tokenized_pairs(toks["chatml"])
    with pytest.raises(DataError, match="'ref_logps' has NaN or inf at pair 3"):
        pair_rows(pairs, {"ref_logps": [0.0, 0.0, 0.0, np.nan, 0.0]})
    with pytest.raises(DataError, match="'ref_logps'.*cannot join a batch of 5 pairs"):
        pair_rows(pairs, {"ref_logps": np.zeros(4)})
    with pytest.raises(DataError, match="'note'.*remove or rename"):
        PairedCollate([16, 64])({**pairs.with_format("numpy")[:2], "note": np.array(["a", "b"])}, np.arange(2))
    with pytest.raises(DataError, match="tokenize_preference_dataset"):
        pair_rows(datasets.Dataset.from_list([TEXT]))


# --- formats and sources --------------------------------------------------------------------------

def test_detect_format_and_its_error():
    assert detect_preference_format(["prompt", "chosen", "rejected", "id"]) == "explicit_prompt"
    assert detect_preference_format(["chosen", "rejected"]) == "implicit_prompt"
    with pytest.raises(DataError, match=r"\['chosen', 'prompt'\].*\{prompt, chosen, rejected\}.*formatting_func"):
        detect_preference_format(["prompt", "chosen"])


def test_mismatched_row_types_are_refused(toks):
    tok = toks["chatml"]
    with pytest.raises(DataError, match="remove_columns\\('prompt'\\)"):
        tokenize_pair({"prompt": "Hi", **IMPLICIT}, tok)
    with pytest.raises(DataError, match="must be conversations"):
        tokenize_preference_dataset(datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}]), tok)


def test_formatting_func_and_local_jsonl_match_in_memory_data(toks, tmp_path):
    tok = toks["llama3"]
    rows = [IMPLICIT, {"chosen": CHAT + [GOOD], "rejected": CHAT + [BAD]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from_file = datasets.load_dataset("json", data_files=str(path), split="train")
    expected, stats = tokenize_preference_dataset(datasets.Dataset.from_list(rows), tok)
    got, file_stats = tokenize_preference_dataset(from_file, tok)
    assert got[:] == expected[:] and stats == file_stats and stats["num_kept"] == 2
    renamed = datasets.Dataset.from_list([{"question": TEXT["prompt"], "good": TEXT["chosen"],
                                           "bad": TEXT["rejected"]}])
    mapped, _ = tokenize_preference_dataset(
        renamed, tok, formatting_func=lambda r: {"prompt": r["question"], "chosen": r["good"], "rejected": r["bad"]})
    assert mapped[0] == dict(zip(PAIR_COLUMNS, [*tokenize_pair(TEXT, tok)[:5], mapped[0]["length"]]))
