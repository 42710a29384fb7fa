"""The batched continuation scorer (evaluation/scoring.py) on the demo's tiny Llama: a hand computation of
the token-normalised log-likelihood, batched == one by one, no recompilation per batch, sharded ==
single device, a model crafted to prefer given tokens, and bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.evaluation import scoring
from spiritlm_jax.models.llama import Llama


@pytest.fixture(scope="session")
def eval_checkpoints(tmp_path_factory):
    """The demo's tiny random checkpoints in the original layout (spiritlm_jax/tiny_checkpoints.py), built once."""
    from spiritlm_jax.tiny_checkpoints import write_tiny_checkpoints

    root = tmp_path_factory.getbasetemp() / "eval_tiny_checkpoints"
    if not (root / "spiritlm_model" / "spirit-lm-base-7b" / "config.json").is_file():
        write_tiny_checkpoints(root, seed=0)
    return root


@pytest.fixture(scope="module")
def lm(eval_checkpoints):
    from spiritlm_jax.spiritlm import SpiritLM

    return SpiritLM.from_pretrained("spirit-lm-base-7b", checkpoints=eval_checkpoints, with_speech=False)


def preference_params(cfg, params, good_ids, bad_ids, strength=8.0):
    """Tiny-LM params whose next-token logits do not depend on the input and are +strength on
    ``good_ids``, -strength on ``bad_ids``, 0 elsewhere: every embedding row is one vector, the
    attention and MLP outputs are zeroed, so the final hidden state is constant."""
    p = jax.tree.map(np.array, params)
    e = np.asarray(p["embed"]["embedding"][0], np.float32)
    p["embed"]["embedding"][:] = e
    for name in [k for k in p if k == "layers" or k.startswith("layers_")]:  # scanned or unrolled layout
        p[name]["attn"]["o"][:] = 0
        p[name]["mlp"]["down"][:] = 0
    h = e / np.sqrt(np.mean(e * e) + cfg.rms_norm_eps) * np.asarray(p["final_norm"]["scale"])
    u = h / np.dot(h, h)
    W = np.zeros_like(p["lm_head"])
    W[list(good_ids)] = strength * u[None]  # lm_head is (V, E)
    W[list(bad_ids)] = -strength * u[None]
    p["lm_head"] = W
    return jax.tree.map(jnp.asarray, p)


def _hand_scores(cfg, params, ctx, cont):
    toks = np.asarray(ctx + cont, np.int32)[None]
    logits, _ = Llama(cfg).apply({"params": params}, jnp.asarray(toks))
    lg = np.asarray(logits[0], np.float64)
    lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
    lp = [lg[t - 1, toks[0, t]] - lse[t - 1] for t in range(len(ctx), toks.shape[1])]
    return float(np.sum(lp)), float(np.mean(lp))


def test_token_normalised_matches_hand_computation(lm):
    ctx, cont = [1, 32001, 32100, 32200], [32300, 32050, 32400]
    s = scoring.score_continuations(lm.cfg, lm.params, [ctx], [cont])
    hs, hm = _hand_scores(lm.cfg, lm.params, ctx, cont)
    # fp32 forward vs float64 log-softmax of the same fp32 logits: agreement to ~1e-6 relative
    assert s.sum_logprob[0] == pytest.approx(hs, rel=1e-5, abs=1e-4)
    assert s.mean_logprob[0] == pytest.approx(hm, rel=1e-5, abs=1e-4)
    assert s.n_tokens[0] == 3 and s.get("mean")[0] == pytest.approx(s.sum_logprob[0] / 3)


def test_batched_equals_one_by_one_and_no_recompile(lm):
    rng = np.random.default_rng(0)
    ctxs = [[1] + rng.integers(3, 32600, n).tolist() for n in (3, 10, 1, 7, 20, 5)]
    conts = [rng.integers(3, 32600, n).tolist() for n in (4, 1, 9, 2, 6, 3)]
    one = [scoring.score_continuations(lm.cfg, lm.params, [c], [x], batch_size=4) for c, x in zip(ctxs, conts)]
    before = scoring.compile_count()
    many = scoring.score_continuations(lm.cfg, lm.params, ctxs, conts, batch_size=4)  # 2 batches, same bucket
    assert scoring.compile_count() == before  # every row fits the 32-token bucket at batch 4: compiled already
    for i, o in enumerate(one):
        # padding rows/columns never reach real tokens (segment ids); only summation order differs
        assert many.sum_logprob[i] == pytest.approx(o.sum_logprob[0], rel=1e-5, abs=1e-5)
        assert many.n_tokens[i] == len(conts[i])
        np.testing.assert_allclose(many.token_logprobs[i], o.token_logprobs[0], rtol=1e-5, atol=1e-5)


def test_sharded_equals_single_device(lm):
    from spiritlm_jax.sharding import make_mesh

    mesh = make_mesh((8, 1, 1))
    rng = np.random.default_rng(1)
    ctxs = [[1] + rng.integers(3, 32600, n).tolist() for n in (2, 6, 4)]
    conts = [rng.integers(3, 32600, n).tolist() for n in (3, 2, 5)]
    a = scoring.score_continuations(lm.cfg, lm.params, ctxs, conts, batch_size=8)
    b = scoring.score_continuations(lm.cfg, lm.params, ctxs, conts, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(b.sum_logprob, a.sum_logprob, rtol=1e-5, atol=1e-5)


def test_preference_model_decides_pairs(lm):
    good, bad = [32010, 32011, 32012], [32020, 32021, 32022]
    ctxs = [[1, 32001]] * 3
    pairs = [([32010, 32011], [32020, 32021]), ([32012, 32030], [32030, 32022]), ([32011], [32021, 32030])]
    for sign, expected in ((1.0, 1.0), (-1.0, 0.0)):
        p = preference_params(lm.cfg, lm.params, good, bad, strength=8.0 * sign)
        s = scoring.score_continuations(lm.cfg, p, ctxs * 2, [g for g, _ in pairs] + [b for _, b in pairs])
        m = s.mean_logprob
        acc = np.mean(m[:3] > m[3:])
        assert acc == expected


def test_bad_inputs(lm):
    with pytest.raises(scoring.ScoringError, match="empty continuation"):
        scoring.score_continuations(lm.cfg, lm.params, [[1]], [[]])
    with pytest.raises(scoring.ScoringError, match="empty context"):
        scoring.score_continuations(lm.cfg, lm.params, [[]], [[5]])
    with pytest.raises(scoring.ScoringError, match="outside"):
        scoring.score_continuations(lm.cfg, lm.params, [[1]], [[lm.cfg.vocab_size]])
    with pytest.raises(scoring.ScoringError, match="2 contexts but 1"):
        scoring.score_continuations(lm.cfg, lm.params, [[1], [1]], [[5]])
    with pytest.raises(scoring.ScoringError, match="exceed the model's context"):
        scoring.score_continuations(lm.cfg, lm.params, [[1] * lm.cfg.max_position_embeddings], [[5]])
    with pytest.raises(scoring.ScoringError, match="normalisation"):
        scoring.score_continuations(lm.cfg, lm.params, [[1]], [[5]]).get("median")
