"""Preference pairs of strings that do not read the same tokenised apart are tokenised as two whole texts, prompt +
chosen and prompt + rejected, as the model reads them: tokenised apart, a SentencePiece-style tokenizer (one that
prepends '▁' to every text it encodes) gives [..., '▁French:', '▁', '▁bonjour'], a second space the data never had.
Both sequences still share their first ``prompt_length`` tokens: the tokens the two joined texts have in common that
lie within the prompt."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from test_sft_prompt_completion_join import pieces_text, sentencepiece_tokenizer

from easytrain.data.preference_data import PreferenceDataOptions, tokenize_pair

KINDS = ["llama_legacy", "metaspace_first"]
PROMPT = "Translate hello into French:"


def sides(pair):
    return [(pair.chosen_input_ids, pair.chosen_loss_mask), (pair.rejected_input_ids, pair.rejected_loss_mask)]


def supervised(ids, mask) -> list[int]:
    return [token for token, bit in zip(ids, mask, strict=True) if bit]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chosen,rejected", [(" bonjour", " au revoir"), ("bonjour", " hello"),
                                             (" The word is bonjour", " The word is salut"), ("", " hello")])
def test_each_sequence_is_the_joined_text_and_the_prompt_is_shared(kind, chosen, rejected):
    """Responses that start with the same words share those tokens, yet they are the responses' (prompt_length
    stops at the prompt's end); an empty chosen reads the same apart, a rejected beside it does not."""
    tok = sentencepiece_tokenizer(kind)
    pair = tokenize_pair({"prompt": PROMPT, "chosen": chosen, "rejected": rejected}, tok)
    n = pair.prompt_length
    assert pair.chosen_input_ids[:n] == pair.rejected_input_ids[:n] and n > 1
    for response, (ids, mask) in zip((chosen, rejected), sides(pair), strict=True):
        joined = tok(PROMPT + response, add_special_tokens=False)["input_ids"]
        assert ids == [tok.bos_token_id] + joined + [tok.eos_token_id], tok.convert_ids_to_tokens(ids)
        assert mask[:n] == [0] * n
        *answer, eos = supervised(ids, mask)
        assert eos == tok.eos_token_id and pieces_text(tok, answer) == response


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_across_the_boundary_is_a_response_token(kind):
    """'two? ' + 'four' is read as '▁two?', '▁four': the token holding the prompt's last space and the response is
    the response's, since the model must produce it; the prompt's tokens before it are shared."""
    tok = sentencepiece_tokenizer(kind)
    prompt = "What is two plus two? "
    pair = tokenize_pair({"prompt": prompt, "chosen": "four", "rejected": "two"}, tok)
    for response, (ids, mask) in zip(("four", "two"), sides(pair), strict=True):
        assert ids == [tok.bos_token_id] + tok(prompt + response, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
        assert mask == [0] * pair.prompt_length + [1] * (len(ids) - pair.prompt_length)
    assert tok.convert_ids_to_tokens(supervised(*sides(pair)[0])) == ["▁four", "</s>"]
    assert pieces_text(tok, pair.chosen_input_ids[1:pair.prompt_length]).strip() == prompt.strip()


def test_prompt_tokens_past_the_shared_ones_are_not_supervised():
    """'two? ' + 'four' ends the prompt inside '▁four', 'two? ' + ' five' with its own '▁': the sequences part
    there, and that '▁' (the prompt's last space) is context, never a trained response token."""
    tok = sentencepiece_tokenizer("llama_legacy")
    pair = tokenize_pair({"prompt": "What is two plus two? ", "chosen": "four", "rejected": " five"}, tok)
    n = pair.prompt_length
    assert pair.chosen_input_ids[:n] == pair.rejected_input_ids[:n]
    assert tok.convert_ids_to_tokens(pair.rejected_input_ids[n:])[0] == "▁"
    assert pair.rejected_loss_mask[n] == 0 and pair.chosen_loss_mask[n] == 1
    assert pieces_text(tok, supervised(*sides(pair)[1])[:-1]) == " five"


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_still_cuts_the_shared_prompt(kind):
    tok = sentencepiece_tokenizer(kind)
    prompt = "The quick brown fox jumps over the lazy dog. " * 4 + PROMPT
    options = PreferenceDataOptions(max_length=12, min_completion_length=4)
    pair = tokenize_pair({"prompt": prompt, "chosen": " bonjour", "rejected": " au revoir"}, tok, options)
    assert pair.prompt_truncated and max(len(ids) for ids, _ in sides(pair)) == 12
    assert pair.chosen_input_ids[0] == tok.bos_token_id
    assert pair.chosen_input_ids[:pair.prompt_length] == pair.rejected_input_ids[:pair.prompt_length]
    for response, (ids, mask) in zip((" bonjour", " au revoir"), sides(pair), strict=True):
        assert pieces_text(tok, supervised(ids, mask)[:-1]) == response


def test_without_offsets_the_pairs_are_the_same(monkeypatch):
    """A slow tokenizer gives no offsets: the response starts where the joined ids part from the prompt's own."""
    from easytrain.data import prompt_completion

    tok = sentencepiece_tokenizer("llama_legacy")
    rows = [{"prompt": PROMPT, "chosen": " bonjour", "rejected": "bonjour"},
            {"prompt": "What is two plus two? ", "chosen": "four", "rejected": " five"}]
    expected = [tokenize_pair(row, tok) for row in rows]

    def no_offsets(tokenizer, text):
        raise NotImplementedError("slow tokenizer")

    monkeypatch.setattr(prompt_completion, "encode_with_offsets", no_offsets)
    assert [tokenize_pair(row, tok) for row in rows] == expected


def test_chat_pairs_are_the_rendered_conversations():
    """Message lists are rendered whole by the template, so they never had the defect; kept so."""
    tok = sentencepiece_tokenizer("llama_legacy")
    template = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
                "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}")
    prompt = [{"role": "user", "content": "Translate hello into French:"}]
    answers = [[{"role": "assistant", "content": text}] for text in ("bonjour", "au revoir")]
    pair = tokenize_pair({"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}, tok,
                         PreferenceDataOptions(chat_template=template))
    for answer, (ids, _) in zip(answers, sides(pair), strict=True):
        rendered = f"[INST] {prompt[0]['content']} [/INST] {answer[0]['content']}</s>"
        assert ids == [tok.bos_token_id] + tok(rendered, add_special_tokens=False)["input_ids"]
