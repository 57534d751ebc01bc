"""OpenAI-style content lists (``[{"type": "text", "text": ...}]``) render as their text, never as a Python repr.

A template that prints ``message['content']`` would otherwise train on ``[{'type': 'text', 'text': ...}]`` (or, with
a character vocabulary, a row of unknown tokens). Text parts are joined when the template does not loop over them
itself; other part types (images, audio) and other non-string contents are refused, naming the row and the message.
"""

import datasets
import pytest
from chat_fixtures import build_chat_tokenizer

from easytrain.data import DataError
from easytrain.data.preference_data import tokenize_preference_dataset
from easytrain.data.prompts import prompt_and_reference, prompts_and_references
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

# Llama 3.1's stock template renders each turn as `message['content'] | trim`: a list is printed as its repr.
LLAMA31_TRIM = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# A multimodal-style template that loops over the parts itself (as Gemma 3's and Qwen2-VL's do).
LOOPS_OVER_PARTS = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                    "{% if message['content'] is string %}{{ message['content'] }}"
                    "{% else %}{% for part in message['content'] %}{{ '[' + part['text'] + ']' }}{% endfor %}"
                    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def parts(*texts):
    return [{"type": "text", "text": text} for text in texts]


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def ids_of(rows, tokenizer, **options):
    tokenized, _ = tokenize_sft_dataset(datasets.Dataset.from_list(rows), tokenizer,
                                        SFTDataOptions(max_length=512, **options))
    return tokenized["input_ids"]


@pytest.fixture(scope="module")
def llama31():
    tokenizer = build_chat_tokenizer("llama3")
    tokenizer.chat_template = LLAMA31_TRIM
    return tokenizer


@pytest.mark.parametrize("tokenizer_name", ["llama31", "arithmetic"])
def test_text_parts_train_as_their_text(llama31, tokenizer_name):
    tokenizer = llama31 if tokenizer_name == "llama31" else build_arithmetic_chat_tokenizer()
    as_parts = ids_of([chat(parts("2+2"), parts("4"))], tokenizer)
    as_strings = ids_of([chat("2+2", "4")], tokenizer)
    assert as_parts == as_strings, tokenizer.decode(as_parts[0])


def test_several_text_parts_are_joined_by_newlines(llama31):
    assert ids_of([chat(parts("What is", "2+2?"), parts("4"))], llama31) == ids_of([chat("What is\n2+2?", "4")],
                                                                                   llama31)


def test_a_template_that_loops_over_the_parts_renders_them_itself():
    tokenizer = build_chat_tokenizer("chatml")
    tokenizer.chat_template = LOOPS_OVER_PARTS
    text = tokenizer.decode(ids_of([chat(parts("What is", "2+2?"), parts("4"))], tokenizer)[0])
    assert "[What is][2+2?]" in text and "[4]" in text, text


def test_prompt_completion_messages_with_parts(llama31):
    rows = [{"prompt": [{"role": "user", "content": parts("2+2")}],
             "completion": [{"role": "assistant", "content": parts("4")}]}]
    strings = [{"prompt": [{"role": "user", "content": "2+2"}], "completion": [{"role": "assistant", "content": "4"}]}]
    assert ids_of(rows, llama31) == ids_of(strings, llama31)


def test_an_image_part_is_refused_naming_the_row_the_message_and_the_type(llama31):
    image_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                           {"type": "text", "text": "What is this?"}]},
                              {"role": "assistant", "content": parts("A cat.")}]}
    rows = [chat(parts("2+2"), parts("4"))] * 3 + [image_row]
    with pytest.raises(DataError) as info:
        ids_of(rows, llama31)
    text = str(info.value)
    assert "Example 3 (0-based row index)" in text and "message 0" in text and "'image'" in text, text


@pytest.mark.parametrize("content", [4, {"text": "4"}, [4], [{"text": "no type"}]])
def test_other_contents_are_refused_naming_the_row_and_the_field(llama31, content):
    rows = [chat("2+2", "4"), {"messages": [{"role": "user", "content": content},
                                            {"role": "assistant", "content": content}]}]
    with pytest.raises(DataError) as info:  # Arrow types a column once: the odd row goes in as a Python list
        ids_of(rows[1:], llama31)
    text = str(info.value)
    assert "Example 0 (0-based row index)" in text and "message 0" in text and "'content'" in text, text


def test_preference_pairs_with_parts_tokenise_as_strings(llama31):
    def pair(wrap):
        return {"prompt": [{"role": "user", "content": wrap("2+2")}],
                "chosen": [{"role": "assistant", "content": wrap("4")}],
                "rejected": [{"role": "assistant", "content": wrap("5")}]}

    with_parts, _ = tokenize_preference_dataset(datasets.Dataset.from_list([pair(parts)]), llama31)
    with_strings, _ = tokenize_preference_dataset(datasets.Dataset.from_list([pair(str)]), llama31)
    assert with_parts["chosen_input_ids"] == with_strings["chosen_input_ids"]
    assert with_parts["rejected_input_ids"] == with_strings["rejected_input_ids"]


def test_an_image_part_in_a_preference_pair_is_refused(llama31):
    row = {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
           "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    with pytest.raises(DataError, match="(?s)Example 0 .*'prompt' message 0.*'image_url'"):
        tokenize_preference_dataset(datasets.Dataset.from_list([row]), llama31)


def test_generation_references_and_prompts_read_the_text(llama31):
    prompt, reference = prompt_and_reference(chat(parts("2+2"), parts("4")), llama31, "conversational")
    string_prompt, _ = prompt_and_reference(chat("2+2", "4"), llama31, "conversational")
    assert reference == "4" and prompt == string_prompt
    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": parts("2+2")}],
                                        "completion": [{"role": "assistant", "content": parts("4", "!")}]}])
    assert prompts_and_references(rows, llama31)[1] == ["4\n!"]
