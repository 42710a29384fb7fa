"""`spiritlm-jax prepare` on the Beam DirectRunner: a tiny synthetic corpus with known word timings."""
import json

import numpy as np
import pytest
import soundfile as sf

from data_helpers import dedup
from spiritlm_jax.cli import main as cli_main
from spiritlm_jax.text import TextTokenizer
from spiritlm_jax.train import prepare
from spiritlm_jax.train.sequences import SequenceBuilder, SequenceConfig, decode_record

SR = 16000


def _utterance(rng, n_words):
    t, words = 0.12, []
    for i in range(n_words):
        d = float(rng.uniform(0.12, 0.35))
        words.append((f"Word{i}" + ("." if i % 9 == 8 else ""), round(t, 3), round(t + d, 3)))
        t += d + float(rng.uniform(0.0, 0.12))
    wav = (0.1 * rng.standard_normal(int((t + 0.15) * SR))).astype(np.float32)
    return wav, words


def _textgrid(words, xmax):
    iv = "".join(f'{s}\n{e}\n"{w}"\n' for w, s, e in words)
    return (f'File type = "ooTextFile"\nObject class = "TextGrid"\n\n0\n{xmax}\n<exists>\n1\n"IntervalTier"\n'
            f'"words"\n0\n{xmax}\n{len(words)}\n{iv}')


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, golden_dir):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "aligned").mkdir()
    (root / "speech").mkdir()
    (root / "text").mkdir()
    truth = {}
    for i, fmt in enumerate(["tsv", "TextGrid", "ctm", "json"]):
        wav, words = _utterance(rng, 30 + 5 * i)
        sf.write(root / "aligned" / f"u{i}.wav", wav, SR, subtype="FLOAT")
        stem = root / "aligned" / f"u{i}"
        if fmt == "tsv":
            stem.with_suffix(".tsv").write_text("".join(f"{w}\t{s}\t{e}\n" for w, s, e in words))
        elif fmt == "TextGrid":
            stem.with_suffix(".TextGrid").write_text(_textgrid(words, len(wav) / SR))
        elif fmt == "ctm":
            stem.with_suffix(".ctm").write_text("".join(f"u{i} 1 {s} {round(e - s, 3)} {w}\n" for w, s, e in words))
        else:
            stem.with_suffix(".json").write_text(json.dumps([{"word": w, "start": s, "end": e} for w, s, e in words]))
        (root / "aligned" / f"u{i}.txt").write_text(" ".join(w for w, _, _ in words))
        truth[f"u{i}"] = (wav, words)
    # bad aligned inputs: transcript mismatch, words past the end, empty transcript, no alignment, broken audio
    wav, words = _utterance(rng, 12)
    for name in ("mismatch", "outside", "empty", "noalign"):
        sf.write(root / "aligned" / f"{name}.wav", wav, SR, subtype="FLOAT")
    (root / "aligned" / "mismatch.tsv").write_text("".join(f"{w}\t{s}\t{e}\n" for w, s, e in words))
    (root / "aligned" / "mismatch.txt").write_text(" ".join(w for w, _, _ in words[:-1]) + " different")
    late = words[:-1] + [(words[-1][0], len(wav) / SR + 0.5, len(wav) / SR + 0.9)]
    (root / "aligned" / "outside.tsv").write_text("".join(f"{w}\t{s}\t{e}\n" for w, s, e in late))
    (root / "aligned" / "empty.tsv").write_text("".join(f"{w}\t{s}\t{e}\n" for w, s, e in words))
    (root / "aligned" / "empty.txt").write_text("  \n")
    (root / "aligned" / "broken.wav").write_bytes(b"RIFF not really")
    (root / "aligned" / "broken.tsv").write_text("a\t0\t0.1\n")
    sp, _ = _utterance(rng, 10)
    sf.write(root / "speech" / "s0.wav", sp, SR, subtype="PCM_16")
    truth["s0"] = (sf.read(root / "speech" / "s0.wav", dtype="float32")[0], None)
    (root / "speech" / "s1.wav").write_bytes(b"garbage")
    (root / "text" / "book.txt").write_text("First paragraph of text.\n\nSecond one, longer than the first.\n")
    out = tmp_path_factory.mktemp("out")
    argv = ["prepare", "--aligned", str(root / "aligned"), "--audio", str(root / "speech"), "--text",
            str(root / "text"), "--text-unit", "paragraph", "--output", str(out), "--name", "tiny",
            "--speech-tokenizer", str(golden_dir / "checkpoints" / "speech_tokenizer"), "--batch-files", "3"]
    rc = cli_main(argv)
    return {"root": root, "out": out, "rc": rc, "truth": truth,
            "dir": out / "spiritlm_corpus" / "tiny" / "1.0.0", "golden": golden_dir}


def test_summary_counts_every_skip(corpus):
    assert corpus["rc"] == 0
    s = json.loads((corpus["out"] / "spiritlm_corpus" / "tiny" / "summary.json").read_text())
    tot = s["total"]
    assert tot["skipped"] == {"alignment_mismatch": 1, "word_outside_audio": 1, "empty_transcript": 1,
                              "no_alignment": 1, "unreadable_audio": 2}
    assert s["splits"]["aligned"]["ok"] == 4 and s["splits"]["speech"]["ok"] == 1
    assert s["splits"]["text"]["documents"] == 2
    truth = corpus["truth"]
    assert tot["seconds"] == pytest.approx(sum(len(w) for w, _ in truth.values()) / SR)
    assert s["splits"]["aligned"]["words"] == sum(len(ws) for _, ws in truth.values() if ws)


def test_records_hold_the_tokenizer_units_and_word_times(corpus):
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer
    from spiritlm_jax.train.loader import open_sources

    src, meta = open_sources(corpus["dir"])
    assert meta["expressive"] is False
    assert sorted(src) == ["aligned", "speech", "text"]
    assert len(src["aligned"]) == 4 and len(src["speech"]) == 1 and len(src["text"]) == 2
    hub = HubertTokenizer.from_checkpoint_dir(corpus["golden"] / "checkpoints" / "speech_tokenizer")
    recs = {decode_record(src[s][i]).id: decode_record(src[s][i]) for s in ("aligned", "speech")
            for i in range(len(src[s]))}
    ids = sorted(corpus["truth"])
    refs = dict(zip(ids, hub.encode_batch([corpus["truth"][i][0] for i in ids])))  # one chunk each (< 100 s)
    for iid, (wav, words) in corpus["truth"].items():
        d = recs[iid]
        assert d.num_samples == len(wav)
        ref = refs[iid]
        assert np.array_equal(d.units["hubert"], ref)
        n = len(ref)
        assert np.array_equal(d.starts["hubert"], 640 * np.arange(n))
        assert np.array_equal(d.ends["hubert"], 640 * np.arange(1, n + 1))
        if words is None:
            assert d.kind == "speech" and d.words == []
            continue
        assert d.kind == "aligned"
        assert d.words == [w for w, _, _ in words]
        assert np.array_equal(d.word_start, [round(s * SR) for _, s, _ in words])
        assert np.array_equal(d.word_end, [round(e * SR) for _, _, e in words])
    texts = sorted(decode_record(src["text"][i]).text for i in range(2))
    assert texts == ["First paragraph of text.", "Second one, longer than the first."]


def test_interleaved_spans_from_the_prepared_corpus(corpus):
    from spiritlm_jax.train.loader import open_sources
    from spiritlm_jax.units import string_to_units

    tok = TextTokenizer.from_dir(corpus["golden"] / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b")
    src, _ = open_sources(corpus["dir"])
    b = SequenceBuilder(tok, SequenceConfig())
    for i in range(len(src["aligned"])):
        d = decode_record(src["aligned"][i])
        wav, words = corpus["truth"][d.id]
        r = b.interleaved(d, np.random.default_rng(i))
        for sp, its in zip(r.spans, r.span_units):
            if sp.modality != "speech":
                continue
            t0, t1 = words[sp.start][1] * SR, words[sp.stop - 1][2] * SR  # the words' known times
            frames = [j for j in range(len(d.units["hubert"])) if t0 <= 640 * j + 320 < t1]
            s = "".join(f"[Hu{v}]" for _, v in its)
            assert string_to_units(s)["hubert"].split() == [str(v) for v in dedup(d.units["hubert"][frames])]


def test_loader_reads_the_prepared_dataset(corpus):
    from spiritlm_jax.train.loader import LoaderConfig, make_dataset

    cfg = LoaderConfig(str(corpus["dir"]), str(corpus["golden"] / "checkpoints" / "spiritlm_model" /
                                               "spirit-lm-base-7b"),
                       seq_len=64, batch_size=2, shard_index=0, shard_count=1)
    it = iter(make_dataset(cfg))
    b = next(it)
    assert b["tokens"].shape == (2, 64) and (b["segment_ids"] > 0).any()


def test_prepare_errors(tmp_path, golden_dir):
    with pytest.raises(prepare.PrepareError, match="no inputs"):
        prepare.build_dataset({"text": []}, str(tmp_path), "x", prepare.PrepareOptions())
    (tmp_path / "a.wav").write_bytes(b"x")
    items, _ = prepare.discover(audio=[str(tmp_path / "a.wav")])
    with pytest.raises(prepare.PrepareError, match="--speech-tokenizer"):
        prepare.build_dataset(items, str(tmp_path), "x", prepare.PrepareOptions())
    with pytest.raises(prepare.PrepareError, match="corpus name"):
        prepare.build_dataset(items, str(tmp_path), "Bad-Name", prepare.PrepareOptions(speech_tokenizer="d"))
    with pytest.raises(prepare.PrepareError, match="no such file"):
        prepare.discover(text=[str(tmp_path / "missing")])
    m = tmp_path / "m.jsonl"
    m.write_text('{"audio": "a.wav", "id": "same"}\n{"audio": "a.wav", "id": "same"}\n')
    with pytest.raises(prepare.PrepareError, match="two inputs have the id 'same'"):
        prepare.discover(manifests=[str(m)])
    m.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(prepare.PrepareError, match="needs 'audio', 'text' or 'text_path'"):
        prepare.discover(manifests=[str(m)])
    m.write_text('{"audio": "a.wav", "alignment": "a.TextGrid", "transcript": "hi"}\n{"text": "hello"}\n')
    items, _ = prepare.discover(manifests=[str(m)])
    assert items["aligned"][0]["alignment"] == f"{tmp_path}/a.TextGrid" and items["text"][0]["inline"] == "hello"


def test_cli_help_lists_inputs(capsys):
    with pytest.raises(SystemExit):
        cli_main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--aligned" in out and "DataflowRunner" in out


@pytest.mark.slow
def test_expressive_units_and_times(golden_dir):
    """Pitch/style streams with their time ranges (FCPE is real-size: slow on CPU)."""
    from spiritlm_jax.pitch_tokenizer import PitchTokenizer
    from spiritlm_jax.style_tokenizer import StyleTokenizer

    st = golden_dir / "checkpoints" / "speech_tokenizer"
    ex = prepare.UnitExtractor(st, expressive=True)
    wav = (0.1 * np.random.default_rng(0).standard_normal(40000)).astype(np.float32)
    u = ex([wav])[0]
    assert np.array_equal(u["pitch"], PitchTokenizer.from_checkpoints(st / "vqvae_f0_quantizer")(wav))
    assert np.array_equal(u["style"], StyleTokenizer.from_checkpoint_dir(st)(wav))
    assert np.array_equal(u["pitch_start"], 1280 * np.arange(len(u["pitch"])))
    assert np.array_equal(u["style_start"], 16000 * np.arange(len(u["style"])))
    assert u["style_end"][-1] == len(wav)


def test_every_input_skipped_is_one_error_with_the_skip_summary(tmp_path, capsys):
    # Before: a Beam/TFDS traceback ("generated examples is 0 for split text") and no summary.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blank.txt").write_text("  \n")
    (tmp_path / "in" / "empty.txt").write_text("")
    rc = cli_main(["prepare", "--text", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--name", "e",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: every one of the 2 input(s) of the 'text' split was skipped" in err
    assert "empty_text: 2" in err and "blank: no text" in err  # the skip summary, by reason, with examples
    assert not (tmp_path / "out" / "spiritlm_corpus" / "e" / "1.0.0").exists()  # no dataset that looks made
