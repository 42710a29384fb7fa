"""The wav2vec2 style tokenizer: audio → one style unit per second (REFERENCE.md §6).

The original ``Wav2Vec2StyleEncoder`` is called by ``SpiritLMTokenizer`` on chunks of at most 100 s;
this tokenizer does the same chunking itself (``max_chunk``; chunks shorter than ``min_chunk`` are
dropped) and concatenates the per-chunk units. Each chunk is z-normalised on its own (host, numpy,
exactly HF's arithmetic), then chunks of one or many utterances run together in padded, jitted,
optionally mesh-sharded batches (see :class:`~spiritlm_jax.hubert_tokenizer.BatchedEncoderRunner`).

Unlike the original's path branch (which does not resample), files are resampled to 16 kHz.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spiritlm_jax.audio import MAX_WAV_CHUNK, load_audio
from spiritlm_jax.hubert_tokenizer import BatchedEncoderRunner, TokenizerInputError, encoder_chunks
from spiritlm_jax.models.style import StyleEncoder, StyleEncoderConfig, normalize_waveform


class StyleTokenizer:
    """>>> tok = StyleTokenizer.from_checkpoint_dir("checkpoints/speech_tokenizer")
    >>> tok("speech.wav")   # int64 style units, one per second (last one covers the remainder)"""

    def __init__(self, cfg: StyleEncoderConfig, params: Any, *, max_chunk: int = MAX_WAV_CHUNK,
                 min_chunk: int | None = None, mesh: Mesh | None = None, bucket_samples: int = 16_000,
                 max_batch_samples: int = 1_600_000, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.max_chunk = int(max_chunk)
        self.min_chunk = cfg.encoder.receptive_field if min_chunk is None else int(min_chunk)
        model = StyleEncoder(cfg, dtype=dtype)

        def forward(p, wav, lengths):
            return model.apply({"params": p}, wav, lengths)

        self._runner = BatchedEncoderRunner(forward, params, mesh=mesh, bucket_samples=bucket_samples,
                                            max_batch_samples=max_batch_samples)

    @classmethod
    def from_checkpoint_dir(cls, path: str | os.PathLike, **kw) -> "StyleTokenizer":
        """``path`` = the ``speech_tokenizer`` folder or its ``style_encoder_w2v2`` sub-folder, converted
        (read without torch) or original (converted on the fly; needs torch)."""
        import dataclasses

        from spiritlm_jax import model_dir

        p = Path(path)
        d = p / "style_encoder_w2v2" if (p / "style_encoder_w2v2").is_dir() else p
        allow = kw.pop("allow_classes", ())
        pool_size = kw.pop("pool_size", None)
        if model_dir.is_converted(d):
            meta, params = model_dir.read_component(d, "style", slot="the style tokenizer (style_encoder_w2v2)")
            cfg = model_dir.config_from_json(StyleEncoderConfig, meta["config"], f"{d}/config.json")
            if pool_size is not None:
                cfg = dataclasses.replace(cfg, pool_size=int(pool_size))
            return cls(cfg, params, **kw)
        model_dir.original_needs_torch(d, "the HF wav2vec2 style encoder")
        from spiritlm_jax.converters.style import convert_style

        cfg, params = convert_style(d, pool_size=50 if pool_size is None else pool_size, allow_classes=allow)
        return cls(cfg, params, **kw)

    def _chunks(self, wav: np.ndarray, max_chunk: int | None, min_chunk: int | None = None) -> list[np.ndarray]:
        return encoder_chunks(wav, self.max_chunk if max_chunk is None else max_chunk,
                              self.min_chunk if min_chunk is None else min_chunk, self.cfg.encoder.receptive_field,
                              "wav2vec2")

    def _run(self, wavs: Sequence[np.ndarray], max_chunk: int | None, intermediates: bool,
             min_chunk: int | None = None):
        per_item = [self._chunks(w, max_chunk, min_chunk) for w in wavs]
        flat = [normalize_waveform(c, self.cfg.norm_eps) for cs in per_item for c in cs]
        rows = self._runner.run(flat)
        out, k = [], 0
        for cs in per_item:
            rs = rows[k:k + len(cs)]
            ins = flat[k:k + len(cs)]
            k += len(cs)
            units = np.concatenate([r["units"][: int(r["n_windows"])] for r in rs]).astype(np.int64)
            if not intermediates:
                out.append(units)
                continue
            cat = lambda key, n: np.concatenate([r[key][: int(r[n])] for r in rs], axis=0)  # noqa: E731
            out.append({
                "units": units,
                "input_values": np.concatenate(ins),
                "last_hidden_state": cat("last_hidden_state", "frame_lengths"),
                "projected": cat("projected", "frame_lengths"),
                "pooled": cat("pooled", "n_windows"),
                "logits": cat("logits", "n_windows"),
            })
        return out

    def encode(self, audio: Any, *, sample_rate: int | None = None, channel: int | None = None,
               max_chunk: int | None = None, min_chunk: int | None = None, return_intermediates: bool = False):
        """One utterance → style units (W,) int64 (or a dict of intermediates). Chunks of ``max_chunk``
        samples are encoded independently; chunks shorter than ``min_chunk`` are dropped."""
        wav = load_audio(audio, sample_rate=sample_rate, channel=channel)
        return self._run([wav], max_chunk, return_intermediates, min_chunk)[0]

    __call__ = encode

    def encode_batch(self, audios: Sequence[Any], *, sample_rate: int | None = None, channel: int | None = None,
                     max_chunk: int | None = None, min_chunk: int | None = None) -> list[np.ndarray]:
        if isinstance(audios, (str, os.PathLike, bytes)) or (isinstance(audios, np.ndarray) and audios.ndim == 1):
            raise TokenizerInputError("encode_batch takes a list of utterances; use encode() for one")
        wavs = [load_audio(a, sample_rate=sample_rate, channel=channel) for a in audios]
        return self._run(wavs, max_chunk, False, min_chunk) if wavs else []
