"""Writes one golden run with an easytrain checkout, for tests/test_golden_checkpoints.py to resume with the
current code: checkpoints and exports written by an older easytrain must still resume and load.

Usage, from a clone of the repository at the commit to freeze (never from the checkout under test):

    git clone -q <repo> /tmp/old && git -C /tmp/old checkout <commit>
    PYTHONPATH=/tmp/old HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_PLATFORMS=cpu \
        python tests/golden/write_golden.py /tmp/old tests/golden/<YYYY-MM-DD>-<short commit>[-<kind>] [<kind>]

It runs in a scratch copy of this folder's inputs (INPUTS: the arguments name them relative to it, so the
goldens resume wherever the repository is cloned) under the suite's XLA flags. Kind `lm` (the default) trains
data.jsonl on the 1-layer Llama of model.json with the embedded task's character tokenizer (tokenizer/);
`sft_lora` trains rank-2 adapters on the 2026-12-01 export with sft.jsonl, `dpo` that export with dpo.jsonl.
Each writes a 4-step run saved at steps 2 and 4 (`run/`; the step-4 checkpoint and the logs other than
metrics.jsonl are left out), the losses of an unbroken 6-step run and, for `lm`, the run's `save_pretrained`
export (`export/`) with its logits on fixed ids; `expected.json` records them with the commit.

Add a golden whenever a commit changes what a checkpoint or an export holds (a run_info key, a state leaf, a
file): write it from that commit's parent, so the change is tested against what users already have on disk, and
keep the older goldens. The arguments below must stay ones every frozen commit accepts: the test resumes each
golden with them. Keep each golden small (about 115 KB for `lm`, 70 KB for `sft_lora`, 105 KB for `dpo`).
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The run's inputs, named relative to the working directory (a copy of them, `workspace`): the arguments a
#: checkpoint records hold these names, so a golden resumes wherever the repository is cloned (train_file and
#: tokenizer_name are compared as written: another path is refused as a change of the data order).
#: Name in the working directory -> file or folder here. `base`, the model `sft_lora` starts from, is the 2026-12-01
#: golden's export (an export that must load anyway, not a second copy).
INPUTS = {"data.jsonl": "data.jsonl", "model.json": "model.json", "tokenizer": "tokenizer", "sft.jsonl": "sft.jsonl",
          "dpo.jsonl": "dpo.jsonl", "base": "2026-12-01-7c2c22f/export"}
#: What a golden trains: its trainer (module, class) and the arguments that differ from the plain language model's.
#: `sft_lora` fine-tunes rank-2 adapters on `base` with prompt/completion rows; `dpo` trains `base` in full on
#: prompt/chosen/rejected pairs against its initial policy (rebuilt on resume, not checkpointed).
KINDS: dict[str, tuple[str, str, dict]] = {
    "lm": ("easytrain", "BaseTrainer", {}),
    "sft_lora": ("easytrain.trainers.sft", "SFTTrainer",
                 dict(task="sft", model_config="tiny", tokenizer_name=None, model_name_or_path="base",
                      train_file="sft.jsonl", lora_rank=2)),
    "dpo": ("easytrain.trainers.dpo", "DPOTrainer",
            dict(task="dpo", model_config="tiny", tokenizer_name=None, model_name_or_path="base",
                 train_file="dpo.jsonl")),
}
#: Token ids the export's logits are recorded on (the embedded task's character tokenizer has 18 ids).
PROBE_IDS = [[1, 7, 8, 14, 5, 6, 16, 4, 5, 7], [1, 4, 4, 14, 13, 3, 16, 0, 0, 0]]
PROBE_MASK = [[1] * 10, [1] * 7 + [0] * 3]


def suite_xla_flags() -> str:
    """XLA_FLAGS with the suite's compiler settings (tests/conftest.py): the losses are recorded as the test
    computes them (at XLA's default -O3 steps 3 and 4 differ from them in the last bit)."""
    flags = ["--xla_backend_optimization_level=0"]
    if tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def arguments(output_dir: str | Path, max_steps: int = 4, kind: str = "lm", **overrides) -> dict:
    """The golden run's TrainingArguments: a constant rate, so steps 1-4 of the 6-step run are the 4-step run's;
    XLA's own compiler options, not 'auto', whose choice depends on the CPU's vendor and changed in 18e7791 (it
    moved a golden's step-6 loss by one float32 ulp)."""
    return dict(output_dir=str(output_dir), model_config="model.json", train_file="data.jsonl",
                tokenizer_name="tokenizer", compiler_options="", max_length=12,
                train_batch_size=4, max_steps=max_steps, learning_rate=3e-3, lr_scheduler_type="constant",
                warmup_steps=0, logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=2,
                report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                seed=7) | KINDS[kind][2] | overrides


def trainer_class(kind: str) -> type:
    module, name, _ = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def workspace(directory: Path) -> Path:
    """`directory` holding a copy of INPUTS, to run in (the arguments name them relative to it)."""
    for name, source in INPUTS.items():
        source, target = HERE / source, directory / name
        shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
    return directory


def losses(output_dir: Path) -> dict[str, float]:
    """`step -> train loss` from a run's metrics.jsonl (JSON floats: the logged values exactly)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): r["loss"] for r in records if r.get("split") == "train" and "loss" in r}


def probe_logits(export: Path) -> str:
    """The export's float32 logits on PROBE_IDS, loaded back by the same code that wrote it: little-endian bytes in
    base64 (exact, and a twentieth of the JSON list's size)."""
    import numpy as np
    from easytrain.models import from_pretrained

    model = from_pretrained(export)
    logits = model(np.asarray(PROBE_IDS), attention_mask_BT=np.asarray(PROBE_MASK))
    return base64.b64encode(np.asarray(logits, dtype="<f4").tobytes()).decode()


def keep_small(run: Path) -> None:
    """Leaves out what the test does not resume or compare: the step-4 checkpoint (the test resumes step 2; each
    checkpoint is about 95 KB) and the logs other than metrics.jsonl."""
    shutil.rmtree(run / "checkpoints" / "4")
    for item in run.iterdir():
        if item.name not in ("checkpoints", "arguments.json", "metrics.jsonl"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def write(checkout: Path, destination: Path, kind: str) -> None:
    from easytrain import TrainingArguments

    commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%H %cI"], check=True,
                            capture_output=True, text=True).stdout.split()
    destination.mkdir(parents=True, exist_ok=False)
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(workspace(Path(scratch)))
        trainer = trainer_class(kind)(TrainingArguments(**arguments("run", kind=kind)))
        trainer.train()
        trainer_class(kind)(TrainingArguments(**arguments("unbroken", max_steps=6, kind=kind))).train()
        keep_small(Path("run"))
        expected = dict(commit=commit[0], committed=commit[1], kind=kind, run_losses=losses(Path("run")),
                        unbroken_losses=losses(Path("unbroken")))
        shutil.copytree("run", destination / "run")
        if kind == "lm":  # one export per commit: the adapters' merge is the same function of the same files
            trainer.save_pretrained(destination / "export")
            expected["probe_logits"] = probe_logits(destination / "export")
    (destination / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = suite_xla_flags()
    write(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3] if len(sys.argv) > 3 else "lm")
