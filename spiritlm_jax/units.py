"""Speech units ↔ Spirit LM token strings (``"[St71][Pi39][Hu99][Hu49]..."``).

Exact semantics of the original's ``units_to_string`` / ``string_to_units`` (REFERENCE.md §8.2–8.3):

* ``units_to_string``: each stream (style, pitch, hubert — in that order) becomes ``(token, i / rate)``
  items, consecutive repeats dropped when the stream deduplicates (times keep the ORIGINAL index);
  all items are then stably sorted by time (float64 ``i / rate``, never ``i * (1 / rate)``), so at a
  tie style precedes pitch precedes hubert. Rates: hubert 24.99, pitch 12.5, style 1.
* ``string_to_units``: the inverse, "pre-duplicated": one pitch/style value per ``[Hu]`` token,
  back-filled with the first value seen; pitch without style draws the style from Python's global
  ``random`` exactly like the original (``random.choice([71, 68, 98])``), so a seeded run matches.

Unit streams are whitespace-separated strings as in the original; sequences of ints (lists, numpy
arrays) are accepted too and written with ``str(int(v))``.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Mapping, Sequence, Union

import numpy as np

__all__ = [
    "MOST_COMMON_STYLES",
    "UnitStringError",
    "MissingUnitsError",
    "UnitValueError",
    "units_to_string",
    "string_to_units",
    "units_to_arrays",
    "UnitStringFormat",
    "BASE_FORMAT",
    "EXPRESSIVE_FORMAT",
]

# The original's fallback styles when a string has pitch tokens but no style token.
MOST_COMMON_STYLES = [71, 68, 98]

Units = Union[str, Sequence[int], np.ndarray]


class UnitStringError(ValueError):
    """Bad unit dict or unit string."""


class MissingUnitsError(UnitStringError, KeyError):
    """A stream the format needs is absent from the unit dict (the original raises KeyError)."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnitValueError(UnitStringError, TypeError):
    """A unit list contains no value where one is required (the original raises TypeError in join)."""


def _tokens(units: Units, key: str) -> list[str]:
    if isinstance(units, str):
        return units.split()
    if isinstance(units, (bytes, bytearray)):
        raise UnitStringError(f"units[{key!r}] is bytes; pass a space-separated str or a sequence of ints")
    try:
        arr = np.asarray(units)
    except Exception as e:  # pragma: no cover - defensive
        raise UnitStringError(f"units[{key!r}] is neither a str nor a sequence of ints: {e}") from e
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise UnitStringError(
            f"units[{key!r}] must be a space-separated str or a 1-D sequence of ints, got "
            f"{type(units).__name__} with shape {arr.shape} and dtype {arr.dtype}"
        )
    return [str(int(v)) for v in arr]


def _positions(tokens: list[str], rate: float, dedup: bool) -> list[tuple[str, float]]:
    out = []
    prev = None
    for i, tok in enumerate(tokens):
        if not dedup or prev is None or tok != prev:
            out.append((tok, i / rate))  # Python float64 division, exactly as the original
        prev = tok
    return out


def _get(units: Mapping[str, Units], key: str) -> Units:
    if not isinstance(units, Mapping):
        raise UnitStringError(f"units must be a dict of unit streams, got {type(units).__name__}")
    if key not in units:
        raise MissingUnitsError(
            f"{key!r}: the unit dict has no {key!r} stream (keys: {sorted(units)}); an expressive format "
            f"needs 'hubert', 'pitch' and 'style' — use the base format for hubert-only units"
        )
    return units[key]


def units_to_string(
    units: Mapping[str, Units],
    has_pitch: bool = False,
    has_style: bool = False,
    hubert_rate: float = 24.99,
    hubert_dedup: bool = True,
    hubert_key: str = "hubert",
    pitch_rate: float = 12.5,
    pitch_dedup: bool = True,
    pitch_key: str = "pitch",
    style_rate: float = 1,
    style_dedup: bool = False,
    style_key: str = "style",
) -> str:
    """Interleave unit streams into one token string, ordered by time (stable: St, Pi, Hu at ties)."""
    items: list[tuple[str, float]] = []
    if has_style:
        items += _positions([f"[St{t}]" for t in _tokens(_get(units, style_key), style_key)], style_rate, style_dedup)
    if has_pitch:
        items += _positions([f"[Pi{t}]" for t in _tokens(_get(units, pitch_key), pitch_key)], pitch_rate, pitch_dedup)
    items += _positions([f"[Hu{t}]" for t in _tokens(_get(units, hubert_key), hubert_key)], hubert_rate, hubert_dedup)
    items.sort(key=lambda x: x[1])  # list.sort is stable
    return "".join(t for t, _ in items)


def _random_most_common_style() -> int:
    return random.choice(MOST_COMMON_STYLES)


def string_to_units(
    gen: str,
    hubert_key: str = "hubert",
    pitch_key: str = "pitch",
    style_key: str = "style",
    duplicate_hubert_for_multiple_pitch: bool = False,
) -> dict[str, str]:
    """Token string → unit dict, pitch/style "pre-duplicated" to one value per ``[Hu]`` token.

    Pieces of ``gen.split("[")`` longer than 2 chars that start with Hu/St/Pi followed by a digit are
    tokens whose value is the piece minus its 2-letter prefix and its LAST character (assumed "]");
    everything else (text, ``[Speech]``, ``[Text]``, malformed tokens) is ignored, as in the original.
    """
    if not isinstance(gen, str):
        raise UnitStringError(f"expected a token string, got {type(gen).__name__}")
    prev_hubert = first_hubert = None
    prev_pitch = first_pitch = None
    prev_style = first_style = None
    prev_is_pitch = False
    hubert: list = []
    pitch: list = []
    style: list = []
    for piece in gen.split("["):
        if len(piece) <= 2 or not piece[2].isdigit():
            continue
        head, value = piece[:2], piece[2:-1]
        if head == "Hu":
            hubert.append(value)
            pitch.append(prev_pitch)
            style.append(prev_style)
            prev_is_pitch = False
            prev_hubert = value
            if first_hubert is None:
                first_hubert = value
        elif head == "St":
            if prev_style is None:
                first_style = value
            prev_style = value
        elif head == "Pi":
            if duplicate_hubert_for_multiple_pitch and prev_is_pitch:
                hubert.append(prev_hubert)
                pitch.append(value)
                style.append(prev_style)
            if prev_pitch is None:
                first_pitch = value
            prev_pitch = value
            prev_is_pitch = True
    if first_pitch is not None and first_style is None:
        # The original picks a common style when pitch is present without style (global `random`).
        first_style = str(_random_most_common_style())
    hubert = [first_hubert if v is None else v for v in hubert]
    style = [first_style if v is None else v for v in style]
    pitch = [first_pitch if v is None else v for v in pitch]
    if any(v is None for v in hubert):
        raise UnitValueError(
            f"sequence item 0: expected str instance, NoneType found — duplicate_hubert_for_multiple_pitch "
            f"needs a [Hu] token before repeated [Pi] tokens, but {gen[:60]!r} has none"
        )
    out = {hubert_key: " ".join(hubert)}
    if first_pitch is not None:
        out[pitch_key] = " ".join(pitch)
    if first_style is not None:
        out[style_key] = " ".join(style)
    return out


def units_to_arrays(units: Mapping[str, Units], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Unit dict (strings) → int64 arrays, with a clear error naming any token that is not an integer.

    The original only fails deep inside the vocoder on such input (e.g. ``"[Hu123]abc[Hu4]"`` parses
    to the hubert value ``"123]ab"``).
    """
    out = {}
    for key in (keys if keys is not None else list(units)):
        toks = _tokens(_get(units, key), key)
        vals = []
        for j, t in enumerate(toks):
            try:
                vals.append(int(t))
            except ValueError:
                raise UnitStringError(
                    f"units[{key!r}] token {j} is {t!r}, not an integer: the speech string is malformed "
                    f"(every unit token must look like [Hu<n>], [Pi<n>] or [St<n>])"
                ) from None
        out[key] = np.asarray(vals, dtype=np.int64)
    return out


@dataclasses.dataclass(frozen=True)
class UnitStringFormat:
    """The original ``SpiritLMTokenizer``'s string settings (base: hubert only; expressive: + pitch/style)."""

    has_pitch: bool = False
    has_style: bool = False
    hubert_rate: float = 24.99
    hubert_dedup: bool = True
    hubert_key: str = "hubert"
    pitch_rate: float = 12.5
    pitch_dedup: bool = True
    pitch_key: str = "pitch"
    style_rate: float = 1
    style_dedup: bool = False
    style_key: str = "style"

    def __post_init__(self):
        if self.has_style and not self.has_pitch:
            # The original stores style settings only when a pitch model is also given.
            raise ValueError("a style stream needs a pitch stream (as in the original tokenizer)")

    def units2string(self, units: Mapping[str, Units]) -> str:
        return units_to_string(units, **dataclasses.asdict(self))

    def string2units(self, gen: str, duplicate_hubert_for_multiple_pitch: bool = False) -> dict[str, str]:
        return string_to_units(
            gen,
            hubert_key=self.hubert_key,
            pitch_key=self.pitch_key if self.has_pitch else "pitch",
            style_key=self.style_key if self.has_style else "style",
            duplicate_hubert_for_multiple_pitch=duplicate_hubert_for_multiple_pitch,
        )


BASE_FORMAT = UnitStringFormat()
EXPRESSIVE_FORMAT = UnitStringFormat(has_pitch=True, has_style=True)
