"""The documentation site builds with `mkdocs build --strict`: every page is in the nav, every link
resolves, every API reference names an object that exists and whose docstring parses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strictly_with_the_api_reference(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    for page in ("index", "quickstart/index", "custom_trainer/index", "metrics/index", "arguments/index"):
        assert (site / f"{page}.html").is_file(), page
    api = {name: (site / "api" / name / "index.html").read_text() for name in
           ("trainers", "arguments", "state", "metrics", "callbacks", "models", "lora", "preference", "data",
            "throughput", "errors")}
    expected = {  # objects the API pages document, by the anchor mkdocstrings gives each
        "trainers": ["trainers.base.BaseTrainer", "trainers.base.BaseTrainer.train_iteration",
                     "trainers.base.BaseTrainer.count_token_slots", "trainers.sft.SFTTrainer",
                     "trainers.dpo.DPOTrainer", "protocol.TrainerProtocol", "protocol.ConfiguredModel",
                     "tasks.registry.register_task"],
        "arguments": ["arguments.TrainingArguments", "config_io.parse_arguments", "config_io.parse_task_arguments"],
        "state": ["state.TrainState", "frozen.Frozen"],
        "metrics": ["losses.LossOutput", "metrics.ExpMean", "metrics.reduce_window", "metrics.Max", "metrics.Min"],
        "callbacks": ["callbacks.Callback", "callbacks.EarlyStopping"],
        "models": ["models.hf_load.from_pretrained", "models.hf_export.save_pretrained",
                   "models.llama.LlamaForCausalLM", "generation.generate"],
        "lora": ["lora.apply_lora", "lora_config.LoRAConfig"],
        "preference": ["preference.dpo_sigmoid_loss", "preference.combined_loss"],
        "data": ["data.pack_examples", "data.TrainBatches"],
        "throughput": ["throughput.window_logs", "flops.training_flops_per_token", "memory_plan.MemoryPlan"],
        "errors": ["errors.EasytrainError", "errors.ArgumentError", "errors.OutputDirError"],
    }
    for name, objects in expected.items():
        for obj in objects:
            assert f'id="easytrain.{obj}"' in api[name], (name, obj)


@pytest.mark.parametrize("breakage", ["a link to a missing page", "an API reference to a missing object"])
def test_a_broken_link_or_reference_fails_the_build(tmp_path, breakage):
    """The same config on a copy of the pages with one thing broken: the strict build must refuse it."""
    docs = tmp_path / "docs"
    subprocess.run(["cp", "-r", str(ROOT / "docs"), str(docs)], check=True)
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    broken = {"a link to a missing page": "See [the missing page](no_such_page.md).\n",
              "an API reference to a missing object": "::: easytrain.trainers.base.NoSuchTrainer\n"}[breakage]
    with (docs / "quickstart.md").open("a") as page:
        page.write("\n" + broken)
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert ("no_such_page.md" if "link" in breakage else "NoSuchTrainer") in result.stderr + result.stdout
