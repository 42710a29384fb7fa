"""k-means in JAX (train/kmeans.py) against scikit-learn, over 8 simulated devices, and `train-quantizer`
through the CLI into a speech tokenizer that uses the k-means units."""
import json

import numpy as np
import pytest
from sklearn.cluster import KMeans

from spiritlm_jax.cli import main as cli_main
from spiritlm_jax.sharding import make_mesh
from spiritlm_jax.train import kmeans as km

SR = 16_000


@pytest.fixture(scope="module")
def blobs():
    """3000 points in 16-d from 10 Gaussian blobs (unequal spreads), float32."""
    rng = np.random.default_rng(0)
    parts = [rng.normal(scale=0.5 + 0.1 * i, size=(300, 16)) + 3 * rng.normal(size=16) for i in range(10)]
    return np.concatenate(parts).astype(np.float32)


def test_same_inertia_as_scikit_learn_from_the_same_init(blobs):
    init = km.kmeans_plus_plus(blobs, 20, seed=0)
    ours = km.fit_kmeans(blobs, 20, init=init, batch_size=256, max_iter=100, tol=1e-4)
    ref = KMeans(20, init=init, n_init=1, algorithm="lloyd", max_iter=100, tol=1e-4).fit(blobs)
    # Both run exact Lloyd steps from the same centres: measured 45596.23 vs 45596.20 (7e-7 relative).
    # The bound is 1 %; a wrong E-step or M-step lands 10-100 % off.
    assert abs(ours.inertia - ref.inertia_) <= 0.01 * ref.inertia_
    assert ours.converged
    # the reported inertia is the one of the final centres
    assert ours.inertia == pytest.approx(float(((blobs[:, None] - ours.centers[None]) ** 2).sum(-1).min(1).sum()),
                                         rel=1e-5)


def test_8_devices_give_the_centres_of_one_device(blobs):
    import jax

    assert jax.device_count() == 8
    init = km.kmeans_plus_plus(blobs, 20, seed=3)
    mesh = make_mesh((8, 1, 1))
    # One Lloyd step from the same centres: only the float32 summation order differs (per-device partial
    # sums); measured max |delta| 1.9e-6 on centres of magnitude ~5.
    one = km.fit_kmeans(blobs, 20, init=init, batch_size=256, max_iter=1)
    eight = km.fit_kmeans(blobs, 20, init=init, batch_size=256, max_iter=1, mesh=mesh)
    np.testing.assert_allclose(eight.centers, one.centers, atol=1e-4, rtol=0)
    # Run to convergence, a point within rounding of a tie between two of the 20 centres (10 blobs: some
    # centres split a blob) may go either way and move its two centres by ~1e-2 (seen on an AVX2 AMD host;
    # not on the Intel one): the same clustering up to such points, the same inertia.
    one = km.fit_kmeans(blobs, 20, init=init, batch_size=256)
    eight = km.fit_kmeans(blobs, 20, init=init, batch_size=256, mesh=mesh)
    labels_one, labels_eight = km.assign(blobs, one.centers)[0], km.assign(blobs, eight.centers)[0]
    assert np.mean(labels_one != labels_eight) <= 0.002  # at most 6 of 3000 points
    assert abs(eight.inertia - one.inertia) <= 1e-4 * one.inertia
    # the batch size does not change the algorithm either (exact Lloyd, not MiniBatchKMeans)
    big = km.fit_kmeans(blobs, 20, init=init, batch_size=4096, max_iter=1)
    np.testing.assert_allclose(big.centers, km.fit_kmeans(blobs, 20, init=init, batch_size=256, max_iter=1).centers,
                               atol=1e-4, rtol=0)


def test_deterministic_for_a_seed(blobs):
    a = km.fit_kmeans(blobs, 12, seed=7, batch_size=512)
    b = km.fit_kmeans(blobs, 12, seed=7, batch_size=512)
    c = km.fit_kmeans(blobs, 12, seed=8, batch_size=512)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert not np.array_equal(a.centers, c.centers)


def test_bad_inputs_are_clear_errors(blobs):
    with pytest.raises(km.KmeansError, match="cannot make 50 clusters"):
        km.fit_kmeans(blobs[:10], 50)
    bad = blobs.copy()
    bad[3, 2] = np.nan
    with pytest.raises(km.KmeansError, match="NaN or inf"):
        km.fit_kmeans(bad, 4)
    with pytest.raises(km.KmeansError, match="init centres have shape"):
        km.fit_kmeans(blobs, 4, init=np.zeros((3, 16), np.float32))


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    """A few eSpeak utterances (the engine of the TTS stage)."""
    from spiritlm_jax.train import tts

    d = tmp_path_factory.mktemp("speech")
    sents = [(f"s{i}", t) for i, t in enumerate(["the big dog finds the bone near the park",
                                                  "the small cat wants the milk by the kitchen",
                                                  "the old king takes the crown near the castle",
                                                  "the young bird sees the seed by the garden"])]
    tts.synthesize_corpus(sents, d, tts.SynthesisOptions(voices=("en-us", "en-us+f2")), progress=False)
    return d


def test_train_quantizer_cli_makes_a_speech_tokenizer(tmp_path, speech_dir):
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer
    from spiritlm_jax.speech import SpeechTokenizer
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints(log=lambda *a: None)
    out = tmp_path / "st" / "speech_tokenizer"
    rc = cli_main(["train-quantizer", "--speech-tokenizer", str(root / "speech_tokenizer"), "--audio", str(speech_dir),
                   "--out", str(out), "--units", "16", "--features", "log_mel:20:1", "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "hubert_25hz" / "kmeans.json").read_text())
    assert meta["n_clusters"] == 16 and meta["dim"] == 60 and meta["features"]["kind"] == "log_mel"
    assert meta["inertia"] > 0 and meta["frames"] > 16
    # the speech tokenizer picks the k-means quantizer up and its units are on HuBERT's 25 Hz framing
    st = SpeechTokenizer.from_checkpoints(out.parent, "base", with_vocoder=False)
    assert not st.hubert.is_linear and st.hubert.n_units == 16
    from spiritlm_jax.audio import load_audio

    wav = load_audio(str(speech_dir / "s0.wav"))
    units = st.hubert.encode(wav)
    rf, hop = st.hubert.cfg.receptive_field, st.hubert.hop
    assert len(units) == (len(wav) - rf) // hop + 1
    assert units.min() >= 0 and units.max() < 16 and len(set(units.tolist())) > 3
    # units are the nearest centres of the stored features (the quantizer reads what it was trained on)
    feats = st.hubert.encode(wav, dense=True)
    centers = np.load(out / "hubert_25hz" / "centers.npy")
    np.testing.assert_array_equal(units, ((feats[:, None] - centers[None]) ** 2).sum(-1).argmin(1))
    assert st.encode_string(wav).startswith("[Hu")
    # a second run refuses to overwrite without --overwrite
    assert cli_main(["train-quantizer", "--speech-tokenizer", str(root / "speech_tokenizer"), "--audio",
                     str(speech_dir), "--out", str(out), "--units", "16", "--no-progress"]) == 2
    # hubert features + the original's k-means layout, read back by our converter
    out2 = tmp_path / "st2"
    assert cli_main(["train-quantizer", "--speech-tokenizer", str(root / "speech_tokenizer"), "--audio",
                     str(speech_dir), "--out", str(out2), "--units", "8", "--features", "hubert:6",
                     "--export-original", "--mesh", "8,1,1", "--no-progress"]) == 0
    from spiritlm_jax.converters.quantizer import convert_kmeans

    qcfg, qp = convert_kmeans(out2 / "hubert_25hz" / "kmeans_8.pt")
    np.testing.assert_array_equal(qp["centers"], np.load(out2 / "hubert_25hz" / "centers.npy"))
    tok = HubertTokenizer.from_checkpoint_dir(out2)
    assert tok.hubert_layer == 6 and tok.n_units == 8


def test_train_quantizer_bad_inputs(tmp_path, capsys, speech_dir):
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints(log=lambda *a: None)
    st = str(root / "speech_tokenizer")
    (tmp_path / "empty").mkdir()
    assert cli_main(["train-quantizer", "--speech-tokenizer", st, "--audio", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no audio files" in capsys.readouterr().err
    assert cli_main(["train-quantizer", "--speech-tokenizer", st, "--audio", str(speech_dir), "--out",
                     str(tmp_path / "o"), "--features", "mfcc", "--no-progress"]) == 2
    assert "cannot read the feature spec 'mfcc'" in capsys.readouterr().err
    assert cli_main(["train-quantizer", "--speech-tokenizer", str(tmp_path), "--audio", str(speech_dir), "--out",
                     str(tmp_path / "o"), "--no-progress"]) == 2
    assert "mhubert_base_25hz.pt not found" in capsys.readouterr().err
    assert cli_main(["train-quantizer", "--speech-tokenizer", st, "--audio", str(speech_dir), "--out",
                     str(tmp_path / "o"), "--units", "100000", "--no-progress"]) == 2
    assert "cannot make 100000 clusters" in capsys.readouterr().err
