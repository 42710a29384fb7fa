"""`spiritlm-jax miniature --quick`: every stage on a tiny corpus, and the interleaved model carries
meaning across modalities on held-out sentences."""
import json
import math
import os
import subprocess
import sys

import pytest

from spiritlm_jax.train.miniature import binomial_threshold


def test_binomial_threshold_is_the_exact_tail():
    # P(X >= k) for X ~ Bin(n, 1/2), summed exactly: k is the smallest count with tail <= alpha
    for n, alpha in ((16, 0.05), (64, 0.001), (128, 0.001)):
        k = binomial_threshold(n, alpha)
        tail = sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n
        tail_before = sum(math.comb(n, j) for j in range(k - 1, n + 1)) / 2 ** n
        assert tail <= alpha < tail_before
    assert binomial_threshold(64, 0.001) == 45  # 70.3 %: mean 32, sd 4, ~3.1 sd


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniature")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (the tests' 8 simulated devices split 2 cores)
    proc = subprocess.run([sys.executable, "-m", "spiritlm_jax.cli", "miniature", "--out", str(out), "--quick",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_every_output(quick_run):
    out, proc = quick_run
    res = json.loads((out / "results.json").read_text())
    # --quick trains the interleaved model only (the full run adds the two controls)
    assert set(res["models"]) == {"interleaved"}
    assert (out / "miniature.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| interleaved |" in table and table in proc.stdout
    # the stages really ran: speech synthesized with engine timings, units trained, corpus prepared
    assert res["synthesis"]["train"]["ok"] >= 150 and res["synthesis"]["train"]["skipped"] == {}
    assert res["quantizer"]["units"] == res["config"]["units"] and res["quantizer"]["inertia"] > 0
    assert res["prepare"]["ok"] == res["synthesis"]["train"]["ok"]
    # the units carry the words far better than the majority baseline (measured: purity 0.35 vs 0.16,
    # MI 2.0 of 4.8 bits with log-mel units; random-weight HuBERT layer-11 units give ~0.6 bits)
    assert res["units"]["purity"] > 1.5 * res["units"]["majority_baseline"]
    assert res["units"]["mutual_information_bits"] > 1.0
    for r in res["models"].values():
        assert r["history"][-1]["loss"] < 0.5 * r["history"][0]["loss"]  # every model learned
    # ASR after SFT: recipe=sft on the training utterances' ASR records, then zero-shot `eval asr`. The
    # transcript loss falls (measured on the 1.5 M model: 3.83 → 1.33 nats after 4 steps, 0.31 after 16);
    # the WER is reported, not bounded: 6 steps is a smoke run of the stage, the full run measures it.
    sft = res["models"]["interleaved"]
    assert sft["asr_sft"]["n"] == res["config"]["asr_items"] and sft["asr_sft"]["n_shot"] == 0
    assert sft["sft_history"][-1]["loss"] < 0.6 * sft["sft_history"][0]["loss"]
    assert "ASR WER after SFT" in table


def test_interleaved_model_carries_meaning_across_modalities(quick_run):
    """Held-out continuation choice T→S and S→T together: 2·n two-way items; a model that ignores the
    context scores exactly 50 % (each wrong ending is the right ending of a paired item). Claim 'above
    chance' only past the one-sided binomial bound at p < 0.001: with n = 64 per direction, 128 items,
    at least 82 correct (64.1 %)."""
    out, _ = quick_run
    m = json.loads((out / "results.json").read_text())["models"]["interleaved"]
    n = m["cloze_T2S"]["n"] + m["cloze_S2T"]["n"]
    correct = m["cloze_T2S"]["correct"] + m["cloze_S2T"]["correct"]
    assert n >= 100
    assert correct >= binomial_threshold(n, 0.001), (correct, n, m["cloze_T2S"], m["cloze_S2T"])


def test_unit_study_bad_feature_spec_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spiritlm_jax.cli", "miniature", "--out", str(tmp_path / "u"),
                           "--unit-study", "conv,wav2vec"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'wav2vec'" in proc.stderr and "use hubert[:LAYER], conv or log_mel" in proc.stderr  # names it and the fix
    assert not (tmp_path / "u").exists()  # rejected before anything is synthesized


def test_log_mel_units_carry_the_words_random_hubert_features_do_not(quick_run):
    """Why the miniature's quantizer reads log-mel frames: on the quick run's speech, units of the
    random-weight HuBERT's conv features carry a small fraction of the word information log-mel units carry
    (measured on the full run's speech, 100 units: conv 0.25 bits, log-mel 2.4 bits of H(word) = 4.8)."""
    from spiritlm_jax.train.miniature import _tiny_speech_tokenizer, unit_study

    out, _ = quick_run
    rows = {r["features"]: r for r in unit_study(_tiny_speech_tokenizer(), out / "tts" / "train",
                                                 ["conv", "log_mel:40:1"], units=64, max_iter=10, log=lambda m: None)}
    conv, mel = rows["conv"], rows["log_mel:40:1"]
    assert conv["frames"] == mel["frames"] > 5000  # the same frames (the encoder's framing), all labelled
    assert mel["mutual_information_bits"] > 1.0 > 2 * conv["mutual_information_bits"]
    assert mel["purity"] > 1.5 * mel["majority_baseline"]
