"""Evaluation tasks on the demo's tiny random model (spiritlm_jax/tiny_checkpoints.py) with data built here (synthetic audio): a model crafted to
prefer the right answer scores 100% and one preferring the wrong answer 0%; few-shot prompts match the
documented formats byte for byte; STSP's few-shot fix; every task end to end through the CLI."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.evaluation import data as eval_data
from spiritlm_jax.evaluation import tasks as eval_tasks
from spiritlm_jax.evaluation import metrics

from test_scoring import eval_checkpoints, preference_params  # noqa: F401 (session fixture)

SR = 16000


def _chirp(f0, n=8000, seed=0):
    f = np.linspace(f0, 1.7 * f0, n)
    ph = 2 * np.pi * np.cumsum(f) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(ph) + 0.2 * np.sin(3 * ph) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _noise(n=8000, seed=0):
    return (0.2 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def lm(eval_checkpoints):
    from spiritlm_jax.spiritlm import SpiritLM

    return SpiritLM.from_pretrained("spirit-lm-base-7b", checkpoints=eval_checkpoints)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    for i in range(4):
        sf.write(d / f"good{i}.wav", _chirp(110 + 45 * i, seed=i), SR)
        sf.write(d / f"bad{i}.wav", _noise(seed=10 + i), SR)
        sf.write(d / f"ctx{i}.wav", _chirp(300 - 30 * i, n=12000, seed=20 + i), SR)
    # ZeroSpeech 2021 layout (sWUGGY-like): gold.csv + <filename>.wav
    zs = d / "lexical" / "dev"
    zs.mkdir(parents=True)
    rows = ["id,filename,word,correct"]
    for i in range(4):
        sf.write(zs / f"w{i}.wav", _chirp(110 + 45 * i, seed=i), SR)
        sf.write(zs / f"n{i}.wav", _noise(seed=10 + i), SR)
        rows += [f"{i},w{i},word{i},1", f"{i},n{i},nonword{i},0"]
    (zs / "gold.csv").write_text("\n".join(rows) + "\n")
    # StoryCloze manifest with text and speech
    texts = [("the model is trained on speech", "license terms apply here", "the tokens follow"),
             ("we release the code", "speech model weights", "text text text"),
             ("a story starts", "the model generates speech", "license license"),
             ("another one", "speech and text", "research license")]
    with open(d / "cloze.jsonl", "w") as f:
        for i, (c, g, b) in enumerate(texts):
            f.write(json.dumps({"id": f"s{i}", "context_text": c, "correct_text": g, "wrong_text": b,
                                "context_audio": f"ctx{i}.wav", "correct_audio": f"good{i}.wav",
                                "wrong_audio": f"bad{i}.wav"}) + "\n")
    # LibriSpeech layout
    ch = d / "LibriSpeech" / "test-clean" / "11" / "22"
    ch.mkdir(parents=True)
    lines = []
    for i in range(5):
        sf.write(ch / f"11-22-{i:04d}.flac", _chirp(130 + 25 * i, seed=30 + i), SR)
        lines.append(f"11-22-{i:04d} HELLO WORLD NUMBER {i}")
    (ch / "11-22.trans.txt").write_text("\n".join(lines) + "\n")
    # intent JSONL
    with open(d / "intent.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"u{i}", "audio": f"good{i}.wav", "text": f"play song {i}",
                                "label": "yes"}) + "\n")
    with open(d / "intent_shots.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"sh{i}", "audio": f"bad{i}.wav", "text": f"stop {i}",
                                "label": "no" if i % 2 else "yes"}) + "\n")
    # STSP layout: <root>/data/<wav>, <root>/manifest/<ds>/<file>.jsonl, <root>/manifest/few_shot/<dir>.jsonl
    root = d / "stsp_data"
    (root / "data" / "emov").mkdir(parents=True)
    (root / "manifest" / "emov").mkdir(parents=True)
    (root / "manifest" / "few_shot").mkdir(parents=True)
    man = []
    for i in range(3):
        sf.write(root / "data" / "emov" / f"{i}.wav", _chirp(150 + 20 * i, n=16000, seed=40 + i), SR)
        man.append({"id": -10 - i, "wav_path": f"emov/{i}.wav", "asr": f"i feel number {i}",
                    "emotion": ["happy", "sad", "neutral"][i], "split": "test", "speaker": "x"})
    (root / "manifest" / "emov" / "emov.test.jsonl").write_text("\n".join(json.dumps(r) for r in man) + "\n")
    fs = []
    for i, s in enumerate(["positive", "negative", "neutral", "positive", "negative", "neutral"]):
        sf.write(root / "data" / "emov" / f"fs{i}.wav", _chirp(100 + 30 * i, n=16000, seed=50 + i), SR)
        fs.append({"prompt": f"prompt text {i}", "generation": f"gen text {i}", "sentiment": s,
                   "wav_prompt": f"emov/fs{i}.wav"})
    (root / "manifest" / "few_shot" / "t2t.jsonl").write_text("\n".join(json.dumps(r) for r in fs) + "\n")
    s2t = [{"prompt": r["wav_prompt"], "generation": r["generation"], "sentiment": r["sentiment"]} for r in fs]
    (root / "manifest" / "few_shot" / "s2t.jsonl").write_text("\n".join(json.dumps(r) for r in s2t) + "\n")
    return d


def _with_params(lm, params):
    m = copy.copy(lm)
    m.params = params
    return m


def _crafted_accuracy(lm, pair_reqs, run, sign):
    """Build a model preferring the tokens found only in right answers (sign +1) or only in wrong ones
    (sign -1), from the very (context, continuation) requests the task scores; run the task with it."""
    r = eval_tasks.Runner(lm)
    good_toks, bad_toks = [], []
    for (gc, gx), (bc, bx) in pair_reqs:
        good_toks.append(set(r.split(gc, gx)[1]))
        bad_toks.append(set(r.split(bc, bx)[1]))
    G = set().union(*good_toks) - set().union(*bad_toks)
    B = set().union(*bad_toks) - set().union(*good_toks)
    # precondition of the construction: every right answer holds a token the wrong answers never use
    assert all(g & G for g in good_toks), "test data: a right answer shares all its tokens with wrong answers"
    p = preference_params(lm.cfg, lm.params, sorted(G), sorted(B), strength=6.0 * sign)
    return run(eval_tasks.Runner(_with_params(lm, p)))


def test_pairs_zerospeech_layout_preference_100_and_0(lm, data):
    items = eval_data.read_pairs(data / "lexical" / "dev")
    assert [it.id for it in items] == ["0", "1", "2", "3"] and items[0].meta == {"word": "word0"}
    reqs = eval_tasks.pair_requests(eval_tasks.Runner(lm), items)
    assert all(g[0] == "[Speech]" and g[1].startswith("[Hu") for g, _ in reqs)
    for sign, expected in ((1, 1.0), (-1, 0.0)):
        res = _crafted_accuracy(lm, reqs, lambda r: eval_tasks.run_pairs(r, items, "swuggy"), sign)
        assert res.metrics["accuracy"] == expected
        assert all(rec["correct"] == (sign > 0) for rec in res.items)


@pytest.mark.parametrize("direction", ["T", "S", "T2S", "S2T"])
def test_storycloze_directions_preference_100_and_0(lm, data, direction):
    items = eval_data.read_storycloze(data / "cloze.jsonl")
    reqs = eval_tasks.cloze_requests(eval_tasks.Runner(lm), items, direction)
    ci, co = eval_tasks.parse_direction(direction)
    ctx = reqs[0][0][0]
    assert ctx.startswith("[Text]" if ci == "t" else "[Speech]")
    assert ctx.endswith({("t", "s"): "[Speech]", ("s", "t"): "[Text]"}.get((ci, co), ctx[-1]))
    if (ci, co) == ("t", "t"):
        assert reqs[0][0] == ("[Text]the model is trained on speech", " license terms apply here")
    for sign, expected in ((1, 1.0), (-1, 0.0)):
        res = _crafted_accuracy(lm, reqs, lambda r: eval_tasks.run_storycloze(r, items, direction), sign)
        assert res.metrics["accuracy"] == expected


def test_storycloze_csv_reader_and_missing_modality(lm, tmp_path):
    cols = ",".join(("InputStoryid",) + eval_data.ROC_COLUMNS)
    (tmp_path / "c.csv").write_text(cols + "\nid1,A.,B.,C.,D.,E1.,E2.,2\n")
    [it] = eval_data.read_storycloze(tmp_path / "c.csv")
    assert (it.context_text, it.correct_text, it.wrong_text) == ("A. B. C. D.", "E2.", "E1.")
    with pytest.raises(eval_data.DataError, match="lacks"):
        eval_tasks.cloze_requests(eval_tasks.Runner(lm), [it], "S2T")
    with pytest.raises(eval_tasks.EvalError, match="unknown direction"):
        eval_tasks.parse_direction("x2y")


def test_few_shot_formats_byte_for_byte():
    shots = [("[Hu1][Hu2]", "hello world"), ("[Hu3]", "good day")]
    assert eval_tasks.asr_prompt(shots, "[Hu9]") == \
        "[Speech][Hu1][Hu2][Text]hello world\n[Speech][Hu3][Text]good day\n[Speech][Hu9][Text]"
    assert eval_tasks.tts_prompt([(t, u) for u, t in shots], "bye") == \
        "[Text]hello world[Speech][Hu1][Hu2]\n[Text]good day[Speech][Hu3]\n[Text]bye[Speech]"
    assert eval_tasks.intent_context([("[Speech][Hu1]", "play"), ("[Text]stop it", "stop")], "[Speech][Hu5]") == \
        "[Speech][Hu1][Text]play\n[Text]stop it[Text]stop\n[Speech][Hu5][Text]"
    assert eval_tasks.leading_speech("[Hu4][Pi2][Hu5]\n[Text]x") == "[Hu4][Pi2][Hu5]"
    assert eval_tasks.leading_speech("hello[Hu4]") == ""


def test_shot_sampling_seeded():
    a, b, c = eval_tasks.sample_shots(50, 10, 3), eval_tasks.sample_shots(50, 10, 3), eval_tasks.sample_shots(50, 10, 4)
    assert a == b and a != c and len(set(a)) == 10
    with pytest.raises(eval_tasks.EvalError, match="only 3"):
        eval_tasks.sample_shots(3, 4, 0)


def test_stsp_few_shot_prompt_text_and_speech(lm, data):
    root = data / "stsp_data"
    r = eval_tasks.Runner(lm)
    rows = eval_data.read_jsonl(root / "manifest" / "few_shot" / "t2t.jsonl")
    p, chosen = eval_tasks.stsp_few_shot_prompt(r, rows, "t2t", 3, seed=5, data_root=root / "data")
    # one row per sentiment, groups in sorted order: negative, neutral, positive
    assert [rows[i]["sentiment"] for i in chosen] == ["negative", "neutral", "positive"]
    assert p == "".join(f"[Text]prompt text {i}[Text]gen text {i}\n" for i in chosen)
    assert eval_tasks.stsp_few_shot_prompt(r, rows, "t2t", 3, seed=5, data_root=root / "data")[1] == chosen
    srows = eval_data.read_jsonl(root / "manifest" / "few_shot" / "s2t.jsonl")
    p2, ch2 = eval_tasks.stsp_few_shot_prompt(r, srows, "s2t", 2, seed=0, data_root=root / "data")
    assert len(ch2) == 3  # ceil(2/3) = 1 per sentiment
    from spiritlm_jax.audio import load_audio

    halves = [load_audio(root / "data" / srows[i]["prompt"]) for i in ch2]
    units = lm.speech_tokenizer.encode_string_batch([w[: len(w) // 2] for w in halves])
    assert p2 == "\n".join(f"[Speech]{u}[Text]{srows[i]['generation']}" for u, i in zip(units, ch2)) + "\n"


def test_stsp_few_shot_fix_and_metric(lm, data):
    root = data / "stsp_data"
    recs = eval_data.read_jsonl(root / "manifest" / "emov" / "emov.test.jsonl")
    rows = eval_data.read_jsonl(root / "manifest" / "few_shot" / "t2t.jsonl")
    seen = []

    def clf(texts):
        seen.extend(texts)
        return ["Positive"] * len(texts)

    res = eval_tasks.run_stsp(eval_tasks.Runner(lm), recs, "t2t", clf, data_root=root / "data", few_shot_rows=rows, n_shot=3, seed=1,
                     max_new_tokens=8)
    pre = res.prompts["few_shot_prefix"]
    assert pre and res.prompts["first_prompt"] == pre + "[Text]i feel number 0"  # the test input follows the shots
    assert len(seen) == 3 and res.metrics["n_failed"] == 0
    # gold: happy->positive, sad->negative, neutral->neutral; all predicted positive -> 1/3
    assert res.metrics["accuracy"] == pytest.approx(1 / 3)
    assert [it["pred"] for it in res.items] == ["positive"] * 3
    with pytest.raises(eval_tasks.EvalError, match="returned 'bored'"):
        eval_tasks.run_stsp(eval_tasks.Runner(lm), recs, "t2t", lambda t: ["bored"] * len(t), data_root=root / "data", max_new_tokens=4)


def test_stsp_speech_output_uses_the_emotion_mapping(lm, data):
    root = data / "stsp_data"
    recs = eval_data.read_jsonl(root / "manifest" / "emov" / "emov.test.jsonl")
    got = []

    def clf(wavs):
        got.extend(wavs)
        return ["sad"] * len(wavs)

    res = eval_tasks.run_stsp(eval_tasks.Runner(lm), recs, "t2s", clf, data_root=root / "data", max_new_tokens=30, seed=3)
    ok = len(recs) - res.metrics["n_failed"]
    assert len(got) == ok and all(isinstance(w, np.ndarray) and w.ndim == 1 and w.size for w in got)
    preds = [it["pred"] for it in res.items]
    assert set(preds) <= {"negative", "failed"}
    assert res.metrics["accuracy"] == pytest.approx(sum(p == "negative" for p in preds[1:2]) / 3)


def test_asr_few_shot_end_to_end(lm, data):
    items = eval_data.read_utterances(data / "LibriSpeech" / "test-clean")
    assert [u.id for u in items][:2] == ["11-22-0000", "11-22-0001"] and items[0].text == "HELLO WORLD NUMBER 0"
    r = eval_tasks.Runner(lm)
    res = eval_tasks.run_asr(r, items, n_shot=2, seed=7, max_new_tokens=10)
    shot_ids = res.prompts["shot_ids"]
    assert len(shot_ids) == 2 and res.metrics["n"] == 3 and not set(shot_ids) & {x["id"] for x in res.items}
    by_id = {u.id: u for u in items}
    su = r.encode_speech([by_id[i].audio for i in shot_ids])
    assert res.prompts["shared_prefix"] == "".join(
        f"[Speech]{u}[Text]{by_id[i].text.lower()}\n" for u, i in zip(su, shot_ids))
    refs, hyps = [x["ref"] for x in res.items], [x["hyp"] for x in res.items]
    assert all("\n" not in h for h in hyps)
    assert res.metrics["wer"] == pytest.approx(100 * metrics.wer(refs, hyps))


def test_tts_cer_through_pluggable_asr(lm, data):
    items = eval_data.read_utterances(data / "LibriSpeech" / "test-clean")
    res = eval_tasks.run_tts(eval_tasks.Runner(lm), items, lambda wavs: ["hello world number 0"] * len(wavs), n_shot=2, seed=1,
                    max_new_tokens=40)
    n, bad = res.metrics["n"], res.metrics["n_no_speech"]
    refs = [x["ref"] for x in res.items]
    hyps = ["hello world number 0" if x["vocoded"] else "" for x in res.items]
    assert res.metrics["cer"] == pytest.approx(100 * metrics.cer(refs, hyps))
    assert sum(not x["vocoded"] for x in res.items) == bad <= n
    with pytest.raises(eval_tasks.EvalError, match="module:function"):
        eval_tasks.run_tts(eval_tasks.Runner(lm), items, "no-such-thing", n_shot=1)


def test_intent_preference_100_and_0(lm, data):
    items = eval_data.read_labelled(data / "intent.jsonl")
    pool = eval_data.read_labelled(data / "intent_shots.jsonl")
    r = eval_tasks.Runner(lm)
    yes = set(r.split("[Text]", "yes")[1])
    no = set(r.split("[Text]", "no")[1])
    for sign, expected in ((1, 1.0), (-1, 0.0)):
        p = preference_params(lm.cfg, lm.params, sorted(yes - no), sorted(no - yes), strength=6.0 * sign)
        res = eval_tasks.run_intent(eval_tasks.Runner(_with_params(lm, p)), items, n_shot=2, shot_pool=pool, seed=0)
        assert res.metrics["accuracy"] == expected and res.settings["labels"] == ["no", "yes"]
    assert res.prompts["shared_prefix"].count("[Text]") == 2


def _cli(args):
    from spiritlm_jax.cli import main

    return main(["eval", *args])


def test_cli_every_task_end_to_end(lm, data, eval_checkpoints, tmp_path, monkeypatch, capsys):
    (tmp_path / "evalplug.py").write_text(
        "def asr(wavs):\n    return ['hello world'] * len(wavs)\n"
        "def sentiment(xs):\n    return ['Positive'] * len(xs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = ["--checkpoints", str(eval_checkpoints), "--batch-size", "4"]
    root = data / "stsp_data"
    runs = {
        "swuggy": ["--data", str(data / "lexical" / "dev")],
        "storycloze": ["--data", str(data / "cloze.jsonl"), "--direction", "S2T"],
        "asr": ["--data", str(data / "LibriSpeech" / "test-clean"), "--n-shot", "1", "--max-new-tokens", "6"],
        "tts": ["--data", str(data / "LibriSpeech" / "test-clean"), "--n-shot", "1", "--max-new-tokens", "20",
                "--asr-model", "evalplug:asr", "--limit", "2"],
        "intent": ["--data", str(data / "intent.jsonl"), "--shots", str(data / "intent_shots.jsonl"), "--n-shot", "2",
                   "--modality", "text"],
        "stsp": ["--data", str(root / "manifest" / "emov" / "emov.test.jsonl"), "--direction", "s2t", "--n-shot", "3",
                 "--classifier", "evalplug:sentiment", "--max-new-tokens", "6",
                 "--write-pred", str(tmp_path / "pred.jsonl")],
    }
    for task, extra in runs.items():
        out = tmp_path / f"{task}.json"
        rc = _cli([task, *extra, *ck, "--seed", "11", "--output", str(out)])
        assert rc == 0, capsys.readouterr().err
        res = json.loads(out.read_text())
        assert res["task"] == task and res["seed"] == 11 and res["model"]["variant"] == "base"
        assert res["metrics"]["n"] >= 1 and res["prompts"] and res["items"]
    printed = capsys.readouterr().out
    assert "paper (base)" in printed and "results:" in printed
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [-10, -11, -12] and all(p["pred"] == "positive" for p in preds)
    st = json.loads((tmp_path / "stsp.json").read_text())
    assert st["prompts"]["few_shot_prefix"].startswith("[Speech][Hu") and len(st["prompts"]["few_shot_rows"]) == 3


def test_cli_stsp_with_the_original_flags_then_stsp_score(data, eval_checkpoints, tmp_path, monkeypatch, capsys):
    """predict_stsp.py's command line (its flags, plus our --classifier/--checkpoints), then eval_stsp.py's."""
    (tmp_path / "stspplug.py").write_text("def speech(wavs):\n    return ['happy'] * len(wavs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = data / "stsp_data"
    manifest = root / "manifest" / "emov" / "emov.test.jsonl"
    pred = tmp_path / "pred_t_s.jsonl"
    rc = _cli(["stsp", "--model", "spirit-lm-base-7b", "--eval_manifest_path", str(manifest), "--eval",
               "--write_pred", str(pred), "--input_output", "text_speech", "--data_root_dir", str(root / "data"),
               "--write_wav_output", str(tmp_path / "wavs"), "--seed", "3", "--classifier", "stspplug:speech",
               "--max-new-tokens", "30", "--checkpoints", str(eval_checkpoints), "--output", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["metrics"]["direction"] == "T→S" and res["seed"] == 3
    preds = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [p["pred"] for p in preds] == ["positive"] * 3
    assert all(Path(p["generation"]).parent == tmp_path / "wavs" and Path(p["generation"]).is_file() for p in preds)
    capsys.readouterr()
    # eval_stsp.py --ref_file --pred_file: gold sentiments positive/negative/neutral → one in three right
    assert _cli(["stsp-score", "--ref_file", str(manifest), "--pred_file", str(pred)]) == 0
    assert capsys.readouterr().out == f"Accuracy: 33.33% for predictions from {pred}\n"
    assert _cli(["stsp-score", "--ref_file", str(manifest), "--pred_file", str(pred), "--label", "emotion"]) == 0
    assert capsys.readouterr().out.startswith("Accuracy: 0.00% ")
    pred.write_text(pred.read_text().splitlines()[0] + "\n")
    assert _cli(["stsp-score", "--ref_file", str(manifest), "--pred_file", str(pred)]) == 2
    assert "1 predictions for 3 references" in capsys.readouterr().err
    assert _cli(["stsp", "--input_output", "speech_text", "--direction", "t2t", "--eval_manifest_path", str(manifest),
                 "--classifier", "stspplug:speech", "--checkpoints", str(eval_checkpoints)]) == 2
    assert "disagree" in capsys.readouterr().err


def test_cli_bad_inputs(data, eval_checkpoints, tmp_path, capsys):
    ck = ["--checkpoints", str(eval_checkpoints)]
    assert _cli(["stsp", "--data", str(data / "stsp_data" / "manifest" / "emov" / "emov.test.jsonl"), *ck]) == 2
    assert "needs --classifier" in capsys.readouterr().err
    assert _cli(["swuggy", "--data", str(tmp_path / "missing.jsonl"), *ck]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _cli(["asr", "--data", str(data / "LibriSpeech" / "test-clean"), "--n-shot", "9", *ck]) == 2
    assert "shot pool has only 5" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"good": "a"}\n')
    assert _cli(["pairs", "--data", str(tmp_path / "bad.jsonl"), *ck]) == 2
    assert "needs 'good' and 'bad'" in capsys.readouterr().err


def _mmlu_folder(root):
    for split, n in (("dev", 5), ("test", 3)):
        (root / split).mkdir(parents=True)
        for subj in ("high_school_physics", "law"):
            rows = [f'"What is {subj} q{i}?",alpha {i},beta {i},gamma {i},delta {i},B' for i in range(n)]
            (root / split / f"{subj}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_mmlu_format_reader_and_preference_100_and_0(lm, eval_checkpoints, tmp_path):
    root = _mmlu_folder(tmp_path / "mmlu")
    test, dev = eval_data.read_mmlu(root, "test"), eval_data.read_mmlu(root, "dev")
    assert sorted(test) == ["high_school_physics", "law"] and test["law"][0].answer == 1
    ctx = eval_tasks.mmlu_context("high_school_physics", dev["high_school_physics"][:1], test["high_school_physics"][0])
    assert ctx == ("[Text]The following are multiple choice questions (with answers) about high school physics.\n\n"
                   "What is high_school_physics q0?\nA. alpha 0\nB. beta 0\nC. gamma 0\nD. delta 0\nAnswer: B\n\n"
                   "What is high_school_physics q0?\nA. alpha 0\nB. beta 0\nC. gamma 0\nD. delta 0\nAnswer:")
    r = eval_tasks.Runner(lm)
    letter = {L: set(r.split("Answer:", f" {L}")[1]) for L in "ABCD"}
    others = set().union(*(letter[L] for L in "ACD"))
    for sign, expected in ((1, 1.0), (-1, 0.0)):
        p = preference_params(lm.cfg, lm.params, sorted(letter["B"] - others), sorted(others - letter["B"]),
                              strength=6.0 * sign)
        res = eval_tasks.run_mmlu(eval_tasks.Runner(_with_params(lm, p)), test, dev, n_shot=5)
        assert res.metrics["accuracy"] == expected and res.metrics["n"] == 6
        assert res.metrics["per_subject"] == {"high_school_physics": expected, "law": expected}
    with pytest.raises(eval_tasks.EvalError, match="shots"):
        eval_tasks.run_mmlu(r, test, {"law": dev["law"][:2]}, n_shot=5)
    bad = tmp_path / "bad" / "test"
    bad.mkdir(parents=True)
    (bad / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(eval_data.DataError, match="answer in A-D"):
        eval_data.read_mmlu(tmp_path / "bad")
    assert _cli(["mmlu", "--data", str(root), "--checkpoints", str(eval_checkpoints), "--n-shot", "1",
                 "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["n"] == 6
