"""The `spiritlm-jax parity` command: table, JSON records, exit codes, --only, unknown case files."""
from __future__ import annotations

import json
import shutil

import numpy as np

from spiritlm_jax.cli import main
from spiritlm_jax.converters.parity import compare_close, compare_exact


def test_parity_lm_cases_pass_with_json(golden_dir, tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = main(["parity", str(golden_dir), "--only", "lm_base,lm_expressive", "--json", str(out)])
    table = capsys.readouterr().out
    assert rc == 0, table
    recs = json.loads(out.read_text())
    assert {r["case"] for r in recs} == {"lm_base.npz", "lm_expressive.npz"}
    for r in recs:
        assert set(r) >= {"case", "quantity", "max_abs_error", "tolerance", "pass", "status"}
        assert r["status"] == "pass" and r["pass"] is True
    logits = [r for r in recs if r["quantity"] == "logits_fp32"]
    assert len(logits) == 2 and all(r["max_abs_error"] <= r["tolerance"] == 1e-5 for r in logits)
    assert "case" in table.splitlines()[0] and "max abs error" in table.splitlines()[0]


def test_unknown_case_file_fails_the_run(golden_dir, tmp_path, capsys):
    g = tmp_path / "golden"
    (g / "cases").mkdir(parents=True)
    (g / "checkpoints").symlink_to(golden_dir / "checkpoints")
    shutil.copy(golden_dir / "cases" / "model_utils.json", g / "cases")
    np.savez(g / "cases" / "mystery_component.npz", x=np.zeros(3))
    out = tmp_path / "p.json"
    rc = main(["parity", str(g), "--json", str(out)])
    assert rc == 1
    recs = {r["case"]: r for r in json.loads(out.read_text())}
    assert recs["mystery_component.npz"]["status"] == "not-implemented"
    assert recs["model_utils.json"]["status"] == "pass"
    assert main(["parity", str(g), "--only", "nothing_"]) == 2
    assert main(["parity", str(tmp_path / "missing")]) == 2
    assert "not a golden set" in capsys.readouterr().err


def test_compare_helpers_fail_when_they_should():
    ok = compare_close("c", "q", np.ones(3), np.ones(3) + 1e-6, 1e-5)
    assert ok.passed
    assert not compare_close("c", "q", np.ones(3), np.ones(3) + 1e-3, 1e-5).passed
    assert not compare_close("c", "q", np.ones(3), np.ones(4), 1.0).passed  # shape mismatch
    assert not compare_close("c", "q", np.array([np.nan]), np.array([0.0]), 1.0).passed
    assert not compare_exact("c", "q", np.array([1, 2]), np.array([1, 3])).passed
    assert not compare_exact("c", "q", "abc", np.str_("abd")).passed
    assert compare_exact("c", "q", "abc", np.str_("abc")).passed


def test_every_golden_case_file_has_a_runner(golden_dir):
    """Every case file of the set is claimed by an importable runner; the component tests (test_hubert,
    test_style, test_quantizer, test_pitch_tokenizer, test_hifigan, test_units, test_prompting,
    test_parity_cli) then run each of them and require every quantity to pass."""
    from spiritlm_jax.converters.parity import INPUT_FILES, GoldenSet, _load_runner

    gs = GoldenSet(golden_dir)
    missing = [c for c in gs.case_files() if c not in INPUT_FILES and _load_runner(c)[0] is None]
    assert not missing


def test_a_key_no_runner_reads_fails_the_run(golden_dir, tmp_path):
    """A case file gaining a key that no runner checks must not pass silently."""
    g = tmp_path / "golden"
    (g / "cases").mkdir(parents=True)
    (g / "checkpoints").symlink_to(golden_dir / "checkpoints")
    data = json.loads((golden_dir / "cases" / "model_utils.json").read_text())
    data["string_predicates"][0]["a_new_quantity"] = 3
    (g / "cases" / "model_utils.json").write_text(json.dumps(data))
    out = tmp_path / "p.json"
    assert main(["parity", str(g), "--json", str(out)]) == 1
    bad = [r for r in json.loads(out.read_text()) if not r["pass"]]
    assert len(bad) == 1 and bad[0]["status"] == "not-implemented"
    assert "string_predicates[].a_new_quantity" in bad[0]["detail"]


def test_tracked_views_record_reads_not_listings():
    from spiritlm_jax.converters.parity import TrackedDict, key_paths

    raw = {"a": 1, "b": {"c": [{"d": 2, "e": 3}]}, "f": {"g": 4}}
    seen: set[str] = set()
    view = TrackedDict(raw, "", seen)
    assert "a" in view and sorted(view) == ["a", "b", "f"] and not seen  # membership and listing read nothing
    assert view["b"]["c"][0]["d"] == 2
    json.dumps(view["f"])  # serialising a sub-dict reads all of it
    assert key_paths(raw) - seen == {"a", "b.c[].e"}


def test_refusal_checks_accept_only_documented_errors():
    """'refused like the original' must not be satisfied by an unrelated crash of ours."""
    import pytest

    from spiritlm_jax.converters.parity_e2e import _decode_refusals, _raises
    from spiritlm_jax.prompting import PromptError

    def bad_output():
        raise PromptError("no speech")

    assert _raises(bad_output, _decode_refusals()) == "PromptError"
    assert _raises(lambda: None, _decode_refusals()) == ""
    with pytest.raises(ZeroDivisionError):
        _raises(lambda: 1 / 0, _decode_refusals())
