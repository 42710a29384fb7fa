"""spiritlm_jax.audio: loading, torchaudio-exact resampling, mono mixing, chunking, and every bad-input error."""
import math

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.audio import (AudioError, MAX_WAV_CHUNK, MIN_WAV_CHUNK, chunk_audio, load_audio, pad_batch,
                                resample, to_mono)

torch = pytest.importorskip("torch")


def torchaudio_resample(w: "torch.Tensor", orig: int, new: int, lw: int = 6, rolloff: float = 0.99):
    """torchaudio 2.x ``functional.resample`` (sinc_interp_hann), written out in torch from REFERENCE.md
    §3.2 as an independent oracle (torchaudio itself cannot be installed next to torch 2.13)."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    width = math.ceil(lw * orig / base)
    idx = torch.arange(-width, width + orig, dtype=w.dtype)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=w.dtype)[:, None, None] / new + idx
    t = (t * base).clamp(-lw, lw)
    window = torch.cos(t * math.pi / lw / 2) ** 2
    t = t * math.pi
    k = torch.where(t == 0, torch.tensor(1.0, dtype=w.dtype), t.sin() / t) * window * (base / orig)
    L = w.shape[-1]
    x = torch.nn.functional.pad(w.reshape(-1, L)[:, None], (width, width + orig))
    y = torch.nn.functional.conv1d(x, k, stride=orig).transpose(1, 2).reshape(x.shape[0], -1)
    n_out = math.ceil(new * L / orig)
    return y[:, :n_out].reshape(*w.shape[:-1], n_out)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 24000, 44100, 48000])
def test_resample_matches_torchaudio_algorithm(sr):
    x = np.random.default_rng(sr).standard_normal((2, 7001)).astype(np.float32) * 0.3
    got = resample(x, sr, 16000)
    ref = torchaudio_resample(torch.from_numpy(x), sr, 16000).numpy()
    assert got.shape == ref.shape == (2, math.ceil(16000 // math.gcd(sr, 16000) * 7001 / (sr // math.gcd(sr, 16000))))
    # float32 rounding only: ours accumulates in float64, torch in float32 (measured ≤ 2.4e-7)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_resample_same_rate_is_identity_and_rejects_bad_rates():
    x = np.arange(10, dtype=np.float32)
    assert resample(x, 16000, 16000) is not None and np.array_equal(resample(x, 16000, 16000), x)
    for bad in (0, -8000, 44100.5, "16k"):
        with pytest.raises(AudioError, match="sample rate"):
            resample(x, bad, 16000)


def test_load_wav_int16_scaling_and_resampling(tmp_path):
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, size=(4410, 2), dtype=np.int16)
    p = tmp_path / "s.wav"
    sf.write(p, pcm, 44100, subtype="PCM_16")
    chans = (pcm.T.astype(np.float32) / 32768.0)  # torchaudio's 1/2^15 scaling
    ref = resample(chans, 44100, 16000)
    np.testing.assert_array_equal(load_audio(p, channel=1), ref[1])
    np.testing.assert_array_equal(load_audio(str(p)), ref.mean(axis=0, dtype=np.float32))
    assert load_audio(p.read_bytes()).shape == (1600,)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_load_other_formats(tmp_path, fmt):
    x = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    p = tmp_path / f"a.{fmt}"
    sf.write(p, x, 16000)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 16000) <= 0
    if fmt == "flac":
        np.testing.assert_allclose(y, x, atol=1 / 32768)  # 16-bit quantisation


def test_golden_recording_loads_exactly(golden_dir):
    ref = np.load(golden_dir / "cases" / "inputs.npz")["recording_wav"]
    np.testing.assert_array_equal(load_audio(golden_dir / "audio" / "7143-88743-0029.flac"), ref)


def test_arrays_taken_as_16k_or_resampled_from_given_rate():
    x = np.random.default_rng(1).standard_normal(8000).astype(np.float32)
    np.testing.assert_array_equal(load_audio(x), x)
    assert load_audio(x, sample_rate=8000).shape == (16000,)
    st = np.stack([x, -x])
    np.testing.assert_array_equal(load_audio(st, channel=0), x)
    np.testing.assert_array_equal(load_audio(st), np.zeros_like(x))
    np.testing.assert_array_equal(load_audio(x[None]), x)  # (1, T) squeezes like the original
    np.testing.assert_allclose(load_audio(np.array([0, 16384, -32768], np.int16)), [0, 0.5, -1.0])
    np.testing.assert_array_equal(load_audio(torch.from_numpy(x)), x)


@pytest.mark.parametrize("bad,match", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.array([0.0, np.nan, 0.1], np.float32), "NaN"),
    (np.array([0.0, np.inf, 0.1], np.float32), "infinite"),
    (np.zeros((2, 3, 100), np.float32), "not a waveform"),
    (np.zeros((3, 100), np.float32), r"\(2, samples\)"),
    (np.zeros((100, 2), np.float32), "channels first"),
    (np.zeros(1, np.float32), "single sample"),
    (np.array(["a", "b"]), "dtype"),
    (np.array([True, False]), "boolean"),
])
def test_bad_arrays_raise_clear_errors(bad, match):
    with pytest.raises(AudioError, match=match):
        load_audio(bad)


def test_bad_channel_choices():
    with pytest.raises(AudioError, match="channel must be 0 or 1"):
        load_audio(np.zeros((2, 100), np.float32), channel=2)
    with pytest.raises(AudioError, match="mono"):
        load_audio(np.zeros(100, np.float32), channel=1)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "text.wav").write_text("this is not audio at all\n" * 10)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(tmp_path / "text.wav")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(b"garbage bytes")
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)
    p = tmp_path / "nan.wav"
    sf.write(p, np.array([0.0, np.nan, 0.5] * 100, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(p)
    p2 = tmp_path / "ok.wav"
    sf.write(p2, np.zeros(100, np.float32), 16000)
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(p2, sample_rate=8000)


def test_chunking_matches_original_rules():
    x = np.arange(146160, dtype=np.float32)
    cs = chunk_audio(x, 29000, 1280)  # 5 × 29000 + a 1160-sample tail that is dropped
    assert [len(c) for c in cs] == [29000] * 5
    np.testing.assert_array_equal(np.concatenate(cs), x[:145000])
    assert chunk_audio(x[:1279]) == []
    assert [len(c) for c in chunk_audio(x[:1280])] == [1280]
    assert MAX_WAV_CHUNK == 1_600_000 and MIN_WAV_CHUNK == 1280
    with pytest.raises(AudioError, match="1-D"):
        chunk_audio(np.zeros((2, 10)))
    with pytest.raises(AudioError, match="positive"):
        chunk_audio(x, 0)


def test_pad_batch_and_to_mono():
    b, lens = pad_batch([np.ones(3), np.ones(5)], multiple=4)
    assert b.shape == (2, 8) and list(lens) == [3, 5] and b[0, 3:].sum() == 0
    with pytest.raises(AudioError):
        pad_batch([])
    with pytest.raises(AudioError):
        pad_batch([np.zeros((2, 2))])
    assert to_mono(np.ones((2, 4)), None).shape == (4,)
