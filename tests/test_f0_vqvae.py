"""Pitch VQ-VAE: converter tables, encoder/bottleneck/decoder against an independent torch.nn.functional
reference on architectures other than the golden one, batching, bad configs and checkpoints."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import jax.numpy as jnp

from spiritlm_jax.converters import f0_vqvae as conv
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.models import f0_vqvae as vq


def cfg_dict(**over):
    enc = dict(input_emb_width=2, output_emb_width=8, levels=1, downs_t=[2], strides_t=[2], width=6, depth=2,
               m_conv=1.5, dilation_growth_rate=3)
    enc.update(over.pop("enc", {}))
    dec = dict(enc, reverse_decoder_dilation=True)
    dec.update(over.pop("dec", {}))
    d = dict(features="norm_f0_interp,vuv", encoder_params=enc, decoder_params=dec,
             vq_params=dict(l_bins=5, emb_width=8, mu=0.99, levels=enc["levels"]))
    d.update(over)
    return d


def random_state_dict(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {key: (torch.randn(*shape, generator=g) * 0.4) for _, key, _, shape in conv._table(cfg)}
    for l in range(cfg.vq_levels):
        sd[f"vq.level_blocks.{l}.k"] = torch.randn(cfg.l_bins, cfg.emb_width, generator=g)
    return sd


# ---- an independent torch.nn.functional reading of REFERENCE.md §5.5-5.6 (not the original's code)
def t_res(sd, prefix, x, c, reverse):
    dil = [c.dilation_growth_rate ** (j if c.dilation_cycle is None else j % c.dilation_cycle) for j in range(c.depth)]
    if reverse:
        dil = dil[::-1]
    scale = 1.0 if not c.res_scale else 1.0 / np.sqrt(c.depth)
    for j, d in enumerate(dil):
        h = F.conv1d(F.relu(x), sd[f"{prefix}.model.{j}.model.1.weight"], sd[f"{prefix}.model.{j}.model.1.bias"],
                     padding=d, dilation=d)
        x = x + scale * F.conv1d(F.relu(h), sd[f"{prefix}.model.{j}.model.3.weight"], sd[f"{prefix}.model.{j}.model.3.bias"])
    return x


def t_encode(sd, cfg, x):
    e, xs = cfg.encoder, []
    for l in range(e.levels):
        s = e.strides_t[l]
        for i in range(e.downs_t[l]):
            p = f"encoder.level_blocks.{l}.model.{i}"
            x = F.conv1d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], stride=s, padding=s // 2)
            x = t_res(sd, f"{p}.1", x, e, False)
        p = f"encoder.level_blocks.{l}.model.{e.downs_t[l]}"
        x = F.conv1d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
        xs.append(x)
    return xs


def t_quant(z, k):
    z = z[0].T
    if z.shape[1] == 2 * k.shape[1]:
        z = z[:, : k.shape[1]] + z[:, k.shape[1]:]
    d = (z ** 2).sum(-1, keepdim=True) - 2 * z @ k.T + (k.T ** 2).sum(0, keepdim=True)
    return d.argmin(-1), z


def t_decode(sd, cfg, zs):
    d = cfg.decoder
    x = zs[-1]
    for l in reversed(range(d.levels)):
        s, p = d.strides_t[l], f"decoder.level_blocks.{l}.model"
        x = F.conv1d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], padding=1)
        for i in range(d.downs_t[l]):
            x = t_res(sd, f"{p}.{1 + i}.0", x, d, d.reverse_decoder_dilation)
            x = F.conv_transpose1d(x, sd[f"{p}.{1 + i}.1.weight"], sd[f"{p}.{1 + i}.1.bias"], stride=s, padding=s // 2)
        if l:
            x = x + zs[l - 1]
    return F.conv1d(x, sd["decoder.out.weight"], sd["decoder.out.bias"], padding=1)


VARIANTS = {
    "golden_like": cfg_dict(),
    # two levels, encoder output 2·emb_width (halves summed), dilation cycle, res_scale, stride 4
    "two_levels_double_emb": cfg_dict(enc=dict(levels=2, downs_t=[2, 1], strides_t=[2, 4], output_emb_width=16,
                                               dilation_cycle=2, res_scale=True),
                                      dec=dict(output_emb_width=8), vq_params=dict(l_bins=7, emb_width=8, mu=0.9, levels=2)),
    "no_reverse_dilation": cfg_dict(dec=dict(reverse_decoder_dilation=False), enc=dict(depth=3)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_functional_reference(name):
    cfg = vq.F0VQVAEConfig.from_yaml_dict(VARIANTS[name])
    sd = random_state_dict(cfg)
    params = conv.convert_state_dict({k: v.numpy() for k, v in sd.items()}, cfg)
    T = cfg.encoder.total_stride * 5 + 3
    x = torch.randn(1, 2, T, generator=torch.Generator().manual_seed(1))
    xs_t = t_encode(sd, cfg, x)
    codes, latent, _ = vq.encode(params, cfg, jnp.asarray(x.numpy().transpose(0, 2, 1)))
    # float32 conv rounding through ~10 layers: 1e-5 of the output's scale (measured ≤ 6e-7)
    ref0 = xs_t[0][0].numpy()
    np.testing.assert_allclose(np.asarray(latent[0]).T, ref0, atol=1e-5 * np.abs(ref0).max())
    ref_codes, _ = t_quant(xs_t[0], sd["vq.level_blocks.0.k"])
    np.testing.assert_array_equal(np.asarray(codes[0]), ref_codes.numpy())
    zq = []
    for l, z in enumerate(xs_t):
        c, zz = t_quant(z, sd[f"vq.level_blocks.{l}.k"])
        zq.append((zz + (sd[f"vq.level_blocks.{l}.k"][c] - zz)).T[None])
    rec_t = t_decode(sd, cfg, zq)[0].numpy().T
    rec = np.asarray(vq.reconstruct(params, cfg, jnp.asarray(x.numpy().transpose(0, 2, 1)))[0])
    assert rec.shape == rec_t.shape == ((T // cfg.encoder.total_stride) * cfg.encoder.total_stride, 2)
    np.testing.assert_allclose(rec, rec_t, atol=1e-5 * np.abs(rec_t).max())


def test_batched_rows_equal_unbatched():
    cfg = vq.F0VQVAEConfig.from_yaml_dict(cfg_dict())
    params = conv.convert_state_dict({k: v.numpy() for k, v in random_state_dict(cfg, 3).items()}, cfg)
    rng = np.random.default_rng(0)
    lens = [37, 16, 64, 23]
    rows = [rng.standard_normal((n, 2)).astype(np.float32) for n in lens]
    x = np.zeros((4, 64, 2), np.float32)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    codes, latent, n = vq.encode(params, cfg, jnp.asarray(x), jnp.asarray(lens))
    assert list(np.asarray(n)) == [L // 4 for L in lens]
    for i, r in enumerate(rows):
        c1, l1, _ = vq.encode(params, cfg, jnp.asarray(r)[None])
        k = lens[i] // 4
        np.testing.assert_array_equal(np.asarray(codes[i, :k]), np.asarray(c1[0]))
        # fp32 rounding of a differently blocked conv stack: measured <= 1e-6 abs on an AVX-512 Intel host and
        # 3.8e-6 abs (5.4e-7 of the latent's scale, ~7) on an AVX2 AMD EPYC; bound 2e-6 of the scale
        want = np.asarray(l1[0])
        np.testing.assert_allclose(np.asarray(latent[i, :k]), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_quantise_first_index_on_ties_and_half_sum():
    cb = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    z = jnp.array([[[1.0, 0.0], [0.5, 0.5]]])
    np.testing.assert_array_equal(np.asarray(vq.quantise(z, cb)), [[0, 0]])
    z2 = jnp.array([[[0.0, 0.3, 0.0, 0.6]]])  # C = 2·emb: halves summed → (0, 0.9) → entry 1
    np.testing.assert_array_equal(np.asarray(vq.quantise(z2, cb)), [[1]])


def test_normalize_f0_semantics():
    f0 = jnp.array([[0.0, 100.0, 200.0, 300.0, 0.0]])
    vuv = jnp.array([[0.0, 1.0, 1.0, 0.0, 0.0]])
    valid = jnp.ones((1, 5), bool)
    out = np.asarray(vq.normalize_f0(f0, vuv, valid, True))
    np.testing.assert_allclose(out, [[0.0, -50.0, 50.0, 150.0, 0.0]])  # mean over vuv≠0, applied to f0≠0
    np.testing.assert_array_equal(np.asarray(vq.normalize_f0(f0, vuv, valid, False)), np.asarray(f0))
    none = np.asarray(vq.normalize_f0(f0, jnp.zeros_like(vuv), valid, True))
    np.testing.assert_array_equal(none, np.asarray(f0))  # no voiced frame: nothing subtracted (no NaN)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(features="log_f0,vuv"), "features"),
    (lambda d: d["encoder_params"].update(strides_t=[3]), "odd stride"),
    (lambda d: d.pop("vq_params"), "vq_params"),
    (lambda d: d["encoder_params"].update(checkpoint_res=1), "checkpoint_res"),
    (lambda d: d["encoder_params"].update(input_emb_width=3), "input_emb_width"),
    (lambda d: d["encoder_params"].update(bogus=1), "unknown field"),
])
def test_bad_config(tmp_path, mutate, match):
    d = cfg_dict()
    mutate(d)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(CheckpointError, match=match):
        conv.read_config(tmp_path / "config.yaml")


def test_bad_checkpoints(tmp_path):
    d = cfg_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    cfg = conv.read_config(tmp_path / "config.yaml")
    sd = random_state_dict(cfg)
    torch.save({"model": sd}, tmp_path / "model.pt")
    got_cfg, params = conv.load_f0_vqvae(tmp_path)
    assert got_cfg == cfg and params["codebook"][0].shape == (5, 8)
    bad = dict(sd)
    del bad["encoder.level_blocks.0.model.1.0.weight"]
    bad["decoder.extra"] = torch.zeros(1)
    torch.save({"model": bad}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"missing.*model\.1\.0\.weight[\s\S]*unexpected.*decoder\.extra"):
        conv.load_f0_vqvae(tmp_path)
    bad = dict(sd)
    bad["vq.level_blocks.0.k"] = torch.zeros(6, 8)
    torch.save({"model": bad}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="vq.level_blocks.0.k.*shape"):
        conv.load_f0_vqvae(tmp_path)
    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="key 'model'"):
        conv.load_f0_vqvae(tmp_path)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml"):
        conv.load_f0_vqvae(tmp_path / "model.pt")
