"""Three DPO steps on one mesh layout with gradient accumulation; prints the per-step losses as JSON.

    python dpo_layout.py DATA FSDP TENSOR ACCUMULATION [LORA_RANK]

With LORA_RANK the policy trains adapters (the reference is the base with adapters off) and a line
`SPECS {...}` first shows how q_proj's kernel, adapters and their AdamW-free SGD state are laid out.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 by tests/test_dpo_trainer.py.
"""

import json
import sys
import tempfile

from easytrain import Callback, TrainingArguments
from easytrain.trainers.dpo import DPOArguments, DPOTrainer


def main() -> None:
    data, fsdp, tensor, accumulation = map(int, sys.argv[1:5])
    lora_rank = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    class Record(Callback):
        values: list = []

        def on_log(self, trainer, step, logs):
            self.values.append([logs["loss"], logs["rewards/margins"], logs["logps/chosen"], logs["grad_norm"]])

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_length=16, train_batch_size=16, max_steps=3,
                             gradient_accumulation_steps=accumulation, data_parallel_size=data, fsdp_size=fsdp,
                             tensor_parallel_size=tensor, logging_steps=1, eval_strategy="no", save_strategy="no",
                             report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                             max_train_samples=64, learning_rate=1e-2, optimizer="sgd", sgd_momentum=0.0,
                             lora_rank=lora_rank)
    recorder = Record()
    trainer = DPOTrainer(args, DPOArguments(beta=0.5), callbacks=[recorder])
    if lora_rank:
        q_proj = trainer.state.params["layers"][0]["self_attn"]["q_proj"]
        spec = lambda x: str(x.sharding.spec)
        print("SPECS", json.dumps({"kernel": spec(trainer.state.base["layers"][0]["self_attn"]["q_proj"]["kernel"]),
                                   "lora_a": spec(q_proj["lora_a"]), "lora_b": spec(q_proj["lora_b"]),
                                   "frozen": sorted(trainer.state.frozen)}))
    trainer.train()
    print(json.dumps(recorder.values))


if __name__ == "__main__":
    main()
