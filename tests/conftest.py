"""Test setup: 8 simulated CPU devices, true-fp32 matmuls, and the golden set location.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here at import time.
"""
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def pytest_sessionstart(session):
    session.config._spiritlm_session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """In CI, leave as soon as pytest has reported: the process ends with pytest's own exit status, without
    waiting on interpreter teardown (on the full suite the process stayed busy for over a minute after
    printing its summary, freeing ~6 GB of compiled programs and arrays), so CI's clock is not spent there."""
    session = getattr(config, "_spiritlm_session", None)
    if session is None or os.environ.get("CI", "").lower() != "true":
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
