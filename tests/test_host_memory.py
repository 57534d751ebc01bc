"""Huge pages for XLA:CPU's per-step scratch memory: when the tunable helps, the relaunch, the advice."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easytrain import host_memory
from runs import RELAUNCHES_FOR_HUGE_PAGES, env_without_huge_pages as clean_env, long_training_flags

needs_madvise_thp = pytest.mark.skipif(not RELAUNCHES_FOR_HUGE_PAGES,
                                       reason="needs Linux, glibc 2.35+ and THP mode madvise")


def test_thp_mode_reads_the_bracketed_mode(tmp_path: Path) -> None:
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert host_memory.thp_mode(tmp_path / "enabled") == "madvise"
    assert host_memory.thp_mode(tmp_path / "missing") is None


@pytest.mark.parametrize("environ, mode, glibc, helps", [
    ({}, "madvise", (2, 36), True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), False),  # the user chose a value
    ({host_memory.OPT_OUT: "0"}, "madvise", (2, 36), False),
    ({}, "always", (2, 36), False),  # huge pages already, without asking
    ({}, "never", (2, 36), False),
    ({}, None, (2, 36), False),
    ({}, "madvise", (2, 34), False),  # glibc before the tunable
    ({}, "madvise", None, False),  # not glibc
])
def test_the_tunable_is_set_only_where_it_takes_effect(environ, mode, glibc, helps) -> None:
    assert host_memory.would_help(environ, mode, glibc) is helps


def test_the_tunable_joins_the_users_own_tunables() -> None:
    assert host_memory.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert host_memory.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_jax_platforms_decide_whether_jax_is_cpu_only() -> None:
    assert host_memory.jax_runs_on_cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not host_memory.jax_runs_on_cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_memory.jax_runs_on_cpu_only({"JAX_PLATFORMS": "tpu"})


RELAUNCHED = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    sys.argv = ["easytrain", "train", "--help"]
    from easytrain.command import main
    sys.exit(main())
""")


@needs_madvise_thp
def test_the_command_relaunches_itself_once_with_the_tunable() -> None:
    done = subprocess.run([sys.executable, "-c", RELAUNCHED], env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    starts = [line.split() for line in done.stdout.splitlines() if line.startswith("start")]
    assert [tunables for _, _, *tunables in starts] == [[], ["glibc.malloc.hugetlb=1"]]
    assert starts[0][1] == starts[1][1], "exec keeps the process id"
    assert "--max_steps" in done.stdout, "the relaunched command ran"


@needs_madvise_thp
def test_opting_out_keeps_the_process_as_it_is() -> None:
    done = subprocess.run([sys.executable, "-c", RELAUNCHED], env=clean_env(**{host_memory.OPT_OUT: "0"}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    starts = [line.split() for line in done.stdout.splitlines() if line.startswith("start")]
    assert len(starts) == 1 and starts[0][2:] == [], starts


FAULTS = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    step = jax.jit(lambda x: jnp.cumsum(x, axis=1).sum())  # the running sums: 64 MiB of scratch memory per call
    x = jnp.ones((4096, 4096))
    step(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
""")


@needs_madvise_thp
def test_huge_pages_cut_the_page_faults_of_each_execution() -> None:
    """The mechanism itself: XLA:CPU's scratch memory is mapped afresh per call, 4 KiB or 2 MiB per fault."""
    faults = {}
    plain = clean_env(XLA_FLAGS=long_training_flags())  # four runs of a 64 MiB scan: at -O0 the test takes 2.5x longer
    for name, env in (("plain", plain), ("huge", host_memory.with_tunable(plain))):
        done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[name] = int(done.stdout.split()[-1])
    assert faults["plain"] > 10 * faults["huge"], faults


def test_a_cpu_trainer_without_huge_pages_is_told_how_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(host_memory, "_advised", False)
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
    with caplog.at_level(logging.INFO, logger="easytrain"):
        host_memory.advise("gpu")
        host_memory.advise("cpu")
        host_memory.advise("cpu")
    assert [r.getMessage().count("GLIBC_TUNABLES=glibc.malloc.hugetlb=1") for r in caplog.records] == [1]
