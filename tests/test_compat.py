"""spiritlm_jax.compat: the original's API with only the import rule applied.

Part 1 rewrites the checks of the original's ``tests/test_spirit_model.py`` (prompt/parse helpers, called
on an instance whose ``__init__`` is patched away, as the original does) with our own strings. Part 2
rewrites ``tests/test_tokenizer.py`` on the golden random checkpoints: the expected unit strings there
come from the real weights, so ours are the ORIGINAL's outputs on the golden set's random weights
(tokenizer_*_recording.npz, recorded by running the original). Part 3 covers what the original's callers
rely on: GenerationConfig objects, dataclass outputs, vocoder signatures, seeds, exception types and log lines.
"""
from __future__ import annotations

import logging
from unittest.mock import Mock, patch

import numpy as np
import pytest

from spiritlm_jax.compat.model.spiritlm_model import (ContentType, GenerationInput, GenerationOuput, OutputModality,
                                                      Spiritlm, SpiritlmVariants)
from spiritlm_jax.compat.model.utils import (does_end_with_speech_token, does_start_with_speech_token,
                                             find_prompt_last_speech_start_position)

PATCH_INIT = "spiritlm_jax.compat.model.spiritlm_model.Spiritlm.__init__"  # the original's target, rule applied


# ------------------------------------------------------------------------------------ part 1: test_spirit_model
@pytest.mark.parametrize("content,expected", [
    ("hi[Speech][St2][Pi10][Hu5][Hu6][Text]there[", [("hi", "t"), ("[St2][Pi10][Hu5][Hu6]", "s"), ("there[", "t")]),
    ("[St4][Pi1][Hu9]", [("[St4][Pi1][Hu9]", "s")]),
    ("plain", [("plain", "t")]),
    ("x[]", [("x[]", "t")]),
    ("[Hu3][Pi2][Text][zz", [("[Hu3][Pi2]", "s"), ("[zz", "t")]),
    ("ab[Text]cd", [("abcd", "t")]),
    ("[Hu10][Text] the cat[Speech][Hu1][Pi3][Hu2][Text] sat down[Speech][Pi7][Hu8][Pi9][Pi4][Hu5]",
     [("[Hu10]", "s"), (" the cat", "t"), ("[Hu1][Pi3][Hu2]", "s"), (" sat down", "t"), ("[Pi7][Hu8][Pi9][Pi4][Hu5]", "s")]),
])
def test_parse_speech_and_text_on_a_stateless_instance(content, expected):
    with patch(PATCH_INIT, Mock(return_value=None)):
        lm = Spiritlm("spirit-lm-base-7b")
        assert lm._parse_speech_and_text(content) == expected


@pytest.mark.parametrize("s,expected", [
    ("]]", False), ("[]", False), ("[Hu7]", True), ("xy[]", False), ("[St1][Hu2][Text][xy]", False),
    ("ab[Text]cd", False), ("[Pi5]", True), ("[St9]", True)])
def test_does_end_with_speech_token(s, expected):
    assert does_end_with_speech_token(s) is expected


@pytest.mark.parametrize("s,expected", [
    ("[[", False), ("[]", False), ("[Hu7]", True), ("xy[]", False), ("[St1][Hu2][Text][xy]", True),
    ("ab[Text]cd", False), ("[Pi5]", True), ("[St9]", True)])
def test_does_start_with_speech_token(s, expected):
    assert does_start_with_speech_token(s) is expected


def test_find_prompt_last_speech_start_position():
    assert find_prompt_last_speech_start_position("ab[Hu1][Hu2][Pi3][St4]") == 2
    assert find_prompt_last_speech_start_position("[Hu1]xy[Hu1][Hu2][Pi3][St4]") == 7
    assert find_prompt_last_speech_start_position("[Hu1][Pi2]") == 0
    assert find_prompt_last_speech_start_position("none") is None
    rng = np.random.default_rng(0)  # a long Expressive prompt after the [Speech] marker: the run starts at 8
    units = "".join(f"[{rng.choice(['Hu', 'Pi', 'St'])}{rng.integers(0, 500)}]" for _ in range(300))
    assert find_prompt_last_speech_start_position("[Speech]" + units) == 8


def test_prompt_and_ban_helpers_on_a_stateless_instance():
    with patch(PATCH_INIT, Mock(return_value=None)):
        lm = Spiritlm("spirit-lm-expressive-7b")
    lm.is_expressive_model = True
    lm.speech_tokenizer = lambda audio: "[St1][Pi2][Hu3]"
    inputs = [GenerationInput("a", ContentType.TEXT), GenerationInput(np.zeros(1600, np.float32), ContentType.SPEECH)]
    assert lm._build_prompt(inputs, OutputModality.TEXT) == "[Text]a[Speech][St1][Pi2][Hu3][Text]"
    assert lm._build_prompt(inputs[:1], OutputModality.SPEECH) == "[Text]a[Speech]"
    with pytest.raises(ValueError, match="Unknown output_modality"):
        lm._build_prompt(inputs, "TEXT")  # the helper takes an OutputModality (generate converts strings)
    text_bans = lm._build_forbidden_tokens(OutputModality.TEXT)
    assert text_bans[:2] == [32000, 32001] and len(text_bans) == 2 + 501 + 64 + 100
    assert len(lm._build_forbidden_tokens(OutputModality.SPEECH)) == 2 + 32000
    assert lm._build_forbidden_tokens(OutputModality.ARBITRARY) == []
    assert [v.value for v in SpiritlmVariants] == SpiritlmVariants.values_as_list()
    assert Spiritlm.TEXT_PROMPT_PREFIX == "[Text]" and Spiritlm.SPEECH_PROMPT_PREFIX == "[Speech]"


# ------------------------------------------------------------------------------------ part 2: test_tokenizer
@pytest.fixture()
def factories(monkeypatch, golden_dir):
    """The compat factories on the golden checkpoints, with the per-process model cache reset."""
    from spiritlm_jax.compat import speech_tokenizer

    monkeypatch.setenv("SPIRITLM_CHECKPOINTS_DIR", str(golden_dir / "checkpoints"))
    for name in ("HUBERT", "HIFIGAN_BASE", "F0", "STYLE_W2V2", "HIFIGAN_EXPRESSIVE_W2V2"):
        monkeypatch.setattr(speech_tokenizer, name, None)
    return speech_tokenizer


def test_expressive_tokenizer_units_and_string_equal_the_original(factories, golden_dir):
    ref = np.load(golden_dir / "cases" / "tokenizer_expressive_recording.npz")
    audio = str(golden_dir / "audio" / "7143-88743-0029.flac")
    tok = factories.spiritlm_expressive()
    units = tok.encode_units(audio)
    assert units["audio"] == str((golden_dir / "audio" / "7143-88743-0029.flac").resolve())
    for key in ("hubert", "pitch", "style"):
        assert units[key] == str(ref[f"units_{key}"])
    assert tok.units2string(units) == str(ref["string"])  # encode_string = units2string(encode_units)


def test_base_tokenizer_units_and_string_equal_the_original(factories, golden_dir):
    import torch

    from spiritlm_jax.audio import load_audio

    ref = np.load(golden_dir / "cases" / "tokenizer_base_recording.npz")
    audio = str(golden_dir / "audio" / "7143-88743-0029.flac")
    tok = factories.spiritlm_base()
    units = tok.encode_units(audio)
    assert units["hubert"] == str(ref["units_hubert"]) and set(units) == {"audio", "hubert"}
    assert tok.encode_string(audio) == str(ref["string"])
    # a torch tensor input gives the same units (the original's tensor-input test); bf16 tensors are accepted
    wav = torch.from_numpy(load_audio(audio))
    assert tok.encode_units(wav) == {"hubert": str(ref["units_hubert"])}
    assert len(tok.encode_units(wav.to(torch.bfloat16))["hubert"].split()) == len(units["hubert"].split())
    wav = tok.decode(str(ref["string"]), speaker_id=2)
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1
    np.testing.assert_allclose(wav, ref["decode_wav"], atol=2e-4)  # the golden vocoder tolerance (MANIFEST)


def test_component_factories_and_vocoder_signature(factories, golden_dir):
    from spiritlm_jax.compat.speech_tokenizer.f0 import spiritlm_expressive_f0
    from spiritlm_jax.compat.speech_tokenizer.hifigan import spiritlm_base_hifigan, spiritlm_expressive_hifigan_w2v2
    from spiritlm_jax.compat.speech_tokenizer.hubert import spiritlm_hubert
    from spiritlm_jax.compat.speech_tokenizer.style_encoder import spiritlm_expressive_style_encoder_w2v2

    ref = np.load(golden_dir / "cases" / "tokenizer_expressive_recording.npz")
    audio = str(golden_dir / "audio" / "7143-88743-0029.flac")
    hubert, f0, style = spiritlm_hubert(), spiritlm_expressive_f0(), spiritlm_expressive_style_encoder_w2v2()
    hu, pi, st = hubert(audio), f0(audio), style(audio)
    assert np.array_equal(np.asarray(hu), ref["units_hubert_int"])
    assert np.array_equal(np.asarray(pi), ref["units_pitch_int"]) and np.array_equal(np.asarray(st), ref["units_style_int"])
    base = spiritlm_base_hifigan()
    wav = base(hu, speaker_id=1).cpu().numpy()
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0
    expressive = spiritlm_expressive_hifigan_w2v2()
    wav_ex = expressive(code=hu, f0_code=pi, style_code=st, dur_pred=False, speaker_id=1,
                        not_dedup_code=True).cpu().numpy()
    assert wav_ex.size == len(ref["units_hubert_int"]) * expressive.vocoder.hop


def test_decode_raises_the_original_exception_types(factories):
    from spiritlm_jax.compat.speech_tokenizer.spiritlm_tokenizer import MissingPitchUnitsError
    from spiritlm_jax.speech import SpeechDecodeError

    with pytest.raises(RuntimeError) as no_units:
        factories.spiritlm_base().decode("[Text]no speech")
    assert isinstance(no_units.value, SpeechDecodeError)
    with pytest.raises(KeyError) as no_pitch:
        factories.spiritlm_expressive().decode("[St3][Hu1][Hu2][Hu3]")
    assert isinstance(no_pitch.value, MissingPitchUnitsError) and no_pitch.value.args == ("f0_code",)


# ------------------------------------------------------------------------------------ part 3: the LM wrapper
@pytest.fixture(scope="module")
def demo_root():
    from spiritlm_jax import tiny_checkpoints

    return tiny_checkpoints.ensure_tiny_checkpoints(log=lambda m: None)[0]


@pytest.fixture()
def base_model(demo_root, monkeypatch):
    from spiritlm_jax.compat import speech_tokenizer

    monkeypatch.setenv("SPIRITLM_CHECKPOINTS_DIR", str(demo_root))
    for name in ("HUBERT", "HIFIGAN_BASE"):
        monkeypatch.setattr(speech_tokenizer, name, None)
    return Spiritlm("spirit-lm-base-7b")


def test_generation_config_objects_are_read_by_attribute(base_model):
    from transformers import GenerationConfig

    outs = base_model.generate(interleaved_inputs=[("text", "The largest country")], output_modality="text",
                               generation_config=GenerationConfig(max_new_tokens=8, do_sample=False))
    same = base_model.generate(interleaved_inputs=[("text", "The largest country")], output_modality="text",
                               max_new_tokens=8, do_sample=False)
    assert outs == same and isinstance(outs[0], GenerationOuput)
    assert repr(outs[0]).startswith("GenerationOuput(content='") and "content_type=<ContentType.TEXT: 'TEXT'>" in repr(outs[0])
    outs[0].content = "mutable"  # a dataclass, as the original's
    from spiritlm_jax.infer.processors import GenerationError

    with pytest.raises(GenerationError, match="beam search is not implemented"):
        base_model.generate(prompt="[Text]hi", generation_config=GenerationConfig(num_beams=3, max_new_tokens=4))


def test_transformers_set_seed_reproduces_a_sampled_call(base_model):
    from transformers import set_seed

    kw = dict(interleaved_inputs=[("text", "Once")], output_modality="text", do_sample=True, max_new_tokens=12)
    set_seed(7)
    a = base_model.generate(**kw)
    b = base_model.generate(**kw)
    set_seed(7)
    assert base_model.generate(**kw) == a and b != a  # reproducible after set_seed; successive calls differ


def test_speech_decode_failure_logs_the_original_line(demo_root, monkeypatch, caplog):
    from spiritlm_jax.compat import speech_tokenizer

    monkeypatch.setenv("SPIRITLM_CHECKPOINTS_DIR", str(demo_root))
    for name in ("HUBERT", "F0", "STYLE_W2V2", "HIFIGAN_EXPRESSIVE_W2V2"):
        monkeypatch.setattr(speech_tokenizer, name, None)
    lm = Spiritlm("spirit-lm-expressive-7b")
    no_pitch = [[i] for i in range(32503, 32503 + 64)]  # generated speech without any [Pi]: undecodable
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError, match="f0_code"):
        lm.generate(prompt="[Speech][Hu5][Hu9]", output_modality="speech", max_new_tokens=10, bad_words_ids=no_pitch)
    assert any(r.levelno == logging.ERROR and r.getMessage().startswith("Fail to decode the content: [")
               for r in caplog.records)


def test_hf_defaults_table_matches_transformers():
    """Our hard-coded GenerationConfig defaults agree with the installed class wherever it has a value, and
    every field of the class is known (so no option is silently dropped or misread)."""
    from transformers import GenerationConfig

    from spiritlm_jax.infer.hf_config import HF_GENERATION_DEFAULTS, read_generation_config

    real = {k: v for k, v in vars(GenerationConfig()).items() if not k.startswith("_") and k != "transformers_version"}
    unknown = sorted(set(real) - set(HF_GENERATION_DEFAULTS))
    assert not [k for k in unknown if real[k] is not None], unknown
    assert {k: v for k, v in real.items() if v is not None and k in HF_GENERATION_DEFAULTS
            and v != HF_GENERATION_DEFAULTS[k]} == {}
    assert read_generation_config(GenerationConfig()) == {}
    assert read_generation_config(GenerationConfig(temperature=0.9, top_p=0.95, max_new_tokens=50, do_sample=True)) == {
        "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 50, "do_sample": True}
