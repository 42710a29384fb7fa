"""Precision is part of the model, not of the environment (models/layers.py).

Two checks:

1. Structural, the one that protects GPU/TPU users: with the PROCESS flag set to bfloat16, every
   contraction (dot_general, conv_general_dilated) that each component traces carries that
   component's own setting (float32 → Precision.HIGHEST), and changing the component's setting
   changes all of them. XLA:CPU ignores the precision attribute, so on CPU this is the check that
   can fail when a module forgets to apply its setting.
2. Behavioural, on the golden cases: HuBERT units, pitch codes, style units and vocoder durations
   are identical to the original's with the global flag unset, set to bfloat16 and set to float32.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.config import ConfigError, LlamaConfig
from spiritlm_jax.models import f0_vqvae, fcpe, hifigan, hubert, llama, quantizer, style
from spiritlm_jax.models.layers import PrecisionError, global_matmul_precision

GLOBAL_SETTINGS = [None, "bfloat16", "float32"]
EXPECTED = {"float32": jax.lax.Precision.HIGHEST, "tensorfloat32": jax.lax.Precision.HIGH,
            "bfloat16": jax.lax.Precision.DEFAULT}


def _contraction_precisions(jaxpr) -> list:
    """Precision of every dot_general / conv_general_dilated in a (closed) jaxpr, sub-jaxprs included."""
    found = []

    def walk(jp):
        jp = getattr(jp, "jaxpr", jp)
        for eqn in jp.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append(eqn.params["precision"])
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub)

    walk(jaxpr)
    return found


def _assert_all(precisions, setting, what):
    assert precisions, f"{what}: no contraction traced (the walker is broken)"
    want = EXPECTED[setting]
    bad = [p for p in precisions if p is None or any(x != want for x in (p if isinstance(p, tuple) else (p,)))]
    assert not bad, f"{what}: {len(bad)} of {len(precisions)} contractions do not carry {setting}: {bad[:3]}"


@pytest.fixture(scope="module")
def speech(golden_dir):
    from spiritlm_jax.converters.f0_vqvae import load_f0_vqvae
    from spiritlm_jax.converters.fcpe import load_fcpe
    from spiritlm_jax.converters.hifigan import load_hifigan
    from spiritlm_jax.converters.hubert import convert_hubert
    from spiritlm_jax.converters.quantizer import convert_linear_quantizer
    from spiritlm_jax.converters.style import convert_style

    st = golden_dir / "checkpoints" / "speech_tokenizer"
    return {
        "hubert": convert_hubert(st / "hubert_25hz" / "mhubert_base_25hz.pt", output_layer=11),
        "quantizer": convert_linear_quantizer(st / "hubert_25hz" / "L11_quantizer_500.pt"),
        "style": convert_style(st / "style_encoder_w2v2", pool_size=50),
        "vqvae": load_f0_vqvae(st / "vqvae_f0_quantizer"),
        "fcpe": load_fcpe(),
        "hifigan": load_hifigan(st / "hifigan_spiritlm_expressive_w2v2"),
    }


def _traced_components(speech, setting):
    """(name, jaxpr) of every component's forward with every config's precision set to ``setting``."""
    wav = jnp.zeros((1, 4000), jnp.float32)
    out = []
    cfg, p = speech["hubert"]
    cfg = dataclasses.replace(cfg, precision=setting)
    out.append(("hubert", jax.make_jaxpr(lambda w: hubert.SpeechEncoder(cfg).apply({"params": p}, w))(wav)))
    qcfg, qp = speech["quantizer"]
    qcfg = dataclasses.replace(qcfg, precision=setting)
    feats = jnp.zeros((1, 5, qcfg.widths[0]))
    out.append(("quantizer", jax.make_jaxpr(lambda x: quantizer.LinearQuantizer(qcfg).apply({"params": qp}, x))(feats)))
    scfg, sp = speech["style"]
    scfg = dataclasses.replace(scfg, encoder=dataclasses.replace(scfg.encoder, precision=setting))
    out.append(("style", jax.make_jaxpr(lambda w: style.StyleEncoder(scfg).apply({"params": sp}, w))(wav)))
    vcfg, vp = speech["vqvae"]
    vp = jax.tree.map(jnp.asarray, vp)
    vcfg = dataclasses.replace(vcfg, precision=setting)
    x = jnp.zeros((1, 4 * vcfg.encoder.total_stride, 2))
    out.append(("f0_vqvae.encode", jax.make_jaxpr(lambda x: f0_vqvae.encode(vp, vcfg, x))(x)))
    out.append(("f0_vqvae.reconstruct", jax.make_jaxpr(lambda x: f0_vqvae.reconstruct(vp, vcfg, x))(x)))
    fcfg, fp, fconsts = speech["fcpe"]
    fcfg = dataclasses.replace(fcfg, precision=setting)
    lengths = jnp.array([4000], jnp.int32)
    out.append(("fcpe", jax.make_jaxpr(lambda w: fcpe.fcpe_f0(fp, fconsts, w, lengths, fcfg))(wav)))
    ck = speech["hifigan"]
    hcfg = dataclasses.replace(ck.cfg, precision=setting)
    model = hifigan.CodeHifiGAN(hcfg)
    codes = jnp.zeros((1, 8), jnp.int32)
    n = jnp.array([8], jnp.int32)
    out.append(("hifigan.durations", jax.make_jaxpr(
        lambda c: model.apply({"params": ck.params}, c, n, method=hifigan.CodeHifiGAN.durations))(codes)))
    zero = jnp.zeros((1,), jnp.int32)
    out.append(("hifigan.generate", jax.make_jaxpr(
        lambda c: model.apply({"params": ck.params}, c, c, c, zero, zero, zero, n))(codes)))
    lcfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, precision=setting)
    lp = llama.Llama(lcfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    out.append(("llama", jax.make_jaxpr(lambda t: llama.Llama(lcfg).apply(lp, t))(jnp.zeros((1, 4), jnp.int32))))
    return out


def test_every_contraction_carries_the_components_precision(speech):
    with global_matmul_precision("bfloat16"):  # what a TPU user's process may have
        for name, jaxpr in _traced_components(speech, "float32"):
            _assert_all(_contraction_precisions(jaxpr), "float32", name)
    with global_matmul_precision("float32"):  # the setting is the component's, not the flag's
        for name, jaxpr in _traced_components(speech, "bfloat16"):
            _assert_all(_contraction_precisions(jaxpr), "bfloat16", name)


def test_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="precision must be one of"):
        LlamaConfig(precision="fp8")
    with pytest.raises(PrecisionError, match=r"HifiGANConfig: precision='half'.*'float32'"):
        hifigan.HifiGANConfig(upsample_rates=(2,), upsample_kernel_sizes=(4,), upsample_initial_channel=4,
                              resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),), num_embeddings=4,
                              embedding_dim=4, precision="half")


@pytest.fixture(scope="module")
def tokenizers(golden_dir):
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer
    from spiritlm_jax.pitch_tokenizer import PitchTokenizer
    from spiritlm_jax.style_tokenizer import StyleTokenizer
    from spiritlm_jax.vocoder import HifiGANVocoder

    st = golden_dir / "checkpoints" / "speech_tokenizer"
    return {
        "hubert": HubertTokenizer.from_checkpoint_dir(st),
        "pitch": PitchTokenizer.from_checkpoints(st / "vqvae_f0_quantizer"),
        "style": StyleTokenizer.from_checkpoint_dir(st),
        "base": HifiGANVocoder.from_pretrained(st / "hifigan_spiritlm_base"),
        "expressive": HifiGANVocoder.from_pretrained(st / "hifigan_spiritlm_expressive_w2v2"),
    }


@pytest.mark.parametrize("global_setting", GLOBAL_SETTINGS)
def test_golden_discrete_outputs_do_not_depend_on_the_global_flag(golden_dir, tokenizers, global_setting):
    cases = golden_dir / "cases"
    rec = np.load(cases / "inputs.npz")["recording_wav"]
    hub, f0c, sty = (np.load(cases / f) for f in ("hubert_recording.npz", "f0_fcpe_recording.npz", "style_recording.npz"))
    base, expr = np.load(cases / "hifigan_base_recunits.npz"), np.load(cases / "hifigan_expressive.npz")
    with global_matmul_precision(global_setting):
        units = tokenizers["hubert"].encode(rec)
        codes = tokenizers["pitch"].encode_batch([rec])[0]
        style_units = tokenizers["style"].encode(rec)
        _, base_info = tokenizers["base"].vocode_with_details({"hubert": base["code"]}, speaker_id=0, style_id=8,
                                                              dur_pred=True, not_dedup_code=True)
        _, expr_info = tokenizers["expressive"].vocode_with_details(
            {"hubert": expr["code"], "pitch": expr["f0_code_dup"], "style": expr["style_code_dup"]},
            speaker_id=0, dur_pred=True, not_dedup_code=True)
    np.testing.assert_array_equal(units, hub["units"])
    np.testing.assert_array_equal(codes, f0c["pitch_codes"])
    np.testing.assert_array_equal(style_units, sty["style_units"])
    np.testing.assert_array_equal(base_info["dur"], base["dur_spk0_style8_dur1_nodedup1"][0])
    np.testing.assert_array_equal(expr_info["dur"], expr["dur_spk0_dur1"][0])
