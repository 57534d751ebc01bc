"""The loop keeps the device busy while it logs: metrics of a logging step are fetched from the device only
after the next step has been dispatched, and nothing is fetched between logging steps."""

import jax

from easytrain import BaseTrainer, TrainingArguments
from easytrain.trainers import loop as loop_module
from runs import logged


class Recording(BaseTrainer):
    """Records dispatches (train iterations) and metric fetches in the order the loop makes them."""

    events: list

    def train_iteration(self, state, batch):
        self.events.append(("dispatch", sum(kind == "dispatch" for kind, _ in self.events) + 1))
        return super().train_iteration(state, batch)


def test_metrics_of_a_logging_step_are_fetched_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    events: list = []
    fetch = loop_module.metrics_lib.fetch

    def recording_fetch(tree):
        events.append(("fetch", len(tree)))
        return fetch(tree)

    monkeypatch.setattr(loop_module.metrics_lib, "fetch", recording_fetch)
    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=7,
                             logging_steps=2, eval_strategy="no", save_strategy="steps", save_steps=6,
                             report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                             max_train_samples=64, max_eval_samples=8)
    trainer = Recording(args)
    trainer.events = events
    trainer.train()
    # Step 2's metrics after step 3 is queued, step 4's after step 5; step 6 is saved (the save waits for the
    # device anyway, so it logs at once); step 7 is the last.
    assert events == [("dispatch", 1), ("dispatch", 2), ("dispatch", 3), ("fetch", 2), ("dispatch", 4),
                      ("dispatch", 5), ("fetch", 2), ("dispatch", 6), ("fetch", 2), ("dispatch", 7), ("fetch", 1)]
    assert sorted(logged(tmp_path)) == [2, 4, 6, 7]


def test_nothing_is_read_from_the_device_between_logging_steps(tmp_path, monkeypatch):
    """Every host read of a `jax.Array` (`__array__`, `_value`, host copies) and every wait for one (its
    `block_until_ready` method, or `jax.block_until_ready` on several) during the loop happens inside the logging
    fetch: a wait each step stalls the host as a read does. (`jax.transfer_guard` cannot show this on CPU, where
    device arrays already live in host memory, so the reads are counted at the array type itself.)"""
    from jax._src import api as api_module
    from jax._src import array as array_module

    state = {"training": False, "fetching": False}
    stray: list = []

    def counted(name, original):
        def read(self, *args, **kwargs):
            if state["training"] and not state["fetching"]:
                stray.append(name)
            return original(self, *args, **kwargs)
        return read

    impl = array_module.ArrayImpl
    for name in ("__array__", "copy_to_host_async", "_copy_single_device_array_to_host_async", "block_until_ready"):
        monkeypatch.setattr(impl, name, counted(name, getattr(impl, name)))
    batched = api_module.xc.batched_block_until_ready  # `jax.block_until_ready` of two or more arrays
    wait_for_all = counted("batched_block_until_ready", lambda _, arrays: batched(arrays))
    monkeypatch.setattr(api_module.xc, "batched_block_until_ready", lambda arrays: wait_for_all(None, arrays))
    monkeypatch.setattr(impl, "_value", property(counted("_value", impl._value.fget)))
    fetch = loop_module.metrics_lib.fetch

    def fetching(tree):
        state["fetching"] = True
        try:
            return fetch(tree)
        finally:
            state["fetching"] = False

    monkeypatch.setattr(loop_module.metrics_lib, "fetch", fetching)

    class Watched(BaseTrainer):
        def train_iteration(self, train_state, batch):
            state["training"] = True
            return super().train_iteration(train_state, batch)

    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=9,
                             logging_steps=4, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                             max_eval_samples=8)
    trainer = Watched(args)
    trainer.train()
    assert sorted(logged(tmp_path)) == [4, 8, 9]
    assert stray == [], f"host reads outside the logging fetch: {stray}"
    state["fetching"] = False
    float(trainer.state.step)
    assert stray, "the patched reads must observe a host read"
    stray.clear()
    trainer.state.step.block_until_ready()
    assert stray == ["block_until_ready"], "the patched method must observe a wait"
    stray.clear()
    jax.block_until_ready(trainer.state)
    assert stray == ["batched_block_until_ready"], "the patched function must observe a wait on several arrays"


def test_at_most_max_steps_in_flight_are_queued_in_a_long_logging_window(tmp_path, monkeypatch):
    """With 40 steps between fetches, the loop waits (without a transfer) for the step `MAX_STEPS_IN_FLIGHT`
    back before queueing more. Past 32 queued programs per device, XLA:CPU blocks a launch on a thread its
    pending collectives need: a multi-device CPU mesh deadlocks (seen with a bare jitted step on (2,2,2))."""
    events: list = []
    wait = loop_module.jax.block_until_ready

    def recording_wait(tree):
        events.append(("wait", None))
        return wait(tree)

    monkeypatch.setattr(loop_module.jax, "block_until_ready", recording_wait)
    monkeypatch.setattr(loop_module, "MAX_STEPS_IN_FLIGHT", 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=7,
                             logging_steps=40, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64)
    trainer = Recording(args)
    trainer.events = events
    trainer.train()
    # Steps 1-4 queue freely; from step 5 on, each dispatch waits for the step 4 before it.
    assert events == [("dispatch", 1), ("dispatch", 2), ("dispatch", 3), ("dispatch", 4), ("dispatch", 5),
                      ("wait", None), ("dispatch", 6), ("wait", None), ("dispatch", 7), ("wait", None)]


def test_evaluation_waits_every_few_batches(tmp_path, monkeypatch):
    """`evaluate` merges metrics on device and fetches once, but waits (without a transfer) every
    `EVAL_BATCHES_IN_FLIGHT` batches, for the same XLA:CPU queue limit; the merged result is unchanged."""
    from easytrain.trainers import loop as loop_module

    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, eval_batch_size=2,
                             max_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                             max_eval_samples=20)
    trainer = BaseTrainer(args)
    reference = trainer.evaluate()
    waits: list = []
    wait = loop_module.jax.block_until_ready
    monkeypatch.setattr(loop_module.jax, "block_until_ready", lambda tree: waits.append(1) or wait(tree))
    monkeypatch.setattr(loop_module, "EVAL_BATCHES_IN_FLIGHT", 3)
    assert trainer.evaluate() == reference
    assert len(waits) == 10 // 3  # 10 eval batches of 2: after the 3rd, 6th and 9th


def test_the_peak_flop_rate_is_looked_up_before_the_first_step_is_dispatched(tmp_path, monkeypatch):
    """On CPU the peak is a matmul timed once per process: at the first log it queued behind the step in flight,
    so the host waited for that step, the device then idled while the matmul ran, and the next window's
    `step_time` read 10-25% low (steps 5-8 of the benchmark Llama: 0.34-0.40 s against 0.44); now it is taken
    before the first step is dispatched."""
    events: list = []
    peak = loop_module.flops.hardware_peak

    def recording_peak():
        events.append(("peak", 0))
        return peak()

    monkeypatch.setattr(loop_module.flops, "hardware_peak", recording_peak)
    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=4,
                             logging_steps=2, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                             max_eval_samples=8)
    trainer = Recording(args)
    trainer.events = events
    logs = trainer.train()
    assert events[0] == ("peak", 0) and ("dispatch", 1) in events, events
    assert "mfu" in logs


class FakeClock:
    """`time.perf_counter` of the loop, advanced only by the test: a step takes 1 s, a log 10 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Timed(BaseTrainer):
    clock: FakeClock

    def train_iteration(self, state, batch):
        self.clock.now += 1.0  # the step's compute, overlapping nothing in this fake
        return super().train_iteration(state, batch)


def test_the_logging_windows_tile_the_run_with_the_log_time_of_a_deferred_log_counted(tmp_path, monkeypatch):
    """A deferred log runs while the next step computes; the time it takes is the loop's (the next dispatch waits
    for it), so every second after the compile lies in exactly one window: step_time * steps sums to the run.
    Restarting the window after the log instead dropped the next step's time (step_time read 0.004 s for 0.13)."""
    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)
    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=6,
                             logging_steps=2, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64)
    trainer = Timed(args)
    trainer.clock = clock
    trainer.callbacks.callbacks.append(type("SlowLog", (), {
        "on_log": lambda self, trainer, step, logs: setattr(clock, "now", clock.now + 10.0),
        **{event: (lambda self, *a: None) for event in ("on_train_begin", "on_train_end", "on_step_end",
                                                         "on_evaluate", "on_save", "on_exception",
                                                         "on_job_update")}})())
    trainer.train()
    step_time = logged(tmp_path, "step_time")
    # The clock reads 1 s once step 1 is compiled and 26 s at the last fetch (6 steps, two deferred 10 s logs; the
    # last log is not deferred and comes after it). The fake charges a step at its dispatch, which precedes the
    # deferred log of the step before, so the windows read 2, 2 + 10 and 1 + 10 seconds.
    assert sum(2 * seconds for seconds in step_time.values()) == 26.0 - 1.0
    assert step_time == {2: 1.0, 4: 6.0, 6: 5.5}
