"""The built-in task: learn to add (and optionally subtract) small numbers.

It needs no downloads, its data are generated from a seed, and a tiny model
learns it within minutes on a laptop CPU, so ``easytrain train`` with no
arguments shows a real learning curve and an exact-match score out of the box.

Problems have one width: ``"37+45=082"``, ``"07+05=012"``, ``"12-45=-33"``.
Operands are zero-padded to the widest operand and answers to one character
more (a carry digit or a minus sign), so every digit sits at a fixed offset
from the ``=``. At the default learning rate a 2-layer model then passes 75%
exact match within 500 updates for each of five seeds tried; with unpadded
text (``"7+5=12"``) it took 750-1000 (docs/benchmarks.md, "Embedded default job").
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import datasets
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from easytrain.data.errors import DataError

TEXT = "text"
OPERATORS = ("+", "-")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
#: Every character a problem can contain, plus space for hand-typed prompts.
CHARACTERS = "0123456789+-= "


def _built_once(make: Callable[..., datasets.DatasetDict]) -> Callable[..., datasets.DatasetDict]:
    """`make`, memoised per process on its arguments: every trainer on the embedded data asks for the same
    splits, and the preference pairs take seconds to build. Each call returns its own copy (Arrow data
    shared, never copied), so a caller that reformats or replaces a split leaves the next caller's alone."""
    cached = functools.lru_cache(maxsize=8)(make)

    @functools.wraps(make)
    def splits(*args, **kwargs) -> datasets.DatasetDict:
        if "operators" in kwargs:
            kwargs["operators"] = tuple(kwargs["operators"])
        return copy.deepcopy(cached(*args, **kwargs))

    return splits


def make_arithmetic_dataset(
    num_examples: int,
    *,
    seed: int,
    max_operand: int = 99,
    operators: Sequence[str] = ("+",),
) -> datasets.Dataset:
    """Distinct random problems, one per row.

    Args:
        num_examples: How many problems; each appears at most once.
        seed: Fixes which problems are drawn and their order.
        max_operand: Operands are drawn from ``[0, max_operand]``.
        operators: Any of ``"+"`` and ``"-"``.

    Returns:
        A dataset with a ``"text"`` column of lines like ``"37+45=082"`` (fixed width, see above).

    Raises:
        DataError: Unknown operators, or more problems asked for than exist.
    """
    problem_ids = _draw_problem_ids(num_examples, seed, max_operand, operators)
    return datasets.Dataset.from_dict(
        {TEXT: [_problem_text(int(i), max_operand, operators) for i in problem_ids]}
    )


@_built_once
def make_arithmetic_splits(
    num_train: int = 8000,
    num_validation: int = 500,
    *,
    seed: int = 0,
    max_operand: int = 99,
    operators: Sequence[str] = ("+",),
) -> datasets.DatasetDict:
    """Train and validation problems with no problem in both.

    Validation measures generalisation to unseen sums, not memorisation.

    Args:
        num_train: Problems in the ``"train"`` split.
        num_validation: Problems in the ``"validation"`` split.
        seed: Fixes both splits.
        max_operand: Operands are drawn from ``[0, max_operand]``.
        operators: Any of ``"+"`` and ``"-"``.

    Returns:
        A ``DatasetDict`` with disjoint ``"train"`` and ``"validation"`` splits.

    Raises:
        DataError: Unknown operators, or more problems asked for than exist.
    """
    both = make_arithmetic_dataset(
        num_train + num_validation, seed=seed, max_operand=max_operand, operators=operators
    )
    return datasets.DatasetDict(
        {
            "train": both.select(range(num_train)),
            "validation": both.select(range(num_train, num_train + num_validation)),
        }
    )


def build_arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer covering every character of the task.

    One token per character keeps digits aligned so the model can learn carries,
    and makes encode/decode an exact round trip.

    Returns:
        A fast tokenizer with ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``
        special tokens; it saves and loads with ``save_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def split_problem(text: str) -> tuple[str, str]:
    """Split a problem into the prompt (through ``=``) and the expected answer.

    Args:
        text: A problem line such as ``"37+45=082"``.

    Returns:
        ``("37+45=", "082")``.

    Raises:
        DataError: The text has no ``=``.
    """
    prompt, equals, answer = text.partition("=")
    if not equals:
        raise DataError(f"Problem {text!r} has no '='; expected text like '37+45=082'.")
    return prompt + equals, answer


def _draw_problem_ids(
    num_examples: int, seed: int, max_operand: int, operators: Sequence[str]
) -> np.ndarray:
    """Sample distinct problem ids, each encoding (operator, left, right)."""
    _check_problem_space(max_operand, operators)
    num_problems = len(operators) * (max_operand + 1) ** 2
    if not 0 <= num_examples <= num_problems:
        raise DataError(
            f"Asked for {num_examples} distinct problems, but only {num_problems} exist "
            f"with max_operand={max_operand} and operators={tuple(operators)}; "
            "ask for fewer or raise `max_operand`."
        )
    return np.random.default_rng(seed).choice(num_problems, size=num_examples, replace=False)


def _check_problem_space(max_operand: int, operators: Sequence[str]) -> None:
    distinct = set(operators)
    if not distinct or not distinct <= set(OPERATORS) or len(distinct) < len(operators):
        raise DataError(
            f"`operators` must be distinct items of {OPERATORS}, got {tuple(operators)}."
        )
    if max_operand < 0:
        raise DataError(f"`max_operand` must be non-negative, got {max_operand}.")


def answer_text(value: int, max_operand: int) -> str:
    """An answer written as the task writes it: one character wider than an operand (``82`` with operands
    up to 99 reads ``"082"``, ``-33`` reads ``"-33"``), the first character a carry digit or a sign."""
    return f"{value:0{len(str(max_operand)) + 1}d}"


def _problem_text(problem_id: int, max_operand: int, operators: Sequence[str]) -> str:
    operator_index, pair = divmod(problem_id, (max_operand + 1) ** 2)
    left, right = divmod(pair, max_operand + 1)
    operator = operators[operator_index]
    result = left + right if operator == "+" else left - right
    digits = len(str(max_operand))
    return f"{left:0{digits}d}{operator}{right:0{digits}d}={answer_text(result, max_operand)}"


USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
#: Generation markers delimit what `assistant_only_loss` supervises: the answer and its end-of-turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_arithmetic_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer plus role and end-of-turn tokens and a chat template with generation
    markers; `<|end|>` closes every turn and is the EOS, so generation stops after the answer."""
    tokenizer = build_arithmetic_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, END]})
    tokenizer.eos_token = END
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@_built_once
def make_arithmetic_chat_splits(num_train: int = 8000, num_validation: int = 500, *, seed: int = 0,
                                max_operand: int = 99) -> datasets.DatasetDict:
    """The problems as conversations: the user asks `"37+45"`, the assistant answers `"082"`."""
    splits = make_arithmetic_splits(num_train, num_validation, seed=seed, max_operand=max_operand)

    def to_messages(row: dict) -> dict:
        prompt, answer = split_problem(row[TEXT])
        return {"messages": [{"role": "user", "content": prompt[:-1]}, {"role": "assistant", "content": answer}]}

    return splits.map(to_messages, remove_columns=[TEXT])


@_built_once
def make_arithmetic_preference_splits(num_train: int = 8000, num_validation: int = 500, *, seed: int = 0,
                                      max_operand: int = 99) -> datasets.DatasetDict:
    """Preference pairs: the user asks `"37+45"`; chosen is the right answer, rejected a near miss.

    With the same sizes and seed, the questions are those of `make_arithmetic_chat_splits`, split the
    same way, so a model fine-tuned on one is evaluated on held-out questions of the other.
    """
    splits = make_arithmetic_splits(num_train, num_validation, seed=seed, max_operand=max_operand)

    def to_pair(row: dict, index: int) -> dict:
        prompt, answer = split_problem(row[TEXT])
        offset = int(np.random.default_rng([seed, index]).choice([-10, -2, -1, 1, 2, 10]))
        assistant = lambda content: [{"role": "assistant", "content": content}]
        return {"prompt": [{"role": "user", "content": prompt[:-1]}], "chosen": assistant(answer),
                "rejected": assistant(answer_text(int(answer) + offset, max_operand))}

    return splits.map(to_pair, with_indices=True, remove_columns=[TEXT])
