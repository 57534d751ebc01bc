"""What a new user copies from the pages is accepted as written: every `--flag` the guides name is a flag of
`easytrain train` (or `easytrain plot`), and an error's advice names a flag that exists."""

import functools
import json
import re
from pathlib import Path

import jax.numpy as jnp
import pytest
from model_configs import family_config, right_padded_batch

from easytrain.config_io import build_parser
from easytrain.models import init_model
from easytrain.tasks import resolve_task

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *(f"docs/{name}.md" for name in (
    "quickstart", "sft", "dpo", "lora", "tasks", "custom_trainer", "models", "scaling", "plots", "metrics"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z_]*[a-z]")
# Flags of other programs the pages show (srun, gcloud, tensorboard, mkdocs, ruff, the benchmarks) and of the
# pages' own example tasks (`toy`, `chat`, the distillation trainer), which no built-in task has.
NOT_EASYTRAIN = {"--nodes", "--ntasks", "--gpus", "--worker", "--command", "--kill", "--logdir", "--strict", "--fix",
                 "--quick", "--meshes", "--rounds", "--version", "--toy_option", "--chat_max_turns",
                 "--teacher_path"}


@functools.cache
def known_flags() -> frozenset[str]:
    """Every option string of `easytrain train` under the built-in tasks, and `easytrain plot --out`."""
    flags = {"--out", "--config", "--task", "--help"}
    for task in ("lm", "sft", "dpo"):
        parser = build_parser(resolve_task(task).arguments, task=task)
        flags |= {option for action in parser._actions for option in action.option_strings}
    return frozenset(flags)


@pytest.mark.parametrize("page", PAGES)
def test_every_flag_a_page_names_is_accepted(page):
    text = (ROOT / page).read_text()
    named = set(FLAG.findall(text)) - NOT_EASYTRAIN - {"--no"}  # tasks.md: "a generated `--no_FIELD` flag"
    unknown = sorted(named - known_flags())
    assert not unknown, f"{page} names flags easytrain train does not accept: {unknown}"


def test_the_mixed_window_scan_refusal_advises_flags_that_exist():
    """A mixed-window model scanned with a structured mask is refused; the flags its message advises parse."""
    model = init_model(family_config("qwen2", num_hidden_layers=3, max_window_layers=2))
    model.attention_implementation, model.scan_layers = "dot_product_attention", True
    ids, mask = (jnp.asarray(a) for a in right_padded_batch())
    with pytest.raises(ValueError, match="scan_layers with attention_implementation") as refused:
        model(ids, attention_mask_BT=mask)
    advised = set(FLAG.findall(str(refused.value)))
    assert advised and not advised - known_flags(), str(refused.value)


# ----------------------------------------------------------------------------- the pages' Python, run as written


def page_blocks(name: str) -> list:
    from doc_snippets import python_blocks

    return python_blocks(ROOT / "docs" / name)


def test_the_quickstart_tokenizer_recipe_saves_a_tokenizer_with_its_special_tokens(tmp_path, monkeypatch, text_lines):
    from doc_snippets import run_block
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n".join(text_lines) + "\n")
    block = page_blocks("quickstart.md")[0]
    assert 'tokenizer.train(["corpus.txt"]' in block.source
    run_block(block, {"__name__": "doc:quickstart.md"})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "path" / "to" / "tokenizer")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.decode(tokenizer("a corpus line").input_ids) == "a corpus line"


def test_the_sft_page_builds_its_trainers_as_written(tmp_path, monkeypatch):
    """Every block but the 300-step training run ("From Python", a minute on 2 cores): the formatting_func and
    compute_metrics trainers are built, and the two subclasses are SFTTrainers."""
    from doc_snippets import run_block

    monkeypatch.chdir(tmp_path)
    blocks = [block for block in page_blocks("sft.md") if "logs = trainer.train()" not in block.source]
    assert len(blocks) == len(page_blocks("sft.md")) - 1 == 4
    namespace: dict = {"__name__": "doc:sft.md"}
    for block in blocks:
        run_block(block, namespace)
    assert namespace["trainer"].answer_metrics is namespace["numeric"]
    assert namespace["trainer"].formatting_func is None  # the compute_metrics trainer maps to_chat over its rows itself
    for name in ("ZLossSFTTrainer", "PromptWeightSFTTrainer"):
        assert issubclass(namespace[name], namespace["SFTTrainer"]), name


def test_the_plots_page_draws_the_runs_it_names(tmp_path, monkeypatch):
    """plots.md's Python on two runs' metrics.jsonl: every figure the page's table lists, drawn and written."""
    from doc_snippets import run_page

    monkeypatch.chdir(tmp_path)
    for run, scale in (("baseline", 1.0), ("high_lr", 2.0)):
        (tmp_path / "runs" / run).mkdir(parents=True)
        records = [{"step": step, "split": "train", "loss": scale / step, "learning_rate": 1e-3,
                    "tokens_per_second": 100.0} for step in (1, 2, 3, 4)]
        records.append({"step": 4, "split": "eval", "eval_loss": scale, "eval_accuracy": 0.5})
        (tmp_path / "runs" / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    namespace = run_page(ROOT / "docs" / "plots.md")
    names = {"loss", "learning_rate", "eval", "throughput"}
    assert set(namespace["figures"]) == names
    assert {path.name for path in (tmp_path / "reports").iterdir()} == {f"{name}.png" for name in names}


def test_the_models_page_loads_exports_and_generates_as_written(tmp_path, monkeypatch):
    """models.md's blocks on tiny local checkpoints in place of its `path/to/...` ones: load, load onto a mesh,
    export with a tokenizer, generate."""
    from doc_snippets import run_block

    from easytrain.models import save_pretrained
    from easytrain.tasks import build_arithmetic_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = build_arithmetic_tokenizer()
    for path, config in (("path/to/qwen3-checkpoint", family_config("qwen3", vocab_size=len(tokenizer))),
                         ("path/to/llama", family_config("llama", vocab_size=len(tokenizer)))):
        model = init_model(config)
        save_pretrained(path, model, model.config, tokenizer=tokenizer)
    namespace: dict = {"__name__": "doc:models.md"}
    for block in page_blocks("models.md"):
        run_block(block, namespace)
    assert namespace["model"].config.model_type == "llama"  # the mesh block's model is the one exported
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "export" / "tokenizer.json").is_file()
    assert namespace["tokens"].shape[0] == 2


def test_the_quickstart_table_lists_what_the_command_writes(tmp_path, monkeypatch):
    """The quickstart's table of `outputs/easytrain/` names every file and folder `easytrain train` leaves there."""
    from easytrain import cli

    page = (ROOT / "docs" / "quickstart.md").read_text()
    table = page.split("| path | what |", 1)[1].split("\n\n", 1)[0]
    listed = {re.sub(r"/.*", "", path) for path in re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)}
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--max_steps", "2", "--max_eval_samples", "8", "--eval_metrics", "none",
                     "--output_dir", "outputs/easytrain"]) == 0
    written = {path.name for path in (tmp_path / "outputs" / "easytrain").iterdir()}
    assert written - {".easytrain.lock"} == listed  # the run lock: docs/checkpoints.md


def test_the_dpo_page_registers_its_loss_as_written():
    """dpo.md's `register_preference_loss` block: `my_simpo` becomes a reference-free `loss_type`. The registry is
    restored afterwards (other tests list every loss)."""
    from doc_snippets import run_block

    from easytrain import preference
    from easytrain.trainers.dpo import DPOArguments

    losses, per_token = dict(preference.PREFERENCE_LOSSES), set(preference._PER_TOKEN_NAMES)
    try:
        block, = [block for block in page_blocks("dpo.md") if "register_preference_loss(" in block.source]
        run_block(block, {"__name__": "doc:dpo.md"})
        arguments = DPOArguments(loss_type="my_simpo", label_smoothing=0.1)
        assert arguments.loss_type == ["my_simpo"] and not arguments.needs_reference
        assert preference.reports_per_token(["my_simpo"])
    finally:
        preference.PREFERENCE_LOSSES.clear()
        preference.PREFERENCE_LOSSES.update(losses)
        preference._PER_TOKEN_NAMES.clear()
        preference._PER_TOKEN_NAMES.update(per_token)
