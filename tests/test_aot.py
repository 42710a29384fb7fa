"""The documented 7B ahead-of-time compile (docs/training.md) runs in CI on a tiny config: the command is
taken from the docs as written, only the model is shrunk, and the real train step is lowered with abstract
inputs and compiled on the 8 simulated CPU devices of the test process."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spiritlm_jax.train import aot

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
TINY = ["--layers", "2", "--hidden", "64", "--inter", "128", "--heads", "4", "--seq", "64"]


def _documented_command() -> list[str]:
    text = " ".join(DOCS.read_text().split())  # the command wraps over two lines there
    m = re.search(r"`(python -m spiritlm_jax\.train\.aot --target 8xh100[^`]*)`", text)
    assert m, "docs/training.md no longer documents the 8xh100 AOT command"
    argv = shlex.split(re.sub(r"\[[^\]]*\]", "", m.group(1)))  # "[--flag value]": optional, as documented
    assert argv[:3] == ["python", "-m", "spiritlm_jax.train.aot"]
    return argv[3:]


def test_documented_aot_command_compiles_on_a_simulated_mesh(tmp_path, capsys):
    argv = _documented_command()
    assert "--target" in argv and "--seq" in argv  # the 7B flags are still accepted as documented
    out = tmp_path / "aot.jsonl"
    assert aot.main(argv + TINY + ["--json", str(out)]) == 0  # later flags win: only the model shrinks
    r = json.loads(out.read_text())
    assert r["mode"] == "simulated-cpu" and r["devices"] == 8 and r["mesh"] == [1, 8, 1]
    assert r["batch"] == 8 and r["seq"] == 64 and r["layers"] == 2
    # FSDP over 8 devices: each holds 1/8 of the train state (plus the batch) as its arguments
    assert r["train_state_gib_total"] / 8 <= r["argument_gib"] < r["train_state_gib_total"] / 8 * 1.1 + 1e-3
    assert r["temp_gib"] > 0 and r["peak_gib_per_device"] >= r["argument_gib"]
    assert r["step_time_s_at_mfu"] > 0 and json.loads(capsys.readouterr().out) == r
    assert r["mosaic_calls"] == 0  # XLA:CPU, xla attention: no Pallas TPU kernel


def test_mosaic_calls_counts_the_tpu_custom_calls():
    """The report's ``mosaic_calls`` counts Mosaic kernels in compiled HLO (custom_call_target) and in
    StableHLO (@tpu_custom_call), nothing else. (A real TPU lowering of splash is counted in
    tests/test_attention.py::test_splash_picks_mosaic_or_interpret_when_lowered; a real TPU compile
    below, with libtpu.)"""
    hlo = ('%a = bf16[8]{0} custom-call(%p), custom_call_target="tpu_custom_call", backend_config="..."\n'
           '%b = f32[8]{0} custom-call(%p), custom_call_target="Sharding"\n'
           '%c = bf16[8]{0} custom-call(%p), custom_call_target="tpu_custom_call"\n')
    assert aot.mosaic_calls(hlo) == 2
    shlo = '%0 = stablehlo.custom_call @tpu_custom_call(%arg0) {backend_config = "..."}\n' \
           '%1 = stablehlo.custom_call @Sharding(%0)\n%2 = stablehlo.custom_call @tpu_custom_call_x(%1)\n'
    assert aot.mosaic_calls(shlo) == 1
    assert aot.mosaic_calls("") == 0


@pytest.mark.slow
def test_splash_compiles_to_mosaic_kernels_for_a_tpu_topology(tmp_path):
    """With libtpu (a directory holding the ``libtpu`` package, in SPIRITLM_LIBTPU: kept off the test
    process's path, where it would start a TPU backend), the tiny train step with splash attention compiles
    for a v5e-8 topology from this CPU host, forward and backward, and the program holds Mosaic kernels
    (forward, dq, dkv, and the rematerialised forward). Measured: 4 calls, about 2 min of CPU."""
    libtpu = os.environ.get("SPIRITLM_LIBTPU")
    if not libtpu or not (Path(libtpu) / "libtpu").is_dir():
        pytest.skip("set SPIRITLM_LIBTPU to a directory with the libtpu package (pip install --target DIR libtpu)")
    out = tmp_path / "aot.jsonl"
    env = dict(os.environ, PYTHONPATH=libtpu, TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    argv = ["--target", "v5e-8", "--seq", "256", "--layers", "2", "--hidden", "512", "--inter", "1024",
            "--heads", "4", "--vocab", "1024", "--attention", "splash", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "spiritlm_jax.train.aot", *argv], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "tpu-topology:v5e:2x4" and r["mosaic_calls"] >= 3, r
