"""Pitch tokenizer: 16 kHz audio → F0 (200 Hz) → pitch units (12.5 Hz), as Spirit LM's
``spiritlm_expressive_f0()`` / ``F0Tokenizer(interpolate=True)`` (REFERENCE.md §5).

Backbones:

* ``"fcpe"`` (default): torchfcpe 0.0.4's bundled FCPE re-implemented in JAX
  (:mod:`spiritlm_jax.models.fcpe`), batched and jit-compiled end to end with the VQ-VAE.
* ``"pyaapt"``: the original's alternative, YAAPT from the ``amfm_decompy`` package (optional extra:
  ``pip install AMFM-decompy``), run on the host per row with the original's pre/post-processing;
  the VQ-VAE part is batched JAX.

Defined where the original crashes or is undefined:

* fully unvoiced audio (no frame with F0 ≥ 50 Hz): the original FCPE path raises IndexError inside
  torchfcpe. Here F0 = 0 Hz and V/UV = 0 on every frame, no mean is subtracted, and the VQ-VAE
  tokenizes that all-zero contour (a valid code sequence of the usual length).
* audio too short for one pitch unit raises :class:`~spiritlm_jax.audio.AudioError`: one unit needs
  ``(N//80 + 1) ≥ 16`` F0 frames (FCPE, N ≥ 1200 samples) or ``N//80 ≥ 16`` (pYAAPT, N ≥ 1280);
  ``dense=True`` (F0 only) accepts any non-empty input. (``SpiritLMTokenizer`` never sends chunks
  below 1280 samples.)

Batches: rows of any lengths give exactly their one-row results (the models mask every padded
frame). With a ``mesh``, the batch is split over its ``data``/``fsdp`` axes.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax import audio as audio_mod
from spiritlm_jax.audio import AudioError
from spiritlm_jax.models import f0_vqvae as vq
from spiritlm_jax.models import fcpe as fcpe_mod

BACKBONES = ("fcpe", "pyaapt")
HOP = 80
SAMPLE_RATE = 16000


# ------------------------------------------------------------------------------------------------
# pYAAPT (host side, numpy float64 like the original)
# ------------------------------------------------------------------------------------------------

def _require_amfm():
    try:
        import amfm_decompy.basic_tools as basic
        import amfm_decompy.pYAAPT as pYAAPT
    except ImportError as e:
        raise ImportError("the 'pyaapt' pitch backbone needs AMFM-decompy: pip install AMFM-decompy "
                          "(tested with 1.0.12.2, the version the golden cases were made with)") from e
    return basic, pYAAPT


def yaapt_f0(wav: np.ndarray, hop: int = HOP, sr: int = SAMPLE_RATE, interpolate: bool = True):
    """The original's ``pYAAPTF0Extractor`` (§5.3): → (f0 float64 (N//hop,), vuv bool)."""
    basic, pYAAPT = _require_amfm()
    from librosa.util import normalize
    from scipy.interpolate import interp1d

    wav = np.asarray(wav)
    frame_length = 20.0  # ms
    to_pad = int(frame_length / 1000 * sr) // 2
    wav = wav[: len(wav) // hop * hop]
    x = normalize(wav) * 0.95
    if hop == 80:
        x = np.pad(x, (to_pad, to_pad), "constant", constant_values=0)
    pitch = pYAAPT.yaapt(basic.SignalObj(x, sr), frame_length=frame_length, frame_space=hop / sr * 1000,
                         nccf_thresh1=0.25, tda_frame_length=25.0)
    f0 = pitch.samp_values
    if interpolate:
        t = np.arange(f0.shape[0])
        ii = f0 != 0
        if ii.sum() > 1:
            f0 = interp1d(t[ii], f0[ii], bounds_error=False, kind="linear", fill_value=0)(t)
            f0[: t[ii][0]] = f0[ii][0]
            f0[t[ii][-1] + 1:] = f0[ii][-1]
    return f0, pitch.vuv


def normalize_host(f0: np.ndarray, vuv: np.ndarray, normalize: bool) -> np.ndarray:
    """§5.4 on the host in the extractor's own dtype (float64 for pYAAPT, as the original's torch
    tensors), then cast to float32 like ``x.float()``."""
    f0 = np.array(f0, copy=True)
    if normalize:
        v = np.asarray(vuv) != 0
        nz = f0 != 0
        if v.any() and nz.any():
            f0[nz] = f0[nz] - np.mean(f0[v])
    return f0.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# jit-compiled kernels (module level so compilations are shared between tokenizer objects)
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("fcfg",))
def _fcpe_f0(fparams, fconsts, wav, lengths, *, fcfg):
    f0, vuv, _ = fcpe_mod.fcpe_f0(fparams, fconsts, wav, lengths, fcfg)
    return f0, vuv


@functools.partial(jax.jit, static_argnames=("fcfg", "vcfg"))
def _fcpe_codes(fparams, fconsts, vparams, wav, lengths, *, fcfg, vcfg):
    f0, vuv, _ = fcpe_mod.fcpe_f0(fparams, fconsts, wav, lengths, fcfg)
    n2 = lengths // fcfg.out_hop + 1
    valid = jnp.arange(f0.shape[1])[None, :] < n2[:, None]
    x = jnp.stack([vq.normalize_f0(f0, vuv, valid, vcfg.normalize), vuv], axis=-1)
    codes, _, ncodes = vq.encode(vparams, vcfg, x, n2)
    return codes, ncodes


@functools.partial(jax.jit, static_argnames=("vcfg",))
def _vq_codes(vparams, x, n, *, vcfg):
    codes, _, ncodes = vq.encode(vparams, vcfg, x, n)
    return codes, ncodes


@functools.partial(jax.jit, static_argnames=("vcfg",))
def _vq_debug(vparams, x, *, vcfg):
    codes, latent, _ = vq.encode(vparams, vcfg, x)
    return codes, latent, vq.reconstruct(vparams, vcfg, x)


FCPE_FOLDER = "fcpe"  # the converted FCPE weights, beside vqvae_f0_quantizer/ in a converted tree


def load_fcpe_model(path: str | os.PathLike | None = None) -> tuple:
    """(cfg, params, consts) of the FCPE pitch estimator: from a converted ``fcpe/`` folder (no torch,
    no torchfcpe), else from a torchfcpe ``.pt`` file, else from the installed torchfcpe wheel."""
    from spiritlm_jax import model_dir

    if path is not None and model_dir.is_converted(path):
        meta, params = model_dir.read_component(path, "fcpe", slot="the FCPE pitch estimator")
        cfg = model_dir.config_from_json(fcpe_mod.FCPEConfig, meta["config"], f"{path}/config.json")
        return cfg, {"net": params["net"]}, params["consts"]
    pt = path if path is not None and Path(path).is_file() else None
    model_dir.original_needs_torch(pt or "torchfcpe's bundled fcpe_c_v001.pt", "the FCPE weights")
    from spiritlm_jax.converters.fcpe import load_fcpe

    return load_fcpe(pt)


class PitchTokenizer:
    """Audio → pitch units (or F0 with ``dense=True``).

    ``PitchTokenizer.from_checkpoints(".../speech_tokenizer/vqvae_f0_quantizer")`` reads the VQ-VAE
    (converted or original) and, for the FCPE backbone, the FCPE weights: the converted ``fcpe/``
    folder beside it, else ``fcpe_path``, else the ones bundled in the installed torchfcpe 0.0.4.
    """

    def __init__(self, vqvae_cfg: vq.F0VQVAEConfig, vqvae_params, fcpe: tuple | None = None,
                 backbone: str = "fcpe", mesh: jax.sharding.Mesh | None = None, bucket: int = SAMPLE_RATE,
                 max_batch_samples: int = 160_000):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown pitch backbone {backbone!r}; choose one of {BACKBONES}")
        if backbone == "fcpe" and fcpe is None:
            raise ValueError("the 'fcpe' backbone needs the FCPE model: fcpe=(cfg, params, consts) from "
                             "spiritlm_jax.converters.fcpe.load_fcpe()")
        if backbone == "pyaapt":
            _require_amfm()
        if int(bucket) < 1:
            raise ValueError(f"bucket must be a positive number of samples, got {bucket}")
        self.backbone = backbone
        self.vcfg = vqvae_cfg
        self.mesh = mesh
        self.bucket = int(bucket)
        # FCPE's activations for many long rows spill the CPU caches: measured on 16 × 10 s, one call of
        # 16 rows took 1.96 s, 4 calls of 4 rows 1.58 s, 16 calls of 1 row 1.45 s. Rows are grouped by
        # length into calls of at most this many padded samples (never fewer rows than the mesh needs).
        self.max_batch_samples = int(max_batch_samples)
        self.stride = vqvae_cfg.encoder.total_stride
        rep = self._replicate
        self.vparams = rep(vqvae_params)
        if fcpe is not None:
            self.fcfg, fparams, fconsts = fcpe
            self.fparams = rep(fparams)
            self.fconsts = rep({k: np.asarray(v) for k, v in fconsts.items()})
        else:
            self.fcfg = None

    @classmethod
    def from_checkpoints(cls, vqvae_dir: str | os.PathLike, backbone: str = "fcpe",
                         fcpe_path: str | os.PathLike | None = None, **kw) -> "PitchTokenizer":
        from spiritlm_jax import model_dir

        vqvae_dir = Path(vqvae_dir)
        if model_dir.is_converted(vqvae_dir):
            meta, vparams = model_dir.read_component(vqvae_dir, "f0-vqvae", slot="the pitch VQ-VAE (vqvae_f0_quantizer)")
            vcfg = model_dir.config_from_json(vq.F0VQVAEConfig, meta["config"], f"{vqvae_dir}/config.json")
        else:
            model_dir.original_needs_torch(vqvae_dir, "the pitch VQ-VAE model.pt")
            from spiritlm_jax.converters.f0_vqvae import load_f0_vqvae

            vcfg, vparams = load_f0_vqvae(vqvae_dir)
        fcpe = None
        if backbone == "fcpe":
            fcpe = load_fcpe_model(fcpe_path if fcpe_path is not None else vqvae_dir.parent / FCPE_FOLDER)
        return cls(vcfg, vparams, fcpe=fcpe, backbone=backbone, **kw)

    # -- helpers ---------------------------------------------------------------------------------
    def _replicate(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        from spiritlm_jax.sharding import replicated

        return jax.device_put(tree, replicated(self.mesh))

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return int(self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1))

    def _put_batch(self, *arrays):
        if self.mesh is None:
            return [jnp.asarray(a) for a in arrays]
        from spiritlm_jax.sharding import named

        return [jax.device_put(a, named(self.mesh, "batch", *([None] * (a.ndim - 1)))) for a in arrays]

    @property
    def min_samples(self) -> int:
        """Fewest samples that give one pitch unit."""
        if self.backbone == "fcpe":
            return (self.stride - 1) * HOP
        return self.stride * HOP

    def _prepare(self, audios, need_codes: bool) -> list[np.ndarray]:
        waves = []
        for i, a in enumerate(audios):
            w = audio_mod.load_audio(a)
            if need_codes and len(w) < self.min_samples:
                raise AudioError(
                    f"audio {i} has {len(w)} samples ({len(w) / SAMPLE_RATE * 1000:.1f} ms at 16 kHz); one "
                    f"pitch unit needs at least {self.min_samples} samples with the {self.backbone} backbone. "
                    f"Pad it, or drop it as SpiritLMTokenizer does with chunks under 1280 samples.")
            waves.append(w)
        return waves

    def _pad(self, waves):
        wav, lengths = audio_mod.pad_batch(waves, multiple=self.bucket)
        m = self._batch_multiple()
        B = len(waves)
        Bp = -(-B // m) * m
        if Bp != B:  # filler rows (silence of the full length); their results are dropped
            wav = np.concatenate([wav, np.zeros((Bp - B, wav.shape[1]), np.float32)])
            lengths = np.concatenate([lengths, np.full(Bp - B, wav.shape[1], np.int32)])
        return wav, lengths

    # -- public API ------------------------------------------------------------------------------
    def f0(self, audios: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per input: (f0, vuv) at 200 Hz as the original's extractor returns them (FCPE: float32 and
        float32 0/1, N//80 + 1 frames; pYAAPT: float64 and bool, N//80 frames)."""
        waves = self._prepare(audios, need_codes=False)
        if self.backbone == "pyaapt":
            return [yaapt_f0(w) for w in waves]
        out = [None] * len(waves)
        for idx in self._groups(waves):
            wav, lengths = self._pad([waves[i] for i in idx])
            f0, vuv = _fcpe_f0(self.fparams, self.fconsts, *self._put_batch(wav, lengths), fcfg=self.fcfg)
            f0, vuv = np.asarray(f0), np.asarray(vuv)
            for k, i in enumerate(idx):
                n = len(waves[i]) // HOP + 1
                out[i] = (f0[k, :n], vuv[k, :n])
        return out

    def _groups(self, waves) -> list[list[int]]:
        """Row indices grouped (by length) into calls of at most ``max_batch_samples`` padded samples."""
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        groups, cur = [], []
        for i in order:
            padded = -(-len(waves[i]) // self.bucket) * self.bucket
            if cur and (len(cur) + 1) * padded > self.max_batch_samples and len(cur) >= self._batch_multiple():
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        return groups

    def encode_batch(self, audios: Sequence[Any], dense: bool = False) -> list[np.ndarray]:
        """A list of 16 kHz waveforms (any lengths) → a list of pitch-unit arrays (int32), or of F0
        arrays with ``dense=True``."""
        if isinstance(audios, (str, bytes, os.PathLike)) or (isinstance(audios, np.ndarray) and audios.ndim == 1):
            raise ValueError("encode_batch takes a list of waveforms; for one waveform call the tokenizer directly")
        if len(audios) == 0:
            raise ValueError("encode_batch got an empty list")
        if dense:
            return [f for f, _ in self.f0(audios)]
        waves = self._prepare(audios, need_codes=True)
        if self.backbone == "fcpe":
            out = [None] * len(waves)
            for idx in self._groups(waves):
                wav, lengths = self._pad([waves[i] for i in idx])
                codes, ncodes = _fcpe_codes(self.fparams, self.fconsts, self.vparams, *self._put_batch(wav, lengths),
                                            fcfg=self.fcfg, vcfg=self.vcfg)
                codes, ncodes = np.asarray(codes), np.asarray(ncodes)
                for k, i in enumerate(idx):
                    out[i] = codes[k, : ncodes[k]]
            return out
        else:
            x, n = self._pyaapt_inputs(waves)
            codes, ncodes = _vq_codes(self.vparams, *self._put_batch(x, n), vcfg=self.vcfg)
        codes, ncodes = np.asarray(codes), np.asarray(ncodes)
        return [codes[i, : ncodes[i]] for i in range(len(waves))]

    def _pyaapt_inputs(self, waves):
        rows = []
        for w in waves:
            f0, vuv = yaapt_f0(w)
            rows.append(np.stack([normalize_host(f0, vuv, self.vcfg.normalize), np.asarray(vuv, np.float32)], -1))
        n = np.array([len(r) for r in rows], np.int32)
        T = -(-int(n.max()) // (self.bucket // HOP)) * (self.bucket // HOP)
        m = self._batch_multiple()
        Bp = -(-len(rows) // m) * m
        x = np.zeros((Bp, T, 2), np.float32)
        for i, r in enumerate(rows):
            x[i, : len(r)] = r
        n = np.concatenate([n, np.full(Bp - len(rows), T, np.int32)])
        return x, n

    def __call__(self, audio: Any, dense: bool = False) -> np.ndarray:
        """One waveform (array at 16 kHz, or a path) → pitch units (T,) int32; F0 with ``dense=True``."""
        return self.encode_batch([audio], dense=dense)[0]

    def debug(self, audio: Any) -> dict[str, np.ndarray]:
        """Every intermediate of one waveform, in the original's terms (unbatched; for parity):
        f0, vuv, vqvae_input (T, 2), latent (T_codes, C), codes, reconstruction (T_codes·stride, 2)."""
        w = self._prepare([audio], need_codes=True)[0]
        if self.backbone == "fcpe":
            f0, vuv = self.f0([w])[0]
            valid = np.ones((1, len(f0)), bool)
            f0n = np.asarray(vq.normalize_f0(jnp.asarray(f0)[None], jnp.asarray(vuv)[None], valid, self.vcfg.normalize))[0]
        else:
            f0, vuv = yaapt_f0(w)
            f0n = normalize_host(f0, vuv, self.vcfg.normalize)
        x = np.stack([f0n, np.asarray(vuv, np.float32)], -1)[None]
        codes, latent, rec = _vq_debug(self.vparams, jnp.asarray(x), vcfg=self.vcfg)
        return {"f0": f0, "vuv": vuv, "vqvae_input": x[0], "latent": np.asarray(latent[0]),
                "codes": np.asarray(codes[0]), "reconstruction": np.asarray(rec[0])}
