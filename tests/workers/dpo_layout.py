"""Three DPO steps on each of several mesh layouts, one after another in this process; prints one JSON line
per layout with its per-step loss, margin, chosen log-prob and gradient norm.

    python dpo_layout.py DATA,FSDP,TENSOR,ACCUMULATION[,LORA_RANK] [...] [small-set]

Each layout's mesh takes the first DATA x FSDP x TENSOR devices. With LORA_RANK the policy trains adapters
(the reference is the base with adapters off) and the line also shows how q_proj's kernel, adapters and
their SGD state are laid out. One process for every layout: a process's start (imports, tokenizer, data)
costs more than a layout's training. `small-set` evaluates 12 eval rows at eval_batch_size 16 on 8 data-parallel
devices with an online and with a precomputed reference, and prints both eval losses.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_dpo_trainer.py.
"""

import json
import sys
import tempfile
import traceback

from easytrain import Callback, TrainingArguments
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from first_devices import layout_mesh


class LayoutTrainer(DPOTrainer):
    """DPO on the first devices the layout needs, so one 8-device process also runs the 1-device layouts."""

    def configure_mesh(self):
        return layout_mesh(self.arguments)


def run(layout: str, output_dir: str) -> dict:
    data, fsdp, tensor, accumulation, *rest = map(int, layout.split(","))
    lora_rank = rest[0] if rest else 0
    values = []

    class Record(Callback):
        def on_log(self, trainer, step, logs):
            values.append([logs["loss"], logs["rewards/margins"], logs["logps/chosen"], logs["grad_norm"]])

    args = TrainingArguments(output_dir=output_dir, max_length=16, train_batch_size=16, max_steps=3,
                             gradient_accumulation_steps=accumulation, data_parallel_size=data, fsdp_size=fsdp,
                             tensor_parallel_size=tensor, logging_steps=1, eval_strategy="no", save_strategy="no",
                             report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                             max_train_samples=64, learning_rate=1e-2, optimizer="sgd", sgd_momentum=0.0,
                             lora_rank=lora_rank)
    trainer = LayoutTrainer(args, DPOArguments(beta=0.5), callbacks=[Record()])
    result = {"layout": layout, "devices": trainer.mesh.size}
    if lora_rank:
        q_proj = trainer.state.params["layers"][0]["self_attn"]["q_proj"]
        spec = lambda x: str(x.sharding.spec)
        result["specs"] = {"kernel": spec(trainer.state.base["layers"][0]["self_attn"]["q_proj"]["kernel"]),
                           "lora_a": spec(q_proj["lora_a"]), "lora_b": spec(q_proj["lora_b"]),
                           "frozen": sorted(trainer.state.frozen)}
    trainer.train()
    result["values"] = values
    return result


def small_set(output_dir: str) -> dict:
    """Eval loss of 12 rows (fewer than a batch, not divisible by the 8 devices) with each kind of reference."""
    losses = {}
    for precompute in (False, True):
        args = TrainingArguments(output_dir=f"{output_dir}/{precompute}", max_length=16, train_batch_size=8,
                                 eval_batch_size=16, max_steps=1, logging_steps=1, eval_strategy="no",
                                 save_strategy="no", report_to=["none"], disable_progress_bar=True,
                                 save_pretrained_at_end=False, max_train_samples=32, max_eval_samples=12,
                                 data_parallel_size=8)
        losses[str(precompute)] = LayoutTrainer(args, DPOArguments(precompute_ref_log_probs=precompute)).evaluate()
    return {"layout": "small-set", "losses": {name: logs["eval_loss"] for name, logs in losses.items()}}


def small_set_or_its_error(output_dir: str) -> dict:
    """`small_set`, or the end of its traceback: its failure is its test's, not every layout test's."""
    try:
        return small_set(output_dir)
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        return {"layout": "small-set", "error": traceback.format_exc()[-3000:]}


if __name__ == "__main__":
    for layout in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as scratch:
            result = small_set_or_its_error(scratch) if layout == "small-set" else run(layout, scratch)
            print(json.dumps(result), flush=True)
