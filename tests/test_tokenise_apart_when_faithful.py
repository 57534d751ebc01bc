"""Prompt-completion strings (and preference pairs of strings) are tokenised APART, prompt and completion each alone,
whenever that reads the same text as the joined prompt + completion: the prompt's ids are then what generation
sees for it (its trailing space stays the prompt's 'Ġ'), and the ids are those of runs before the joined
tokenisation, so their data digests match and they resume. Only where apart is not faithful (a SentencePiece-style
tokenizer prepends '▁' to every text, giving 'French:  bonjour') are the joined text's ids used, the completion's
tokens found by character offsets. The SFT generation-eval prompt is the training ids before the completion's
first token either way, so it is a prefix of what the model was trained on."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from chat_fixtures import build_chat_tokenizer
from test_sft_prompt_completion_join import sentencepiece_tokenizer

from easytrain import evaluators
from easytrain.data.preference_data import tokenize_pair
from easytrain.data.prompts import prompt_and_reference, prompts_and_references
from easytrain.data.sft import SFTDataOptions, tokenize_example

TRAILING_SPACE = [("What is two plus two? ", "Two plus two is four."),
                  ("Question: What is two plus two?\nAnswer: ", "four")]
# The ids and masks easytrain gave these rows with the chatml fixture before prompt and completion were ever joined.
OLD_SFT = [
    ([57, 292, 265, 287, 308, 287, 33, 223, 54, 273, 308, 287, 265, 280, 285, 16, 2], 8),
    ([51, 87, 290, 86, 75, 277, 28, 278, 292, 265, 287, 308, 287, 33, 201, 35, 80, 85, 89, 286, 28, 223, 72, 285, 2],
     22),
]
OLD_REJECTED_NO = [[57, 292, 265, 287, 308, 287, 33, 223, 48, 81, 16, 2],
                   [51, 87, 290, 86, 75, 277, 28, 278, 292, 265, 287, 308, 287, 33, 201, 35, 80, 85, 89, 286, 28, 223,
                    48, 81, 16, 2]]


def kinds():
    return {"byte_level": build_chat_tokenizer("chatml"), "llama_legacy": sentencepiece_tokenizer("llama_legacy"),
            "metaspace_first": sentencepiece_tokenizer("metaspace_first")}


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def bos(tok):
    return [] if tok.bos_token_id is None else [tok.bos_token_id]


@pytest.mark.parametrize("row", range(len(TRAILING_SPACE)))
def test_byte_level_rows_keep_the_ids_of_the_apart_tokenisation(row):
    tok = build_chat_tokenizer("chatml")
    (prompt, completion), (expected, prompt_length) = TRAILING_SPACE[row], OLD_SFT[row]
    assert expected == bos(tok) + encode(tok, prompt) + encode(tok, completion) + [tok.eos_token_id]
    example = {"prompt": prompt, "completion": completion}
    out = tokenize_example(example, tok, SFTDataOptions(), "prompt_completion")
    assert out.input_ids == expected, tok.convert_ids_to_tokens(out.input_ids)
    assert out.loss_mask == [0] * prompt_length + [1] * (len(expected) - prompt_length)
    everything = tokenize_example(example, tok, SFTDataOptions(completion_only_loss=False), "prompt_completion")
    assert everything.input_ids == expected


@pytest.mark.parametrize("row", range(len(TRAILING_SPACE)))
def test_byte_level_pairs_keep_the_ids_of_the_apart_tokenisation(row):
    tok = build_chat_tokenizer("chatml")
    (prompt, chosen), (expected, prompt_length) = TRAILING_SPACE[row], OLD_SFT[row]
    pair = tokenize_pair({"prompt": prompt, "chosen": chosen, "rejected": "No."}, tok)
    assert pair.prompt_length == prompt_length
    assert pair.chosen_input_ids == expected and pair.rejected_input_ids == OLD_REJECTED_NO[row]
    assert pair.chosen_loss_mask == [0] * prompt_length + [1] * (len(expected) - prompt_length)


@pytest.mark.parametrize("kind", ["llama_legacy", "metaspace_first"])
def test_a_pair_with_one_side_unfaithful_apart_is_joined_on_both(kind):
    """'French:' + ' bonjour' apart is 'French:  bonjour'; both sides then come from the joined texts, so they
    still share their prompt tokens."""
    tok = sentencepiece_tokenizer(kind)
    prompt = "Translate hello into French:"
    pair = tokenize_pair({"prompt": prompt, "chosen": " bonjour", "rejected": " au revoir"}, tok)
    for response, ids in ((" bonjour", pair.chosen_input_ids), (" au revoir", pair.rejected_input_ids)):
        assert ids == bos(tok) + encode(tok, prompt + response) + [tok.eos_token_id]


def test_a_cleanup_that_hides_the_extra_space_does_not_count_as_faithful():
    """``clean_up_tokenization_spaces`` turns 'two ?' into 'two?': compared after it, the apart ids (which read
    'two ?') would pass for the joined text."""
    tok = sentencepiece_tokenizer("llama_legacy")
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # transformers skips it for BPE
    prompt, completion = "What is two plus two", "?"
    assert tok.decode(encode(tok, prompt) + encode(tok, completion)) == tok.decode(encode(tok, prompt + completion))
    out = tokenize_example({"prompt": prompt, "completion": completion}, tok, SFTDataOptions(), "prompt_completion")
    assert out.input_ids == bos(tok) + encode(tok, prompt + completion) + [tok.eos_token_id]


ROWS = [{"prompt": p, "completion": c} for p, c in
        TRAILING_SPACE + [("What is two plus two? ", "four"), ("Translate hello into French:", " bonjour"),
                          ("Translate hello into French:", "bonjour"), ("What is two plus two?", " Four.")]]


@pytest.mark.parametrize("kind", ["byte_level", "llama_legacy", "metaspace_first"])
@pytest.mark.parametrize("row", ROWS, ids=lambda row: repr(row["prompt"][-6:] + "|" + row["completion"][:5]))
def test_the_eval_prompt_is_the_training_ids_before_the_completion(kind, row):
    tok = kinds()[kind]
    trained = tokenize_example(row, tok, SFTDataOptions(max_length=None), "prompt_completion")
    prompt, reference = prompt_and_reference(row, tok, "prompt_completion")
    assert reference == row["completion"]
    assert trained.input_ids[:len(prompt)] == prompt, (tok.convert_ids_to_tokens(prompt),
                                                       tok.convert_ids_to_tokens(trained.input_ids))
    assert trained.loss_mask[len(prompt)] == 1 and not any(trained.loss_mask[:len(prompt)])
    if kind == "byte_level":  # apart: the prompt alone, as inference tokenises it
        assert prompt == bos(tok) + encode(tok, row["prompt"])


@pytest.mark.parametrize("kind", ["byte_level", "llama_legacy"])
def test_a_model_that_reproduces_its_training_rows_scores_full_exact_match(kind, monkeypatch):
    """A stand-in for a model that learned its training rows: it continues a prompt only where the prompt is a
    prefix of a training row (else it answers nothing). Trailing-space prompts must not cost exact match."""
    tok = kinds()[kind]
    rows = [{"prompt": f"What is {a} plus {b}? ", "completion": answer}
            for a, b, answer in (("two", "two", "four"), ("one", "two", "three"), ("two", "one", "three"))]
    trained = [tokenize_example(row, tok, SFTDataOptions(), "prompt_completion").input_ids for row in rows]

    def memorised(model, prompts, max_new_tokens, pad, eos):
        out = np.full((len(prompts), max_new_tokens), pad)
        for i, prompt in enumerate(prompts):
            tail = next((ids[len(prompt):] for ids in trained if ids[:len(prompt)] == prompt), [])[:max_new_tokens]
            out[i, :len(tail)] = tail
        return out

    monkeypatch.setattr(evaluators, "greedy_complete", memorised)
    import datasets

    prompts, references = prompts_and_references(datasets.Dataset.from_list(rows), tok)
    metric = evaluators.CompletionMetrics(prompts, references, tok, max_new_tokens=8)
    assert metric(type("Trainer", (), {"model": None})()) == {"eval_exact_match": 1.0}
