"""HuBERT encoder + tokenizer: golden parity, a live transformers oracle, batching, sharding, converter
and input errors."""
import re

import jax
import numpy as np
import pytest

from spiritlm_jax.audio import AudioError
from spiritlm_jax.converters.hubert import convert_hubert, parity_cases
from spiritlm_jax.converters.parity import GoldenSet
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.hubert_tokenizer import HubertTokenizer, TokenizerInputError
from spiritlm_jax.models.hubert import EncoderConfigError, SpeechEncoderConfig, parse_conv_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CKPT = "checkpoints/speech_tokenizer"

# Batched / sharded rows vs the unbatched call: the same math on different padded shapes, so only
# float32 summation order differs (measured ≤ 7e-6 on the golden model; the reference's own
# 1-vs-2-thread spread is 2.6e-6). Units must be identical.
ROW_TOL = 2e-5
# Against transformers' HubertModel (an independent torch implementation): measured ≤ 1e-5.
ORACLE_TOL = 1e-4


@pytest.fixture(scope="module")
def tok(golden_dir):
    return HubertTokenizer.from_checkpoint_dir(golden_dir / CKPT)


@pytest.fixture(scope="module")
def rec(golden_dir):
    return np.load(golden_dir / "cases" / "inputs.npz")["recording_wav"]


@pytest.mark.parametrize("case", ["hubert_recording.npz", "hubert_synth_odd.npz", "hubert_chunking.npz"])
def test_golden_parity(golden_dir, tok, case):
    gs = GoldenSet(golden_dir)
    gs._cache["hubert_tokenizer"] = tok
    results = list(parity_cases(gs, case))
    assert results and all(r.passed for r in results), [(r.quantity, r.max_abs_error, r.status, r.detail)
                                                        for r in results if not r.passed]


# ------------------------------------------------------------------------------------------------
# transformers HubertModel as a live oracle (same random weights, keys renamed)
# ------------------------------------------------------------------------------------------------

FAIRSEQ_TO_HF = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"feature_extractor\.conv_layers\.0\.2\.", r"feature_extractor.conv_layers.0.layer_norm."),
    (r"^layer_norm\.", "feature_projection.layer_norm."),
    (r"^post_extract_proj\.", "feature_projection.projection."),
    (r"encoder\.pos_conv\.0\.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"\.self_attn\.", ".attention."),
    (r"\.self_attn_layer_norm\.", ".layer_norm."),
    (r"\.fc1\.", ".feed_forward.intermediate_dense."),
    (r"\.fc2\.", ".feed_forward.output_dense."),
    (r"^mask_emb$", "masked_spec_embed"),
]


def hf_config(cfg: SpeechEncoderConfig):
    return transformers.HubertConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_dim, conv_dim=[d for d, _, _ in cfg.conv_layers],
        conv_kernel=[k for _, k, _ in cfg.conv_layers], conv_stride=[s for _, _, s in cfg.conv_layers],
        conv_bias=cfg.conv_bias, feat_extract_norm="group", num_conv_pos_embeddings=cfg.conv_pos,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups, do_stable_layer_norm=False, feat_proj_layer_norm=True,
        hidden_act="gelu", layer_norm_eps=1e-5)


def hf_from_fairseq(sd, cfg):
    model = transformers.HubertModel(hf_config(cfg)).eval()
    new = {}
    for k, v in sd.items():
        if k.startswith(("label_embs_concat", "final_proj")):
            continue
        for a, b in FAIRSEQ_TO_HF:
            k = re.sub(a, b, k)
        new[k] = v
    model.load_state_dict(new, strict=True)
    return model


def test_transformers_hubert_oracle_on_golden_weights(golden_dir, tok, rec):
    ck = torch.load(golden_dir / CKPT / "hubert_25hz" / "mhubert_base_25hz.pt", weights_only=True)
    cfg = SpeechEncoderConfig.from_fairseq(ck["model_cfg"], ck["task_cfg"])
    model = hf_from_fairseq(ck["model_weight"], cfg)
    x = rec[30000:78000]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)[None], output_hidden_states=True).hidden_states[11][0].numpy()
    got = tok.encode(x, dense=True)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=ORACLE_TOL)


def fairseq_ckpt_from_hf(model, cfg_spec: str, d: int, heads: int, ffn: int, layers: int, pos: int, groups: int):
    hf_to_fs = []
    sd = {}
    for k, v in model.state_dict().items():
        fk = k
        for a, b in [("feature_projection.layer_norm.", "layer_norm."), ("feature_projection.projection.", "post_extract_proj."),
                     ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
                     ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
                     ("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"), (".attention.", ".self_attn."),
                     (".feed_forward.intermediate_dense.", ".fc1."), (".feed_forward.output_dense.", ".fc2."),
                     ("masked_spec_embed", "mask_emb")]:
            fk = fk.replace(a, b)
        fk = re.sub(r"(encoder\.layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm.", fk)
        fk = re.sub(r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0.", fk)
        fk = fk.replace("feature_extractor.conv_layers.0.layer_norm.", "feature_extractor.conv_layers.0.2.")
        hf_to_fs.append((k, fk))
        sd[fk] = v.detach().clone()
    model_cfg = {"label_rate": 25.0, "extractor_mode": "default", "encoder_layers": layers, "encoder_embed_dim": d,
                 "encoder_ffn_embed_dim": ffn, "encoder_attention_heads": heads, "activation_fn": "gelu",
                 "layer_type": "transformer", "layer_norm_first": False, "conv_feature_layers": cfg_spec,
                 "conv_bias": False, "conv_pos": pos, "conv_pos_groups": groups, "conv_pos_batch_norm": False}
    return {"model_cfg": model_cfg, "task_cfg": {"sample_rate": 16000, "normalize": False},
            "model_weight": sd, "dictionaries_symbols": [["0", "1"]]}


@pytest.fixture(scope="module")
def alt_layout(tmp_path_factory):
    """A random HF HubertModel with the OTHER plausible 25 Hz conv layout, saved in the fairseq format."""
    spec = "[(24,10,5)] + [(24,3,2)] * 5 + [(24,2,2)] * 2"
    layers = parse_conv_layers(spec)
    cfg = SpeechEncoderConfig(conv_layers=layers, embed_dim=32, ffn_dim=40, num_heads=4, num_layers=3, conv_pos=8,
                              conv_pos_groups=2)
    torch.manual_seed(0)
    model = transformers.HubertModel(hf_config(cfg)).eval()
    with torch.no_grad():  # random affine norms and a weight-norm g that differs from ‖v‖
        for n, p in model.named_parameters():
            if "norm" in n or "original0" in n:
                p.add_(0.3 * torch.randn_like(p))
    ck = fairseq_ckpt_from_hf(model, spec, 32, 4, 40, 3, 8, 2)
    path = tmp_path_factory.mktemp("alt") / "hubert.pt"
    torch.save(ck, path)
    return model, path, ck


def test_conv_layout_is_read_from_the_checkpoint(alt_layout):
    model, path, _ = alt_layout
    cfg, params = convert_hubert(path, output_layer=2)
    assert cfg.conv_layers == ((24, 10, 5),) + ((24, 3, 2),) * 5 + ((24, 2, 2),) * 2 and cfg.hop == 640
    assert params["layers"]["fc1_kernel"].shape[0] == 2  # only the layers that run are kept
    tok = HubertTokenizer(cfg, params, *_dummy_quantizer(32), hubert_layer=2)
    x = np.random.default_rng(0).standard_normal(24017).astype(np.float32) * 0.1
    for n in (24017, 1440, 1439, 800):
        got = tok.encode(x[:n], dense=True, min_chunk=1)
        assert got.shape[0] == (n - 800) // 640 + 1  # REFERENCE.md §14.1, the (3,2)×5 layout
        with torch.no_grad():
            ref = model(torch.from_numpy(x[:n])[None], output_hidden_states=True).hidden_states[2][0].numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=ORACLE_TOL)
    with pytest.raises(TokenizerInputError, match="800 samples"):
        tok.encode(x[:799], min_chunk=1)


def _dummy_quantizer(dim):
    from spiritlm_jax.models.quantizer import LinearQuantizerConfig

    cfg = LinearQuantizerConfig(vocab_size=5, widths=(dim, 8, 8, 6))
    rng = np.random.default_rng(0)
    params = {}
    for i in range(3):
        params[f"dense_{i}_kernel"] = rng.standard_normal((cfg.widths[i], cfg.widths[i + 1])).astype(np.float32)
        params[f"dense_{i}_bias"] = np.zeros(cfg.widths[i + 1], np.float32)
    return cfg, params


# ------------------------------------------------------------------------------------------------
# batching and sharding
# ------------------------------------------------------------------------------------------------

LENGTHS = (20000, 50017, 33333, 1500, 8000, 146160, 64000, 721)


def test_batched_rows_equal_unbatched(tok, rec):
    wavs = [rec[:n] for n in LENGTHS]
    single_u = [tok.encode(w) for w in wavs]
    single_f = [tok.encode(w, dense=True) for w in wavs]
    batch_u = tok.encode_batch(wavs)
    batch_f = tok.encode_batch(wavs, dense=True)
    for n, a, b, fa, fb in zip(LENGTHS, single_u, batch_u, single_f, batch_f):
        assert len(a) == (n - 720) // 640 + 1
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(fa, fb, rtol=0, atol=ROW_TOL)


def test_sharded_batch_equals_one_device(golden_dir, tok, rec):
    """Batch split over the 'data' axis of an 8-device mesh; parameters replicated on every device."""
    from spiritlm_jax.sharding import make_mesh

    assert len(jax.devices()) == 8
    mesh = make_mesh((8, 1, 1))
    stok = HubertTokenizer.from_checkpoint_dir(golden_dir / CKPT, mesh=mesh)
    leaf = jax.tree.leaves(stok._runner.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    wavs = [rec[:n] for n in LENGTHS]
    for a, b in zip(tok.encode_batch(wavs), stok.encode_batch(wavs)):
        np.testing.assert_array_equal(a, b)
    fa, fb = tok.encode_batch(wavs[:3], dense=True), stok.encode_batch(wavs[:3], dense=True)
    for a, b in zip(fa, fb):
        np.testing.assert_allclose(a, b, rtol=0, atol=ROW_TOL)


def test_file_input_and_channels(golden_dir, tok, rec, tmp_path):
    import soundfile as sf

    units = tok.encode(golden_dir / "audio" / "7143-88743-0029.flac")
    np.testing.assert_array_equal(units, tok.encode(rec))
    sf.write(tmp_path / "st.wav", np.stack([rec[:32000], np.zeros(32000, np.float32)], 1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(tok.encode(tmp_path / "st.wav", channel=0), tok.encode(rec[:32000]))
    np.testing.assert_array_equal(tok.encode(tmp_path / "st.wav"), tok.encode(rec[:32000] * np.float32(0.5)))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_bad_audio_errors(tok):
    with pytest.raises(TokenizerInputError, match="fewer than min_chunk=400"):
        tok.encode(np.zeros(399, np.float32))
    with pytest.raises(TokenizerInputError, match="720 samples"):
        tok.encode(np.zeros(719, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        tok.encode(np.full(2000, np.nan, np.float32))
    with pytest.raises(AudioError, match="empty"):
        tok.encode(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="not a waveform"):
        tok.encode(np.zeros((2, 2, 2000), np.float32))
    with pytest.raises(TokenizerInputError, match="list of utterances"):
        tok.encode_batch(np.zeros(2000, np.float32))
    assert tok.encode_batch([]) == []


def test_converter_errors(alt_layout, tmp_path):
    _, _, ck = alt_layout

    def save(c):
        p = tmp_path / "bad.pt"
        torch.save(c, p)
        return p

    sd = dict(ck["model_weight"])
    del sd["encoder.layers.1.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): encoder.layers.1.fc1.bias"):
        convert_hubert(save({**ck, "model_weight": sd}), output_layer=2)
    sd = dict(ck["model_weight"], **{"encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder.extra.weight"):
        convert_hubert(save({**ck, "model_weight": sd}), output_layer=2)
    sd = dict(ck["model_weight"], **{"post_extract_proj.weight": torch.zeros(32, 23)})
    with pytest.raises(CheckpointError, match="post_extract_proj.weight"):
        convert_hubert(save({**ck, "model_weight": sd}), output_layer=2)
    with pytest.raises(CheckpointError, match="dictionaries_symbols"):
        convert_hubert(save({k: v for k, v in ck.items() if k != "dictionaries_symbols"}))
    with pytest.raises(CheckpointError, match="layer_type"):
        convert_hubert(save({**ck, "model_cfg": {**ck["model_cfg"], "layer_type": "conformer"}}), output_layer=2)
    with pytest.raises(CheckpointError, match="label_rate"):
        convert_hubert(save({**ck, "model_cfg": {k: v for k, v in ck["model_cfg"].items() if k != "label_rate"}}))
    with pytest.raises(CheckpointError, match="output layer 4"):
        convert_hubert(save(ck), output_layer=4)


def test_conv_layer_spec_is_parsed_safely():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 3")[-1] == (512, 2, 2)
    for bad in ("__import__('os').system('true')", "[(1,2)]", "[]", "[(1,2,3)] * 'a'", "[(1, 2, 3.5)]"):
        with pytest.raises(EncoderConfigError):
            parse_conv_layers(bad)


def test_prenorm_and_waveform_norm_variants_run():
    """layer_norm_first=True (encoder LN skipped when a target layer is given, as fairseq) and
    task normalize=True (per-item waveform layer norm, masked per row in a batch)."""
    from spiritlm_jax.models.hubert import SpeechEncoder, init_params

    cfg = SpeechEncoderConfig.from_fairseq(
        {"label_rate": 25, "conv_feature_layers": "[(8,10,5)] + [(8,3,2)] * 2", "encoder_embed_dim": 16,
         "encoder_ffn_embed_dim": 16, "encoder_attention_heads": 2, "encoder_layers": 2, "conv_pos": 4,
         "conv_pos_groups": 2, "layer_norm_first": True}, {"normalize": True}, output_layer=1)
    assert cfg.encoder_ln == "none" and cfg.normalize_waveform
    params = init_params(cfg)
    x = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
    x[1, 600:] = 0.0
    m = SpeechEncoder(cfg)
    run = jax.jit(lambda w, n: m.apply({"params": params}, w, n))
    out = run(x, np.array([1000, 600]))
    one = run(x[1:, :600], np.array([600]))
    n = int(one["frame_lengths"][0])
    np.testing.assert_allclose(out["features"][1, :n], one["features"][0], atol=ROW_TOL)
    # scaling the waveform does not change a layer-normed input
    two = run(3.0 * x[1:, :600], np.array([600]))
    np.testing.assert_allclose(two["features"], one["features"], atol=1e-4)
