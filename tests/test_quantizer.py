"""Quantizers: blank filling vs the original's roll loop, golden edge cases, converters, k-means."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.converters.parity import GoldenSet
from spiritlm_jax.converters.quantizer import convert_kmeans, convert_linear_quantizer, parity_cases
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.models.quantizer import (KmeansQuantizer, LinearQuantizer, LinearQuantizerConfig, fill_blanks,
                                           linear_quantize, logits_to_raw_units)

torch = pytest.importorskip("torch")

BLANK = 9


def roll_loop(code: np.ndarray, blank: int, max_iter: int = 10_000) -> np.ndarray:
    """The original's loop on ONE row: code[blank] = roll(code, 1)[blank] until no blank (≤ max_iter)."""
    code = code.copy()
    if (code == blank).all():  # the loop cannot change an all-blank row; skip its 10 000 no-op rounds
        return code
    it = 0
    while (code == blank).any():
        it += 1
        m = code == blank
        code[m] = np.roll(code, 1)[m]
        if it == max_iter:
            break
    return code


def test_fill_blanks_equals_roll_loop_on_random_rows():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(400):
        T = int(rng.integers(1, 40))
        p_blank = rng.choice([0.0, 0.3, 0.7, 0.95, 1.0])
        rows.append(np.where(rng.random(T) < p_blank, BLANK, rng.integers(0, BLANK, T)).astype(np.int32))
    batch = np.full((len(rows), 40), BLANK, np.int32)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    lens = jnp.asarray([len(r) for r in rows])
    got = np.asarray(fill_blanks(jnp.asarray(batch), BLANK, lens))
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(got[i, :len(r)], roll_loop(r, BLANK), err_msg=f"row {r}")
    # and one row alone (1-D input, no lengths)
    np.testing.assert_array_equal(np.asarray(fill_blanks(jnp.asarray(rows[0]), BLANK)), roll_loop(rows[0], BLANK))


def test_fill_blanks_leading_blanks_wrap_and_all_blank_stays():
    np.testing.assert_array_equal(np.asarray(fill_blanks(jnp.array([9, 9, 1, 9, 2, 9]), BLANK)), [2, 2, 1, 1, 2, 2])
    np.testing.assert_array_equal(np.asarray(fill_blanks(jnp.array([9, 9, 9]), BLANK)), [9, 9, 9])


def test_fill_blanks_respects_the_iteration_cap():
    row = np.array([9, 9, 9, 9, 3, 9, 9, 9, 9, 9], np.int32)
    for cap in (1, 2, 3, 6):
        np.testing.assert_array_equal(np.asarray(fill_blanks(jnp.asarray(row), BLANK, max_iterations=cap)),
                                      roll_loop(row, BLANK, cap))


def test_fill_blanks_is_per_row_with_lengths():
    rng = np.random.default_rng(1)
    rows = [np.where(rng.random(n) < 0.5, BLANK, rng.integers(0, BLANK, n)).astype(np.int32) for n in (7, 12, 3, 12)]
    rows[2][:] = [BLANK, BLANK, 4]  # leading blanks must wrap within the row's own length
    T = 16
    batch = np.full((len(rows), T), 5, np.int32)  # padding holds a non-blank value that must not leak
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    lens = np.array([len(r) for r in rows])
    out = np.asarray(jax.jit(fill_blanks, static_argnames="blank_id")(jnp.asarray(batch), blank_id=BLANK,
                                                                      lengths=jnp.asarray(lens)))
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(out[i, :len(r)], roll_loop(r, BLANK))
        np.testing.assert_array_equal(out[i, len(r):], 5)


def test_log_softmax_argmax_takes_first_of_ties():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0]])
    assert int(logits_to_raw_units(logits)[0]) == 1


def test_golden_edge_cases(golden_dir):
    gs = GoldenSet(golden_dir)
    results = list(parity_cases(gs, "quantizer_blank_edgecases.npz"))
    assert results and all(r.passed for r in results), [(r.quantity, r.status, r.detail) for r in results]


def test_width_formula_and_batched_rows(golden_dir):
    cfg = LinearQuantizerConfig.from_model_cfg({"vocab_size": 500, "dim": 768, "upstream_dim": 768})
    assert cfg.widths == (768, 702, 635, 501)  # REFERENCE.md §2.3
    qcfg, params = convert_linear_quantizer(golden_dir / "checkpoints/speech_tokenizer/hubert_25hz/L11_quantizer_500.pt")
    feats = np.random.default_rng(0).standard_normal((3, 20, qcfg.widths[0])).astype(np.float32)
    lens = np.array([20, 13, 5])
    batched = np.asarray(linear_quantize(params, qcfg, jnp.asarray(feats), jnp.asarray(lens)))
    for i, n in enumerate(lens):
        single = np.asarray(linear_quantize(params, qcfg, jnp.asarray(feats[i:i + 1, :n])))
        np.testing.assert_array_equal(batched[i, :n], single[0])


def test_converter_against_torch_mlp(tmp_path):
    """Our MLP equals the original's Sequential(Linear, LeakyReLU, Linear, LeakyReLU, Linear)."""
    torch.manual_seed(0)
    cfg = {"vocab_size": 20, "dim": 16, "upstream_dim": 30}
    qc = LinearQuantizerConfig.from_model_cfg(cfg)
    w = qc.widths
    seq = torch.nn.Sequential(torch.nn.Linear(w[0], w[1]), torch.nn.LeakyReLU(), torch.nn.Linear(w[1], w[2]),
                              torch.nn.LeakyReLU(), torch.nn.Linear(w[2], w[3]))
    p = tmp_path / "q.pt"
    torch.save({"model_cfg": cfg, "model_weight": seq.state_dict()}, p)
    qcfg, params = convert_linear_quantizer(p)
    x = torch.randn(2, 7, 16)
    ref = seq(x).detach().numpy()
    got = np.asarray(LinearQuantizer(qcfg).apply({"params": params}, jnp.asarray(x.numpy())))
    np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 summation order only (measured ~1e-6)


def test_converter_errors(tmp_path):
    torch.manual_seed(0)
    cfg = {"vocab_size": 20, "dim": 16, "upstream_dim": 30}
    w = LinearQuantizerConfig.from_model_cfg(cfg).widths
    sd = torch.nn.Sequential(torch.nn.Linear(w[0], w[1]), torch.nn.LeakyReLU(), torch.nn.Linear(w[1], w[2]),
                             torch.nn.LeakyReLU(), torch.nn.Linear(w[2], w[3])).state_dict()
    bad = dict(sd)
    del bad["2.bias"]
    torch.save({"model_cfg": cfg, "model_weight": bad}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing \(1\): 2.bias"):
        convert_linear_quantizer(tmp_path / "missing.pt")
    torch.save({"model_cfg": {**cfg, "dim": 17}, "model_weight": sd}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="shape"):
        convert_linear_quantizer(tmp_path / "shape.pt")
    torch.save({"weights": sd}, tmp_path / "nocfg.pt")
    with pytest.raises(CheckpointError, match="model_cfg"):
        convert_linear_quantizer(tmp_path / "nocfg.pt")
    torch.save({"model_cfg": {"vocab_size": 20}, "model_weight": sd}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="upstream_dim"):
        convert_linear_quantizer(tmp_path / "partial.pt")


def test_kmeans_quantizer_and_converter(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((7, 5)).astype(np.float32)
    torch.save({"cluster_centers": torch.from_numpy(centers), "n_clusters": 7}, tmp_path / "km.pt")
    np.save(tmp_path / "km.npy", centers)
    x = rng.standard_normal((2, 11, 5)).astype(np.float32)
    ref = np.argmin(((x[..., None, :] - centers) ** 2).sum(-1), axis=-1)
    for f in ("km.pt", "km.npy"):
        cfg, params = convert_kmeans(tmp_path / f)
        got = np.asarray(KmeansQuantizer(cfg).apply({"params": params}, jnp.asarray(x)))
        np.testing.assert_array_equal(got, ref)
    torch.save({"cluster_centers": torch.from_numpy(centers), "n_clusters": 8}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="shape"):
        convert_kmeans(tmp_path / "bad.pt")
    torch.save({"centers": torch.from_numpy(centers)}, tmp_path / "nokm.pt")
    with pytest.raises(CheckpointError, match="k-means"):
        convert_kmeans(tmp_path / "nokm.pt")
