"""Online policy gradient (REINFORCE) on the public trainer surface: sample, score, update in one compiled step.

    python examples/reinforce.py --output_dir runs/reinforce

Every step takes the first tokens of each of the loop's rows as prompts, samples completions from the current
policy with `generate_traced` inside the train step (one compiled program: rollout, then the update), rewards
each completion by how often it emits one chosen token, and updates on -advantage * log p(completion), the
advantage being the reward minus the batch mean. The sampling key is `state.stream_rng("rollout")`: a stream of
its own, apart from the loss's keys, and the same after a resume, so a resumed run samples what an uninterrupted
one does (`--resume` continues from the latest checkpoint).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from easytrain import BaseTrainer, LossOutput, TrainingArguments
from easytrain.generation import generate_traced
from easytrain.losses import model_logits
from easytrain.metrics import Mean


class ReinforceTrainer(BaseTrainer):
    """Prompts: the first `prompt_length` tokens of each row; reward: the share of `rewarded_token` in the
    `new_tokens` sampled after them."""

    prompt_length, new_tokens = 8, 8
    rewarded_token = 11  # "7" in the embedded arithmetic task's vocabulary

    def rollout(self, state, batch):
        """The batch the update sees: prompts with sampled completions, the completion tokens supervised."""
        prompts_BP = batch["input_ids"][:, :self.prompt_length]
        sampled = generate_traced(state.model(train=False), prompts_BP, None, state.stream_rng("rollout"),
                                  max_new_tokens=self.new_tokens, do_sample=True)
        sequence_BS = jnp.concatenate([prompts_BP, sampled.tokens], axis=1)
        reward_B = jnp.mean(sampled.tokens == self.rewarded_token, axis=1, dtype=jnp.float32)
        before_BT = jnp.zeros((prompts_BP.shape[0], self.prompt_length - 1), jnp.float32)  # predicting the prompt
        return {"input_ids": sequence_BS[:, :-1], "targets": sequence_BS[:, 1:],
                "loss_mask": jnp.concatenate([before_BT, sampled.mask.astype(jnp.float32)], axis=1),
                "advantage": reward_B - jnp.mean(reward_B), "reward": reward_B}

    def train_function(self):
        update = super().train_function()

        def sample_then_update(state, batch):  # one program: the rollout's batch keeps the loop batch's sharding
            return update(state, self.rollout(state, batch))

        return sample_then_update

    def compute_loss(self, model, batch, rng, train, frozen):
        if not train:  # evaluation: the plain language-model loss on the eval rows
            return super().compute_loss(model, batch, rng, train, frozen)
        logits_BTV = model_logits(model, batch).astype(jnp.float32)
        logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), batch["targets"][..., None], axis=-1)[..., 0]
        logp_B = jnp.sum(logp_BT * batch["loss_mask"], axis=1)
        rows = jnp.float32(logp_B.shape[0])
        return LossOutput(-jnp.sum(jax.lax.stop_gradient(batch["advantage"]) * logp_B), rows,
                          {"reward": Mean(jnp.sum(batch["reward"]), rows)})

    # Throughput counts the loop's batch; the update runs on the rollout's sequences instead.
    def count_tokens(self, batch):
        return len(batch["input_ids"]) * (self.prompt_length + self.new_tokens)

    def model_flops(self, batch):  # the update's FLOPs (the sampling's are left out: mfu is a lower bound)
        length = self.prompt_length + self.new_tokens - 1
        return super().model_flops({"input_ids": np.zeros((len(batch["input_ids"]), length), np.int32)})


def arguments(output_dir: str, max_steps: int, **overrides) -> TrainingArguments:
    settings = dict(output_dir=output_dir, max_steps=max_steps, max_length=32, train_batch_size=16,
                    learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler_type="constant", max_train_samples=512,
                    eval_strategy="no", save_strategy="steps", save_steps=max(1, max_steps // 2),
                    logging_steps=max(1, max_steps // 10), save_pretrained_at_end=False)
    return TrainingArguments(**{**settings, **overrides})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/reinforce")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    options = parser.parse_args(argv)
    resume = {"resume_from_checkpoint": "latest"} if options.resume else {"overwrite_output_dir": True}
    trainer = ReinforceTrainer(arguments(options.output_dir, options.max_steps, **resume))
    logs = trainer.train()
    rewarded = trainer.tokenizer.decode([trainer.rewarded_token])
    print(f"reward {logs['reward']:.3f} (share of sampled tokens that are {rewarded!r})")
    return logs


if __name__ == "__main__":
    main()
