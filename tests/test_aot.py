"""The documented 7B ahead-of-time compile (docs/training.md) runs in CI on a tiny config: the command is
taken from the docs as written, only the model is shrunk, and the real train step is lowered with abstract
inputs and compiled on the 8 simulated CPU devices of the test process."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

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
