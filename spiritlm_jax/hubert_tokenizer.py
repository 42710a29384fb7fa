"""The HuBERT-25Hz phonetic tokenizer: audio → HuBERT layer-11 features → quantizer → units (25 Hz).

Reproduces the original ``HubertTokenizer`` (REFERENCE.md §4): the waveform is split into chunks of
``max_chunk`` samples (1.6 M = 100 s), chunks shorter than ``min_chunk`` (400) are dropped, each
chunk is encoded independently, the chunk features are concatenated along time, and the quantizer
(with its blank filling, which runs over the concatenation) gives the units.

Batched and jit-compiled: every call groups chunks (of one or many utterances) into padded batches
with per-row lengths; the encoder masks padding so each row equals its unbatched result. Input
lengths are rounded up to ``bucket_samples`` so that few distinct shapes are compiled. With a
``mesh`` the batch is split over the mesh's ``data``/``fsdp`` axes and parameters are replicated.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spiritlm_jax.audio import AudioError, chunk_audio, load_audio
from spiritlm_jax.models.hubert import SpeechEncoder, SpeechEncoderConfig
from spiritlm_jax.models.quantizer import (KmeansConfig, KmeansQuantizer, LinearQuantizer, LinearQuantizerConfig,
                                           fill_blanks, logits_to_raw_units)
from spiritlm_jax.unit_features import KMEANS_CONFIG, FeatureSpec, read_kmeans_dir, select_features

HUBERT_MAX_CHUNK = 100 * 16_000  # the original HubertTokenizer's defaults
HUBERT_MIN_CHUNK = 400


class TokenizerInputError(AudioError):
    """The audio cannot be tokenized (e.g. too short for the conv stack)."""


def encoder_chunks(wav: np.ndarray, max_chunk: int, min_chunk: int, receptive_field: int,
                   model: str) -> list[np.ndarray]:
    """The original's chunking (``audio.chunk_audio``) for a conv-stack encoder, with clear errors when
    nothing is left to tokenize or a kept chunk is too short for one frame (the original fails in conv1d)."""
    mn = int(min_chunk)
    chunks = chunk_audio(wav, int(max_chunk), mn)
    if not chunks:
        raise TokenizerInputError(
            f"the audio has {len(wav)} samples, fewer than min_chunk={mn}: nothing to tokenize "
            f"(the original raises here too); pad or skip such inputs")
    short = [len(c) for c in chunks if len(c) < receptive_field]
    if short:
        raise TokenizerInputError(
            f"a chunk of {short[0]} samples is shorter than the {receptive_field} samples the {model} conv stack "
            f"needs for one frame (the original fails in conv1d); give at least {receptive_field} samples per chunk")
    return chunks


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m if m > 1 else n


class BatchedEncoderRunner:
    """Shared machinery for the speech encoders: pad chunks into batches, bucket shapes, shard over a
    mesh, run one jitted function, hand back per-row numpy results."""

    def __init__(self, fn, params, *, mesh: Mesh | None = None, bucket_samples: int = 16_000,
                 max_batch_samples: int = 1_600_000):
        self.mesh = mesh
        self.bucket_samples = int(bucket_samples)
        self.max_batch_samples = int(max_batch_samples)
        if mesh is not None:
            from spiritlm_jax.sharding import logical_spec

            self._batch_spec = logical_spec("batch", None)
            self._data_size = int(np.prod([mesh.shape[a] for a in self._batch_spec[0]])) \
                if isinstance(self._batch_spec[0], tuple) else int(mesh.shape[self._batch_spec[0]])
            rep = NamedSharding(mesh, P())
            self.params = jax.device_put(params, rep)  # parameters replicated on every device
        else:
            self._batch_spec = None
            self._data_size = 1
            self.params = jax.device_put(params)
        self._fn = jax.jit(fn)

    def run(self, chunks: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """chunks: 1-D float32 arrays → per chunk, the dict of (batch-row) outputs of ``fn``."""
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))  # similar lengths together
        results: list[Any] = [None] * len(chunks)
        i = 0
        while i < len(order):
            n_max = _round_up(len(chunks[order[i]]), self.bucket_samples)
            per = max(1, self.max_batch_samples // max(n_max, 1))
            left = len(order) - i
            per = -(-left // -(-left // per))  # balanced groups (16 rows, at most 10 → 8 + 8, one shape)
            per = _round_up(per, self._data_size)
            group = order[i:i + per]
            i += len(group)
            B = _round_up(len(group), self._data_size)
            wav = np.zeros((B, n_max), np.float32)
            lens = np.zeros((B,), np.int32)
            for r, j in enumerate(group):
                wav[r, :len(chunks[j])] = chunks[j]
                lens[r] = len(chunks[j])
            for r in range(len(group), B):  # batch padding rows: copies of the first row
                wav[r], lens[r] = wav[0], lens[0]
            if self.mesh is not None:
                sh = NamedSharding(self.mesh, self._batch_spec)
                wav_d = jax.device_put(wav, sh)
                lens_d = jax.device_put(lens, NamedSharding(self.mesh, P(self._batch_spec[0])))
            else:
                wav_d, lens_d = wav, lens
            out = jax.device_get(self._fn(self.params, wav_d, lens_d))
            for r, j in enumerate(group):
                results[j] = {k: v[r] for k, v in out.items()}
        return results


class HubertTokenizer:
    """Units (or dense features) for a file, an array, or a batch of them.

    >>> tok = HubertTokenizer.from_checkpoint_dir("checkpoints/speech_tokenizer")
    >>> tok("speech.wav")            # int32 units, 25 Hz
    >>> tok(wav, dense=True)         # (T, D) float32 layer-11 features
    >>> tok.encode_batch([a, b, c])  # list of unit arrays
    """

    def __init__(self, encoder_cfg: SpeechEncoderConfig, encoder_params: Any,
                 quantizer_cfg: LinearQuantizerConfig | KmeansConfig, quantizer_params: Any, *,
                 hubert_layer: int | None = None, max_chunk: int = HUBERT_MAX_CHUNK, min_chunk: int = HUBERT_MIN_CHUNK,
                 mesh: Mesh | None = None, bucket_samples: int = 16_000, max_batch_samples: int = 1_600_000,
                 dtype: Any = jnp.float32, features: FeatureSpec | None = None):
        self.cfg = encoder_cfg
        # What the quantizer reads (unit_features.py): the encoder output (default) or, for a k-means
        # quantizer trained by `train-quantizer`, conv or log-mel frames on the encoder's framing.
        self.features = features if features is not None else FeatureSpec("hubert")
        self.hubert_layer = hubert_layer if hubert_layer is not None else encoder_cfg.layers_run
        self.qcfg = quantizer_cfg
        self.is_linear = isinstance(quantizer_cfg, LinearQuantizerConfig)
        self.max_chunk = int(max_chunk)
        self.min_chunk = int(min_chunk)
        self.mesh = mesh
        self.sample_rate = 16_000
        encoder = SpeechEncoder(encoder_cfg, dtype=dtype)
        quant = LinearQuantizer(quantizer_cfg) if self.is_linear else KmeansQuantizer(quantizer_cfg)
        self._quant = quant
        self._qparams = quantizer_params
        is_linear = self.is_linear
        spec = self.features

        def forward(params, wav, lengths):
            out = encoder.apply({"params": params["encoder"]}, wav, lengths)
            feats = select_features(spec, out, wav, lengths, encoder_cfg)
            q = quant.apply({"params": params["quantizer"]}, feats)
            raw = logits_to_raw_units(q) if is_linear else q
            return {"features": feats, "frame_lengths": out["frame_lengths"], "raw_units": raw,
                    "conv_features": out["conv_features"].astype(jnp.float32)}

        self._runner = BatchedEncoderRunner(forward, {"encoder": encoder_params, "quantizer": quantizer_params},
                                            mesh=mesh, bucket_samples=bucket_samples,
                                            max_batch_samples=max_batch_samples)
        self._fill = jax.jit(fill_blanks, static_argnames=("blank_id",))
        self._logits = jax.jit(lambda p, x: quant.apply({"params": p}, x))

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_checkpoints(cls, hubert_ckpt: str | os.PathLike, quantizer_ckpt: str | os.PathLike, *,
                         hubert_layer: int = 11, is_linear_quantizer: bool = True,
                         allow_classes: Sequence[str] = (), **kw) -> "HubertTokenizer":
        from spiritlm_jax.converters.hubert import convert_hubert
        from spiritlm_jax.converters.quantizer import convert_kmeans, convert_linear_quantizer

        ecfg, eparams = convert_hubert(hubert_ckpt, output_layer=hubert_layer, allow_classes=allow_classes)
        if is_linear_quantizer:
            qcfg, qparams = convert_linear_quantizer(quantizer_ckpt, allow_classes=allow_classes)
        else:
            qcfg, qparams = convert_kmeans(quantizer_ckpt, allow_classes=allow_classes)
        qdim = qcfg.widths[0] if isinstance(qcfg, LinearQuantizerConfig) else qcfg.dim
        if qdim != ecfg.embed_dim:
            from spiritlm_jax.converters.torch_io import CheckpointError

            raise CheckpointError(
                f"{quantizer_ckpt}: the quantizer expects {qdim}-d features but {hubert_ckpt} gives {ecfg.embed_dim}-d"
            )
        return cls(ecfg, eparams, qcfg, qparams, hubert_layer=hubert_layer, **kw)

    @classmethod
    def from_kmeans(cls, hubert_ckpt: str | os.PathLike, kmeans_dir: str | os.PathLike, *,
                    allow_classes: Sequence[str] = (), **kw) -> "HubertTokenizer":
        """HuBERT + a k-means quantizer folder written by ``spiritlm-jax train-quantizer`` (``kmeans.json``
        + ``centers.npy``; the features it was trained on are read from ``kmeans.json``)."""
        from spiritlm_jax.converters.hubert import convert_hubert

        centers, spec, _ = read_kmeans_dir(kmeans_dir)
        layer = spec.layer if spec.layer is not None else 11
        ecfg, eparams = convert_hubert(hubert_ckpt, output_layer=layer, allow_classes=allow_classes)
        if centers.shape[1] != spec.dim(ecfg):
            from spiritlm_jax.converters.torch_io import CheckpointError

            raise CheckpointError(f"{kmeans_dir}: the centres are {centers.shape[1]}-d but {spec.kind} features of "
                                  f"{hubert_ckpt} are {spec.dim(ecfg)}-d: the quantizer was trained on another encoder")
        qcfg = KmeansConfig(n_clusters=int(centers.shape[0]), dim=int(centers.shape[1]))
        return cls(ecfg, eparams, qcfg, {"centers": centers}, hubert_layer=layer, features=spec, **kw)

    @classmethod
    def from_checkpoint_dir(cls, path: str | os.PathLike, **kw) -> "HubertTokenizer":
        """``path`` = the ``speech_tokenizer`` folder or its ``hubert_25hz`` sub-folder, converted
        (``spiritlm-jax convert all``: read without torch) or original (converted on the fly; needs torch).
        A folder holding a k-means quantizer trained by ``train-quantizer`` (``kmeans.json``) uses it
        instead of ``L11_quantizer_500.pt``."""
        from spiritlm_jax import model_dir

        p = Path(path)
        d = p / "hubert_25hz" if (p / "hubert_25hz").is_dir() else p
        if (d / KMEANS_CONFIG).is_file():
            return cls.from_kmeans(d / "mhubert_base_25hz.pt", d, **kw)
        if model_dir.is_converted(d):
            return cls.from_model_dir(d, **kw)
        model_dir.original_needs_torch(d, "the HuBERT and quantizer .pt files")
        return cls.from_checkpoints(d / "mhubert_base_25hz.pt", d / "L11_quantizer_500.pt", **kw)

    @classmethod
    def from_model_dir(cls, folder: str | os.PathLike, *, hubert_layer: int | None = None,
                       allow_classes: Sequence[str] = (), **kw) -> "HubertTokenizer":
        """A converted ``hubert_25hz`` folder (config.json + model.safetensors; docs/model-format.md). It
        stores every layer; ``hubert_layer`` (default: the tokenizer's, 11) picks the output layer."""
        from spiritlm_jax import model_dir

        meta, params = model_dir.read_component(folder, "hubert", slot="the HuBERT tokenizer (hubert_25hz)")
        c = meta["config"]
        ecfg = model_dir.config_from_json(SpeechEncoderConfig, c["encoder"], f"{folder}/config.json:encoder")
        qkind = c["quantizer"]["kind"]
        qcls = LinearQuantizerConfig if qkind == "linear" else KmeansConfig
        qcfg = model_dir.config_from_json(qcls, c["quantizer"]["config"], f"{folder}/config.json:quantizer")
        layer = int(c.get("hubert_layer", ecfg.num_layers) if hubert_layer is None else hubert_layer)
        if not 1 <= layer <= ecfg.num_layers:
            raise model_dir.ModelDirError(f"hubert_layer={layer} is outside 1..{ecfg.num_layers}, the layers stored in {folder}")
        # run the first `layer` layers; a pre-norm encoder then skips its final LayerNorm (as fairseq does)
        params["encoder"]["layers"] = {k: v[:layer] for k, v in params["encoder"]["layers"].items()}
        ecfg = ecfg.replace(num_layers=layer, output_layer=None,
                            encoder_ln="none" if ecfg.layer_norm_first else ecfg.encoder_ln)
        return cls(ecfg, params["encoder"], qcfg, params["quantizer"], hubert_layer=layer, **kw)

    # -- properties ----------------------------------------------------------------------------------

    @property
    def blank_id(self) -> int | None:
        return self.qcfg.blank_id if self.is_linear else None

    @property
    def hop(self) -> int:
        return self.cfg.hop

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.cfg.hop

    @property
    def n_units(self) -> int:
        return self.qcfg.vocab_size if self.is_linear else self.qcfg.n_clusters

    # -- API -------------------------------------------------------------------------------------------

    def load(self, audio: Any, sample_rate: int | None = None, channel: int | None = None) -> np.ndarray:
        return load_audio(audio, sample_rate=sample_rate, channel=channel)

    def _chunks(self, wav: np.ndarray, max_chunk: int | None, min_chunk: int | None) -> list[np.ndarray]:
        return encoder_chunks(wav, self.max_chunk if max_chunk is None else max_chunk,
                              self.min_chunk if min_chunk is None else min_chunk, self.cfg.receptive_field, "HuBERT")

    def _encode_many(self, wavs: Sequence[np.ndarray], dense: bool, max_chunk, min_chunk,
                     intermediates: bool = False) -> list:
        per_item = [self._chunks(w, max_chunk, min_chunk) for w in wavs]
        flat = [c for cs in per_item for c in cs]
        rows = self._runner.run(flat)
        out, k = [], 0
        raws = []
        for cs in per_item:
            rs = rows[k:k + len(cs)]
            k += len(cs)
            n = [int(r["frame_lengths"]) for r in rs]
            if dense:
                feats = np.concatenate([r["features"][:m] for r, m in zip(rs, n)], axis=0)
                if intermediates:
                    conv = np.concatenate([r["conv_features"][:m] for r, m in zip(rs, n)], axis=0)
                    out.append({"features": feats, "conv_features": conv})
                else:
                    out.append(feats)
            else:
                raws.append(np.concatenate([r["raw_units"][:m] for r, m in zip(rs, n)], axis=0))
        if dense:
            return out
        if not self.is_linear:
            return [r.astype(np.int64) for r in raws]
        # blank filling runs over each utterance's concatenated chunks (as the original), per row
        T = _round_up(max(len(r) for r in raws), 64)
        batch = np.full((len(raws), T), self.blank_id, np.int32)
        lens = np.array([len(r) for r in raws], np.int32)
        for i, r in enumerate(raws):
            batch[i, :len(r)] = r
        filled = np.asarray(self._fill(jnp.asarray(batch), blank_id=self.blank_id, lengths=jnp.asarray(lens)))
        return [filled[i, :lens[i]].astype(np.int64) for i in range(len(raws))]

    def encode(self, audio: Any, *, dense: bool = False, sample_rate: int | None = None, channel: int | None = None,
               max_chunk: int | None = None, min_chunk: int | None = None) -> np.ndarray:
        """One utterance (path, bytes or array) → units (T,) int64, or (T, D) float32 with ``dense``."""
        wav = self.load(audio, sample_rate=sample_rate, channel=channel)
        return self._encode_many([wav], dense, max_chunk, min_chunk)[0]

    __call__ = encode

    def encode_dense(self, audio: Any, *, return_intermediates: bool = False, max_chunk: int | None = None,
                     min_chunk: int | None = None, sample_rate: int | None = None, channel: int | None = None):
        wav = self.load(audio, sample_rate=sample_rate, channel=channel)
        return self._encode_many([wav], True, max_chunk, min_chunk, intermediates=return_intermediates)[0]

    def encode_batch(self, audios: Sequence[Any], *, dense: bool = False, sample_rate: int | None = None,
                     channel: int | None = None, max_chunk: int | None = None,
                     min_chunk: int | None = None) -> list[np.ndarray]:
        """Many utterances in shared padded batches → a list of per-utterance results."""
        if isinstance(audios, (str, os.PathLike, bytes)) or (isinstance(audios, np.ndarray) and audios.ndim == 1):
            raise TokenizerInputError("encode_batch takes a list of utterances; use encode() for one")
        wavs = [self.load(a, sample_rate=sample_rate, channel=channel) for a in audios]
        if not wavs:
            return []
        return self._encode_many(wavs, dense, max_chunk, min_chunk)

    def quantizer_logits(self, features: np.ndarray) -> np.ndarray:
        """(T, D) features → (T, V+1) logits of the linear quantizer (an intermediate, for parity)."""
        if not self.is_linear:
            raise ValueError("quantizer_logits exists only for the linear quantizer")
        return np.asarray(self._logits(self._qparams, jnp.asarray(features, jnp.float32)))
