"""One training run for tests/test_fault_tolerance.py, which kills it with SIGKILL and resumes it.

Usage: `python tests/workers/fault_run.py SPEC_JSON`, SPEC keys:

* `output_dir`, `max_steps`, `model_config` (a config.json path), `resume` (continue "latest");
* `train_file`: a .txt of arithmetic problems, tokenised through the `datasets` cache
  (`HF_DATASETS_CACHE`) and cut into 40 blocks of 17 tokens: 5 steps of 8 rows per epoch;
* `records`: file that gets one JSON line per event, appended and flushed at once so the test can
  watch it: `{"begin": restored_step, "cache": {file: [inode, mtime_ns]}}` when training starts
  (the datasets cache as the data pipeline left it), then `{"step", "ids"}` after every optimizer
  step (the example ids of that step's batch), each with this process's `pid`;
* `step_delay`: seconds to sleep after each step, so a kill lands while training runs;
* `hold_save_step`: hold that step's checkpoint just before Orbax renames (commits) it, after
  writing `{"holding": step}` to `records`, so the test can kill mid-save;
* `export`: write `final_model` at the end; `keep_all`: keep every checkpoint (else the newest 3);
  `no_saves`: write no checkpoint at all;
* `resume_from_checkpoint`: a checkpoint path to resume instead of "latest".

The loss drops tokens at random with the step's PRNG key, so a resumed run whose RNG stream
restarted (instead of continuing) would log different losses.
"""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import datasets
import jax

from easytrain import BaseTrainer, Callback, TrainingArguments, causal_lm_loss
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer, make_arithmetic_dataset

NUM_ROWS, BATCH, MAX_LENGTH, SAVE_STEPS = 40, 8, 16, 3  # 5 steps per epoch
KEEP_PROBABILITY = 0.75


def write_problems(path: str, count: int = 200) -> None:
    """The training text: one arithmetic problem per line."""
    problems = make_arithmetic_dataset(count, seed=7)["text"]
    Path(path).write_text("\n".join(problems) + "\n")


def cache_snapshot() -> dict[str, list[int]]:
    """Every file of the datasets cache with its inode and mtime: a rewrite changes one or the other."""
    root = Path(datasets.config.HF_DATASETS_CACHE)
    return {str(p.relative_to(root)): [p.stat().st_ino, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


class Appender:
    """Appends JSON lines and flushes each one, so a SIGKILL loses nothing already written."""

    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, **record) -> None:
        self.file.write(json.dumps({**record, "pid": os.getpid()}) + "\n")
        self.file.flush()


class RandomDropoutTrainer(BaseTrainer):
    """Drops supervised tokens with the step key and remembers each train batch's example ids."""

    evaluating = False
    last_ids: list[int] = []

    def compute_loss(self, model, batch, rng, train, frozen):
        keep = jax.random.bernoulli(rng, KEEP_PROBABILITY, batch["loss_mask"].shape)
        return causal_lm_loss(model, {**batch, "loss_mask": batch["loss_mask"] * keep}, rng, train, frozen)

    def to_global(self, host_batch):
        if not self.evaluating:  # eval batches pass through here too
            self.last_ids = host_batch["example_id"].tolist()
        return super().to_global(host_batch)

    def evaluate(self):
        self.evaluating = True
        try:
            return super().evaluate()
        finally:
            self.evaluating = False


class Record(Callback):
    def __init__(self, append: Appender, step_delay: float):
        self.append, self.step_delay = append, step_delay

    def on_train_begin(self, trainer):
        self.append(begin=int(jax.device_get(trainer.state.step)), cache=cache_snapshot())

    def on_step_end(self, trainer, step):
        self.append(step=step, ids=trainer.last_ids)
        time.sleep(self.step_delay)


def hold_save(step: int, append: Appender) -> None:
    """Make the commit (tmp-dir rename) of checkpoint `step` wait for a kill."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == str(step):
            append(holding=step, tmp=str(self.get()))
            await asyncio.sleep(600)
        await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def build_trainer(spec: dict, callbacks=(), trainer_class=RandomDropoutTrainer) -> RandomDropoutTrainer:
    """The trainer every run of a test uses; `spec` as in the module docstring."""
    args = TrainingArguments(
        output_dir=spec["output_dir"], model_config=spec["model_config"], max_steps=spec["max_steps"],
        resume_from_checkpoint=spec.get("resume_from_checkpoint") or ("latest" if spec.get("resume") else None),
        train_file=spec["train_file"], max_train_samples=NUM_ROWS, max_length=MAX_LENGTH, train_batch_size=BATCH,
        eval_batch_size=BATCH, learning_rate=1e-2, warmup_steps=2, logging_steps=1, eval_strategy="no",
        save_strategy="no" if spec.get("no_saves") else "steps", save_steps=SAVE_STEPS,
        save_total_limit=None if spec.get("keep_all") else 3, report_to=["jsonl", "tensorboard"],
        disable_progress_bar=True, save_pretrained_at_end=bool(spec.get("export")))
    return trainer_class(args, tokenizer=build_arithmetic_tokenizer(), callbacks=callbacks)


def main(spec: dict) -> None:
    append = Appender(spec["records"])
    if spec.get("hold_save_step"):
        hold_save(spec["hold_save_step"], append)
    trainer = build_trainer(spec, callbacks=[Record(append, spec.get("step_delay", 0.0))])
    trainer.train()  # returns once every checkpoint and the export are on disk
    append(done=trainer.arguments.max_steps)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: seconds on a loaded CPU, and nothing is left to write


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
