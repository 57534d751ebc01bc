"""Fault tolerance under real kills: bitwise resume, TensorBoard purge, O(1) data resume, atomic saves, no pickles.

The worker (`tests/workers/fault_run.py`) trains a 1-layer Llama on 40 blocks of tokenised arithmetic
text (5 steps per epoch) for 30 steps, checkpointing every 3 steps in the background, with a loss that
drops tokens using the step's PRNG key. One chain of runs is killed with SIGKILL twice, at steps drawn
from a fixed-seed RNG: mid-epoch in epoch 1 while it trains, then in epoch >= 2 while a checkpoint is
written but not yet committed; each time it is resumed with `resume_from_checkpoint="latest"`. It is
compared with one uninterrupted run. Both chains start together, once per module; the tests that only
read the uninterrupted run come first, so they overlap the kills."""

import concurrent.futures
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from easytrain.checkpoint import CHECKPOINTS_DIRNAME, finalized_steps, resolve_checkpoint

from event_files import effective_scalars
from pickle_scan import scan_for_pickles
from runs import child_env
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "fault_run.py"
MAX_STEPS, STEPS_PER_EPOCH, SAVE_STEPS, BATCH, MAX_LENGTH = 30, 5, 3, 8, 16
MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
STEP_DELAY = 0.05  # seconds per step in the killed runs, so a kill lands while training runs
TIMEOUT = 300  # seconds one worker may take on a loaded 2-core machine
COMPARED = ("loss", "num_tokens", "grad_norm", "learning_rate", "accuracy", "skipped_steps", "epoch")


# ----------------------------------------------------------------------------- running workers


def start(root: Path, output_dir: Path, records: Path, **spec) -> subprocess.Popen:
    """One worker; every run of a chain shares the chain's `datasets` cache (keyed by `records`)."""
    spec = dict(output_dir=str(output_dir), records=str(records), max_steps=MAX_STEPS,
                model_config=str(root / "model.json"), train_file=str(root / "problems.txt"), **spec)
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(datasets_cache(records)),
                    TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu",
                    JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    log = root / f"{records.stem}.{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    proc.log = log
    return proc


def datasets_cache(records: Path) -> Path:
    return records.with_name(records.stem.split(".")[0] + ".datasets_cache")


def tail(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")[-3000:]


def read_records(path: Path) -> list[dict]:
    """The worker's JSON lines; a torn last line (a kill mid-write) is ignored."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def wait_for(proc: subprocess.Popen, records: Path, predicate, what: str) -> dict:
    """Polls the worker's records until one of this process satisfies `predicate`."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in read_records(records):
            if record["pid"] == proc.pid and predicate(record):
                return record
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} before {what}:\n{tail(proc)}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"worker did not reach {what} in {TIMEOUT} s:\n{tail(proc)}")


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no handler, no flush, no cleanup
    assert proc.wait(timeout=60) == -signal.SIGKILL, tail(proc)


def complete(proc: subprocess.Popen) -> None:
    try:
        returncode = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker did not finish in {TIMEOUT} s:\n{tail(proc)}") from None
    assert returncode == 0, tail(proc)


def last_step(records: Path, pid: int) -> int:
    return max(r["step"] for r in read_records(records) if r["pid"] == pid and "step" in r)


def load_worker():
    return load_script("fault_run", WORKER)


# ----------------------------------------------------------------------------- the two run chains


def uninterrupted(root: Path, compiled: threading.Event) -> dict:
    out, records = root / "reference", root / "reference.records.jsonl"
    proc = start(root, out, records, export=True, keep_all=True)
    try:
        wait_for(proc, records, lambda r: "step" in r, "its first step")
    finally:
        compiled.set()  # the compiled steps are in the persistent cache (or this run failed)
    complete(proc)
    return dict(out=out, records=records)


def killed_twice(root: Path, rng: random.Random, compiled: threading.Event) -> dict:
    """Killed mid-epoch in epoch 1; resumed and killed in epoch >= 2 while a checkpoint is written but
    not yet committed (renamed); resumed to the end.

    It starts once the uninterrupted run has compiled, so that each run dies seconds after it opened
    its logs, as a preempted job does, rather than after a cold compile.
    """
    out, records, checkpoints = root / "killed", root / "killed.records.jsonl", root / "killed" / CHECKPOINTS_DIRNAME
    compiled.wait(TIMEOUT)
    target = rng.choice([6, 7, 8, 9])  # mid-epoch in epoch 1
    first = start(root, out, records, step_delay=STEP_DELAY)
    wait_for(first, records, lambda r: r.get("step", 0) >= target, f"step {target}")
    kill(first)
    first_kill = dict(target=target, last=last_step(records, first.pid), finalized=finalized_steps(checkpoints))
    later = [step for step in (12, 18, 21, 24) if step > max(first_kill["finalized"], default=0)]
    assert later, f"the first run was killed too late to leave a save in epoch >= 2 to kill: {first_kill}"
    held = rng.choice(later)  # a save of the resumed run, in epoch >= 2, that does not end an epoch
    second = start(root, out, records, resume=True, hold_save_step=held, step_delay=STEP_DELAY)
    tmp = Path(wait_for(second, records, lambda r: r.get("holding") == held, f"the save of step {held}")["tmp"])
    kill(second)
    second_kill = dict(held=held, last=last_step(records, second.pid), finalized=finalized_steps(checkpoints),
                       entries=sorted(p.name for p in checkpoints.iterdir()), tmp=tmp,
                       tmp_items=sorted(p.name for p in tmp.iterdir()), latest=resolve_checkpoint(out, "latest"),
                       pickles=scan_for_pickles(out))
    complete(start(root, out, records, resume=True))
    return dict(out=out, records=records, first_kill=first_kill, second_kill=second_kill)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, concurrent.futures.Future]:
    """Starts both chains at once; each test waits for the chains it reads."""
    root = tmp_path_factory.mktemp("fault")
    (root / "model.json").write_text(json.dumps(MODEL))
    load_worker().write_problems(root / "problems.txt")
    pool, compiled = concurrent.futures.ThreadPoolExecutor(max_workers=2), threading.Event()
    futures = {"reference": pool.submit(uninterrupted, root, compiled),
               "killed": pool.submit(killed_twice, root, random.Random(20240607), compiled)}
    yield futures
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- reading results


def train_logs(output_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["split"] == "train"]


def by_step(logs: list[dict]) -> dict[int, dict]:
    return {log["step"]: {key: log[key] for key in COMPARED} for log in logs}


def assert_same_curve(output_dir: Path, reference: Path) -> None:
    """One train record per step, each equal (==, not approx) to the uninterrupted run's."""
    logs, expected = train_logs(output_dir), by_step(train_logs(reference))
    assert [log["step"] for log in logs] == list(range(1, MAX_STEPS + 1))  # no duplicate, no gap
    for step, values in by_step(logs).items():
        assert values == expected[step], f"step {step}: {values} != {expected[step]}"


def assert_same_batches(records: Path, reference: Path) -> None:
    """Every record of every step (killed runs' included) holds the uninterrupted run's example ids."""
    expected = {r["step"]: r["ids"] for r in read_records(reference) if "step" in r}
    seen: dict[int, list] = {}
    for record in (r for r in read_records(records) if "step" in r):
        seen.setdefault(record["step"], []).append(record["ids"])
    assert sorted(seen) == list(range(1, MAX_STEPS + 1))
    for step, ids in seen.items():
        assert all(one == expected[step] for one in ids), f"step {step}: {ids} != {expected[step]}"


# ----------------------------------------------------------------------------- the uninterrupted run


def test_uninterrupted_run_really_consumes_the_step_rng(runs):
    """Guards the bitwise tests: the loss depends on each step's key, and each epoch reshuffles."""
    reference = runs["reference"].result()
    tokens = [log["num_tokens"] for log in train_logs(reference["out"])]
    assert len(set(tokens)) > 5 and max(tokens) < BATCH * MAX_LENGTH, tokens  # tokens dropped at random
    ids = [r["ids"] for r in read_records(reference["records"]) if "step" in r]
    epochs = [sum(ids[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH], []) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(STEPS_PER_EPOCH * BATCH)) and epochs[0] != epochs[1]


def test_tensorboard_reads_back_the_jsonl_curve_of_an_uninterrupted_run(runs):
    """Validates the reader above: without kills, TensorBoard and metrics.jsonl agree exactly."""
    out = runs["reference"].result()["out"]
    loss = effective_scalars(out / "tensorboard")["train/loss"]
    assert loss == [(log["step"], float(np.float32(log["loss"]))) for log in train_logs(out)]


def test_tensorboard_keeps_the_first_run_when_a_resume_opens_in_the_same_second(tmp_path, monkeypatch):
    from easytrain.reporting import TENSORBOARD_DIRNAME, Reporter

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)  # e.g. a stop and resume in one process
    for initial_step, steps in ((0, (1, 2, 3)), (3, (4, 5, 6))):
        with Reporter(output_dir=tmp_path, report_to=["tensorboard"], total_steps=6, initial_step=initial_step,
                      show_progress=False) as reporter:
            for step in steps:
                reporter.log(step, {"loss": float(step)})
    assert effective_scalars(tmp_path / TENSORBOARD_DIRNAME)["train/loss"] == [(s, float(s)) for s in range(1, 7)]


def test_data_position_is_restored_without_reading_earlier_batches():
    """TrainBatches at the loop's resume path (`iterator(k)` + `set_state`): one batch read, whatever k."""
    import grain

    from easytrain.data import TrainBatches

    rows = {"input_ids": np.arange(40 * 17, dtype=np.int32).reshape(40, 17)}
    sync = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # reads happen exactly on next()
    for k in (4, 40):
        replayed = TrainBatches(rows, BATCH, seed=7, read_options=sync).iterator(0)
        expected = [next(replayed) for _ in range(k + 1)][-1]
        loader = TrainBatches(rows, BATCH, seed=7, read_options=sync)
        iterator = loader.iterator(0)
        iterator.set_state({**iterator.get_state(), "step": k})
        batch = next(iterator)
        assert loader.rows_read == BATCH, (k, loader.rows_read)
        np.testing.assert_array_equal(batch["example_id"], expected["example_id"])
        np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])


def test_resumed_trainer_reads_one_batch_before_its_first_step(runs, tmp_path, monkeypatch):
    """The trainer's resume path, in process, from step 3 and from step 27 of the uninterrupted run."""
    import datasets
    import grain

    from easytrain.data import TrainBatches

    reference = runs["reference"].result()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(datasets_cache(reference["records"])))
    worker = load_worker()

    class CountingTrainer(worker.RandomDropoutTrainer):
        rows_before_first_step = None

        def configure_dataloaders(self):  # the same batches, read synchronously so counts are exact
            data = super().configure_dataloaders()
            sync = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            return data._replace(train=TrainBatches(self._dataset_train, BATCH, seed=self.arguments.seed,
                                                    read_options=sync))

        def to_global(self, host_batch):
            if self.rows_before_first_step is None:
                self.rows_before_first_step = self._data.train.rows_read
            return super().to_global(host_batch)

    expected = {log["step"]: log["loss"] for log in train_logs(reference["out"])}
    root = reference["out"].parent
    for k in (3, 27):
        spec = dict(model_config=str(root / "model.json"), train_file=str(root / "problems.txt"),
                    max_steps=MAX_STEPS, output_dir=str(tmp_path / str(k)), no_saves=True,
                    resume_from_checkpoint=str(reference["out"] / CHECKPOINTS_DIRNAME / str(k)))
        trainer = worker.build_trainer(spec, trainer_class=CountingTrainer)
        trainer.train()
        assert trainer.rows_before_first_step == BATCH, (k, trainer.rows_before_first_step)
        assert trainer.dataloaders.train.rows_read == (MAX_STEPS - k) * BATCH  # nothing before step k was read
        resumed = {log["step"]: log["loss"] for log in train_logs(tmp_path / str(k))}
        assert resumed == {step: expected[step] for step in range(k + 1, MAX_STEPS + 1)}


def test_run_directories_hold_no_pickles(runs):
    """Checkpoints, exported model, tokenizer, logs: only JSON, safetensors, OCDBT, event files."""
    reference = runs["reference"].result()["out"]
    exported = {p.name for p in (reference / "final_model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported, exported
    assert len(finalized_steps(reference / CHECKPOINTS_DIRNAME)) == MAX_STEPS // SAVE_STEPS
    assert scan_for_pickles(reference) == []


def inject_pickle(run: Path) -> Path:
    path = run / "final_model" / "extra.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    return path


def inject_pickle_as_ocdbt_data(run: Path) -> Path:
    data_dir = next((run / CHECKPOINTS_DIRNAME).glob("*/state/ocdbt.process_0/d"))
    path = data_dir / "0123456789abcdef0123456789abcdef"
    path.write_bytes(pickle.dumps(np.zeros(3), protocol=2))
    return path


def inject_text_pickle_as_json(run: Path) -> Path:
    path = run / "final_model" / "config.json"
    path.write_bytes(pickle.dumps(json.loads(path.read_text()), protocol=0))  # no binary header at all
    return path


def inject_object_npy(run: Path) -> Path:
    path = run / "final_model" / "extra.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("inject", [inject_pickle, inject_pickle_as_ocdbt_data, inject_text_pickle_as_json,
                                    inject_object_npy])
def test_the_pickle_scan_catches_a_pickle(runs, tmp_path, inject):
    copy = Path(shutil.copytree(runs["reference"].result()["out"], tmp_path / "run"))
    assert scan_for_pickles(copy) == []
    planted = inject(copy)
    problems = scan_for_pickles(copy)
    assert len(problems) == 1 and problems[0].startswith(str(planted.relative_to(copy))), problems


# ----------------------------------------------------------------------------- the killed runs


def test_sigkill_twice_resumes_bitwise(runs):
    """Same losses, token counts, grad norms, learning rates (==) and example ids as without kills;
    one metrics.jsonl record per step, though the killed runs logged steps that were then redone."""
    killed, reference = runs["killed"].result(), runs["reference"].result()
    first, second = killed["first_kill"], killed["second_kill"]
    assert first["finalized"] and max(first["finalized"]) <= first["last"] < MAX_STEPS, first
    assert second["last"] // STEPS_PER_EPOCH >= 2 and second["last"] < MAX_STEPS, second  # killed in epoch >= 2
    assert second["last"] > max(second["finalized"]), second  # so the last resume redid logged steps
    begins = [r["begin"] for r in read_records(killed["records"]) if "begin" in r]
    # Each resume started at the newest checkpoint that was complete when the previous run died.
    assert begins == [0, max(first["finalized"]), max(second["finalized"])], (begins, first, second)
    assert_same_curve(killed["out"], reference["out"])
    assert_same_batches(killed["records"], reference["records"])


def test_kill_mid_save_leaves_an_uncommitted_directory_that_resume_ignores(runs):
    """The second kill landed after Orbax wrote every item of a checkpoint but before it renamed it."""
    killed = runs["killed"].result()
    after = killed["second_kill"]
    held, previous = after["held"], after["held"] - SAVE_STEPS
    assert after["tmp"].name.startswith(f"{held}.orbax-checkpoint-tmp"), after
    assert after["tmp"].name in after["entries"] and str(held) not in after["entries"], after
    assert {"state", "data_state", "run_info"} <= set(after["tmp_items"]), after  # written, never committed
    assert held not in after["finalized"] and max(after["finalized"]) == previous, after
    assert after["latest"] == (killed["out"].absolute() / CHECKPOINTS_DIRNAME, previous)
    assert after["pickles"] == []
    assert [r["begin"] for r in read_records(killed["records"]) if "begin" in r][-1] == previous
    assert not list((killed["out"] / CHECKPOINTS_DIRNAME).glob("*orbax-checkpoint-tmp*"))  # cleaned on resume
    assert scan_for_pickles(killed["out"]) == []
    # The loss curve and batches after that resume: test_sigkill_twice_resumes_bitwise.


def test_resumed_processes_do_not_tokenize_again(runs):
    """Both resumed processes found the tokenised blocks in the datasets cache and wrote nothing there."""
    snapshots = [r["cache"] for r in read_records(runs["killed"].result()["records"]) if "begin" in r]
    assert len(snapshots) == 3 and any(name.endswith(".arrow") for name in snapshots[0]), snapshots[0]
    assert snapshots[1] == snapshots[0] and snapshots[2] == snapshots[0], snapshots


def test_tensorboard_loss_has_one_value_per_step_across_kills(runs):
    killed, reference = runs["killed"].result(), runs["reference"].result()
    loss = effective_scalars(killed["out"] / "tensorboard")["train/loss"]
    assert [step for step, _ in loss] == list(range(1, MAX_STEPS + 1)), loss
    expected = [float(np.float32(log["loss"])) for log in train_logs(reference["out"])]
    assert [value for _, value in loss] == expected
