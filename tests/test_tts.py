"""eSpeak NG synthesis with the engine's word timings (train/tts.py) and `prepare --tts espeak`."""
import json

import numpy as np
import pytest

from spiritlm_jax.cli import main as cli_main
from spiritlm_jax.train import tts

SENTENCE = "the old horse takes the hay near the barn"


@pytest.fixture(scope="module")
def engine():
    return tts.Espeak.get()


def test_the_wheel_ships_the_library_and_its_data(engine):
    import espeakng_loader
    from pathlib import Path

    assert Path(espeakng_loader.get_library_path()).is_file()
    assert (Path(espeakng_loader.get_data_path()) / "en_dict").is_file()
    assert engine.engine_rate == 22050
    langs, variants = tts.list_voices()
    assert "en-US" in langs and "m3" in variants


@pytest.mark.parametrize("voice,rate,pitch", [("en-us", 175, 50), ("en-us+f2", 220, 70), ("en-gb-x-rp+m1", 130, 30)])
def test_timings_are_monotone_inside_the_audio_and_tile_it(engine, voice, rate, pitch):
    syn = engine.synthesize(SENTENCE, voice, rate, pitch)
    assert [w for w, _, _ in syn.words] == SENTENCE.split()
    starts = np.array([s for _, s, _ in syn.words])
    ends = np.array([e for _, _, e in syn.words])
    assert starts[0] >= 0 and ends[-1] <= len(syn.audio)
    assert (np.diff(starts) > 0).all()  # strictly increasing: every word has its own sound
    assert (ends > starts).all()
    np.testing.assert_array_equal(starts[1:], ends[:-1])  # consecutive spans tile the utterance
    # no word is a sliver: each lasts 60 ms at least (eSpeak's shortest word here "the": ~100 ms)
    assert ((ends - starts) >= 0.06 * tts.TARGET_RATE).all()
    # slower speech lasts longer: the rate parameter reaches the engine
    slow = engine.synthesize(SENTENCE, voice, 100, pitch)
    assert slow.duration > syn.duration * min(1.2, rate / 100 * 0.8)


def _logmel(wav):
    import librosa

    m = librosa.feature.melspectrogram(y=wav, sr=tts.TARGET_RATE, n_fft=512, hop_length=160, n_mels=40)
    return np.log(m + 1e-6)


def _dtw_distance(a, b):
    import librosa

    D, wp = librosa.sequence.dtw(X=a, Y=b, metric="euclidean")
    return float(D[-1, -1] / len(wp))


def test_a_cut_word_matches_its_isolated_rendering(engine):
    """Measure: mean frame distance along the DTW path between log-mel spectrograms (10 ms frames). A word
    cut out of the sentence by its engine span must be closer to the SAME word synthesized alone (same
    voice, rate, pitch) than to any other content word of the sentence synthesized alone: nearest-neighbour
    identification of all 5 content words. With a shifted span (the word's span moved by one word) the
    identification fails, so the test sees wrong timings."""
    syn = engine.synthesize(SENTENCE, "en-us", 160, 50)
    content = [(i, w) for i, (w, _, _) in enumerate(syn.words) if w != "the"]
    alone = {w: _logmel(engine.synthesize(w, "en-us", 160, 50).audio) for _, w in content}

    def identify(spans):
        hits = 0
        for i, w in content:
            s, e = spans[i]
            cut = _logmel(syn.audio[s:e])
            d = {o: _dtw_distance(cut, ref) for o, ref in alone.items()}
            hits += min(d, key=d.get) == w
        return hits

    spans = [(s, e) for _, s, e in syn.words]
    assert identify(spans) == len(content)
    shifted = spans[1:] + spans[:1]
    assert identify(shifted) <= len(content) // 2


def test_unvoiceable_and_untimed_words_are_counted_skips(tmp_path):
    sents = [("ok", SENTENCE), ("punct", "!!! ... ???"), ("merged", "the bone in the park")]
    stats = tts.synthesize_corpus(sents, tmp_path, tts.SynthesisOptions(voices=("en-us",)), progress=False)
    assert stats["ok"] == 1
    # eSpeak reports "in the" as ONE word event: "the" has no timing of its own, so the sentence is
    # skipped rather than given a guessed span
    assert stats["skipped"] == {"no_words": 1, "unreported_word_timing": 1}
    assert "'the'" in stats["skipped_examples"]["unreported_word_timing"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "ok.txt", "ok.wav"]
    align = json.loads((tmp_path / "ok.json").read_text())
    assert [a["word"] for a in align] == SENTENCE.split()


def test_unknown_voices_and_bad_options_are_clear_errors(engine, tmp_path):
    with pytest.raises(tts.TTSError, match=r"unknown eSpeak NG voice\(s\) \['xx-nowhere', 'en-us\+robotz'\]"):
        tts.check_voices(["en-us", "xx-nowhere", "en-us+robotz"])
    with pytest.raises(tts.TTSError, match="no voice 'zz'"):
        engine.synthesize("hello", "zz")
    with pytest.raises(tts.TTSError, match=r"rate must be an integer in \[80, 450\]"):
        engine.synthesize("hello", "en-us", rate=1000)
    with pytest.raises(tts.TTSError, match="pitches must be a range"):
        tts.SynthesisOptions(pitches=(60, 20))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(tts.TTSError, match="the file is empty"):
        tts.read_sentences([empty])


def test_prepare_tts_cli(tmp_path, capsys):
    """`prepare --tts espeak TEXT` synthesizes, then prepares the speech as aligned inputs (Beam/TFDS)."""
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints
    from spiritlm_jax.train.loader import open_sources
    from spiritlm_jax.train.sequences import decode_record

    root, _ = ensure_tiny_checkpoints(log=lambda *a: None)
    text = tmp_path / "story.txt"
    text.write_text(f"{SENTENCE}\n\n!!! ...\nthe small cat wants the milk by the kitchen\n")
    rc = cli_main(["prepare", "--tts", "espeak", str(text), "--tts-voices", "en-us,en-us+m3", "--output",
                   str(tmp_path / "data"), "--name", "tts", "--speech-tokenizer", str(root / "speech_tokenizer"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "synthesized 2 of 3 sentences" in err and "no_words: 1" in err
    assert (tmp_path / "data" / "tts" / "tts" / "story-000001.wav").is_file()
    sources, _ = open_sources(tmp_path / "data" / "spiritlm_corpus" / "tts" / "1.0.0")
    docs = sorted((decode_record(sources["aligned"][i]) for i in range(len(sources["aligned"]))), key=lambda d: d.id)
    assert [d.words for d in docs] == [SENTENCE.split(), "the small cat wants the milk by the kitchen".split()]
    for d in docs:
        assert (np.diff(d.word_start) > 0).all() and d.word_end[-1] <= d.num_samples and len(d.units["hubert"])


def test_prepare_tts_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints(log=lambda *a: None)
    base = ["--output", str(tmp_path / "d"), "--name", "x", "--no-progress", "--speech-tokenizer",
            str(root / "speech_tokenizer")]
    assert cli_main(["prepare", "--tts", "espeak", str(empty)] + base) == 2
    assert "empty.txt: the file is empty" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text(SENTENCE + "\n")
    assert cli_main(["prepare", "--tts", "espeak", str(good), "--tts-voices", "en-us,en-us+m9x"] + base) == 2
    assert "unknown eSpeak NG voice(s) ['en-us+m9x']" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("!!!\n...\n")
    assert cli_main(["prepare", "--tts", "espeak", str(bad)] + base) == 2
    assert "no sentence could be synthesized" in capsys.readouterr().err
    assert cli_main(["prepare", str(good)] + base) == 2
    assert "synthesized only with --tts espeak" in capsys.readouterr().err
    assert cli_main(["prepare", "--tts", "espeak", str(good), "--output", str(tmp_path / "d"), "--name", "x"]) == 2
    assert "needs the speech tokenizer checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "d" / "spiritlm_corpus").exists()  # nothing prepared after an error
