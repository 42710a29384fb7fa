"""Spirit LM text tokenizer and vocabulary layout, on the ``sentencepiece`` package alone.

The reference loads ``tokenizer.model`` with ``transformers.LlamaTokenizer(add_bos_token=True,
add_eos_token=False)``; in transformers 5 that is a ``tokenizers`` backend converted from the
SentencePiece model. It differs from a raw ``SentencePieceProcessor.encode`` in three ways, all
reproduced here (REFERENCE.md §9.1, trap 38; pinned by golden ids and a live transformers oracle in
tests/test_text.py):

1. Added tokens. Every USER_DEFINED piece (``[Text]``, ``[Speech]``, ``[HuN]``, ``[PiN]``, ``[StN]``)
   and the special pieces ``<unk>``, ``<s>``, ``</s>`` are matched in the raw text first (leftmost,
   longest) and become their ids; only the text between them is BPE-encoded. So a literal ``"<s>"``
   in the text is the BOS id, as in the reference, while SentencePiece would spell it out.
2. The dummy-prefix rule ("Metaspace, prepend_scheme=first", i.e. ``legacy`` false in
   ``tokenizer_config.json``; ``legacy: true`` and ``add_prefix_space: false`` are honoured too): spaces become ``▁`` and a ``▁`` is
   prepended ONLY to the text segment that starts at character 0 of the input, and only if it does
   not already start with ``▁``. SentencePiece instead prepends ``▁`` to the whole string, hence
   its extra lone ``▁`` piece before a leading marker (``"[Text]The"`` → ``▁ [Text] T h e``, where
   the reference gives ``[Text] T h e``) and an extra ``▁`` before a leading space
   (``" hi"`` → ``▁▁ h i`` instead of ``▁h i``).
3. Decoding: ids → pieces (special ids dropped with ``skip_special_tokens``; ids without a piece
   dropped), ``▁`` → space, runs of byte pieces ``<0xNN>`` decoded as UTF-8 (an invalid run gives one
   U+FFFD per byte), concatenated, then ONE leading space removed. No clean-up of spaces.

Each text segment is BPE-encoded by SentencePiece itself, with the model's ``add_dummy_prefix``
switched off (the prefix is handled by rule 2), which reproduces the reference's merges.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["VocabError", "Vocab", "TextTokenizer"]

_SPACE = "\u2581"  # ▁


class VocabError(ValueError):
    """The tokenizer files do not have Spirit LM's vocabulary layout."""


def _block(pieces_to_id: dict[str, int], prefix: str, where: str) -> range:
    """Ids of ``[<prefix>0]``, ``[<prefix>1]``, … which must be contiguous (id = base + n)."""
    if f"[{prefix}0]" not in pieces_to_id:
        return range(0)
    base = pieces_to_id[f"[{prefix}0]"]
    n = 0
    while f"[{prefix}{n}]" in pieces_to_id:
        if pieces_to_id[f"[{prefix}{n}]"] != base + n:
            raise VocabError(
                f"{where}: [{prefix}{n}] has id {pieces_to_id[f'[{prefix}{n}]']}, expected {base + n}: "
                f"Spirit LM needs the [{prefix}N] pieces at contiguous ids"
            )
        n += 1
    return range(base, base + n)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Spirit LM's id layout (REFERENCE.md §9.1), derived from the tokenizer pieces and the model config.

    ``n_tokens`` ids have a tokenizer piece; ``n_embed`` is the model's embedding/logit rows
    (``config.json: vocab_size``); rows ``n_tokens..n_embed-1`` are padding rows without a token.
    """

    n_tokens: int
    n_embed: int
    text_marker: int  # [Text]
    speech_marker: int  # [Speech]
    hubert: range  # [Hu0]..
    pitch: range  # [Pi0].. (empty for a tokenizer without them)
    style: range  # [St0]..
    bos_id: int
    eos_id: int
    unk_id: int
    special_ids: frozenset  # dropped by skip_special_tokens decoding

    @property
    def text(self) -> range:
        """Ordinary text ids: everything below the first marker (0..31999 in Spirit LM)."""
        return range(0, min(self.text_marker, self.speech_marker))

    @property
    def padding(self) -> range:
        return range(self.n_tokens, self.n_embed)

    def hubert_id(self, n: int) -> int:
        return self._unit_id(self.hubert, n, "Hu")

    def pitch_id(self, n: int) -> int:
        return self._unit_id(self.pitch, n, "Pi")

    def style_id(self, n: int) -> int:
        return self._unit_id(self.style, n, "St")

    @staticmethod
    def _unit_id(r: range, n: int, name: str) -> int:
        if not 0 <= n < len(r):
            raise VocabError(f"[{name}{n}] is not in the vocabulary ({len(r)} [{name}N] tokens)")
        return r.start + n

    @classmethod
    def from_pieces(cls, pieces: Sequence[str], n_embed: int | None = None, *, bos_id: int = 1, eos_id: int = 2,
                    unk_id: int = 0, special_ids: Iterable[int] | None = None, where: str = "tokenizer") -> "Vocab":
        p2i = {p: i for i, p in enumerate(pieces)}
        for m in ("[Text]", "[Speech]"):
            if m not in p2i:
                raise VocabError(f"{where}: no {m} piece; this is not a Spirit LM tokenizer")
        hub = _block(p2i, "Hu", where)
        if not len(hub):
            raise VocabError(f"{where}: no [HuN] pieces; this is not a Spirit LM tokenizer")
        n_tokens = len(pieces)
        n_embed = n_tokens if n_embed is None else int(n_embed)
        if n_embed < n_tokens:
            raise VocabError(f"{where}: the model has {n_embed} embedding rows but the tokenizer has {n_tokens} "
                             f"pieces; the tokenizer does not belong to this model")
        specials = frozenset(special_ids if special_ids is not None else (unk_id, bos_id, eos_id))
        return cls(n_tokens, n_embed, p2i["[Text]"], p2i["[Speech]"], hub, _block(p2i, "Pi", where),
                   _block(p2i, "St", where), bos_id, eos_id, unk_id, specials)

    @classmethod
    def spiritlm_default(cls, expressive: bool = True) -> "Vocab":
        """The layout the original's ``get_forbidden_tokens`` hard-codes (7B checkpoints)."""
        if expressive:
            return cls(32667, 32768, 32000, 32001, range(32002, 32503), range(32503, 32567), range(32567, 32667),
                       1, 2, 0, frozenset({0, 1, 2}))
        return cls(32503, 32512, 32000, 32001, range(32002, 32503), range(0), range(0), 1, 2, 0,
                   frozenset({0, 1, 2}))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise VocabError(f"{path} is not valid JSON: {e}") from e


class TextTokenizer:
    """Encode/decode exactly as the reference's ``LlamaTokenizer`` (see module docstring)."""

    def __init__(self, model_file: str | os.PathLike, *, add_bos: bool = True, add_eos: bool = False,
                 n_embed: int | None = None, legacy: bool = False, add_prefix_space: bool = True):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover
            raise ImportError("the text tokenizer needs the `sentencepiece` package (pip install sentencepiece)") from e
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_file} (expected a SentencePiece "
                                    f"tokenizer.model in the LM checkpoint folder)")
        self._model_file = model_file
        # The ModelProto is read with a minimal wire-format reader (_SpModel) rather than sentencepiece's
        # generated protobuf module, whose protobuf-runtime requirement conflicts with apache-beam's pin.
        try:
            model = _SpModel(model_file.read_bytes())
        except Exception as e:
            raise VocabError(f"{model_file} is not a SentencePiece model: {e}") from e
        if not model.pieces:
            raise VocabError(f"{model_file} is not a SentencePiece model (no pieces)")
        self.pieces: list[str] = [p for p, _ in model.pieces]
        types = [t for _, t in model.pieces]
        bos, eos, unk, pad = model.bos_id, model.eos_id, model.unk_id, model.pad_id
        # Added tokens of the reference: the special pieces (unk/bos/eos/pad that exist) and every
        # USER_DEFINED piece; matched leftmost-longest in the raw text.
        special_ids = sorted(i for i in (unk, bos, eos, pad) if 0 <= i < len(self.pieces))
        user_ids = [i for i, t in enumerate(types) if t == _SpModel.USER_DEFINED]
        self._added: dict[str, int] = {self.pieces[i]: i for i in user_ids + special_ids}
        alts = sorted(self._added, key=lambda s: (-len(s), s))
        self._added_re = re.compile("|".join(re.escape(a) for a in alts)) if alts else None
        self._byte_ids = {i for i, t in enumerate(types) if t == _SpModel.BYTE}
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab = Vocab.from_pieces(self.pieces, n_embed, bos_id=bos, eos_id=eos, unk_id=unk,
                                       special_ids=special_ids, where=str(model_file))
        # The dummy prefix is applied by our own rule; SentencePiece only does the BPE of each segment.
        self._sp = spm.SentencePieceProcessor(model_proto=model.without_dummy_prefix())
        # The reference's Metaspace prepend scheme (transformers 5 `_get_prepend_scheme`): "first" for
        # legacy=False (its LlamaTokenizer default; Spirit LM's files), "always" for legacy=True (every
        # text segment, also after a marker), "never" without add_prefix_space; the decoder strips one
        # leading space only when add_prefix_space is on.
        self._dummy_prefix = bool(add_prefix_space)
        self._prepend = ("first" if not legacy else "always") if add_prefix_space else "never"

    @classmethod
    def from_dir(cls, path: str | os.PathLike, n_embed: int | None = None) -> "TextTokenizer":
        """Load ``tokenizer.model`` (+ ``tokenizer_config.json``/``config.json`` when present) from an LM folder.

        The reference forces ``add_bos_token=True, add_eos_token=False`` whatever the files say;
        ``legacy`` (default False) and ``add_prefix_space`` (default True) come from
        ``tokenizer_config.json``. ``n_embed`` defaults to ``config.json: vocab_size``.
        """
        path = Path(path)
        if n_embed is None:
            cfg = _read_json(path / "config.json")
            # an HF config.json, or ours from 'spiritlm-jax convert' ({"format": ..., "llama": {...}})
            n_embed = cfg.get("vocab_size", cfg.get("llama", {}).get("vocab_size"))
        tcfg = _read_json(path / "tokenizer_config.json")
        aps = tcfg.get("add_prefix_space")
        return cls(path / "tokenizer.model", add_bos=True, add_eos=False, n_embed=n_embed,
                   legacy=bool(tcfg.get("legacy", False)), add_prefix_space=True if aps is None else bool(aps))

    def __len__(self) -> int:
        return len(self.pieces)

    # ---------------------------------------------------------------- encode
    def _split(self, text: str):
        """Yield (segment, is_added_token, start_offset)."""
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > pos:
                    yield text[pos:m.start()], False, pos
                yield m.group(0), True, m.start()
                pos = m.end()
        if pos < len(text):
            yield text[pos:], False, pos

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a str prompt, got {type(text).__name__}")
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            ids.append(self.vocab.bos_id)
        for seg, added, start in self._split(text):
            if added:
                ids.append(self._added[seg])
                continue
            seg = seg.replace(" ", _SPACE)
            if (self._prepend == "always" or (self._prepend == "first" and start == 0)) and not seg.startswith(_SPACE):
                seg = _SPACE + seg
            ids.extend(self._sp.encode(seg))
        if self.add_eos if add_eos is None else add_eos:
            ids.append(self.vocab.eos_id)
        return ids

    __call__ = encode

    # ---------------------------------------------------------------- decode
    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"decode expects a 1-D sequence of int ids, got shape {arr.shape} dtype {arr.dtype}")
        n = len(self.pieces)
        skip = self.vocab.special_ids if skip_special_tokens else frozenset()
        out: list[str] = []
        pending = bytearray()
        npend = 0

        def flush():
            nonlocal pending, npend
            if npend:
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * npend)
                pending, npend = bytearray(), 0

        for i in arr.tolist():
            if i < 0 or i >= n or i in skip:  # ids without a piece (padding rows) have no text
                continue
            piece = self.pieces[i]
            b = _byte_value(piece)
            if b is not None:
                pending.append(b)
                npend += 1
                continue
            flush()
            out.append(piece.replace(_SPACE, " "))
        flush()
        s = "".join(out)
        return s[1:] if self._dummy_prefix and s.startswith(" ") else s

    def batch_decode(self, batch, *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]


def encode_varint(x: int) -> bytes:
    """A non-negative int as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


class _SpModel:
    """The parts of a SentencePiece ``ModelProto`` we need, read straight from the protobuf wire format.

    Fields (sentencepiece_model.proto): ModelProto.pieces = 1 (SentencePiece: piece = 1, score = 2,
    type = 3), trainer_spec = 2 (unk_id = 40, bos_id = 41, eos_id = 42, pad_id = 43), normalizer_spec = 3
    (add_dummy_prefix = 3).
    """

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

    def __init__(self, buf: bytes):
        self.buf = buf
        self.pieces: list[tuple[str, int]] = []
        ids = {40: 0, 41: 1, 42: 2, 43: -1}  # proto defaults
        for field, wire, val in self._fields(buf):
            if field == 1 and wire == 2:
                piece, typ = "", self.NORMAL
                for f2, w2, v2 in self._fields(val):
                    if f2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif f2 == 3 and w2 == 0:
                        typ = v2
                self.pieces.append((piece, typ))
            elif field == 2 and wire == 2:
                for f2, w2, v2 in self._fields(val):
                    if f2 in ids and w2 == 0:
                        ids[f2] = v2 - (1 << 64) if v2 >= 1 << 63 else v2  # int32 varints are sign-extended
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = ids[40], ids[41], ids[42], ids[43]

    @staticmethod
    def _varint(buf: bytes, i: int) -> tuple[int, int]:
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out, i

    @classmethod
    def _fields(cls, buf: bytes):
        i, n = 0, len(buf)
        while i < n:
            key, i = cls._varint(buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                val, i = cls._varint(buf, i)
            elif wire == 1:
                val, i = buf[i:i + 8], i + 8
            elif wire == 2:
                size, i = cls._varint(buf, i)
                val, i = buf[i:i + size], i + size
            elif wire == 5:
                val, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            if i > n:
                raise ValueError("truncated protobuf message")
            yield field, wire, val

    def without_dummy_prefix(self) -> bytes:
        """The serialized model with normalizer_spec.add_dummy_prefix = false (a later scalar field wins)."""
        off = bytes([3 << 3 | 0, 0])  # field 3, varint 0
        out, i, n, done = bytearray(), 0, len(self.buf), False
        while i < n:
            start = i
            key, i = self._varint(self.buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, i = self._varint(self.buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                size, j = self._varint(self.buf, i)
                i = j + size
                if field == 3:
                    payload = self.buf[j:i] + off
                    out += encode_varint(key) + encode_varint(len(payload)) + payload
                    done = True
                    continue
            out += self.buf[start:i]
        if not done:
            out += encode_varint(3 << 3 | 2) + encode_varint(len(off)) + off
        return bytes(out)


def _byte_value(piece: str) -> int | None:
    # The reference's ByteFallback decoder: any 6-char token "<0xNN>" with hex NN is a byte.
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        if _HEX2.fullmatch(piece[3:5]):
            return int(piece[3:5], 16)
    return None


_HEX2 = re.compile("[0-9A-Fa-f]{2}")
