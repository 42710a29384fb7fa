"""Streaming speech out (serve/audio.py): unit tokens fed one at a time come out as waveform blocks whose
concatenation equals one-shot vocoding of the final token string (what SpeechTokenizer.decode does), for
Base and for Expressive (pitch and style units), and the first block leaves long before the end."""
import random

import numpy as np
import pytest

from spiritlm_jax.serve.audio import StreamingVocoder, UnitStream
from spiritlm_jax.units import string_to_units
from spiritlm_jax.vocoder import HifiGANVocoder, VocoderInputError

# float rounding only: the windows see exactly the frames one-shot vocoding sees (measured max |diff| 0.0
# on these vocoders; the bound is 1e-4)
TOL = 1e-4


@pytest.fixture(scope="module")
def vocoders():
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    st = ensure_tiny_checkpoints()[0] / "speech_tokenizer"
    return {"base": HifiGANVocoder.from_pretrained(st / "hifigan_spiritlm_base"),
            "expressive": HifiGANVocoder.from_pretrained(st / "hifigan_spiritlm_expressive_w2v2")}


def token_stream(rng, n_hu: int, expressive: bool, style_at: int | None):
    """An LM-like token order: [St] rarely, [Pi] every other [Hu] (none before the 4th)."""
    toks = []
    for i in range(n_hu):
        if expressive and style_at is not None and i == style_at:
            toks.append(("st", int(rng.integers(0, 100))))
        if expressive and i % 2 == 0 and i > 3:
            toks.append(("pi", int(rng.integers(0, 64))))
        toks.append(("hu", int(rng.integers(0, 500))))
    return toks


def as_string(toks) -> str:
    return "".join({"hu": "[Hu%d]", "pi": "[Pi%d]", "st": "[St%d]"}[k] % v for k, v in toks)


@pytest.mark.parametrize("variant, style_at", [("base", None), ("expressive", 30), ("expressive", None)])
def test_streamed_blocks_equal_one_shot_vocoding(vocoders, variant, style_at):
    voc = vocoders[variant]
    expressive = variant == "expressive"
    toks = token_stream(np.random.default_rng(1), 120, expressive, style_at)
    random.seed(0)  # a pitch stream without [St] draws the original's random style (at the end, both ways)
    want = voc.vocode(string_to_units(as_string(toks)), speaker_id=1, dur_pred=True, not_dedup_code=True)
    sv = StreamingVocoder(voc, expressive, speaker_id=1, chunk_frames=16)
    blocks, first_at = [], None
    for k, (kind, value) in enumerate(toks):
        sv.add(kind, value)
        ready = sv.ready()
        if ready and first_at is None:
            first_at = k
        blocks += ready
    random.seed(0)
    blocks += sv.finish()
    got = np.concatenate(blocks)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL)
    if style_at is None and expressive:
        assert first_at is None  # nothing is final until the style is known: it is drawn at the end
    else:
        # the first block leaves after chunk + margin frames, not at the end of the utterance
        assert first_at is not None and first_at < len(toks) // 2


def test_unit_stream_finality_and_errors(vocoders):
    s = UnitStream(expressive=True)
    s.add("hu", 5)
    s.add("pi", 3)
    assert s.n_final() == 0  # no style yet
    s.add("st", 7)
    s.add("hu", 6)
    assert s.n_final() == 2 and s.units(0, 2)["pitch"].tolist() == [3, 3] and s.units(0, 2)["style"].tolist() == [7, 7]
    with pytest.raises(VocoderInputError, match="chunk_frames must be positive"):
        StreamingVocoder(vocoders["base"], False, chunk_frames=0)
    with pytest.raises(VocoderInputError, match="speaker_id"):
        StreamingVocoder(vocoders["base"], False, speaker_id=999)
    no_pitch = StreamingVocoder(vocoders["expressive"], True)
    no_pitch.add("hu", 4)
    with pytest.raises(VocoderInputError, match="no \\[Pi\\] token"):
        no_pitch.finish()
