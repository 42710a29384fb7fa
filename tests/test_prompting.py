"""Wrapper logic: the 28 cases of the original's tests/test_spirit_model.py (REFERENCE.md §11.1), the
golden model_utils / lm_wrapper cases, prompt building, output parsing and the modality mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ref_strings import EXPRESSIVE_STRING
from spiritlm_jax import prompting
from spiritlm_jax import units as unit_strings
from spiritlm_jax.converters.parity import GoldenSet
from spiritlm_jax.converters.parity_e2e import run_lm_wrapper, run_model_utils
from spiritlm_jax.text import Vocab

# ------------------------------------------------------------------ §11.1 (28 cases)
PARSE = [
    ("abc[Speech][St1][Pi234][Hu123][Hu45][Text]hello world[",
     [("abc", "t"), ("[St1][Pi234][Hu123][Hu45]", "s"), ("hello world[", "t")]),
    ("[St1][Pi234][Hu123][Hu45]", [("[St1][Pi234][Hu123][Hu45]", "s")]),
    ("abc", [("abc", "t")]),
    ("abc[]", [("abc[]", "t")]),
    ("[St1][Pi234][Hu123][Hu45][Text][abc", [("[St1][Pi234][Hu123][Hu45]", "s"), ("[abc", "t")]),
    ("abc[Text]def", [("abcdef", "t")]),
    ("[Hu338][Text] and they went out together[Speech][Hu431][Pi0][Hu457][Hu79][Pi11][Hu258][Hu85][Hu28][Hu50]"
     "[Text] and mrs johnson  shoes except in mourning[Speech][Pi59][Hu32][Pi20][Hu453][Pi35][Pi26][Hu166]",
     [("[Hu338]", "s"), (" and they went out together", "t"),
      ("[Hu431][Pi0][Hu457][Hu79][Pi11][Hu258][Hu85][Hu28][Hu50]", "s"),
      (" and mrs johnson  shoes except in mourning", "t"), ("[Pi59][Hu32][Pi20][Hu453][Pi35][Pi26][Hu166]", "s")]),
]
ENDS = [("]]", False), ("[]", False), ("[Hu100]", True), ("abc[]", False),
        ("[St1][Pi234][Hu123][Hu45][Text][abc]", False), ("abc[Text]def", False), ("[Pi9]", True), ("[St0]", True)]
STARTS = [("[[", False), ("[]", False), ("[Hu100]", True), ("abc[]", False),
          ("[St1][Pi234][Hu123][Hu45][Text][abc]", True), ("abc[Text]def", False), ("[Pi9]", True), ("[St0]", True)]
FIND = [("abc[Hu123][Hu456][Pi23][St2]", 3), ("[Hu123]abc[Hu123][Hu456][Pi23][St2]", 10),
        ("[Hu123][Hu456][Pi23][St2]", 0), ("abc", None),
        # the original uses a long Expressive prompt of the same shape: "[Speech]" + contiguous tokens
        ("[Speech]" + EXPRESSIVE_STRING, 8)]


@pytest.mark.parametrize("content,expected", PARSE)
def test_parse_speech_and_text(content, expected):
    assert prompting.parse_speech_and_text(content) == expected


@pytest.mark.parametrize("s,expected", ENDS)
def test_does_end_with_speech_token(s, expected):
    assert prompting.does_end_with_speech_token(s) is expected


@pytest.mark.parametrize("s,expected", STARTS)
def test_does_start_with_speech_token(s, expected):
    assert prompting.does_start_with_speech_token(s) is expected


@pytest.mark.parametrize("s,expected", FIND)
def test_find_prompt_last_speech_start_position(s, expected):
    assert prompting.find_prompt_last_speech_start_position(s) == expected


def test_the_reference_test_count():
    assert len(PARSE) + len(ENDS) + len(STARTS) + len(FIND) == 28


def test_predicate_window_edges():
    # "]" at index 10 still counts, at 11 not; "[" down to len-11 is examined
    assert prompting.does_start_with_speech_token("[Hu1234567]") and not prompting.does_start_with_speech_token("[Hu12345678]")
    assert prompting.does_end_with_speech_token("[Hu1234567]") and not prompting.does_end_with_speech_token("[Hu12345678]")
    assert prompting.does_start_with_speech_token(None) is False and prompting.does_end_with_speech_token(None) is False
    assert prompting.find_prompt_last_speech_start_position("[Hux][Speech][Hu1]x") == 13


# ------------------------------------------------------------------ golden
def test_golden_model_utils(golden_dir):
    gs = GoldenSet(golden_dir)
    for case in ("model_utils.json", "model_utils_forbidden.npz"):
        res = list(run_model_utils(gs, case))
        assert len(res) >= 5 and all(r.passed for r in res), [(r.quantity, r.detail) for r in res if not r.passed]


def test_golden_lm_wrapper(golden_dir):
    res = list(run_lm_wrapper(GoldenSet(golden_dir), "lm_wrapper.json"))
    assert len(res) >= 100
    assert all(r.passed for r in res), [(r.case, r.quantity, r.status, r.detail) for r in res if not r.passed]


# ------------------------------------------------------------------ forbidden ids and the mask
def test_forbidden_tokens_per_modality():
    v = Vocab.spiritlm_default(expressive=True)
    assert len(prompting.forbidden_tokens_for("text", False, v)) == 503
    assert len(prompting.forbidden_tokens_for(prompting.OutputModality.TEXT, True, v)) == 667
    sp = prompting.forbidden_tokens_for("SPEECH", True, v)
    assert sp[:2] == [32000, 32001] and sp[2:] == list(range(32000))
    assert prompting.forbidden_tokens_for("arbitrary", True, v) == []
    with pytest.raises(prompting.PromptError, match="generate_only_speech and generate_only_text"):
        prompting.get_forbidden_tokens(generate_only_speech=True, generate_only_text=True)


@pytest.mark.parametrize("expressive", [False, True])
def test_modality_mask_never_lets_a_banned_id_through(expressive):
    v = Vocab.spiritlm_default(expressive)
    key = jax.random.PRNGKey(0)
    for mod in ("TEXT", "SPEECH", "ARBITRARY"):
        mask = prompting.forbidden_mask(mod, v, expressive)
        assert mask.shape == (v.n_embed,) and mask.dtype == bool
        assert not mask[v.padding.start:].any()  # padding rows are never banned
        assert mask.sum() == len(prompting.forbidden_tokens_for(mod, expressive, v))
        masked_fn = jax.jit(prompting.mask_logits)
        for _ in range(3):
            key, k1, k2 = jax.random.split(key, 3)
            # adversarial logits: banned ids get the largest values
            logits = jax.random.normal(k1, (16, v.n_embed)) + 50.0 * jnp.asarray(mask)
            masked = masked_fn(logits, mask)
            greedy = np.asarray(jnp.argmax(masked, -1))
            drawn = np.asarray(jax.random.categorical(k2, masked, axis=-1))
            assert not mask[greedy].any() and not mask[drawn].any()
            assert np.all(np.isneginf(np.asarray(masked)[:, mask]))


def test_mask_rejects_a_vocab_smaller_than_the_ban_list():
    with pytest.raises(prompting.PromptError, match="outside the model"):
        prompting.forbidden_mask("TEXT", Vocab.spiritlm_default(True), True, n_embed=32100)


# ------------------------------------------------------------------ prompt building
def _enc(content):
    return {"wavA": "[Hu1][Hu2]", "wavB": "[Hu3]"}[content]


def test_build_prompt_examples():
    assert prompting.build_prompt([("speech", "wavA")], "text", _enc) == "[Speech][Hu1][Hu2][Text]"
    assert prompting.build_prompt([("TEXT", "a"), ("text", " b")], "SPEECH", _enc) == "[Text]a b[Speech]"
    assert prompting.build_prompt([("speech", "wavA"), ("speech", "wavB")], "arbitrary", _enc) == "[Speech][Hu1][Hu2][Hu3]"
    gi = [prompting.GenerationInput("A:", prompting.ContentType.TEXT), prompting.GenerationInput("wavB", "speech"), ("text", " B:")]
    assert prompting.build_prompt(gi, prompting.OutputModality.SPEECH, _enc) == "[Text]A:[Speech][Hu3][Text] B:[Speech]"
    assert prompting.build_prompt(("text", "x"), "TEXT") == "[Text]x"  # a single item is accepted


@pytest.mark.parametrize("inputs,modality,match", [
    ([("audio", "x")], "TEXT", "content_type"),
    ([("text", "x")], "voice", "output_modality"),
    ([["text", "x"]], "TEXT", "GenerationInput or a tuple"),
    ([("speech", "wavA")], "TEXT", "encode_speech"),
    ([("text", 3)], "TEXT", "must be a str"),
    (None, "TEXT", "None"),
])
def test_build_prompt_errors(inputs, modality, match):
    with pytest.raises(prompting.PromptError, match=match):
        prompting.build_prompt(inputs, modality, None)


# ------------------------------------------------------------------ output parsing
class _Vocoder:
    """Decodes a speech string to 10 samples per [Hu] token, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, s):
        self.calls.append(s)
        hub = unit_strings.units_to_arrays(unit_strings.string_to_units(s), keys=["hubert"])["hubert"]
        return np.repeat(hub.astype(np.float32), 10)


def _hu(n, start=0):
    return "".join(f"[Hu{start + i}]" for i in range(n))


def test_text_and_speech_modalities():
    voc = _Vocoder()
    out = prompting.decode_generated_output("[Text]hi there  ", "[Text]hi", "TEXT", voc)
    assert out == [("there", prompting.ContentType.TEXT)]
    out = prompting.decode_generated_output("[Speech][Hu1]" + _hu(3, 5), "[Speech][Hu1]", "speech", voc)
    assert out[0].content_type is prompting.ContentType.SPEECH and out[0].content.tolist() == [5.0] * 10 + [6.0] * 10 + [7.0] * 10


def test_arbitrary_25_piece_rule_and_decode_always_called():
    voc = _Vocoder()
    prompt = "[Text]a"
    gen = prompt + " b[Speech]" + _hu(23) + "[Text] c[Speech]" + _hu(24) + "[Text] d"
    out = prompting.decode_generated_output(gen, prompt, "ARBITRARY", voc)
    # chunk 1 has 23 [Hu] (24 pieces) → dropped; chunk 3 has 24 [Hu] (25 pieces) → kept
    assert [(o.content if o.content_type is prompting.ContentType.TEXT else "wav") for o in out] == ["b", " c", "wav", " d"]
    assert len(voc.calls) == 2  # the dropped chunk was decoded too
    # a first chunk is never length-filtered
    out = prompting.decode_generated_output("[Speech][Hu1]", "", "ARBITRARY", voc)
    assert len(out) == 1 and out[0].content.size == 10


def test_arbitrary_speech_continuation_is_trimmed_proportionally():
    voc = _Vocoder()
    prompt = "[Speech][St3][Pi4]" + _hu(12)
    gen = prompt + _hu(30, 100) + "[Text] ok"
    out = prompting.decode_generated_output(gen, prompt, "ARBITRARY", voc)
    # the vocoder sees the prompt's last speech run (with its St/Pi context) + the continuation
    assert voc.calls == ["[St3][Pi4]" + _hu(12) + _hu(30, 100)]
    n_pieces, n_prompt, total = 43, 12, 42 * 10
    assert out[0].content.size == total - math.ceil(total * (n_prompt / n_pieces))
    assert out[1] == (" ok", prompting.ContentType.TEXT)
    # too short a continuation (pieces - prompt units < 25) is dropped, text kept
    out = prompting.decode_generated_output(prompt + _hu(12, 100) + "[Text] ok", prompt, "ARBITRARY", voc)
    assert out == [(" ok", prompting.ContentType.TEXT)]


def test_garbage_unit_string_gives_clear_error():
    with pytest.raises(unit_strings.UnitStringError, match="not an integer"):
        prompting.decode_generated_output("[Speech][Hu123]abc[Hu4]", "[Speech]", "SPEECH", _Vocoder())
