"""Test setup: 8 simulated CPU devices, LLVM -O0, true-fp32 matmuls, one compilation cache per run, the golden set.

XLA_FLAGS and the cache settings must be set before jax is imported anywhere, so they are set here at
import time; the `spiritlm-jax` subprocesses that tests start inherit them through the environment.
"""
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# LLVM at -O0 for the suite's programs: they are tiny, so compiling dominates and running them barely
# changes. Measured on 2026-12-04, same 2-core host, full suite: 924 s at the default level, 777 s at 0, all 639
# tests passing both ways. Numbers move only by rounding: `spiritlm-jax parity ../shared/golden` at level 0
# changed 36 of its 420 max errors, each within ~1.4x (e.g. f0_raw 1.7e-4 -> 2.3e-4 against a tolerance of
# 9.4e-3; LM logits 4.8e-6 -> 5.7e-6). Every tolerance still passes with its measured margin. The parity
# command itself, and everything users run, keeps the default level. To run the suite at another level, put
# your own --xla_backend_optimization_level in XLA_FLAGS.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the whole run, shared by the pytest-xdist workers (they inherit
# the controller's environment) and by every CLI subprocess: the suite compiles the same tiny programs in
# many processes, and a hit replaces the compile by a file read (on tests/test_original_examples.py it cut
# the CPU time from 172 s to 133 s). Programs of every size are cached (the default floor is 1 s of compile
# time, which most tiny programs stay under). The key covers the program, the flags and the jax version, so
# a hit is the very executable a compile would give. A run that brings its own directory keeps it.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spiritlm-jax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SPIRITLM_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden set. In CI (CI=true) a missing set is a failure, never a silent skip."""
    if not (GOLDEN / "cases").is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"golden set not found at {GOLDEN} (CI must have ../shared/golden beside the checkout)")
        pytest.skip(f"golden set not found at {GOLDEN}; set SPIRITLM_GOLDEN")
    return GOLDEN


@pytest.fixture(scope="session")
def converted_tree(golden_dir, tmp_path_factory) -> Path:
    """The golden checkpoints through `spiritlm-jax convert all` (docs/model-format.md), once per session."""
    from spiritlm_jax.cli import main

    dst = tmp_path_factory.mktemp("converted") / "tree"
    assert main(["convert", "all", str(golden_dir / "checkpoints"), str(dst), "--no-self-check"]) == 0
    return dst


def pytest_sessionfinish(session, exitstatus):
    """In CI nothing may be skipped: every optional dependency (torch, transformers, torchfcpe,
    AMFM-decompy, jiwer) is installed there, so a skip means a check silently did not run."""
    if os.environ.get("CI", "").lower() != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for rep in skipped:
            print(f"\nCI: skipped test is not allowed: {rep.nodeid}: {rep.longrepr}")
        session.exitstatus = 1


# The README runs the suite as `-n 2 --dist loadfile`: each worker takes whole files in collection order, so
# a heavy file collected last runs alone at the end while the other core idles (on 2026-12-03 the last 10 %
# of the tests took 6 of the run's 17.5 minutes). Files measured as the heaviest (`--durations`, seconds of
# their slowest tests on that run) are collected first, longest first, so the two workers' loads even out
# on the light files; every other file keeps its place, and within a file the order is unchanged.
HEAVY_FILES_FIRST = (
    "test_miniature.py",  # 157 s fixture (the whole miniature run) + its three tests
    "test_finetune.py",  # six tests of 13-33 s
    "test_multihost.py",  # 75 s: two processes train, are killed, resume
    "test_demo.py",  # 42 + 32 s
    "test_original_examples.py",  # 39 + 13 + 13 s
    "test_model_tree.py",  # 74 s
    "test_export.py",  # 17 + 19 + 19 s
    "test_train.py",
    "test_train_checkpoint.py",
    "test_serve_http.py",
    "test_serve_engine.py",
    "test_prompting.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionstart(session):
    session.config._spiritlm_session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The run's compilation cache goes (only the process that made it removes it). In CI, leave as soon as pytest has reported: the process ends with pytest's own exit status, without
    waiting on interpreter teardown (on the full suite the process stayed busy for over a minute after
    printing its summary, freeing ~6 GB of compiled programs and arrays), so CI's clock is not spent there.
    Under pytest-xdist only the controller leaves this way; its workers end when their channel closes."""
    if _OWN_COMPILATION_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    session = getattr(config, "_spiritlm_session", None)
    if session is None or os.environ.get("CI", "").lower() != "true":
        return
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: it reports through its controller, which exits
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
