"""HiFi-GAN unit vocoder: golden parity (vocoder cases and the decode parts of the tokenizer cases),
batched == unbatched, streamed == one-shot, sharded == one device, converter errors, bad inputs."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.converters.hifigan import LOG_DUR_TOL, WAV_TOL, load_hifigan, parity_cases, write_random_original
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.models.hifigan import HifiGANConfig
from spiritlm_jax.models.layers import Conv1d
from spiritlm_jax.vocoder import HifiGANVocoder, VocoderInputError, bucket_length

# Batched rows / other padded lengths run the same maths with other XLA conv tilings: measured
# ≤ 3e-6 on tanh outputs (golden base checkpoint), so 1e-5 still catches any masking error (O(1e-1)).
SHAPE_TOL = 1e-5
# Streaming: the criterion; measured ≤ 3e-6.
STREAM_TOL = 1e-4


def _ckpt(golden_dir, kind):
    name = {"base": "hifigan_spiritlm_base", "expressive": "hifigan_spiritlm_expressive_w2v2"}[kind]
    return golden_dir / "checkpoints" / "speech_tokenizer" / name


@pytest.fixture(scope="module")
def base(golden_dir):
    return HifiGANVocoder.from_pretrained(_ckpt(golden_dir, "base"))


@pytest.fixture(scope="module")
def expressive(golden_dir):
    return HifiGANVocoder.from_pretrained(_ckpt(golden_dir, "expressive"))


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", ["hifigan_base_recunits.npz", "hifigan_base_randunits.npz", "hifigan_expressive.npz"])
def test_golden_parity(golden_dir, case):
    from spiritlm_jax.converters.parity import GoldenSet

    results = list(parity_cases(GoldenSet(golden_dir), case))
    assert len(results) >= 10
    bad = [(r.quantity, r.max_abs_error, r.detail) for r in results if not r.passed]
    assert not bad, bad


def test_tokenizer_base_decode(golden_dir, base):
    """decode(string) (durations on the deduplicated units, not_dedup_code=True) and
    decode(string, speaker_id=1, dur_pred=False) of tokenizer_base_recording."""
    z = np.load(golden_dir / "cases" / "tokenizer_base_recording.npz")
    hubert = [int(v) for v in re.findall(r"\[Hu(\d+)\]", str(z["string"]))]
    wav, info = base.vocode_with_details({"hubert": hubert}, speaker_id=2, dur_pred=True, not_dedup_code=True)
    np.testing.assert_array_equal(info["dur"], z["decode_dur"][0])
    assert np.abs(info["log_dur"] - z["decode_log_dur"][0]).max() <= LOG_DUR_TOL
    assert wav.shape == z["decode_wav"].shape and np.abs(wav - z["decode_wav"]).max() <= WAV_TOL
    wav = base.vocode({"hubert": hubert}, speaker_id=1, dur_pred=False)
    assert wav.shape == z["decode_spk1_nodur_wav"].shape
    assert np.abs(wav - z["decode_spk1_nodur_wav"]).max() <= WAV_TOL


def test_tokenizer_expressive_decode(golden_dir, expressive):
    z = np.load(golden_dir / "cases" / "tokenizer_expressive_recording.npz")
    units = {k: str(z[f"string2units_{k}"]) for k in ("hubert", "pitch", "style")}
    wav, info = expressive.vocode_with_details(units, speaker_id=2, dur_pred=True, not_dedup_code=True)
    for ours, ref in (("code", "decode_gen_code"), ("f0_code", "decode_gen_f0_code"),
                      ("style_code", "decode_gen_style_code"), ("dur", "decode_dur")):
        np.testing.assert_array_equal(info[ours], z[ref][0], err_msg=ours)
    assert np.abs(info["log_dur"] - z["decode_log_dur"][0]).max() <= LOG_DUR_TOL
    assert wav.shape == z["decode_wav"].shape and np.abs(wav - z["decode_wav"]).max() <= WAV_TOL
    # decode(units dict): pitch length != hubert length → dur_pred forced False by decode()
    units = {"hubert": z["units_hubert_int"], "pitch": z["units_pitch_int"], "style": z["units_style_int"]}
    wav = expressive.vocode(units, speaker_id=0, dur_pred=False, not_dedup_code=True)
    assert wav.shape == z["decode_units_spk0_wav"].shape
    assert np.abs(wav - z["decode_units_spk0_wav"]).max() <= WAV_TOL


# ------------------------------------------------------------------------------------ model pieces
@pytest.mark.parametrize("k,u", [(11, 5), (8, 4), (4, 2), (16, 4), (3, 3)])
def test_conv_transpose_matches_torch(k, u):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(k * 10 + u)
    cin, cout, length = 5, 3, 9
    w = rng.standard_normal((cin, cout, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((2, cin, length)).astype(np.float32)
    ref = torch.nn.functional.conv_transpose1d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                               stride=u, padding=(k - u) // 2).numpy()
    params = {"kernel": jnp.asarray(w.transpose(2, 0, 1)), "bias": jnp.asarray(b)}
    got = Conv1d(cout, k, stride=u, padding=(k - u) // 2, transpose=True).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 1)))
    assert got.shape == (2, length * u, cout)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1), ref, atol=1e-5)  # fp32 sums of ≤ 15 terms


def test_receptive_margin_bounds_influence(base):
    """Changing one unit changes only samples within margin_frames of it (the streaming premise)."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 500, 80)
    f = 40
    a = base.vocode(codes, dur_pred=False)
    codes2 = codes.copy()
    codes2[f] = (codes[f] + 7) % 500
    b = base.vocode(codes2, dur_pred=False)
    changed = np.nonzero(np.abs(a - b) > 0)[0]
    assert changed.size
    m, hop = base.margin_frames, base.hop
    assert changed.min() >= (f - m) * hop and changed.max() < (f + 1 + m) * hop


# --------------------------------------------------------------------------- batch / stream / shard
def test_batched_equals_unbatched(base, expressive):
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 500, n) for n in (7, 41, 23)]
    for dur_pred in (True, False):
        wavs = base.vocode_batch(seqs, speaker_id=[0, 3, None], style_id=[None, 2, 8], dur_pred=dur_pred)
        for s, spk, sty, w in zip(seqs, [0, 3, None], [None, 2, 8], wavs):
            one = base.vocode(s, speaker_id=spk, style_id=sty, dur_pred=dur_pred)
            assert w.shape == one.shape and np.abs(w - one).max() <= SHAPE_TOL
    ex = [{"hubert": s, "pitch": rng.integers(0, 64, -(-s.size // 2)), "style": rng.integers(0, 100, -(-s.size // 25))}
          for s in seqs]
    wavs = expressive.vocode_batch(ex, speaker_id=1, dur_pred=False)
    for u, w in zip(ex, wavs):
        one = expressive.vocode(u, speaker_id=1, dur_pred=False)
        assert w.shape == one.shape == (u["hubert"].size * expressive.hop,)
        assert np.abs(w - one).max() <= SHAPE_TOL


@pytest.mark.parametrize("chunk", [8, 29])
def test_stream_equals_one_shot(expressive, chunk):
    rng = np.random.default_rng(3)
    n = 70
    units = {"hubert": rng.integers(0, 500, n), "pitch": rng.integers(0, 64, n), "style": rng.integers(0, 100, n)}
    one = expressive.vocode(units, speaker_id=3, not_dedup_code=True)
    blocks = list(expressive.stream(units, speaker_id=3, not_dedup_code=True, chunk_frames=chunk))
    frames = one.size // expressive.hop
    assert len(blocks) == -(-frames // chunk)
    assert all(b.size == chunk * expressive.hop for b in blocks[:-1])
    got = np.concatenate(blocks)
    assert got.shape == one.shape and np.abs(got - one).max() <= STREAM_TOL


def test_sharded_equals_one_device(golden_dir, base):
    from spiritlm_jax import sharding

    assert jax.device_count() == 8
    mesh = sharding.make_mesh()  # all 8 devices on `data`
    voc = HifiGANVocoder.from_pretrained(_ckpt(golden_dir, "base"), mesh=mesh)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 500, n) for n in (5, 40, 31, 23, 17, 9, 12, 33, 3)]  # 9 rows → padded to 16
    sharded = voc.vocode_batch(seqs, dur_pred=False)
    single = base.vocode_batch(seqs, dur_pred=False)
    # 9 rows padded to 16 → 2 rows per device. The same per-device program (batch 2, same padded
    # length) run on one device gives bit-identical rows.
    rows = [base._prepare(s, 2, None, False, False) for s in seqs]
    frames = [base._frames(r, None) for r in rows]
    empty = (np.zeros(0, np.int64),) * 3
    frames_p = frames + [empty] * (16 - len(frames))
    length = bucket_length(max(f[0].size for f in frames))
    for i, (w, w1) in enumerate(zip(sharded, single)):
        g = i // 2 * 2
        ref = base._generate(frames_p[g:g + 2], [2, 2], [8, 8], length=length)[i - g, :w.size]
        np.testing.assert_array_equal(w, ref)
        assert np.abs(w - w1).max() <= SHAPE_TOL  # vs one device's batch-of-9 program


def test_negative_units_dropped(base):
    codes = np.array([5, 5, -1, 7, 9, -3, 9, 4])
    a = base.vocode(codes, dur_pred=False)
    b = base.vocode(codes[codes >= 0], dur_pred=False)
    np.testing.assert_array_equal(a.shape, b.shape)
    assert np.abs(a - b).max() <= SHAPE_TOL
    # dedup happens before the removal, as the original ([9, -3, 9] keeps both 9s)
    _, info = base.vocode_with_details(codes, dur_pred=True)
    np.testing.assert_array_equal(info["code"], [5, 7, 9, 9, 4])


def test_dedup_rule(base):
    codes = [3, 3, 3, 8, 8, 3]
    _, info = base.vocode_with_details(codes, dur_pred=True, not_dedup_code=False)
    np.testing.assert_array_equal(info["code"], [3, 8, 3])
    _, info = base.vocode_with_details(codes, dur_pred=True, not_dedup_code=True)
    np.testing.assert_array_equal(info["code"], codes)
    _, info = base.vocode_with_details(codes, dur_pred=False)
    np.testing.assert_array_equal(info["code"], codes)
    # string input as the original accepts
    w1 = base.vocode("3 3 3 8 8 3", dur_pred=False)
    w2 = base.vocode(np.array(codes), dur_pred=False)
    np.testing.assert_array_equal(w1, w2)


# -------------------------------------------------------------------------------------- bad inputs
def test_empty_sequences_give_empty_audio(base, expressive):
    for units in ([], "", np.zeros(0, np.int64), [-1, -2]):
        w = base.vocode(units)
        assert w.shape == (0,) and w.dtype == np.float32
        assert list(base.stream(units)) == []
    w = expressive.vocode({"hubert": [], "pitch": [], "style": []})
    assert w.shape == (0,)
    out = base.vocode_batch([[], [1, 2, 3]], dur_pred=False)
    assert out[0].shape == (0,) and out[1].shape == (3 * base.hop,)
    assert base.vocode_batch([]) == []


def test_bad_ids_refused(base, expressive):
    with pytest.raises(VocoderInputError, match="outside the vocoder's unit table"):
        base.vocode([1, 2, 501])
    with pytest.raises(VocoderInputError, match="speaker_id 4"):
        base.vocode([1, 2], speaker_id=4)
    with pytest.raises(VocoderInputError, match="speaker_id -1"):
        base.vocode([1, 2], speaker_id=-1)
    with pytest.raises(VocoderInputError, match="style_id 10"):
        base.vocode([1, 2], style_id=10)
    with pytest.raises(VocoderInputError, match="style_id"):
        HifiGANVocoder(base.cfg, base.params, default_style=12).vocode([1, 2])
    with pytest.raises(VocoderInputError, match="space-separated integers"):
        base.vocode("1 2 x")
    with pytest.raises(VocoderInputError, match="integer ids"):
        base.vocode(np.array([1.5, 2.0]))
    with pytest.raises(VocoderInputError, match="pitch code"):
        expressive.vocode({"hubert": [1, 2], "pitch": [1, 64], "style": [3, 3]})
    with pytest.raises(VocoderInputError, match="style code"):
        expressive.vocode({"hubert": [1, 2], "pitch": [1, 2], "style": [3, -1]})
    with pytest.raises(VocoderInputError, match="2 speaker ids"):
        expressive.vocode_batch([[1, 2]], speaker_id=[1, 2])


def test_expressive_without_pitch_or_style(expressive):
    with pytest.raises(VocoderInputError, match=r"needs pitch codes.*\[PiN\]"):
        expressive.vocode({"hubert": [1, 2, 3], "style": [4, 4, 4]})
    with pytest.raises(VocoderInputError, match=r"needs style codes"):
        expressive.vocode({"hubert": [1, 2, 3], "pitch": [4, 4, 4]})
    with pytest.raises(VocoderInputError, match="must be per unit"):
        expressive.vocode({"hubert": [1, 2, 3, 4], "pitch": [4, 4], "style": [1, 1, 1, 1]}, not_dedup_code=True)
    with pytest.raises(VocoderInputError, match="cannot be aligned"):
        expressive.vocode({"hubert": list(range(10)), "pitch": [4, 4], "style": [1]}, dur_pred=False)
    # base ignores pitch/style entries (as decode() does)


def test_hu500_trap_and_random_checkpoint(tmp_path):
    """A 500-row unit table (as a real tokenizer's 0..499) refuses [Hu500]; the writer + converter
    round-trip a checkpoint in the original format with another architecture."""
    raw = {"upsample_rates": [4, 4, 2], "upsample_kernel_sizes": [8, 8, 4], "upsample_initial_channel": 16,
           "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 2, 3], [1, 3, 5]],
           "num_embeddings": 500, "embedding_dim": 4, "multispkr": True, "num_speakers": 3,
           "code_hop_size": 32, "model_in_dim": 8,
           "dur_predictor_params": {"encoder_embed_dim": 4, "var_pred_hidden_dim": 6, "var_pred_kernel_size": 3,
                                    "var_pred_dropout": 0.5}}
    d = write_random_original(tmp_path / "hg", raw, seed=3)
    voc = HifiGANVocoder.from_pretrained(d)
    assert voc.hop == 32 and voc.speakers == ["spk0", "spk1", "spk2"]
    with pytest.raises(VocoderInputError, match=r"\[Hu500\]|500"):
        voc.vocode([1, 500, 2])
    w = voc.vocode([1, 499, 2], speaker_id=0)
    assert w.dtype == np.float32 and w.size % 32 == 0 and np.isfinite(w).all()
    blocks = np.concatenate(list(voc.stream([1, 499, 2, 7, 7, 9] * 5, speaker_id=0, chunk_frames=5)))
    assert np.abs(blocks - voc.vocode([1, 499, 2, 7, 7, 9] * 5, speaker_id=0)).max() <= STREAM_TOL
    with pytest.raises(VocoderInputError, match="no duration predictor"):
        raw2 = dict(raw)
        del raw2["dur_predictor_params"]
        HifiGANVocoder.from_pretrained(write_random_original(tmp_path / "nodur", raw2)).vocode([1, 2])


# ---------------------------------------------------------------------------------------- converter
def test_converter_errors(tmp_path, golden_dir):
    torch = pytest.importorskip("torch")
    src = _ckpt(golden_dir, "base")
    raw = json.loads((src / "config.json").read_text())
    sd = torch.load(src / "generator.pt", weights_only=True)["generator"]

    def write(name, cfg, state):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        torch.save({"generator": state}, d / "generator.pt")
        return d

    missing = dict(sd)
    del missing["ups.2.weight_g"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): ups.2.weight_g"):
        load_hifigan(write("missing", raw, missing))
    extra = dict(sd, **{"f0_dict.weight": torch.zeros(64, 16)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): f0_dict.weight"):
        load_hifigan(write("extra", raw, extra))
    bad = dict(sd, **{"ups.0.weight_v": torch.zeros(64, 32, 9)})
    with pytest.raises(CheckpointError, match="ups.0.weight_v"):
        load_hifigan(write("shape", raw, bad))
    with pytest.raises(CheckpointError, match="model_in_dim"):
        load_hifigan(write("indim", dict(raw, model_in_dim=40), sd))
    with pytest.raises(CheckpointError, match="k-u must be even"):
        load_hifigan(write("kodd", dict(raw, upsample_kernel_sizes=[10, 8, 8, 8, 4]), sd))
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hifigan(tmp_path / "no_such_dir")
    with pytest.raises(CheckpointError, match="'generator'"):
        d = tmp_path / "nogen"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw))
        torch.save({"model": sd}, d / "generator.pt")
        load_hifigan(d)


def test_weight_norm_axis_of_transposed_conv(golden_dir):
    """ConvTranspose1d's g is per INPUT channel: the folded kernel's per-input-channel norm is |g|."""
    torch = pytest.importorskip("torch")
    src = _ckpt(golden_dir, "base")
    sd = torch.load(src / "generator.pt", weights_only=True)["generator"]
    ck = load_hifigan(src)
    k = ck.params["ups_0"]["kernel"]  # (k, C_in, C_out)
    norms = np.sqrt((k.astype(np.float64) ** 2).sum(axis=(0, 2)))
    np.testing.assert_allclose(norms, np.abs(sd["ups.0.weight_g"].numpy().reshape(-1)), rtol=1e-5)
    assert HifiGANConfig.from_original(ck.raw_config).hop == 640
