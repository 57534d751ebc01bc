"""Pre-tokenized language-model rows with Hugging Face's `labels` and `attention_mask` columns: -100 labels and
padding are not supervised, exactly as transformers' causal-LM loss (which shifts the labels itself) counts them,
and what easytrain cannot train on as given is refused before compute, naming the split, row and column."""

import json

import datasets
import numpy as np
import pytest
import torch
import transformers

from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import DataError, lm_collate_rows
from easytrain.trainers import lm_blocks

LENGTH = 13  # tokens per stored row: max_length + 1
IGNORE = -100


def hf_rows(seed: int = 0, rows: int = 8, vocab: int = 300) -> dict[str, np.ndarray]:
    """Rows as a transformers user prepares them: a prompt and padding labelled -100, right padding on even rows
    and left padding on odd ones (pad id 0), with the supervised answer lengths varying per row."""
    rng = np.random.default_rng(seed)
    ids_NL = rng.integers(3, vocab, size=(rows, LENGTH))
    mask_NL = np.ones_like(ids_NL)
    labels_NL = ids_NL.copy()
    for row in range(rows):
        pads, prompt = 1 + row % 3, 2 + row % 4
        real = slice(pads, LENGTH) if row % 2 else slice(0, LENGTH - pads)
        mask_NL[row] = 0
        mask_NL[row, real] = 1
        ids_NL[row, mask_NL[row] == 0] = 0
        labels_NL[row, mask_NL[row] == 0] = IGNORE
        labels_NL[row, real.start:real.start + prompt] = IGNORE
    return {"input_ids": ids_NL, "labels": labels_NL, "attention_mask": mask_NL}


def as_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({name: values.tolist() for name, values in columns.items()})


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=LENGTH - 1, train_batch_size=4, eval_batch_size=3,
                  max_steps=1, learning_rate=1e-3, logging_steps=1, eval_strategy="no", save_strategy="no",
                  report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  validation_split_percentage=0)
    return TrainingArguments(**(values | overrides))


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny transformers Llama and the suite's tokenizer, saved as a pretrained checkpoint."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                      initializer_range=0.5)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_loss(model_dir, columns: dict[str, np.ndarray]) -> tuple[float, int]:
    """transformers' loss on the rows (mean over the targets whose label is not -100) and that target count."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(**{name: torch.tensor(values) for name, values in columns.items()}).loss
    return float(loss), int((columns["labels"][:, 1:] != IGNORE).sum())


def test_eval_loss_is_transformers_loss_over_exactly_the_supervised_tokens(tmp_path, hf_model_dir):
    columns = hf_rows()
    trainer = BaseTrainer(arguments(tmp_path, model_name_or_path=str(hf_model_dir)),
                          dataset_train=as_dataset(columns))
    metrics = trainer.evaluate(as_dataset(columns))
    expected, supervised = hf_loss(hf_model_dir, columns)
    every_token, _ = hf_loss(hf_model_dir, {"input_ids": columns["input_ids"], "labels": columns["input_ids"]})
    assert abs(expected - every_token) > 0.01, "the test rows tell the two readings apart"
    assert metrics["eval_loss"] == pytest.approx(expected, abs=2e-5)
    assert metrics["eval_num_tokens"] == supervised


def test_a_training_step_supervises_the_labelled_tokens_only(tmp_path, hf_model_dir):
    columns = hf_rows(seed=1, rows=4)
    args = arguments(tmp_path, model_name_or_path=str(hf_model_dir))
    BaseTrainer(args, dataset_train=as_dataset(columns)).train()
    record = next(json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"num_tokens"' in line)
    expected, supervised = hf_loss(hf_model_dir, columns)
    assert record["num_tokens"] == supervised
    assert record["loss"] == pytest.approx(expected, abs=2e-5)


def test_each_target_is_supervised_exactly_when_its_label_is_not_minus_100():
    columns = hf_rows(rows=6)
    batch = lm_collate_rows(columns, np.arange(6))
    for row in range(6):
        real = columns["attention_mask"][row] == 1
        ids, labels = columns["input_ids"][row][real], columns["labels"][row][real]
        kept = int(real.sum()) - 1  # targets of the real tokens, first in the row
        np.testing.assert_array_equal(batch["input_ids"][row][:kept], ids[:-1])
        np.testing.assert_array_equal(batch["targets"][row][:kept], ids[1:])
        np.testing.assert_array_equal(batch["loss_mask"][row], np.r_[labels[1:] != IGNORE, [0] * (LENGTH - 1 - kept)])
        np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(LENGTH - 1) < kept + 1)


def test_eval_padding_rows_still_weigh_nothing():
    batch = lm_collate_rows(hf_rows(rows=2), np.array([0, -1]))
    assert batch["loss_mask"][1].sum() == 0 and batch["loss_mask"][0].sum() > 0


def test_hugging_face_grouped_blocks_batch_as_plain_blocks(tmp_path):
    """run_clm's `group_texts` rows: all-ones attention_mask, labels a copy of input_ids: nothing to mask, so the
    same batches as `input_ids` alone, without an attention mask."""
    ids_NL = np.random.default_rng(2).integers(3, 300, size=(6, LENGTH))
    grouped = as_dataset({"input_ids": ids_NL, "attention_mask": np.ones_like(ids_NL), "labels": ids_NL})
    rows = lm_blocks.lm_eval_blocks(arguments(tmp_path), None, grouped, split_name="train")
    batch = lm_collate_rows(dict(rows[:]), np.arange(6))
    plain = lm_collate_rows({"input_ids": ids_NL}, np.arange(6))
    assert batch.keys() == plain.keys()
    for name, values in plain.items():
        np.testing.assert_array_equal(batch[name], values)


def refused(tmp_path, columns: dict[str, np.ndarray], split: str = "train") -> str:
    splits = datasets.DatasetDict({split: as_dataset(columns)} | ({"train": as_dataset(hf_rows())}
                                                                   if split != "train" else {}))
    with pytest.raises(DataError) as info:
        lm_blocks.lm_blocks(arguments(tmp_path), None, splits)
    return str(info.value)


def test_a_label_other_than_the_token_or_minus_100_is_refused_naming_row_and_column(tmp_path):
    columns = hf_rows()
    columns["labels"][5, 9] = columns["input_ids"][5, 9] + 1
    message = refused(tmp_path, columns, split="validation")
    assert "'validation' split" in message and "row 5" in message and "'labels'" in message
    assert "position 9" in message and "-100" in message


def test_labels_already_shifted_by_one_are_refused_as_such(tmp_path):
    columns = hf_rows()
    columns["labels"] = np.concatenate([columns["input_ids"][:, 1:], np.full((8, 1), IGNORE)], axis=1)
    columns["attention_mask"][:] = 1
    assert "shifted" in refused(tmp_path, columns)


def test_padding_inside_a_row_is_refused_naming_the_row(tmp_path):
    columns = hf_rows()
    columns["attention_mask"][3, 6] = 0
    message = refused(tmp_path, columns)
    assert "'train' split" in message and "row 3" in message and "'attention_mask'" in message


def test_an_attention_mask_of_other_values_is_refused(tmp_path):
    columns = hf_rows()
    columns["attention_mask"][2, 0] = 2
    message = refused(tmp_path, columns)
    assert "row 2" in message and "'attention_mask'" in message and "0 or 1" in message


def test_a_labels_row_of_another_length_is_refused_naming_the_row(tmp_path):
    columns = {name: values.tolist() for name, values in hf_rows().items()}
    columns["labels"][4] = columns["labels"][4][:-1]
    with pytest.raises(DataError, match=r"'train' split.*row 4.*'labels'.*12.*13"):
        lm_blocks.lm_blocks(arguments(tmp_path), None, datasets.DatasetDict(train=datasets.Dataset.from_dict(columns)))


def test_the_collate_refuses_a_wrong_label_naming_the_example(tmp_path):
    columns = hf_rows(rows=3)
    columns["labels"][1, 8] = IGNORE + 1
    with pytest.raises(DataError, match=r"row 41.*'labels'"):
        lm_collate_rows(columns, np.array([40, 41, 42]))


def test_other_columns_are_carried_and_ignored(tmp_path):
    columns = hf_rows(rows=4) | {"source": np.array(["a", "b", "c", "d"])}
    rows = lm_blocks.lm_eval_blocks(arguments(tmp_path), None, as_dataset(columns), split_name="train")
    assert "source" in rows.column_names
    without = {name: values for name, values in hf_rows(rows=4).items()}
    for name, values in lm_collate_rows(without, np.arange(4)).items():
        np.testing.assert_array_equal(lm_collate_rows(dict(rows[:]), np.arange(4))[name], values)


def test_labels_without_a_mask_mask_the_loss_and_add_no_attention_mask():
    columns = hf_rows(rows=3)
    columns["input_ids"][:, :] = np.where(columns["attention_mask"] == 1, columns["input_ids"], 7)
    columns = {"input_ids": columns["input_ids"], "labels": columns["labels"]}  # padding now ordinary, unlabelled
    batch = lm_collate_rows(columns, np.arange(3))
    assert "attention_mask" not in batch
    np.testing.assert_array_equal(batch["input_ids"], columns["input_ids"][:, :-1])
    np.testing.assert_array_equal(batch["loss_mask"], columns["labels"][:, 1:] != IGNORE)


def test_rows_of_a_selection_are_named_as_stored_and_only_the_rows_used_are_checked(tmp_path):
    columns = hf_rows()
    columns["labels"][6, 10] = 5
    data = as_dataset(columns)
    with pytest.raises(DataError, match=r"evaluate\(dataset\): row 6, column 'labels', position 10"):
        lm_blocks.lm_eval_blocks(arguments(tmp_path), None, data.select([0, 6, 2]))
    assert len(lm_blocks.lm_eval_blocks(arguments(tmp_path), None, data, limit=6)) == 6


def test_a_labels_column_of_one_value_per_row_is_not_a_token_mask(tmp_path):
    """Class labels (one int per row) beside token blocks are another layout's column, carried along for a custom
    collate as any other column: only list columns are transformers' per-token `labels` and `attention_mask`."""
    columns = hf_rows()
    rows = {"input_ids": columns["input_ids"].tolist(), "labels": list(range(len(columns["input_ids"]))),
            "attention_mask": [1] * len(columns["input_ids"])}
    blocks = lm_blocks.lm_eval_blocks(arguments(tmp_path), None, datasets.Dataset.from_dict(rows))
    assert blocks.column_names == ["input_ids", "labels", "attention_mask"]
    batch = lm_collate_rows(blocks[:4], np.arange(4))
    np.testing.assert_array_equal(batch["loss_mask"], lm_collate_rows({"input_ids": blocks[:4]["input_ids"]},
                                                                      np.arange(4))["loss_mask"])
