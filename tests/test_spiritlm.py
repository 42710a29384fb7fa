"""The SpiritLM user API and the CLIs, on the golden set's tiny random checkpoints (original layout)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spiritlm_jax import prompting
from spiritlm_jax.infer.engine import GenerationError, SamplingConfig, generate
from spiritlm_jax.speech import SpeechDecodeError
from spiritlm_jax.spiritlm import SpiritLM


@pytest.fixture(scope="module")
def base_lm(golden_dir):
    return SpiritLM.from_pretrained("spirit-lm-base-7b", checkpoints=golden_dir / "checkpoints", dtype="float32")


def test_generate_batch_equals_per_prompt(base_lm, golden_dir):
    wav = np.load(golden_dir / "cases" / "inputs.npz")["synth_odd_wav"]
    batch = [[("text", "The weather today is")], [("speech", wav)], [("speech", wav), ("text", " so")]]
    mods = ["text", "speech", "arbitrary"]
    ids = base_lm.generate_batch(batch, output_modality=mods, max_new_tokens=12, decode=False)
    for i, (inp, m) in enumerate(zip(batch, mods)):
        ids1 = base_lm.generate_batch([inp], output_modality=m, max_new_tokens=12, decode=False)
        assert ids1[0] == ids[i]  # greedy: identical tokens alone and in the batch
    outs, prompts = base_lm.generate_batch(batch[:1], output_modality="text", max_new_tokens=12, return_prompt=True)
    assert prompts[0] == "[Text]The weather today is" and outs[0][0].content_type is prompting.ContentType.TEXT
    # the modality masks held per row: speech rows produced only speech-unit ids, text rows no unit ids
    vocab = base_lm.tokenizer.vocab
    assert all(t >= vocab.hubert.start for t in ids[1])
    assert not any(t in vocab.hubert for t in ids[0])


def test_text_generation_matches_golden_wrapper_record(base_lm, golden_dir):
    # fp32 greedy TEXT continuation of the fixed prompt equals the original's fp32 greedy ids (lm_base.npz)
    z = np.load(golden_dir / "cases" / "lm_base.npz")
    outs, ids = base_lm.generate_batch(prompts=[str(z["prompt"])], output_modality="text", max_new_tokens=20,
                                       return_ids=True)
    assert ids[0] == z["greedy_fp32_TEXT_ids"].tolist()
    assert outs[0][0].content_type is prompting.ContentType.TEXT


def test_modality_mask_never_lets_a_banned_id_through(base_lm):
    """Property test over random logits: with sampling, a banned id is never drawn (per row masks)."""
    cfg = base_lm.cfg
    vocab = base_lm.tokenizer.vocab
    rng = np.random.default_rng(0)
    masks = np.stack([prompting.forbidden_mask(m, vocab, False, n_embed=cfg.vocab_size) for m in ("text", "speech")])
    import jax
    import jax.numpy as jnp

    from spiritlm_jax.infer.engine import process_logits

    for trial in range(20):
        logits = rng.normal(size=(2, cfg.vocab_size)).astype(np.float32) * rng.uniform(1, 30)
        logits[:, masks[0]] += 50.0 * (trial % 2)  # adversarial: banned ids get the highest logits
        x = process_logits(jnp.asarray(logits), jnp.asarray(masks),
                           SamplingConfig(do_sample=True, temperature=rng.uniform(0.5, 2), top_p=rng.uniform(0.5, 1)))
        draws = np.asarray(jax.random.categorical(jax.random.key(trial), x[:, None, :], axis=-1, shape=(2, 64)))
        for row in range(2):
            assert not masks[row][draws[row]].any()


def test_prompt_longer_than_context_is_a_clear_error(base_lm):
    n = base_lm.cfg.max_position_embeddings
    with pytest.raises(GenerationError, match="context"):
        base_lm.generate(prompt="[Text]" + "hello " * n, output_modality="text", max_new_tokens=5)
    # transformers' default without max_new_tokens / max_length: 20 NEW tokens whatever the prompt length
    ids = base_lm.generate_batch(prompts=["[Text]" + "hello " * 30], output_modality="text", decode=False)
    assert len(ids[0]) == 20 or ids[0][-1] == base_lm.tokenizer.vocab.eos_id
    with pytest.raises(GenerationError, match=r"max_length=10 \(prompt \+ new tokens\) leaves no room"):
        base_lm.generate(prompt="[Text]" + "hello " * 30, output_modality="text", max_length=10)
    with pytest.raises(GenerationError, match="beam search is not implemented"):
        base_lm.generate(prompt="[Text]hi", max_new_tokens=3, num_beams=4)
    with pytest.raises(GenerationError, match=r"unsupported generation option\(s\) \['typical_p'\]"):
        base_lm.generate(prompt="[Text]hi", max_new_tokens=3, typical_p=0.5)
    with pytest.raises(prompting.PromptError, match="interleaved_inputs is an empty list"):
        base_lm.generate(interleaved_inputs=[], max_new_tokens=3)


def test_garbage_unit_strings_are_clear_errors(base_lm):
    tok = base_lm.speech_tokenizer
    with pytest.raises(SpeechDecodeError, match=r"no \[Hu\] unit"):
        tok.decode("[Text]no speech here")
    with pytest.raises(ValueError):
        tok.decode("[Hu12][Hu9999999]")  # beyond the vocoder's table: refused before any compute
    with pytest.raises(ValueError):
        tok.decode("[Hu12]abc[Hu4]")  # malformed piece (the original would feed '12]ab' to int())


def test_expressive_without_pitch_is_a_clear_error(golden_dir):
    from spiritlm_jax.speech import SpeechTokenizer

    tok = SpeechTokenizer.from_checkpoints(golden_dir / "checkpoints", "expressive")
    with pytest.raises(SpeechDecodeError, match=r"\[Pi\]"):
        tok.decode("[St3][Hu1][Hu2][Hu3]")


def test_cli_tokenize_generate_convert(golden_dir, tmp_path, capsys, monkeypatch):
    from spiritlm_jax.cli import main

    ck = golden_dir / "checkpoints"
    audio = golden_dir / "audio"
    out = tmp_path / "units.jsonl"
    assert main(["tokenize", str(audio), "--checkpoints", str(ck), "--variant", "base", "--out", str(out)]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    ref = np.load(golden_dir / "cases" / "tokenizer_base_recording.npz")
    assert rec["hubert"] == str(ref["units_hubert"]) and rec["string"] == str(ref["string"])

    conv = tmp_path / "conv"
    assert main(["convert", "all", str(ck), str(conv), "--variant", "base"]) == 0
    capsys.readouterr()
    assert main(["generate", "--text", "The weather today is", "--model", "spirit-lm-base-7b", "--checkpoints",
                 str(conv), "--output-modality", "text", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    # the converted tree generates exactly what the original tree does (greedy, fp32)
    assert main(["generate", "--text", "The weather today is", "--model", "spirit-lm-base-7b", "--checkpoints",
                 str(ck), "--output-modality", "text", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == text
    assert main(["generate", "--text", "hi", "--model", "spirit-lm-base-7b", "--checkpoints", str(ck),
                 "--output-modality", "speech", "--max-new-tokens", "30", "--out", str(tmp_path / "wavs")]) == 0
    assert list((tmp_path / "wavs").glob("*.wav"))
    # bad inputs: clear errors, non-zero exit codes, no traceback
    assert main(["tokenize", str(tmp_path / "nope"), "--checkpoints", str(ck)]) == 2
    assert main(["generate", "--model", "spirit-lm-base-7b", "--checkpoints", str(ck)]) == 2
    assert main(["convert", "all", str(tmp_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such file" in err
