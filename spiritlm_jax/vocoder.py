"""High-level HiFi-GAN unit vocoder: the original ``HifiGANVocoder.forward`` semantics (REFERENCE
§7.1, §7.3, §8.4) on top of the Flax model, batched, bucketed, streamable and shardable.

    voc = HifiGANVocoder.from_pretrained("checkpoints/speech_tokenizer/hifigan_spiritlm_base")
    wav = voc.vocode({"hubert": units})                       # 16 kHz float32, 1-D
    wavs = voc.vocode_batch([{"hubert": u1}, {"hubert": u2}])   # one jit call for the generator
    for block in voc.stream({"hubert": long_units}): play(block)

Input semantics (as the original):
* unit arrays may be space-separated strings, lists or int arrays;
* ``hubert`` units are de-duplicated (consecutive repeats collapsed) iff ``dur_pred and not
  not_dedup_code``; pitch/style codes are never de-duplicated;
* positions with a negative unit id are dropped after de-duplication (the original's "invalid
  code" mask); with ``dur_pred`` the pitch/style codes at those positions are dropped too (the
  original asserts equal lengths instead);
* ``dur_pred=True``: one predicted duration per unit, applied to unit, pitch and style-code
  embeddings; pitch/style codes must be per unit (same length as the units);
  ``dur_pred=False``: pitch codes are upsampled ×``hubert_to_f0`` (2) and style codes
  ×``hubert_to_style`` (25): repeat, extend with the last value, truncate; ``|K·u − N| / u ≤ 1``
  is required;
* ``speaker_id=None`` → the default speaker, ``style_id=None`` → the default style (Base).
* A Base vocoder (no pitch/style tables) ignores ``pitch``/``style`` entries (as ``decode`` does).

Defined behaviours where the original crashes (documented divergences):
* an empty unit sequence (or one whose units are all negative) gives an EMPTY waveform
  (``np.zeros(0, float32)``), not a conv error;
* every bad id is refused BEFORE any computation with a ``VocoderInputError`` naming it: unit ids
  ``≥ num_embeddings`` (e.g. ``[Hu500]``, which the LM can emit but a 500-row table cannot embed),
  pitch/style codes outside their tables, unknown speaker or style ids;
* an Expressive vocoder called without pitch codes (the original raises ``KeyError: 'f0_code'``)
  or without style codes raises ``VocoderInputError`` saying what to pass.

Shapes: unit and frame lengths are padded up to buckets (``bucket_length``) so repeated calls reuse
compiled programs; batches are padded to a multiple of the mesh's batch-axis size when sharded.
Durations run as one small jit call, the generator as a second one (the output length depends on
the predicted durations, so it must be known on the host before the generator's shape is fixed).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.buckets import bucket_length  # noqa: F401  (re-exported: the one bucketing rule)
from spiritlm_jax.models.hifigan import CodeHifiGAN, HifiGANConfig


class VocoderInputError(ValueError):
    """A vocoder input that the model cannot synthesise (bad ids, misaligned codes, …)."""


class VocoderSlotError(ValueError):
    """A vocoder folder holds the other variant's vocoder (e.g. a Base one in the Expressive slot)."""


VOCODER_FOLDERS = {"base": "hifigan_spiritlm_base", "expressive": "hifigan_spiritlm_expressive_w2v2"}


def vocoder_variant(cfg: HifiGANConfig) -> str:
    """"expressive" for a vocoder with pitch- and style-code tables, else "base"."""
    return "expressive" if cfg.num_f0_tokens and cfg.num_style_tokens else "base"


def check_vocoder_slot(folder: str | Path, cfg: HifiGANConfig, variant: str | None) -> None:
    if variant is None:
        return
    got = vocoder_variant(cfg)
    if got != variant:
        raise VocoderSlotError(
            f"{folder} holds a {got.capitalize()} vocoder (its config {'has' if got == 'expressive' else 'lacks'} "
            f"pitch/style code tables) but sits in the {variant.capitalize()} slot; the {got.capitalize()} vocoder "
            f"belongs in speech_tokenizer/{VOCODER_FOLDERS[got]}/ and the {variant.capitalize()} one in "
            f"speech_tokenizer/{VOCODER_FOLDERS[variant]}/")


def read_names(p: Path) -> list[str] | None:
    """speakers.txt / styles.txt: one name per line (None when the file is absent)."""
    if not p.exists():
        return None
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, str):
        parts = x.split()
        try:
            return np.array([int(p) for p in parts], dtype=np.int64)
        except ValueError as e:
            raise VocoderInputError(f"{name}: a unit string must be space-separated integers ({e})") from None
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise VocoderInputError(f"{name}: expected integer ids, got dtype {a.dtype}")
    return a.reshape(-1).astype(np.int64)


def _dedup(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return a
    keep = np.ones(a.shape, bool)
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def _upsample_codes(codes: np.ndarray, n: int, u: int, name: str) -> np.ndarray:
    """Original ``upsample``: repeat ×u, extend with the last value, truncate to n."""
    k = codes.size
    if k == 0:
        raise VocoderInputError(f"{name}: empty code sequence for {n} units")
    if abs(k * u - n) / u > 1:
        raise VocoderInputError(
            f"{name}: {k} codes cannot be aligned to {n} units at {u} units per code (|{k}*{u} - {n}| / {u} > 1); "
            f"pass one code per {u} units, or per-unit codes with dur_pred=True")
    up = np.repeat(codes, u)
    if up.size < n:
        up = np.concatenate([up, np.full(n - up.size, up[-1], up.dtype)])
    return up[:n]


@dataclasses.dataclass
class _Row:
    code: np.ndarray  # units fed to the generator (after dedup / negative removal)
    f0: np.ndarray | None  # per unit (aligned)
    style_code: np.ndarray | None
    speaker: int
    style: int
    dur_pred: bool


class HifiGANVocoder:
    def __init__(self, cfg: HifiGANConfig, params: Mapping[str, Any], *, default_speaker: int = 2,
                 default_style: int = 8, speakers: Sequence[str] | None = None,
                 styles: Sequence[str] | None = None, mesh=None, chunk_frames: int = 96):
        self.cfg = cfg
        self.default_speaker = default_speaker
        self.default_style = default_style
        self.speakers = list(speakers) if speakers is not None else None
        self.styles = list(styles) if styles is not None else None
        self.mesh = mesh
        self.chunk_frames = int(chunk_frames)
        self.margin_frames = cfg.receptive_margin_frames()
        self._model = CodeHifiGAN(cfg)
        self._batch_sharding = self._replicated = None
        if mesh is not None:
            from spiritlm_jax import sharding

            self._batch_sharding = sharding.named(mesh, "batch", None)
            self._batch1_sharding = sharding.named(mesh, "batch")
            self._replicated = sharding.replicated(mesh)
            self._batch_multiple = math.prod(
                mesh.shape[a] for a in (sharding.logical_spec("batch")[0] or ()) if a is not None)
            params = jax.device_put(params, self._replicated)
        else:
            self._batch_multiple = 1
            params = jax.device_put(params)
        self.params = params
        model = self._model

        def _dur(p, codes, lengths):
            return model.apply({"params": p}, codes, lengths, method=CodeHifiGAN.durations)

        def _gen(p, codes, f0, sc, spk, sty, start, end):
            return model.apply({"params": p}, codes, f0, sc, spk, sty, start, end)

        self._dur_fn = jax.jit(_dur)
        self._gen_fn = jax.jit(_gen)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, *, variant: str | None = None, **kwargs) -> "HifiGANVocoder":
        """Load a ``hifigan_*`` directory: converted (config.json + model.safetensors + names; no torch)
        or original (config.json + generator.pt + names; converted on the fly, needs torch).

        ``variant`` ("base" / "expressive"): the slot the caller loads it for; a vocoder of the other
        variant is refused with :class:`VocoderSlotError` naming the folder and both variants."""
        from spiritlm_jax import model_dir

        d = Path(ckpt_dir)
        if model_dir.is_converted(d):
            meta, params = model_dir.read_component(d, "hifigan", slot="the HiFi-GAN vocoder")
            cfg = model_dir.config_from_json(HifiGANConfig, meta["config"], f"{d}/config.json")
            speakers, styles = read_names(d / "speakers.txt"), read_names(d / "styles.txt")
        else:
            model_dir.original_needs_torch(d, "the HiFi-GAN generator.pt")
            from spiritlm_jax.converters.hifigan import load_hifigan

            ck = load_hifigan(d)
            cfg, params, speakers, styles = ck.cfg, ck.params, ck.speakers, ck.styles
        check_vocoder_slot(d, cfg, variant)
        return cls(cfg, params, speakers=speakers, styles=styles, **kwargs)

    @property
    def sample_rate(self) -> int:
        return 16000

    @property
    def hop(self) -> int:
        return self.cfg.hop

    # ------------------------------------------------------------------------------- input checks
    def _prepare(self, units: Mapping[str, Any] | str | Sequence[int] | np.ndarray, speaker_id, style_id,
                 dur_pred: bool, not_dedup_code: bool) -> _Row:
        c = self.cfg
        if not isinstance(units, Mapping):
            units = {"hubert": units}
        if "hubert" not in units:
            raise VocoderInputError(f"units must have a 'hubert' entry (got keys {sorted(units)})")
        if dur_pred and not c.has_dur_predictor:
            raise VocoderInputError("dur_pred=True but this vocoder has no duration predictor; pass dur_pred=False")
        code = _as_int_array(units["hubert"], "hubert")
        if dur_pred and not not_dedup_code:
            code = _dedup(code)
        keep = code >= 0
        code = code[keep]
        if code.size and code.max() >= c.num_embeddings:
            bad = sorted(set(int(v) for v in code[code >= c.num_embeddings]))
            raise VocoderInputError(
                f"hubert unit id(s) {bad[:10]} are outside the vocoder's unit table (0..{c.num_embeddings - 1}). "
                f"The LM vocabulary has [Hu0]..[Hu500] but the tokenizer only produces 0..499; "
                f"drop or replace such units before vocoding")

        def aligned(key: str, table: int, up: int, label: str):
            if not table:
                return None  # Base: pitch/style entries are ignored
            if units.get(key) is None:
                raise VocoderInputError(
                    f"this Expressive vocoder needs {label} codes ('{key}' entry) but none were given "
                    f"(the original fails with KeyError here); a speech string needs at least one "
                    f"[{'Pi' if key == 'pitch' else 'St'}N] token")
            a = _as_int_array(units[key], key)
            if a.size and (a.min() < 0 or a.max() >= table):
                bad = sorted(set(int(v) for v in a[(a < 0) | (a >= table)]))
                raise VocoderInputError(f"{label} code(s) {bad[:10]} are outside the table 0..{table - 1}")
            if dur_pred:
                if a.size == keep.size:
                    a = a[keep]
                elif a.size != code.size:
                    raise VocoderInputError(
                        f"with dur_pred=True the {label} codes must be per unit: got {a.size} codes for "
                        f"{code.size} units; pass dur_pred=False to upsample {label} codes by {up}")
                return a
            if code.size == 0:
                return np.zeros(0, np.int64)
            return _upsample_codes(a, code.size, up, key)

        f0 = aligned("pitch", c.num_f0_tokens, c.hubert_to_f0, "pitch")
        sc = aligned("style", c.num_style_tokens, c.hubert_to_style, "style")
        spk = sty = 0
        if c.num_speakers:
            spk = self.default_speaker if speaker_id is None else speaker_id
            if not isinstance(spk, (int, np.integer)) or not 0 <= int(spk) < c.num_speakers:
                names = f" ({', '.join(self.speakers)})" if self.speakers else ""
                raise VocoderInputError(f"speaker_id {spk!r} is not one of the vocoder's speakers 0..{c.num_speakers - 1}{names}")
        if c.num_styles:
            sty = self.default_style if style_id is None else style_id
            if not isinstance(sty, (int, np.integer)) or not 0 <= int(sty) < c.num_styles:
                raise VocoderInputError(f"style_id {sty!r} is not one of the vocoder's styles 0..{c.num_styles - 1}")
        return _Row(code, f0, sc, int(spk), int(sty), bool(dur_pred))

    # ------------------------------------------------------------------------------- device calls
    def _pad_batch(self, b: int) -> int:
        m = self._batch_multiple
        return -(-b // m) * m

    def _put(self, arr: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(arr)
        return jax.device_put(arr, self._batch_sharding if arr.ndim == 2 else self._batch1_sharding)

    def _durations(self, codes: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        b = self._pad_batch(len(codes))
        t = bucket_length(max(x.size for x in codes))
        ids = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, x in enumerate(codes):
            ids[i, :x.size] = x
            lengths[i] = x.size
        log_d, d = self._dur_fn(self.params, self._put(ids), self._put(lengths))
        log_d, d = np.asarray(log_d), np.asarray(d)
        return [(log_d[i, :x.size], d[i, :x.size]) for i, x in enumerate(codes)]

    def _frames(self, row: _Row, d: np.ndarray | None):
        """Per-frame ids (code, f0, style_code) after duration repetition."""
        rep = (lambda a: np.repeat(a, d)) if d is not None else (lambda a: a)
        code = rep(row.code)
        f0 = rep(row.f0) if row.f0 is not None else np.zeros_like(code)
        sc = rep(row.style_code) if row.style_code is not None else np.zeros_like(code)
        return code, f0, sc

    def _generate(self, frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], spk: list[int], sty: list[int],
                  starts: list[int] | None = None, ends: list[int] | None = None, length: int | None = None):
        """One generator call on a batch of per-frame id rows → (B, T·hop) numpy."""
        b = self._pad_batch(len(frames))
        t = length if length is not None else bucket_length(max(f[0].size for f in frames))
        arrs = np.zeros((3, b, t), np.int32)
        st = np.zeros((b,), np.int32)
        en = np.zeros((b,), np.int32)
        sp = np.zeros((b,), np.int32)
        sy = np.zeros((b,), np.int32)
        for i, f in enumerate(frames):
            for j in range(3):
                arrs[j, i, :f[j].size] = f[j]
            st[i] = 0 if starts is None else starts[i]
            en[i] = f[0].size if ends is None else ends[i]
            sp[i], sy[i] = spk[i], sty[i]
        wav = self._gen_fn(self.params, *(self._put(a) for a in arrs), *(self._put(a) for a in (sp, sy, st, en)))
        return np.asarray(wav)

    def _vocode_rows(self, rows: list[_Row]):
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows)
        infos: list[dict] = [dict() for _ in rows]
        live = [i for i, r in enumerate(rows) if r.code.size]
        durs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        need = [i for i in live if rows[i].dur_pred]
        if need:
            for i, res in zip(need, self._durations([rows[i].code for i in need])):
                durs[i] = res
        frames = []
        for i in live:
            d = durs[i][1] if i in durs else None
            frames.append(self._frames(rows[i], d))
        for i, r in enumerate(rows):
            infos[i] = {"code": r.code, "f0_code": r.f0, "style_code": r.style_code}
            if i in durs:
                infos[i]["log_dur"], infos[i]["dur"] = durs[i]
        if live:
            wav = self._generate(frames, [rows[i].speaker for i in live], [rows[i].style for i in live])
            for k, i in enumerate(live):
                infos[i]["frames_code"], infos[i]["frames_f0"], infos[i]["frames_style"] = frames[k]
                out[i] = np.ascontiguousarray(wav[k, :frames[k][0].size * self.hop], dtype=np.float32)
        return out, infos

    # ------------------------------------------------------------------------------- public API
    def vocode(self, units, speaker_id: int | None = 2, style_id: int | None = None, dur_pred: bool = True,
               not_dedup_code: bool = False) -> np.ndarray:
        """Units → 16 kHz float32 waveform (1-D), as the original ``HifiGANVocoder.forward``."""
        return self.vocode_with_details(units, speaker_id, style_id, dur_pred, not_dedup_code)[0]

    def vocode_with_details(self, units, speaker_id: int | None = 2, style_id: int | None = None,
                            dur_pred: bool = True, not_dedup_code: bool = False) -> tuple[np.ndarray, dict]:
        """``vocode`` plus what the generator was fed: ``code``, ``f0_code``, ``style_code`` (per unit),
        ``log_dur``/``dur`` (when predicted) and the per-frame ids."""
        row = self._prepare(units, speaker_id, style_id, dur_pred, not_dedup_code)
        wavs, infos = self._vocode_rows([row])
        return wavs[0], infos[0]

    def vocode_batch(self, batch: Sequence[Any], speaker_id: int | Sequence[int | None] | None = 2,
                     style_id: int | Sequence[int | None] | None = None, dur_pred: bool = True,
                     not_dedup_code: bool = False) -> list[np.ndarray]:
        """B unit sequences of any lengths → B waveforms; each equals its ``vocode`` output. The
        duration predictor runs once on the batch, the generator once (padded to a bucket)."""
        n = len(batch)
        spk = list(speaker_id) if isinstance(speaker_id, (list, tuple, np.ndarray)) else [speaker_id] * n
        sty = list(style_id) if isinstance(style_id, (list, tuple, np.ndarray)) else [style_id] * n
        if len(spk) != n or len(sty) != n:
            raise VocoderInputError(f"got {n} sequences but {len(spk)} speaker ids and {len(sty)} style ids")
        rows = [self._prepare(u, s, y, dur_pred, not_dedup_code) for u, s, y in zip(batch, spk, sty)]
        if not rows:
            return []
        return self._vocode_rows(rows)[0]

    def stream(self, units, speaker_id: int | None = 2, style_id: int | None = None, dur_pred: bool = True,
               not_dedup_code: bool = False, chunk_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield the waveform in consecutive blocks of ``chunk_frames`` frames (× hop samples; the last
        may be shorter). Each block is synthesised from a window with ``margin_frames`` of context on
        both sides (≥ the generator's receptive field), so the concatenation equals ``vocode``'s
        output up to float rounding. Every window has one shape: one compiled program."""
        cf = int(chunk_frames or self.chunk_frames)
        if cf <= 0:
            raise VocoderInputError(f"chunk_frames must be positive, got {cf}")
        row = self._prepare(units, speaker_id, style_id, dur_pred, not_dedup_code)
        if row.code.size == 0:
            return
        d = self._durations([row.code])[0][1] if row.dur_pred else None
        code, f0, sc = self._frames(row, d)
        t = code.size
        m = self.margin_frames
        w = cf + 2 * m
        hop = self.hop
        for s in range(0, t, cf):
            lo, hi = s - m, s + cf + m
            src_lo, src_hi = max(0, lo), min(t, hi)
            win = []
            for a in (code, f0, sc):
                buf = np.zeros(w, np.int64)
                buf[src_lo - lo:src_hi - lo] = a[src_lo:src_hi]
                win.append(buf)
            wav = self._generate([tuple(win)], [row.speaker], [row.style], starts=[src_lo - lo],
                                 ends=[src_hi - lo], length=w)
            n = min(cf, t - s)
            yield np.ascontiguousarray(wav[0, m * hop:(m + n) * hop], dtype=np.float32)
