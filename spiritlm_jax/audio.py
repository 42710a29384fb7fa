"""Audio input handling shared by every speech tokenizer: load, mono, resample to 16 kHz, chunk, pad.

Semantics follow the original Spirit LM (REFERENCE.md §3):

* files are decoded to float32 with integer PCM scaled by ``1 / 2**(bits-1)`` (16-bit: /32768), as
  ``torchaudio.load`` does (libsndfile applies the same scaling);
* a rate other than 16 kHz is resampled with torchaudio's windowed-sinc algorithm (Hann window,
  ``lowpass_filter_width=6``, ``rolloff=0.99``; §3.2), re-implemented here in numpy so the units match
  the original's;
* stereo is averaged over the two channels unless a channel is chosen (§3.3);
* long audio is split into consecutive chunks of ``max_chunk`` samples (100 s) and chunks shorter
  than ``min_chunk`` (1280 samples = 80 ms) are dropped, not padded (§3.3).

Arrays passed in are taken as 16 kHz unless ``sample_rate`` says otherwise (the original assumes
16 kHz for arrays without checking). Every problem with the input raises :class:`AudioError` (a
``ValueError``) naming the problem and what to do about it.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16_000
# SpiritLMTokenizer's chunking (REFERENCE.md §3.3).
MAX_WAV_CHUNK = 100 * SAMPLE_RATE
MIN_WAV_CHUNK = 1280
# torchaudio.functional.resample defaults (REFERENCE.md §3.2).
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99

__all__ = [
    "AudioError",
    "SAMPLE_RATE",
    "MAX_WAV_CHUNK",
    "MIN_WAV_CHUNK",
    "load_audio",
    "read_audio_file",
    "to_mono",
    "resample",
    "chunk_audio",
    "pad_batch",
]


class AudioError(ValueError):
    """The audio input is unusable (missing, not audio, empty, non-finite, impossible shape)."""


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def read_audio_file(source: str | os.PathLike | bytes) -> tuple[np.ndarray, int]:
    """Decode a file (or its bytes) → ``(float32 array (channels, samples), sample_rate)``.

    soundfile (libsndfile: wav, flac, ogg, mp3 with libsndfile ≥ 1.1) first; librosa/audioread as a
    fallback for formats libsndfile cannot read.
    """
    import soundfile as sf

    if isinstance(source, (bytes, bytearray)):
        name = "<bytes>"
        if len(source) == 0:
            raise AudioError("the audio bytes are empty; pass the content of an audio file")
        try:
            data, sr = sf.read(io.BytesIO(bytes(source)), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile error types differ across versions
            raise AudioError(f"{name}: not a readable audio file ({_first_line(e)})") from e
        return np.ascontiguousarray(data.T), int(sr)

    path = Path(source)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return np.ascontiguousarray(data.T), int(sr)
    except Exception as sf_err:
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, sr = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
        except Exception:
            raise AudioError(
                f"{path}: not a readable audio file ({_first_line(sf_err)}). Supported: wav, flac, ogg, "
                f"mp3 and whatever else libsndfile or librosa can decode."
            ) from sf_err
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 1:
            data = data[None]
        return np.ascontiguousarray(data), int(sr)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _as_array(x: Any) -> np.ndarray:
    """numpy / jax / torch / lists → a float32 numpy array (integer PCM scaled as torchaudio does)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if getattr(x, "is_floating_point", lambda: False)():
            x = x.float()  # bfloat16 / float16 tensors have no numpy dtype
        x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception as e:
        raise AudioError(f"cannot interpret the audio input of type {type(x).__name__} as an array ({e})") from e
    if a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        if a.dtype.kind == "u":  # unsigned PCM (8-bit wav) is offset-binary
            mid = (int(info.max) + 1) // 2
            a = (a.astype(np.float64) - mid) / mid
        else:
            a = a.astype(np.float64) / (int(info.max) + 1)
    elif a.dtype.kind == "b":
        raise AudioError("the audio array is boolean; pass float samples in [-1, 1]")
    elif a.dtype.kind not in "f":
        raise AudioError(f"the audio array has dtype {a.dtype}; pass float samples in [-1, 1]")
    return np.asarray(a, dtype=np.float32)


def _check_finite(x: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(x)):
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        raise AudioError(
            f"{where}: the audio contains {n_nan} NaN and {n_inf} infinite sample(s); clean or re-decode it "
            f"(e.g. np.nan_to_num) before tokenizing"
        )


# ------------------------------------------------------------------------------------------------
# Channels
# ------------------------------------------------------------------------------------------------

def to_mono(x: np.ndarray, channel: int | None = None, *, where: str = "audio") -> np.ndarray:
    """(channels, samples) or (samples,) → (samples,): squeeze, then mean of 2 channels or one channel.

    Like the original: after squeezing, a 2-D input must be stereo in channels-first layout (2, T);
    ``channel=None`` averages the two channels, ``channel=0|1`` picks one.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0:
        raise AudioError(f"{where}: the audio is empty (shape {x.shape}); nothing to tokenize")
    if x.ndim == 2 and x.shape[0] == 1 and channel not in (None, 0):
        raise AudioError(f"{where}: channel={channel} requested but the audio is mono")
    x = np.squeeze(x)
    if x.ndim == 0:
        raise AudioError(f"{where}: the audio has a single sample (shape {np.shape(x)}); nothing to tokenize")
    if x.ndim == 2:
        if x.shape[0] != 2:
            hint = (" It looks like (samples, channels): pass x.T (channels first)." if x.shape[1] == 2 else
                    " Only mono (T,) and stereo (2, T) are accepted; mix or pick a channel first.")
            raise AudioError(f"{where}: expected a stereo array of shape (2, samples), got {x.shape}.{hint}")
        if channel is None:
            return x.mean(axis=0, dtype=np.float32)
        if channel not in (0, 1):
            raise AudioError(f"{where}: channel must be 0 or 1 for stereo audio, got {channel!r}")
        return np.ascontiguousarray(x[channel])
    if x.ndim != 1:
        raise AudioError(
            f"{where}: audio of shape {np.shape(x)} is not a waveform; expected (samples,) or (2, samples)"
        )
    if channel not in (None, 0):
        raise AudioError(f"{where}: channel={channel} requested but the audio is mono")
    return x


# ------------------------------------------------------------------------------------------------
# Resampling: torchaudio's windowed-sinc algorithm (REFERENCE.md §3.2)
# ------------------------------------------------------------------------------------------------

def _sinc_kernel(orig: int, new: int, width_taps: int, lowpass_filter_width: int, rolloff: float) -> np.ndarray:
    """(new, 2·width + orig) float32 phase kernels, computed in float32 in torchaudio's order."""
    base = min(orig, new) * rolloff
    f32 = np.float32
    idx = np.arange(-width_taps, width_taps + orig, dtype=f32)[None, :] / f32(orig)
    t = np.arange(0, -new, -1, dtype=f32)[:, None] / f32(new) + idx
    t = t * f32(base)
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width).astype(f32)
    window = np.cos(t * f32(math.pi) / f32(lowpass_filter_width) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kern = np.where(t == 0, f32(1.0), np.sin(t) / t).astype(f32)
    kern = kern * (window * f32(base / orig))
    return kern.astype(f32)


def resample(x: np.ndarray, orig_sr: int, new_sr: int, *, lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
             rolloff: float = ROLLOFF) -> np.ndarray:
    """Resample the last axis from ``orig_sr`` to ``new_sr`` exactly as ``torchaudio.functional.resample``
    (sinc_interp_hann) does: output length ``ceil(new·L/orig)`` after dividing both rates by their gcd.

    The float32 kernel matches torchaudio's; the correlation is accumulated in float64 and rounded
    once, so the result is within float32 rounding of torchaudio's (whose own summation order varies
    with the thread count).
    """
    for name, v in (("orig_sr", orig_sr), ("new_sr", new_sr)):
        if not (isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer())) or v <= 0:
            raise AudioError(f"{name} must be a positive integer sample rate, got {v!r}")
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    x = np.asarray(x, dtype=np.float32)
    if orig_sr == new_sr:
        return x
    if x.shape[-1] == 0:
        raise AudioError("cannot resample empty audio")
    g = math.gcd(orig_sr, new_sr)
    o, n = orig_sr // g, new_sr // g
    base = min(o, n) * rolloff
    width = int(math.ceil(lowpass_filter_width * o / base))
    kern = _sinc_kernel(o, n, width, lowpass_filter_width, rolloff).astype(np.float64)  # (n, K)
    K = kern.shape[1]
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    L = flat.shape[1]
    padded = np.pad(flat, ((0, 0), (width, width + o)))
    n_frames = (padded.shape[1] - K) // o + 1
    target = int(math.ceil(n * L / o))
    out = np.empty((flat.shape[0], n_frames * n), dtype=np.float32)
    block = max(1, (1 << 22) // K)  # frames per block: bounds the temporary to ~32 MB of float64
    for r in range(flat.shape[0]):
        frames = np.lib.stride_tricks.sliding_window_view(padded[r], K)[::o]
        for s in range(0, n_frames, block):
            f = frames[s:s + block].astype(np.float64)
            out[r, s * n:(s + f.shape[0]) * n] = (f @ kern.T).reshape(-1).astype(np.float32)
    return out[:, :target].reshape(*lead, target)


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------

def load_audio(path_or_array: Any, sample_rate: int | None = None, channel: int | None = None) -> np.ndarray:
    """A file path / file bytes / array → float32 mono waveform at 16 kHz, shape (samples,).

    * path or bytes: decoded, resampled to 16 kHz if needed (per channel, then mixed, as the
      original), ``sample_rate`` must be None or the file's rate.
    * array (numpy, jax, torch, list): (T,), (1, T) or (2, T) channels-first; taken as 16 kHz unless
      ``sample_rate`` is given, in which case it is resampled from that rate.
    * ``channel``: None averages stereo, 0/1 picks a channel.
    """
    if isinstance(path_or_array, (str, os.PathLike, bytes, bytearray)):
        where = "<bytes>" if isinstance(path_or_array, (bytes, bytearray)) else str(path_or_array)
        data, sr = read_audio_file(path_or_array)
        if sample_rate is not None and int(sample_rate) != sr:
            raise AudioError(
                f"{where}: the file's sample rate is {sr} Hz but sample_rate={sample_rate} was given; "
                f"leave sample_rate=None for files (their header is authoritative)"
            )
        if data.size == 0:
            raise AudioError(f"{where}: the file holds no samples")
        _check_finite(data, where)
        if sr != SAMPLE_RATE:
            data = resample(data, sr, SAMPLE_RATE)
        return to_mono(data, channel, where=where)

    where = "audio array"
    x = _as_array(path_or_array)
    if x.size == 0:
        raise AudioError(f"{where}: the audio is empty (shape {x.shape}); nothing to tokenize")
    if x.ndim > 2 and np.squeeze(x).ndim > 2:
        raise AudioError(
            f"{where}: shape {x.shape} is not a waveform; expected (samples,), (1, samples) or (2, samples)"
        )
    _check_finite(x, where)
    x = to_mono(x, channel, where=where)
    if sample_rate is not None and int(sample_rate) != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    return np.ascontiguousarray(x, dtype=np.float32)


def chunk_audio(x: np.ndarray, max_chunk: int = MAX_WAV_CHUNK, min_chunk: int = MIN_WAV_CHUNK) -> list[np.ndarray]:
    """Consecutive chunks of ``max_chunk`` samples; chunks shorter than ``min_chunk`` are dropped
    (only the last chunk, or the whole input, can be that short). Returns views of ``x``."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise AudioError(f"chunk_audio expects a 1-D waveform, got shape {x.shape}; call load_audio first")
    if int(max_chunk) <= 0:
        raise AudioError(f"max_chunk must be positive, got {max_chunk}")
    max_chunk = int(max_chunk)
    out = []
    for start in range(0, len(x), max_chunk):
        c = x[start:start + max_chunk]
        if len(c) < min_chunk:
            continue
        out.append(c)
    return out


def pad_batch(waves: Sequence[np.ndarray], multiple: int = 1, pad_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D waveforms to a common length → ``(batch (B, L) float32, lengths (B,) int32)``.

    ``L`` is the longest length rounded up to ``multiple`` (use a bucket size to limit recompiles).
    """
    if len(waves) == 0:
        raise AudioError("pad_batch got an empty list of waveforms")
    arrs = []
    for i, w in enumerate(waves):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise AudioError(f"waveform {i} has shape {w.shape}; each batch item must be 1-D (call load_audio)")
        arrs.append(w)
    lengths = np.array([len(w) for w in arrs], dtype=np.int32)
    L = int(lengths.max())
    if multiple > 1:
        L = -(-L // multiple) * multiple
    out = np.full((len(arrs), max(L, 1)), pad_value, dtype=np.float32)
    for i, w in enumerate(arrs):
        out[i, :len(w)] = w
    return out, lengths
