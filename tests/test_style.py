"""wav2vec2 style encoder: golden parity, transformers oracle (incl. the stable-layer-norm variant),
pooling, batching, sharding, converter errors."""
import json
import shutil

import jax
import numpy as np
import pytest

from spiritlm_jax.converters.parity import GoldenSet
from spiritlm_jax.converters.style import convert_style, parity_cases
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.hubert_tokenizer import TokenizerInputError
from spiritlm_jax.models.style import normalize_waveform, pool_windows
from spiritlm_jax.style_tokenizer import StyleTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STYLE_DIR = "checkpoints/speech_tokenizer/style_encoder_w2v2"
# Batched/sharded rows vs unbatched: float32 summation order only (measured ≤ 5e-6); units identical.
ROW_TOL = 2e-5
# Against transformers' Wav2Vec2Model (independent torch implementation): measured ≤ 1e-5.
ORACLE_TOL = 1e-4


@pytest.fixture(scope="module")
def tok(golden_dir):
    return StyleTokenizer.from_checkpoint_dir(golden_dir / "checkpoints/speech_tokenizer")


@pytest.fixture(scope="module")
def rec(golden_dir):
    return np.load(golden_dir / "cases" / "inputs.npz")["recording_wav"]


@pytest.mark.parametrize("case", ["style_recording.npz", "style_synth_odd.npz"])
def test_golden_parity(golden_dir, tok, case):
    gs = GoldenSet(golden_dir)
    gs._cache["style_tokenizer"] = tok
    results = list(parity_cases(gs, case))
    assert results and all(r.passed for r in results), [(r.quantity, r.max_abs_error, r.detail) for r in results if not r.passed]


def test_pooling_partial_last_window():
    x = np.arange(2 * 7 * 1, dtype=np.float32).reshape(2, 7, 1)
    pooled, n = pool_windows(x, np.array([7, 4]), 3)
    np.testing.assert_allclose(pooled[0, :, 0], [1.0, 4.0, 6.0])  # windows [0,1,2] [3,4,5] [6]
    np.testing.assert_allclose(pooled[1, :2, 0], [8.0, 10.0])  # row 1 has 4 valid frames: [7,8,9] [10]
    assert list(np.asarray(n)) == [3, 2]


def test_normalisation_matches_hf_feature_extractor(rec):
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    ref = fe(rec[:5000], sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_array_equal(normalize_waveform(rec[:5000]), ref)


def test_transformers_oracle_on_golden_weights(golden_dir, tok, rec):
    model = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(golden_dir / STYLE_DIR).eval()
    x = normalize_waveform(rec[10000:60000])
    with torch.no_grad():
        ref = model.wav2vec2(torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
    got = tok.encode(rec[10000:60000], return_intermediates=True)["last_hidden_state"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=ORACLE_TOL)


def test_stable_layer_norm_variant_against_transformers(tmp_path):
    """do_stable_layer_norm=True: LayerNorm conv blocks, pre-norm layers, final encoder LayerNorm."""
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=[8, 8, 8],
        conv_kernel=[10, 3, 3], conv_stride=[5, 2, 2], feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=7, num_conv_pos_embedding_groups=2, classifier_proj_size=6, num_labels=5,
        conv_bias=True)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "original0" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=False)
    stok = StyleTokenizer.from_checkpoint_dir(tmp_path, pool_size=4)
    x = np.random.default_rng(0).standard_normal(3001).astype(np.float32)
    out = stok.encode(x, return_intermediates=True)
    with torch.no_grad():
        h = model.wav2vec2(torch.from_numpy(normalize_waveform(x))[None]).last_hidden_state
        proj = model.projector(h)[0].numpy()
    np.testing.assert_allclose(out["last_hidden_state"], h[0].numpy(), rtol=0, atol=ORACLE_TOL)
    T = proj.shape[0]
    pooled = np.stack([proj[i:i + 4].mean(0) for i in range(0, T, 4)])
    np.testing.assert_allclose(out["pooled"], pooled, atol=ORACLE_TOL)
    logits = model.classifier(torch.from_numpy(pooled)).detach().numpy()
    np.testing.assert_array_equal(out["units"], logits.argmax(-1))


LENGTHS = (146160, 24017, 401, 50017, 16000, 800)


def test_batched_rows_equal_unbatched(tok, rec):
    wavs = [rec[:n] for n in LENGTHS]
    single = [tok.encode(w, return_intermediates=True) for w in wavs]
    batch = tok.encode_batch(wavs)
    for n, s, b in zip(LENGTHS, single, batch):
        assert len(b) == -(-((n - 400) // 320 + 1) // 50)  # REFERENCE.md §14.1
        np.testing.assert_array_equal(s["units"], b)
    # features of a padded row vs its own unbatched call
    out = tok._runner.run([normalize_waveform(w) for w in wavs[1:3]])
    for r, s in zip(out, single[1:3]):
        n = int(r["frame_lengths"])
        np.testing.assert_allclose(r["last_hidden_state"][:n], s["last_hidden_state"], rtol=0, atol=ROW_TOL)


def test_sharded_batch_equals_one_device(golden_dir, tok, rec):
    """Batch split over the mesh's 'data' axis (8 simulated devices); parameters replicated."""
    from spiritlm_jax.sharding import make_mesh

    stok = StyleTokenizer.from_checkpoint_dir(golden_dir / "checkpoints/speech_tokenizer", mesh=make_mesh((8, 1, 1)))
    assert jax.tree.leaves(stok._runner.params)[0].sharding.is_fully_replicated
    wavs = [rec[:n] for n in LENGTHS]
    for a, b in zip(tok.encode_batch(wavs), stok.encode_batch(wavs)):
        np.testing.assert_array_equal(a, b)


def test_chunking_and_errors(tok, rec):
    u = tok.encode(rec, max_chunk=29000)  # 5 chunks of 90 frames → 2 windows each; the 1160 tail gives 3 frames → 1
    assert len(u) == 5 * 2 + 1
    np.testing.assert_array_equal(u[:2], tok.encode(rec[:29000]))
    assert len(tok.encode(rec, max_chunk=29000, min_chunk=1280)) == 5 * 2  # SpiritLMTokenizer drops the tail
    with pytest.raises(TokenizerInputError, match="min_chunk=400"):
        tok.encode(np.ones(399, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(np.full(1000, np.nan, np.float32))


def test_converter_errors(golden_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(golden_dir / STYLE_DIR, d)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd2 = dict(sd)
    del sd2["classifier.bias"]
    torch.save(sd2, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing \(1\): classifier.bias"):
        convert_style(d)
    sd2 = dict(sd)
    del sd2["wav2vec2.encoder.layers.1.final_layer_norm.weight"]
    torch.save(sd2, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="final_layer_norm.weight"):
        convert_style(d)
    torch.save(sd, d / "pytorch_model.bin")
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "classifier_proj_size": 25}))
    with pytest.raises(CheckpointError, match="projector.weight"):
        convert_style(d)
    (d / "config.json").write_text(json.dumps({**c, "feat_extract_norm": "batch"}))
    with pytest.raises(CheckpointError, match="feat_extract_norm"):
        convert_style(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        convert_style(d)
