"""Shared fixtures. Tests never touch the network and run on the CPU."""

import gc
import importlib.metadata
import importlib.util
import os
import py_compile
import secrets
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite compiles hundreds of tiny programs and runs most of them a few steps, so XLA:CPU's LLVM backend at
# -O0 instead of its default -O3: the same HLO passes, fusions and buffer assignment, compiles about a quarter
# faster than at -O1, steps about twice as slow. And XLA:CPU's elemental emitters instead of its MLIR fusion emitters:
# the same HLO, the same losses in the runs compared, a train step's code generated in 0.5-0.8 of the time and run
# about a tenth slower at -O0 (docs/benchmarks.md). A test that trains hundreds of steps asks for -O1 and the fusion
# emitters in its child process (tests/runs.py `long_training_env`). Benchmarks and the easytrain command keep XLA's
# defaults. Subprocesses inherit these; tests that set a device count add it to them (tests/runs.py `xla_flags`). The
# emitter switch exists in jaxlib 0.10 and is gone from 0.11, whose XLA aborts on an unknown flag at backend start.
_FLAGS = [("--xla_backend_optimization_level", "0")]
if tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    _FLAGS.append(("--xla_cpu_use_fusion_emitters", "false"))
for _flag, _value in _FLAGS:
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()


def of_this_run(stem: str) -> str:
    """A path in the temporary directory that no other test run names: a process id alone is reused by a later run,
    which would then read what a killed run left there (`pytest_unconfigure` never ran for it)."""
    return os.path.join(tempfile.gettempdir(), f"{stem}-pid{os.getpid()}-{secrets.token_hex(6)}")


# One persistent XLA compilation cache per test run, shared by its worker subprocesses (they inherit the
# environment): the suite compiles the same tiny programs many times (a straight run, an interrupted
# one and its resume; every trainer of the contract test). "Compiling ..." is still logged on a cache
# hit, so compile-count tests keep counting. A test run never reads an earlier run's cache (`of_this_run`), and the
# process that named it (pytest-xdist's controller, or the only process) removes it at the end (`pytest_unconfigure`).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = of_this_run("easytrain-xla")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# transformers' maps of its lazily imported names, which `import transformers` builds by reading 1 600 files in every
# child process: built once per test run, read by the others (tests/without_torch/sitecustomize.py), removed with
# the compilation cache.
_OWN_IMPORT_MAPS = "EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS" not in os.environ
if _OWN_IMPORT_MAPS:
    os.environ["EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS"] = of_this_run("easytrain-transformers-imports") + ".pickle"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# XLA:CPU's per-step scratch memory on transparent huge pages, the setting the easytrain command runs with
# (easytrain.host_memory): pytest-xdist's workers and every subprocess start with it.
from easytrain import host_memory  # noqa: E402

if host_memory.would_help(os.environ, host_memory.thp_mode(), host_memory.glibc_version()):
    os.environ.update(host_memory.with_tunable(os.environ))

import pytest  # noqa: E402

import loaded_executables  # noqa: E402
from runs import args_for, children_without_torch, copied_run, without_hidden_torch  # noqa: E402

# Each test process keeps the programs it compiled or loaded, for the next trainer that builds the same one.
loaded_executables.install()


#: A checked-hash .pyc's flags (PEP 552): Python hashes the source at each import and compiles it afresh if it changed.
_CHECKED_HASH = (0b11).to_bytes(4, "little")


def precompile(package: Path) -> int:
    """Writes a checked-hash .pyc for each module of `package` whose own is missing or stale; how many it wrote.

    This environment may set PYTHONDONTWRITEBYTECODE, and then every test process and child compiles the easytrain
    modules it imports from source: a 2-step `easytrain train` child compiles 163 of them, 0.2 CPU-s, and the suite
    starts a few hundred children. Python still reads a .pyc that is there. Checked-hash, not timestamped: a source
    edited during the run (in the same second, to the same size) is never run from an older .pyc. A .pyc that cannot
    be written is left out (the module compiles from source, as before).
    """
    written = 0
    for source in sorted(package.rglob("*.py")):
        cached = importlib.util.cache_from_source(str(source))
        try:
            with open(cached, "rb") as file:
                header = file.read(16)
        except OSError:
            header = b""
        if header == importlib.util.MAGIC_NUMBER + _CHECKED_HASH + importlib.util.source_hash(source.read_bytes()):
            continue
        try:  # written whole or not at all (py_compile replaces the file), for a process importing it meanwhile
            py_compile.compile(str(source), cached, quiet=2,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except OSError:
            continue
        written += 1
    return written


def pytest_configure(config):
    """Child processes started by the tests run without PyTorch (tests/without_torch), as under easytrain's
    runtime install; the test processes themselves keep it for the interop tests. pytest-xdist's controller
    leaves the environment alone, or its workers would start without PyTorch too. The controller (or the only
    process) compiles easytrain's modules once for all (`precompile`), before any worker starts."""
    controller = not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"
    if not controller:
        os.environ["PYTHONPATH"] = children_without_torch(os.environ.get("PYTHONPATH", ""))
    if not hasattr(config, "workerinput"):
        precompile(Path(__file__).resolve().parents[1] / "easytrain")


def pytest_unconfigure(config):
    """The run's compilation cache and transformers' import maps go with the run (pytest-xdist's workers inherit
    their paths from the controller)."""
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    if _OWN_IMPORT_MAPS and not hasattr(config, "workerinput"):
        Path(os.environ["EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS"]).unlink(missing_ok=True)


# Python's cyclic collector at its default thresholds (700, 10, 10) took 7% of a trainer module's CPU time (16.4 of
# 249 s over six trainer modules): JAX's tracing makes and drops objects by the million, and every 700 of them a
# collection ran. At (10 000, 20, 10) it takes 4.9 s of 231 s (the six modules 238.8 -> 222.8 s), each worker holding
# 0.14 GB more at its peak. The collector finds the same garbage, later; no test's result depends on when. The
# tests' child processes set the same in tests/without_torch/sitecustomize.py.
GC_THRESHOLDS = (10_000, 20, 10)
gc.set_threshold(*GC_THRESHOLDS)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """The objects alive once the tests are collected (the libraries, the 3500 tests: about 680 000, of the million
    a worker holds after half the suite) live as long as the process. So no garbage collection runs while they are
    made (18 full ones took 5-6 s of a 15-17 s collection), and then they are frozen (`gc.freeze`): no full
    collection walks them again, neither the collector's own nor a test's `gc.collect()`."""
    gc.disable()
    yield
    gc.enable()
    gc.collect()
    gc.freeze()


CORPUS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    "All that glitters is not gold. Where there is a will there is a way. Practice makes perfect. "
    "Knowledge is power. Time flies like an arrow; fruit flies like a banana. "
) * 4


@pytest.fixture(scope="session")
def text_lines() -> list[str]:
    sentences = [s.strip() + "." for s in CORPUS.split(".") if s.strip()]
    return sentences * 3


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, text_lines):
    """A byte-level BPE tokenizer trained on a few KB of local text, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 4-step run (`runs.args_for`) with checkpoints at steps 2 and 4, trained once per test process for
    every module that resumes or reruns it. Tests change only copies of it (`run_copy`); a module whose tests need
    another run defines its own `finished_run` or `run_copy`."""
    from easytrain import BaseTrainer

    output_dir = tmp_path_factory.mktemp("finished") / "run"
    BaseTrainer(args_for(output_dir)).train()
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """This test's own copy of `finished_run`, at `tmp_path / "run"`."""
    return copied_run(finished_run, tmp_path / "run")


@pytest.fixture
def collections_of_this_test():
    """`gc.collect()` looks only at the objects this test makes: the process's older ones (a million in a worker that
    ran half the suite: a second a collection) are collected once and frozen for the rest of the process, as the
    collected tests are (`pytest_collection`; unfreezing them after the test would unfreeze those too), so they
    count alike before and after each call. What the test makes and lets go of is collected."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture
def children_with_torch(monkeypatch):
    """For a test whose child processes need PyTorch (a PyTorch contender): they start with it."""
    monkeypatch.setenv("PYTHONPATH", without_hidden_torch(os.environ.get("PYTHONPATH", "")))


@pytest.fixture
def process_0_of_2(monkeypatch):
    """This test process as process 0 of a 2-process run, with a fake coordination service
    (`test_process_failure.FakeClient`)."""
    from easytrain.trainers import process_failure
    from test_process_failure import FakeClient

    client = FakeClient()
    monkeypatch.setattr(process_failure, "coordination_client", lambda: client)
    monkeypatch.setattr(process_failure, "_runs", 0)
    monkeypatch.setattr(process_failure, "_published", {})
    monkeypatch.setattr(process_failure.jax, "process_index", lambda: 0)
    return client
