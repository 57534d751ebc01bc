"""SFT tokenisation: formats, assistant/completion masks, BOS/EOS, truncation and drop counts.

Each test pins one failure seen in other trainers (see research/pain_points.md section 3):
all-zero or misplaced assistant masks, EOS masked out when pad == eos, doubled BOS/EOS,
prompt/completion boundaries found by string search, silently empty examples.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools
import json

import datasets
import numpy as np
import pytest
from chat_fixtures import (
    CHAT,
    CHATML,
    MARKED,
    SPECS,
    TOOL_CHAT,
    WEATHER_TOOL,
    assistant_span,
    build_chat_tokenizer,
)
from transformers import BatchEncoding

from easytrain.data import DataError, load_text_datasets
from easytrain.data.packing import (
    PaddedCollate,
    bucket_lengths,
    pack_examples,
    packed_collate,
)
from easytrain.data.sft import (
    SFT_STATS_KEYS,
    SFTDataOptions,
    detect_format,
    tokenize_example,
    tokenize_sft_dataset,
)

DEFAULTS = SFTDataOptions()
ASSISTANT_ONLY = SFTDataOptions(assistant_only_loss=True)


@pytest.fixture(scope="module")
def toks():
    return {name: build_chat_tokenizer(name) for name in SPECS}


def supervised_spans(tok, ids, mask):
    """Decoded runs of consecutive supervised tokens."""
    spans, current = [], []
    for token, bit in zip(ids, mask, strict=True):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tok.decode(span) for span in spans + ([current] if current else [])]


def expected_spans(name, contents):
    """Assistant content + end of turn; an EOS that is not the end of turn is appended to the last."""
    spans = [assistant_span(name, content) for content in contents]
    if SPECS[name].eos != SPECS[name].end_of_turn:
        spans[-1] += SPECS[name].eos
    return spans


def tokenize(example, tok, options=DEFAULTS, data_format=None):
    """``tokenize_example`` with the format detected from the example's keys."""
    return tokenize_example(example, tok, options, data_format or detect_format(list(example)))


def chat_dataset(rows):
    return datasets.Dataset.from_list([{"messages": messages} for messages in rows])


# --- assistant-only masks ---------------------------------------------------------------------

@pytest.mark.parametrize("name", MARKED)
def test_assistant_mask_is_exactly_the_assistant_turns(toks, name):
    tok = toks[name]
    out = tokenize_example({"messages": CHAT}, tok, ASSISTANT_ONLY, "conversational")
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert supervised_spans(tok, out.input_ids, out.loss_mask) == expected_spans(name, contents)
    assert "You are a helpful assistant." in tok.decode(out.input_ids)  # system turn rendered


@pytest.mark.parametrize("name", MARKED)
def test_tool_calls_supervised_tool_results_not(toks, name):
    tok = toks[name]
    example = {"messages": TOOL_CHAT, "tools": [WEATHER_TOOL]}
    out = tokenize_example(example, tok, ASSISTANT_ONLY, "conversational")
    spans = supervised_spans(tok, out.input_ids, out.loss_mask)
    assert len(spans) == 2
    assert "get_weather" in spans[0] and "Paris" in spans[0]
    assert spans[1] == expected_spans(name, [TOOL_CHAT[-1]["content"]])[0]
    text = tok.decode(out.input_ids)
    assert "Weather in a city." in text and "sunny and warm" in text  # tools and tool result rendered
    assert all("sunny and warm" != span for span in spans)


def test_tools_column_as_json_string_and_arrow_none_fields(toks):
    """Arrow fills absent keys with None; a JSON-string tools column is parsed."""
    rows = [{"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])},
            {"messages": CHAT, "tools": None}]
    dataset = datasets.Dataset.from_list(rows)
    assert dataset[1]["messages"][0]["tool_calls"] is None  # what Arrow does to mixed rows
    tokenized, stats = tokenize_sft_dataset(dataset, toks["chatml"], ASSISTANT_ONLY)
    assert stats["num_kept"] == 2
    text = toks["chatml"].decode(tokenized[0]["input_ids"])
    assert "get_weather" in text and "None" not in toks["chatml"].decode(tokenized[1]["input_ids"])


def test_template_without_generation_markers_is_refused(toks):
    with pytest.raises(DataError, match=r"\{% generation %\}.*assistant_only_loss=False"):
        tokenize_sft_dataset(chat_dataset([CHAT]), toks["no_markers"], ASSISTANT_ONLY)
    with pytest.raises(DataError, match="generation"):
        tokenize_example({"messages": CHAT}, toks["no_markers"], ASSISTANT_ONLY, "conversational")
    _tokenized, stats = tokenize_sft_dataset(chat_dataset([CHAT]), toks["no_markers"], SFTDataOptions())
    assert stats["num_supervised_tokens"] == stats["num_tokens"] - 1  # all but the first token


def test_reasoning_prefix_outside_generation_block_is_not_supervised(toks):
    """Qwen3-style empty think blocks the template injects must not be learned."""
    template = CHATML.replace("{{ '<|im_start|>assistant\\n' }}{% generation %}",
                              "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% generation %}")
    options = SFTDataOptions(assistant_only_loss=True, chat_template=template)
    out = tokenize_example({"messages": CHAT}, toks["chatml"], options, "conversational")
    assert "<think>" in toks["chatml"].decode(out.input_ids)
    spans = supervised_spans(toks["chatml"], out.input_ids, out.loss_mask)
    assert spans == expected_spans("chatml", [m["content"] for m in CHAT if m["role"] == "assistant"])


def test_assistant_only_loss_needs_conversational_data(toks):
    dataset = datasets.Dataset.from_dict({"text": ["hello there"]})
    with pytest.raises(DataError, match="assistant_only_loss=True.*conversational.*'messages'"):
        tokenize_sft_dataset(dataset, toks["llama3"], ASSISTANT_ONLY)


def test_conversation_without_chat_template_is_refused(toks):
    tok = build_chat_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(DataError, match="chat_template"):
        tokenize_sft_dataset(chat_dataset([CHAT]), tok, SFTDataOptions())


def test_apply_chat_template_returns_batch_encoding_in_transformers_v5(toks):
    """Pins the v5 behaviour the renderer relies on (a list of ids in v4)."""
    out = toks["llama3"].apply_chat_template(CHAT, tokenize=True)
    assert isinstance(out, BatchEncoding) and isinstance(out["input_ids"][0], int)


# --- special tokens -----------------------------------------------------------------------------

def all_formats(name):
    """One example of each format, for one tokenizer."""
    return [({"text": "The quick brown fox."}, "language_modeling"),
            ({"prompt": "What is two plus two?", "completion": " Four."}, "prompt_completion"),
            ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, "prompt_completion"),
            ({"messages": CHAT}, "conversational")]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_exactly_one_bos_at_position_zero(toks, name):
    tok = toks[name]
    for example, data_format in all_formats(name):
        ids = tokenize_example(example, tok, SFTDataOptions(), data_format).input_ids
        assert all(isinstance(token, int) for token in ids)
        if tok.bos_token_id is None:  # ChatML/Qwen: no BOS, and no None either
            assert SPECS[name].bos is None
            continue
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (data_format, tok.decode(ids))


def test_bos_already_in_text_is_not_doubled(toks):
    tok = toks["mistral"]
    for text in ("<s>The fox.", "<s><s>The fox.", "The fox."):
        ids = tokenize_example({"text": text}, tok, SFTDataOptions(), "language_modeling").input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    no_bos = SFTDataOptions(add_bos=False)
    assert tok.bos_token_id not in tokenize({"text": "The fox."}, tok, no_bos).input_ids


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eos_ends_every_example_once(toks, name):
    tok = toks[name]
    eos = tok.eos_token_id
    for example, data_format in all_formats(name):
        ids = tokenize_example(example, tok, SFTDataOptions(), data_format).input_ids
        last = max(i for i, token in enumerate(ids) if tok.decode([token]).strip())
        assert ids[last] == eos, (data_format, tok.decode(ids[-4:]))
        assert not any(a == b == eos for a, b in itertools.pairwise(ids)), tok.decode(ids)
    ends_with_eos = {"text": "The fox." + tok.eos_token}
    assert tokenize(ends_with_eos, tok).input_ids.count(eos) == 1


@pytest.mark.parametrize("name", ["mistral", "llama3_base", "no_markers"])
def test_eos_is_supervised_when_pad_is_eos(toks, name):
    tok = toks[name]
    assert tok.pad_token_id == tok.eos_token_id
    options = SFTDataOptions(assistant_only_loss=name != "no_markers")
    for example, data_format in all_formats(name):
        out = tokenize_example(example, tok, options if data_format == "conversational" else SFTDataOptions(),
                               data_format)
        last = max(i for i, token in enumerate(out.input_ids) if tok.decode([token]).strip())
        assert out.input_ids[last] == tok.eos_token_id and out.loss_mask[last] == 1, data_format


# --- prompt-completion --------------------------------------------------------------------------

@pytest.mark.parametrize("name", MARKED)
def test_prompt_completion_text_boundary_is_exact(toks, name):
    tok = toks[name]
    prompt, completion = "What is two plus two?", " Two plus two is four."
    out = tokenize({"prompt": prompt, "completion": completion}, tok)
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    prompt_ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.input_ids == prompt_ids + completion_ids
    assert out.loss_mask == [0] * len(prompt_ids) + [1] * len(completion_ids)
    everything = tokenize_example({"prompt": prompt, "completion": completion}, tok,
                                  SFTDataOptions(completion_only_loss=False), "prompt_completion")
    assert everything.loss_mask == [0] + [1] * (len(out.input_ids) - 1)


@pytest.mark.parametrize("name", MARKED)
def test_prompt_completion_messages_split_at_the_generation_prompt(toks, name):
    tok = toks[name]
    out = tokenize({"prompt": CHAT[:2], "completion": CHAT[2:3]}, tok)
    prompt_ids = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)["input_ids"]
    full_ids = tok.apply_chat_template(CHAT[:3])["input_ids"]
    assert out.input_ids[: len(full_ids)] == full_ids and full_ids[: len(prompt_ids)] == prompt_ids
    assert out.loss_mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert all(out.loss_mask[len(prompt_ids):])
    both = tokenize({"prompt": CHAT[:2], "completion": CHAT[2:3]}, tok, ASSISTANT_ONLY)
    assert supervised_spans(tok, both.input_ids, both.loss_mask) == expected_spans(name, [CHAT[2]["content"]])
    everything = tokenize({"prompt": CHAT[:2], "completion": CHAT[2:3]}, tok,
                          SFTDataOptions(completion_only_loss=False))
    assert everything.input_ids == out.input_ids and everything.loss_mask == [0] + [1] * (len(out.input_ids) - 1)


def test_prompt_not_a_token_prefix_is_refused(toks):
    template = CHATML.replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}",
                              "{% if add_generation_prompt %}{{ '<|im_start|>model\\n' }}")
    options = SFTDataOptions(chat_template=template)
    with pytest.raises(DataError, match="not a token prefix"):
        tokenize({"prompt": CHAT[:2], "completion": CHAT[2:3]}, toks["chatml"], options)


# --- truncation and dropping --------------------------------------------------------------------

def test_truncation_sides_are_kept_and_counted(toks):
    tok = toks["llama3"]
    text = "A journey of a thousand miles begins with one step."
    full = tokenize({"text": text}, tok, SFTDataOptions(max_length=None)).input_ids
    dataset = datasets.Dataset.from_dict({"text": [text, "Gold."]})
    short = len(tokenize_example({"text": "Gold."}, tok, SFTDataOptions(), "language_modeling").input_ids)
    limit = short + 2
    assert limit < len(full)
    right, stats = tokenize_sft_dataset(dataset, tok, SFTDataOptions(max_length=limit))
    assert right[0]["input_ids"] == full[:limit] and stats["truncated"] == 1
    left, stats = tokenize_sft_dataset(dataset, tok, SFTDataOptions(max_length=limit, truncation_side="left"))
    assert left[0]["input_ids"] == full[:1] + full[-(limit - 1):] and stats["truncated"] == 1
    drop = SFTDataOptions(max_length=limit, truncation_side="drop")
    dropped, stats = tokenize_sft_dataset(dataset, tok, drop)
    assert len(dropped) == 1 and stats["dropped_too_long"] == 1 and stats["truncated"] == 0
    assert dropped[0]["length"] == short


def test_left_truncation_keeps_the_mask_of_the_kept_tokens(toks):
    """A prompt/completion row cut on the left keeps its BOS and the end: the mask is the end's too (the completion
    supervised, the prompt's kept tail not), never the start's all-zero prompt mask."""
    tok = toks["llama3"]
    row = {"prompt": "A journey of a thousand miles begins with one step. " * 2, "completion": " Gold."}
    full = tokenize(row, tok, SFTDataOptions(max_length=None))
    limit = 12
    assert 0 < sum(full.loss_mask[-(limit - 1):]) < limit - 1  # the kept end holds prompt and completion tokens
    left = tokenize(row, tok, SFTDataOptions(max_length=limit, truncation_side="left"))
    assert left.truncated and left.input_ids == full.input_ids[:1] + full.input_ids[-(limit - 1):]
    assert left.loss_mask == [0] + full.loss_mask[-(limit - 1):]


def test_examples_without_supervised_tokens_are_dropped_and_counted(toks):
    tok = toks["chatml"]
    no_assistant = [{"role": "user", "content": "Thank you!"}]
    long_prompt = [{"role": "user", "content": "Practice makes perfect. " * 40}, CHAT[2]]
    dataset = chat_dataset([CHAT, no_assistant, long_prompt])
    options = SFTDataOptions(assistant_only_loss=True, max_length=100)
    tokenized, stats = tokenize_sft_dataset(dataset, tok, options)
    assert stats["dropped_no_supervised_tokens"] == 2 and stats["num_kept"] == 1
    assert stats["truncated"] == 1  # the long prompt, whose whole assistant turn was cut away
    assert len(tokenized) == 1 and sum(tokenized[0]["loss_mask"]) == stats["num_supervised_tokens"]
    with pytest.raises(DataError, match="No example is left"):
        tokenize_sft_dataset(chat_dataset([no_assistant]), tok, ASSISTANT_ONLY)


def test_stats_account_for_every_example(toks):
    texts = ["The fox.", "", "A journey of a thousand miles begins with one step. " * 3]
    dataset = datasets.Dataset.from_dict({"text": texts})
    options = SFTDataOptions(max_length=12, truncation_side="drop")
    tokenized, stats = tokenize_sft_dataset(dataset, toks["gemma"], options)
    assert set(stats) == set(SFT_STATS_KEYS)
    dropped = stats["dropped_too_long"] + stats["dropped_no_supervised_tokens"]
    assert stats["num_examples"] == stats["num_kept"] + dropped
    assert (stats["num_kept"], stats["dropped_too_long"], stats["dropped_no_supervised_tokens"]) == (1, 1, 1)
    assert stats["num_tokens"] == sum(tokenized["length"]) == sum(map(len, tokenized["input_ids"]))
    assert tokenized.column_names == ["input_ids", "loss_mask", "length"]


def test_first_token_is_never_supervised(toks):
    """Without a BOS (ChatML), token 0 is text; left truncation must not leave it supervised either."""
    out = tokenize_example({"text": "fox"}, toks["chatml"], SFTDataOptions(), "language_modeling")
    assert out.loss_mask[0] == 0 and all(out.loss_mask[1:])
    left = SFTDataOptions(max_length=4, truncation_side="left")
    out = tokenize_example({"text": "The quick brown fox jumps."}, toks["chatml"], left, "language_modeling")
    assert out.truncated and len(out.input_ids) == 4 and out.loss_mask == [0, 1, 1, 1]


# --- formats and sources ------------------------------------------------------------------------

def test_detect_format_from_columns():
    assert detect_format(["text", "id"]) == "language_modeling"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["messages", "tools"]) == "conversational"
    assert detect_format(["messages", "text"]) == "conversational"  # documented priority


def test_unknown_format_lists_columns_and_expected_sets():
    expected = r"\['answer', 'question'\].*\{messages\}.*\{prompt, completion\}.*\{text\}"
    with pytest.raises(DataError, match=expected):
        detect_format(["question", "answer"])
    with pytest.raises(DataError, match="needs both 'prompt' and 'completion'"):
        detect_format(["prompt"])


def test_formatting_func_maps_examples_to_a_format(toks):
    dataset = datasets.Dataset.from_dict({"question": ["What is two plus two?"], "answer": ["Four."]})
    tokenized, _stats = tokenize_sft_dataset(
        dataset, toks["llama3"],
        formatting_func=lambda ex: {"prompt": ex["question"] + " ", "completion": ex["answer"]},
    )
    tok = toks["llama3"]
    ids, mask = tokenized[0]["input_ids"], tokenized[0]["loss_mask"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Four." + tok.eos_token
    with pytest.raises(DataError, match="formatting_func"):
        tokenize_sft_dataset(dataset, tok, formatting_func=lambda ex: {"q": ex["question"]})


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_files_tokenise_like_in_memory_data(toks, tmp_path, suffix):
    rows = [{"messages": CHAT}, {"messages": TOOL_CHAT}]
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet":
        chat_dataset([CHAT, TOOL_CHAT]).to_parquet(path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(row) for row in rows))
    loaded = load_text_datasets(train_file=path, validation_split_percentage=0)["train"]
    from_file, _ = tokenize_sft_dataset(loaded, toks["gemma"], ASSISTANT_ONLY)
    in_memory, _ = tokenize_sft_dataset(chat_dataset([CHAT, TOOL_CHAT]), toks["gemma"], ASSISTANT_ONLY)
    assert from_file["input_ids"] == in_memory["input_ids"]
    assert from_file["loss_mask"] == in_memory["loss_mask"]


def test_tokenised_chats_pack_and_pad_with_the_same_supervised_targets(toks):
    """End to end: the supervised targets of packed and padded batches are the assistant turns."""
    tok = toks["llama3_base"]  # pad == eos, and an EOS appended after the last <|eot_id|>
    tokenized, _ = tokenize_sft_dataset(chat_dataset([CHAT, TOOL_CHAT[-2:], CHAT[1:3]]), tok, ASSISTANT_ONLY)
    rows = tokenized.with_format("numpy")[:]
    padded = PaddedCollate(bucket_lengths(128), pad_id=tok.pad_token_id)(rows, np.arange(3))
    packed_rows = pack_examples(tokenized, 128, seed=0).rows
    packed = packed_collate(packed_rows, np.arange(len(packed_rows["input_ids"])))
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    expected = "".join(expected_spans("llama3_base", contents)) + "".join(
        expected_spans("llama3_base", [TOOL_CHAT[-1]["content"]])) + "".join(
        expected_spans("llama3_base", [CHAT[2]["content"]]))
    assert tok.decode(padded["targets"][padded["loss_mask"] > 0]) == expected
    supervised = sorted(packed["targets"][packed["loss_mask"] > 0].tolist())
    assert supervised == sorted(padded["targets"][padded["loss_mask"] > 0].tolist())


@pytest.mark.parametrize("row", [{"messages": CHAT[:4]}, {"prompt": CHAT[:2], "completion": CHAT[2:4]}],
                         ids=["conversation", "prompt_completion_messages"])
def test_eos_after_an_unsupervised_last_turn_is_not_supervised(toks, row):
    """A chat ending in a user turn under assistant_only_loss: the EOS appended after it ends no answer."""
    tok = toks["llama3_base"]  # EOS is not the end of turn, so one is appended
    out = tokenize(row, tok, ASSISTANT_ONLY)
    assert out.input_ids[-1] == tok.eos_token_id and out.loss_mask[-1] == 0
    assert supervised_spans(tok, out.input_ids, out.loss_mask) == [assistant_span("llama3_base", CHAT[2]["content"])]
    assert tokenize(row, tok).loss_mask[-1] == 1  # every token supervised: so is the EOS
