"""What a new user copies from the pages is accepted as written: every `--flag` the guides name is a flag of
`easytrain train` (or `easytrain plot`), and an error's advice names a flag that exists."""

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


def known_flags() -> set[str]:
    """Every option string of `easytrain train` under the built-in tasks, and `easytrain plot --out`."""
    flags = {"--out", "--config", "--task", "--help"}
    for task in ("lm", "sft", "dpo"):
        parser = build_parser(resolve_task(task).arguments, task=task)
        flags |= {option for action in parser._actions for option in action.option_strings}
    return flags


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
