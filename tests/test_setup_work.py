"""The work a trainer's set-up and first steps do: each program traced once, not again for a question its first
trace already answered."""

from easytrain import BaseTrainer, TrainingArguments


def small_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=1,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    return TrainingArguments(**(values | overrides))


class CountingTrainer(BaseTrainer):
    """Counts the traces of its loss in evaluation mode: one per trace of the eval step."""

    eval_traces = 0

    def compute_loss(self, model, batch, rng, train, frozen):
        if not train:
            type(self).eval_traces += 1
        return super().compute_loss(model, batch, rng, train, frozen)


def test_the_eval_step_is_traced_once_for_its_metric_names_and_its_evaluations(tmp_path):
    CountingTrainer.eval_traces = 0
    trainer = CountingTrainer(small_args(tmp_path))
    trainer.setup()  # the eval metrics' names are checked here, from a trace of the eval step
    first = trainer.evaluate()
    assert CountingTrainer.eval_traces == 1
    assert trainer.evaluate() == first  # the same program, the same state
    assert CountingTrainer.eval_traces == 1


def test_a_lora_runs_base_fingerprint_digests_its_small_arrays_on_the_host(tmp_path, monkeypatch):
    """The frozen base's fingerprint (what a resume must find again) is taken at every LoRA set-up: a digest program
    compiled per shape for arrays NumPy digests to the same values in less time than the program takes to launch."""
    import transformers

    from easytrain import integrity
    from easytrain.models import init_model, save_pretrained
    from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    tokenizer = build_arithmetic_chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_pretrained(tmp_path / "base", init_model(config), config)
    tokenizer.save_pretrained(tmp_path / "base")
    on_device, digest = [], integrity._digest
    monkeypatch.setattr(integrity, "_digest", lambda leaf: on_device.append(leaf.shape) or digest(leaf))
    trainer = SFTTrainer(small_args(tmp_path, model_name_or_path=str(tmp_path / "base"), lora_rank=4), SFTArguments())
    trainer.setup()
    assert trainer.base_fingerprint and on_device == []
