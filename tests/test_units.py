"""units ↔ string: the original's exact semantics (REFERENCE.md §8.2–8.3, §14.2) and the golden pairs."""
import json
import random

import numpy as np
import pytest

from _ref_strings import EXPRESSIVE_STRING, HUBERT_228, PITCH_114, STYLE_10
from spiritlm_jax import units as unit_strings
from spiritlm_jax.converters.parity import GoldenSet
from spiritlm_jax.converters.parity_e2e import run_tokenizer, run_units_string


def _dedup(toks):
    return [t for i, t in enumerate(toks) if i == 0 or toks[i - 1] != t]


# ------------------------------------------------------------------ §14.2 (original's test_tokenizer.py)
def test_base_string_from_reference_units():
    s = unit_strings.BASE_FORMAT.units2string({"hubert": HUBERT_228})
    assert s.count("[Hu") == 167
    assert s == "".join(f"[Hu{u}]" for u in _dedup(HUBERT_228.split()))
    assert s.startswith("[Hu99][Hu49][Hu38][Hu149][Hu71][Hu423]") and s.endswith("[Hu54][Hu85][Hu361]")


def test_expressive_string_from_reference_units():
    units = {"hubert": HUBERT_228, "pitch": PITCH_114, "style": STYLE_10}
    s = unit_strings.EXPRESSIVE_FORMAT.units2string(units)
    assert s == EXPRESSIVE_STRING
    assert (s.count("[St"), s.count("[Pi"), s.count("[Hu")) == (10, 82, 167)
    # int arrays give the same string as the space-separated strings
    ints = {k: np.array(v.split(), dtype=np.int64) for k, v in units.items()}
    assert unit_strings.EXPRESSIVE_FORMAT.units2string(ints) == s


def test_expressive_roundtrip_is_pre_duplicated():
    back = unit_strings.EXPRESSIVE_FORMAT.string2units(EXPRESSIVE_STRING)
    n = len(back["hubert"].split())
    assert n == 167 and len(back["pitch"].split()) == n and len(back["style"].split()) == n
    assert back["hubert"].split() == _dedup(HUBERT_228.split())
    assert back["style"].split()[-1] == "83" and set(back["style"].split()) == {"71", "83"}


# ------------------------------------------------------------------ ordering details
def test_hubert_rate_24_99_flips_order_after_1250_pitch_frames():
    # hubert frame 2p-1 sits at (2p-1)/24.99 and pitch frame p at p/12.5: the pitch token comes first
    # exactly when p > 1250 (with a rate of 25.0 the hubert token would always come first).
    n_p = 1400
    units = {"hubert": " ".join(str(i % 2) for i in range(2 * n_p)), "pitch": " ".join(str(i % 2) for i in range(n_p))}
    s = unit_strings.units_to_string(units, has_pitch=True)
    order = []
    counts = {"Hu": 0, "Pi": 0}
    for tok in s.split("]")[:-1]:
        k = tok[1:3]
        order.append((k, counts[k]))
        counts[k] += 1
    pos = {t: i for i, t in enumerate(order)}
    for p in (1000, 1249):
        assert pos[("Hu", 2 * p - 1)] < pos[("Pi", p)]
    for p in (1251, 1300, 1399):
        assert pos[("Pi", p)] < pos[("Hu", 2 * p - 1)]
    s25 = unit_strings.units_to_string(units, has_pitch=True, hubert_rate=25.0)
    assert s25 != s


def test_ties_are_stable_style_pitch_hubert():
    s = unit_strings.units_to_string({"hubert": "1 2", "pitch": "3", "style": "4"}, has_pitch=True, has_style=True,
                          hubert_rate=1, pitch_rate=1, style_rate=1)
    assert s == "[St4][Pi3][Hu1][Hu2]"


def test_dedup_times_use_the_original_index():
    # hubert "1 1 1 1 2": [Hu2] is placed at 4/24.99 s, after pitch frame 1 (0.08 s) although it is
    # only the second hubert token emitted.
    s = unit_strings.units_to_string({"hubert": "1 1 1 1 2", "pitch": "5 6"}, has_pitch=True)
    assert s == "[Pi5][Hu1][Pi6][Hu2]"


# ------------------------------------------------------------------ string_to_units details
def test_random_style_fallback_uses_python_global_random():
    for seed in range(8):
        random.seed(seed)
        expected = str(random.choice([71, 68, 98]))
        random.seed(seed)
        out = unit_strings.string_to_units("[Pi3][Hu1][Hu2]")
        assert out == {"hubert": "1 2", "pitch": "3 3", "style": f"{expected} {expected}"}


def test_no_random_draw_without_pitch():
    random.seed(5)
    state = random.getstate()
    assert unit_strings.string_to_units("[St4][Hu1]") == {"hubert": "1", "style": "4"}
    assert random.getstate() == state


def test_malformed_pieces_follow_the_original():
    assert unit_strings.string_to_units("[Hu123]abc[Hu4]") == {"hubert": "123]ab 4"}  # last char stripped, text kept
    assert unit_strings.string_to_units("[Hu12") == {"hubert": "1"}
    assert unit_strings.string_to_units("[Hux][Hu][Text]hi[Speech][Hu3]") == {"hubert": "3"}


def test_duplicate_pitch_without_any_hubert_raises_like_the_original():
    with pytest.raises(unit_strings.UnitValueError) as ei:
        unit_strings.string_to_units("[Pi3][Pi4]", duplicate_hubert_for_multiple_pitch=True)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, ValueError)
    assert "duplicate_hubert_for_multiple_pitch" in str(ei.value)


def test_base_vs_expressive_format_roundtrip_property():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 80))
        hub = rng.integers(0, 501, size=n)
        hub[rng.random(n) < 0.3] = 7  # runs of repeats
        s = unit_strings.BASE_FORMAT.units2string({"hubert": hub})
        assert unit_strings.BASE_FORMAT.string2units(s)["hubert"].split() == _dedup([str(v) for v in hub])


# ------------------------------------------------------------------ bad input
def test_missing_stream_is_a_keyerror_naming_the_fix():
    with pytest.raises(unit_strings.MissingUnitsError) as ei:
        unit_strings.EXPRESSIVE_FORMAT.units2string({"hubert": "5 5 6"})
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)
    assert "'style'" in str(ei.value) and "base format" in str(ei.value)


@pytest.mark.parametrize("bad", [3.5, np.zeros((2, 3), np.int64), np.array([1.5, 2.0]), b"1 2"])
def test_bad_unit_container_is_rejected(bad):
    with pytest.raises(unit_strings.UnitStringError, match="units\\['hubert'\\]"):
        unit_strings.units_to_string({"hubert": bad})


def test_units_not_a_dict():
    with pytest.raises(unit_strings.UnitStringError, match="dict"):
        unit_strings.units_to_string("1 2 3")
    with pytest.raises(unit_strings.UnitStringError, match="token string"):
        unit_strings.string_to_units(["[Hu1]"])


def test_garbage_unit_string_gives_clear_error_before_the_vocoder():
    units = unit_strings.string_to_units("[Hu123]abc[Hu4]")
    with pytest.raises(unit_strings.UnitStringError, match=r"token 0 is '123\]ab', not an integer"):
        unit_strings.units_to_arrays(units)
    assert unit_strings.units_to_arrays({"hubert": "1 2", "pitch": "3 3"})["pitch"].tolist() == [3, 3]


def test_style_without_pitch_format_is_rejected():
    with pytest.raises(ValueError, match="pitch"):
        unit_strings.UnitStringFormat(has_style=True)


# ------------------------------------------------------------------ golden
@pytest.mark.parametrize("case", ["units_string_pairs.json", "units_string_pairs.npz"])
def test_golden_units_string_pairs(golden_dir, case):
    res = list(run_units_string(GoldenSet(golden_dir), case))
    assert len(res) >= 6
    assert all(r.passed for r in res), [(r.quantity, r.detail) for r in res if not r.passed]


def test_golden_pairs_direct(golden_dir):
    data = json.loads((golden_dir / "cases" / "units_string_pairs.json").read_text())
    n_err = 0
    for p in data["pairs"]:
        if p["fn"] != "string_to_units":
            continue
        random.seed(p["random_seed_before_call"])
        if p.get("error"):
            n_err += 1
            with pytest.raises(TypeError):
                unit_strings.string_to_units(p["input"], **p["kwargs"])
        else:
            assert unit_strings.string_to_units(p["input"], **p["kwargs"]) == p["output"], p["input"]
    assert n_err == 1


def test_golden_tokenizer_cases(golden_dir):
    gs = GoldenSet(golden_dir)
    for case in ("tokenizer_base_recording.npz", "tokenizer_expressive_recording.npz", "tokenizer_synth_odd.npz"):
        res = list(run_tokenizer(gs, case))
        assert res and all(r.passed for r in res), [(r.quantity, r.status, r.detail) for r in res if not r.passed]


def test_golden_npz_without_its_json_twin_checks_random_styles_up_to_the_choice(golden_dir, tmp_path):
    import shutil

    (tmp_path / "cases").mkdir()
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(golden_dir / "cases" / "units_string_pairs.npz", tmp_path / "cases")
    res = list(run_units_string(GoldenSet(tmp_path), "units_string_pairs.npz"))
    assert all(r.passed for r in res), [(r.quantity, r.detail) for r in res if not r.passed]
    assert any("unseeded random styles" in r.quantity for r in res)
