"""Word-alignment readers (TSV, JSON, WhisperX, MFA JSON, TextGrid long/short/UTF-16, CTM) and checks."""
import json

import pytest

from spiritlm_jax.train import alignments as al
from spiritlm_jax.train.alignments import AlignmentError, Word

WORDS = [("Hello,", 0.10, 0.45), ("world", 0.50, 0.90), ("again", 1.00, 1.30)]


def _expected(words=WORDS):
    return [Word(w, s, e) for w, s, e in words]


def test_tsv_with_header_comments_and_audacity(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("word\tstart\tend\n# comment\n\n" + "".join(f"{w}\t{s}\t{e}\n" for w, s, e in WORDS))
    assert al.read_alignment(p) == _expected()
    q = tmp_path / "labels.tsv"  # Audacity: start, end, label
    q.write_text("".join(f"{s}\t{e}\t{w}\n" for w, s, e in WORDS) + "1.4\t1.5\tsil\n")
    assert al.read_alignment(q) == _expected()


def test_json_variants(tmp_path):
    plain = [{"word": w, "start": s, "end": e} for w, s, e in WORDS]
    for i, data in enumerate([plain, {"words": plain},
                              {"segments": [{"text": "x", "words": [dict(d, score=0.9) for d in plain[:2]]},
                                            {"words": plain[2:]}]},  # WhisperX
                              {"tiers": {"words": {"type": "interval", "entries": [[s, e, w] for w, s, e in WORDS]
                                                   + [[1.3, 1.6, ""]]},
                                         "phones": {"type": "interval", "entries": []}}}]):  # MFA JSON
        p = tmp_path / f"a{i}.json"
        p.write_text(json.dumps(data))
        assert al.read_alignment(p) == _expected(), data


def test_whisperx_word_without_times_is_an_error(tmp_path):
    p = tmp_path / "wx.json"
    p.write_text(json.dumps({"segments": [{"words": [{"word": "In", "start": 0.1, "end": 0.2}, {"word": "1984"}]}]}))
    with pytest.raises(AlignmentError, match="no start/end") as e:
        al.read_alignment(p)
    assert e.value.reason == "unaligned_word"


LONG_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 1.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 1.5
        intervals: size = 5
        intervals [1]:
            xmin = 0
            xmax = 0.1
            text = ""
        intervals [2]:
            xmin = 0.1
            xmax = 0.45
            text = "Hello,"
        intervals [3]:
            xmin = 0.5
            xmax = 0.9
            text = "world"
        intervals [4]:
            xmin = 1.0
            xmax = 1.3
            text = "again"
        intervals [5]:
            xmin = 1.3
            xmax = 1.5
            text = "sil"
    item [2]:
        class = "TextTier"
        name = "events"
        xmin = 0
        xmax = 1.5
        points: size = 1
        points [1]:
            number = 0.7
            mark = "a ""quoted"" mark"
'''

SHORT_TG = '''File type = "ooTextFile"
Object class = "TextGrid"

0
1.5
<exists>
2
"IntervalTier"
"spk1 - words"
0
1.5
3
0.1
0.45
"Hello,"
0.5
0.9
"world"
1.0
1.3
"again"
"IntervalTier"
"spk1 - phones"
0
1.5
1
0
1.5
"HH"
'''


def test_textgrid_long_short_utf16(tmp_path):
    p = tmp_path / "a.TextGrid"
    p.write_text(LONG_TG)
    assert al.read_alignment(p) == _expected()
    q = tmp_path / "b.TextGrid"
    q.write_text(SHORT_TG)
    assert al.read_alignment(q) == _expected()  # MFA's "<speaker> - words" tier name
    assert [w.word for w in al.read_alignment(q, tier="spk1 - phones")] == ["HH"]
    r = tmp_path / "c.TextGrid"
    r.write_bytes(LONG_TG.replace("again", "ağain").encode("utf-16"))  # Praat writes UTF-16 with a BOM
    assert [w.word for w in al.read_alignment(r)] == ["Hello,", "world", "ağain"]


def test_textgrid_ambiguous_or_missing_tier(tmp_path):
    p = tmp_path / "a.TextGrid"
    p.write_text(SHORT_TG.replace('"spk1 - words"', '"ortho"'))
    with pytest.raises(AlignmentError, match="which tier"):
        al.read_alignment(p)
    with pytest.raises(AlignmentError, match="no interval tier named 'nope'"):
        al.read_alignment(p, tier="nope")
    bad = tmp_path / "bad.TextGrid"
    bad.write_text("hello")
    with pytest.raises(AlignmentError, match="not a Praat TextGrid"):
        al.read_alignment(bad)
    trunc = tmp_path / "t.TextGrid"
    trunc.write_text(SHORT_TG[:SHORT_TG.index('"world"')])
    with pytest.raises(AlignmentError, match="malformed TextGrid"):
        al.read_alignment(trunc)


def test_ctm(tmp_path):
    p = tmp_path / "a.ctm"
    lines = [f"utt1 1 {s:.2f} {e - s:.2f} {w} 0.9" for w, s, e in reversed(WORDS)]  # any order
    p.write_text(";; comment\n" + "\n".join(lines) + "\n")
    got = al.read_alignment(p)
    assert [w.word for w in got] == [w for w, _, _ in WORDS]
    assert all(abs(g.start - s) < 1e-9 and abs(g.end - e) < 1e-9 for g, (_, s, e) in zip(got, WORDS))
    p.write_text(p.read_text() + "utt2 1 0.0 0.5 other\n")
    with pytest.raises(AlignmentError, match="2 utterances"):
        al.read_alignment(p)
    assert [w.word for w in al.read_alignment(p, utterance="utt2")] == ["other"]
    p.write_text("utt1 1 0.1\n")
    with pytest.raises(AlignmentError, match="5 or 6 fields"):
        al.read_alignment(p)


def test_unknown_extension_and_unreadable(tmp_path):
    with pytest.raises(AlignmentError, match="unknown alignment extension"):
        al.read_alignment(tmp_path / "a.srt")
    with pytest.raises(AlignmentError, match="cannot read") as e:
        al.read_alignment(tmp_path / "missing.tsv")
    assert e.value.reason == "unreadable_alignment"
    p = tmp_path / "x.tsv"
    p.write_text("a\tzero\t1\n")
    with pytest.raises(AlignmentError, match="not a number"):
        al.read_alignment(p)


def test_match_transcript_keeps_display_forms_and_punctuation():
    got = al.align(_expected(), "« Hello , world again! »", 2.0)
    assert [w.text for w in got] == ["« Hello ,", "world", "again! »"]
    assert [(w.start, w.end) for w in got] == [(s, e) for _, s, e in WORDS]
    # no transcript: the aligned words are the transcript
    assert [w.text for w in al.align(_expected(), None, 2.0)] == ["Hello,", "world", "again"]


@pytest.mark.parametrize("transcript,where", [("Hello world", "word 2"), ("Hello world again too", "word 3"),
                                              ("Hello word again", "word 1")])
def test_mismatch_is_an_error(transcript, where):
    with pytest.raises(AlignmentError, match=f"does not match the transcript at {where}") as e:
        al.align(_expected(), transcript, 2.0)
    assert e.value.reason == "alignment_mismatch"


def test_empty_transcript():
    for t in ("", "   ", " ,. ! "):
        with pytest.raises(AlignmentError) as e:
            al.align(_expected(), t, 2.0)
        assert e.value.reason == "empty_transcript"
    with pytest.raises(AlignmentError) as e:
        al.align([], None, 2.0)
    assert e.value.reason == "empty_transcript"


def test_times_outside_audio_overlapping_or_negative():
    with pytest.raises(AlignmentError, match="audio lasts 1.000s") as e:
        al.align(_expected(), None, 1.0)
    assert e.value.reason == "word_outside_audio"
    clipped = al.align(_expected(), None, 1.28)  # 20 ms past the end: within tolerance, clipped
    assert clipped[-1].end == 1.28
    with pytest.raises(AlignmentError, match="overlap") as e:
        al.align([Word("a", 0.0, 0.5), Word("b", 0.3, 0.6)], None, 1.0)
    assert e.value.reason == "bad_times"
    with pytest.raises(AlignmentError, match="0 <= start <= end"):
        al.align([Word("a", 0.5, 0.4)], None, 1.0)
    with pytest.raises(AlignmentError, match="0 <= start <= end"):
        al.align([Word("a", -0.1, 0.4)], None, 1.0)


def test_normalize_word():
    assert al.normalize_word("Don't!") == al.normalize_word("don't") == "dont"
    assert al.normalize_word("Ｈｅｌｌｏ") == "hello"  # NFKC full-width
    assert al.normalize_word("—") == ""
