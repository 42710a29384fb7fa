"""The HF logits processors and stopping rules of infer/processors.py against transformers' own classes.

Every processor is compared on random fp32 logits with PER-ROW parameters (each row against the HF
processor built with that row's value): the same removed (−inf) sets, and the same finite values to
1e-6 relative to max(1, |value|) (both run the same fp32 operations; measured: identical except XLA's
division by the temperature, ≤ 1 ulp = 6e-8 relative). The engine is then
checked end to end against ``LlamaForCausalLM.generate`` on a tiny random model.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llama_helpers import make_hf_model, save_hf
from spiritlm_jax.converters.llama import load_hf_params
from spiritlm_jax.infer import processors
from spiritlm_jax.infer.engine import generate
from spiritlm_jax.infer.processors import GenerationError, SamplingConfig

TOL = 1e-6
V = 97


def _rows(configs, eos=(2,), stops=None):
    return jax.tree.map(jnp.asarray, processors.row_params(configs, list(eos), stops or {}))


def _same(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert np.array_equal(np.isneginf(ours), np.isneginf(ref)), "different removed sets"
    fin = np.isfinite(ref)
    assert (np.abs(ours[fin] - ref[fin]) / np.maximum(1, np.abs(ref[fin]))).max(initial=0) <= TOL


def _logits(B, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(scale=scale, size=(B, V)).astype(np.float32)


def _history(B, T, seed=1, hi=12):
    # few distinct ids, so n-grams and penalties hit often
    return np.random.default_rng(seed).integers(0, hi, size=(B, T)).astype(np.int32)


def test_repetition_penalty_per_row():
    x, hist = _logits(4), _history(4, 9)
    pens = [1.0, 1.3, 0.7, 2.5]
    seen = np.zeros((4, V), bool)
    for i in range(4):
        seen[i, hist[i]] = True
    got = processors.repetition_penalty(jnp.asarray(x), jnp.asarray(seen), jnp.asarray(pens, jnp.float32))
    for i, p in enumerate(pens):
        ref = hf.RepetitionPenaltyLogitsProcessor(p)(torch.tensor(hist[i:i + 1]).long(), torch.tensor(x[i:i + 1]))
        _same(got[i:i + 1], ref)


@pytest.mark.parametrize("sizes", [(1, 2, 3, 0), (4, 2, 5, 3)])
def test_no_repeat_ngram_per_row(sizes):
    B, T = 4, 14
    hist = _history(B, T, seed=sum(sizes), hi=4)
    cur = np.array([T, T - 3, 6, 2], np.int32)  # rows use a prefix of their history
    x = _logits(B, seed=3)
    ban = processors.no_repeat_ngram_bans(jnp.asarray(hist), jnp.asarray(cur), jnp.asarray(sizes, jnp.int32),
                                          max(sizes), V)
    got = jnp.where(ban, -jnp.inf, jnp.asarray(x))
    for i, n in enumerate(sizes):
        ids = torch.tensor(hist[i:i + 1, :cur[i]]).long()
        ref = torch.tensor(x[i:i + 1]) if n == 0 else hf.NoRepeatNGramLogitsProcessor(n)(ids, torch.tensor(x[i:i + 1]))
        _same(got[i:i + 1], ref)


def test_bad_words_single_and_multi_token_with_eos_rule():
    words = [[5], [2], [3, 4], [1, 3, 6], [7, 7]]  # [2] is the EOS: HF drops it from the list
    B, T = 3, 8
    hist = np.array([[0, 1, 1, 3, 9, 9, 1, 3], [0, 5, 5, 5, 7, 7, 3, 3], [1, 1, 1, 1, 1, 1, 7, 7]], np.int32)
    cur = np.array([8, 7, 6], np.int32)  # row 0 ends "1 3", row 1 ends "3", row 2 ends "1 1"
    cfgs = [SamplingConfig(bad_words_ids=words, eos_token_id=2)] * B
    single = processors.single_token_bans(cfgs, [2], V)
    rows = _rows(cfgs)
    ban = single | np.asarray(processors.bad_word_bans(jnp.asarray(hist), jnp.asarray(cur), rows.bad_words, V))
    x = _logits(B, seed=4)
    got = np.where(ban, -np.inf, x)
    proc = hf.NoBadWordsLogitsProcessor(words, eos_token_id=2)
    for i in range(B):
        _same(got[i:i + 1], proc(torch.tensor(hist[i:i + 1, :cur[i]]).long(), torch.tensor(x[i:i + 1])))
    assert not ban[:, 2].any()  # EOS stays reachable, as in transformers


def test_min_length_and_min_new_tokens_with_eos_list():
    eos = [2, 11]
    cfgs = [SamplingConfig(min_length=10, eos_token_id=eos), SamplingConfig(min_new_tokens=4, eos_token_id=eos),
            SamplingConfig(min_length=3, min_new_tokens=1, eos_token_id=eos), SamplingConfig(eos_token_id=eos)]
    cur = np.array([9, 7, 5, 2], np.int32)  # prompt + generated
    new = np.array([3, 3, 0, 1], np.int32)
    rows = _rows(cfgs, eos)
    x = _logits(4, seed=5)
    got = np.where(processors.min_length_bans(jnp.asarray(cur), jnp.asarray(new), rows, V), -np.inf, x)
    for i, c in enumerate(cfgs):
        ids = torch.zeros((1, int(cur[i])), dtype=torch.long)
        ref = torch.tensor(x[i:i + 1])
        if c.min_length:
            ref = hf.MinLengthLogitsProcessor(c.min_length, eos)(ids, ref)
        if c.min_new_tokens:
            ref = hf.MinNewTokensLengthLogitsProcessor(int(cur[i] - new[i]), c.min_new_tokens, eos)(ids, ref)
        _same(got[i:i + 1], ref)


@pytest.mark.parametrize("top_ks", [(50, 5, 20, 1), (0, 10, 96, 200)])
def test_warpers_per_row(top_ks):
    """temperature → top-k → top-p with one setting per row; the second case has rows without top-k, so
    the full-vocabulary sort path runs; the first, the top-k-only path (sort width < V)."""
    temps, top_ps = (0.7, 1.0, 1.9, 0.3), (0.9, 0.5, 1.0, 0.95)
    cfgs = [SamplingConfig(do_sample=True, temperature=t, top_k=k, top_p=p) for t, k, p in zip(temps, top_ks, top_ps)]
    flags = processors.flags_for(cfgs, V)
    assert (flags.sort_width < V) == (0 not in top_ks and max(top_ks) < V)
    x = _logits(4, seed=6)
    x[0, :7] = -np.inf  # some ids already banned
    got = processors.warp(jnp.asarray(x), _rows(cfgs), flags)
    for i, c in enumerate(cfgs):
        ref = torch.tensor(x[i:i + 1])
        if c.temperature != 1.0:
            ref = hf.TemperatureLogitsWarper(c.temperature)(None, ref)
        if c.top_k:
            ref = hf.TopKLogitsWarper(c.top_k)(None, ref)
        if c.top_p < 1.0:
            ref = hf.TopPLogitsWarper(c.top_p)(None, ref)
        _same(got[i:i + 1], ref)


def test_process_runs_hf_order_on_random_logits():
    """The whole per-step pipeline against an HF LogitsProcessorList built in HF's order."""
    rng = np.random.default_rng(7)
    B, T = 3, 12
    hist = _history(B, T, seed=8, hi=6)
    cur = np.array([12, 10, 9], np.int32)
    cfgs = [SamplingConfig(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.4,
                           no_repeat_ngram_size=2, min_new_tokens=5, bad_words_ids=[[3], [4, 5]]),
            SamplingConfig(do_sample=True, top_k=0, top_p=0.7, repetition_penalty=0.9),
            SamplingConfig(do_sample=True, temperature=1.3, top_k=8, no_repeat_ngram_size=3, min_length=4)]
    new = np.array([3, 2, 6], np.int32)
    banned = rng.random((B, V)) < 0.1
    x = rng.normal(scale=2, size=(B, V)).astype(np.float32)
    seen = np.zeros((B, V), bool)
    for i in range(B):
        seen[i, hist[i, :cur[i]]] = True
    banned_all = banned | processors.single_token_bans(cfgs, [2], V)
    view = processors.StepState(jnp.asarray(hist), jnp.asarray(cur), jnp.asarray(new), jnp.asarray(seen))
    flags = processors.flags_for(cfgs, V)
    _, got = processors.process(jnp.asarray(x), jnp.asarray(banned_all), view, _rows(cfgs), flags)
    for i, c in enumerate(cfgs):
        ids = torch.tensor(hist[i:i + 1, :cur[i]]).long()
        chain = []
        if c.repetition_penalty != 1.0:
            chain.append(hf.RepetitionPenaltyLogitsProcessor(c.repetition_penalty))
        if c.no_repeat_ngram_size:
            chain.append(hf.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
        bad = [[int(t)] for t in np.nonzero(banned[i])[0]] + [list(w) for w in c.bad_words_ids]
        chain.append(hf.NoBadWordsLogitsProcessor(bad, eos_token_id=2))
        if c.min_length:
            chain.append(hf.MinLengthLogitsProcessor(c.min_length, 2))
        if c.min_new_tokens:
            chain.append(hf.MinNewTokensLengthLogitsProcessor(int(cur[i] - new[i]), c.min_new_tokens, 2))
        if c.temperature != 1.0:
            chain.append(hf.TemperatureLogitsWarper(c.temperature))
        if c.top_k:
            chain.append(hf.TopKLogitsWarper(c.top_k))
        if c.top_p < 1.0:
            chain.append(hf.TopPLogitsWarper(c.top_p))
        ref = hf.LogitsProcessorList(chain)(ids, torch.tensor(x[i:i + 1]))
        # the banned mask is applied as given (no EOS rule): mirror that for the reference's EOS column
        if banned[i, 2]:
            ref[0, 2] = -math.inf
        _same(got[i:i + 1], ref)


# ------------------------------------------------------------------------------------ stop strings
def test_stop_strings_match_hf_criteria(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    from transformers.generation.stopping_criteria import StopStringCriteria

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    stops = ["the", "ing.", "e ar"]
    crit = StopStringCriteria(tok, stops)
    token_list, token_idx = StopStringCriteria.clean_tokenizer_vocab(tok)
    vocab = len(tok)
    texts = [""] * vocab
    for t, i in zip(token_list, token_idx):
        texts[i] = t
    tables = processors.stop_tables(stops, texts)
    rng = np.random.default_rng(0)
    # sequences built from the text, so the stop strings occur, cut at every length
    ids = tok("the tiny model is learning. we are there: then the end", add_special_tokens=False)["input_ids"]
    seqs = [ids[:n] for n in range(1, len(ids) + 1)] + [rng.integers(0, 300, size=12).tolist() for _ in range(20)]
    T = max(map(len, seqs))
    hist = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        hist[i, :len(s)] = s
    cur = np.array([len(s) for s in seqs], np.int32)
    use = jnp.ones((len(seqs), len(stops)), bool)
    got = np.asarray(processors.stop_string_hits(jnp.asarray(hist), jnp.asarray(cur), jax.tree.map(jnp.asarray, tables), use))
    ref = np.array([bool(crit(torch.tensor([s]), None)[0]) for s in seqs])
    assert ref.sum() >= 3  # the check is not vacuous
    assert np.array_equal(got, ref)


@pytest.fixture(scope="module")
def tiny_tokenizer_dir():
    from spiritlm_jax import tiny_checkpoints

    root, _ = tiny_checkpoints.ensure_tiny_checkpoints(log=lambda m: None)
    return root / "spiritlm_model" / tiny_checkpoints.lm_dir_name("base")


# ------------------------------------------------------------------------------------ the engine vs HF generate
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    model = make_hf_model(seed=3, vocab=128, hidden=32, layers=1, heads=2, inter=48)
    cfg, params = load_hf_params(save_hf(model, tmp_path_factory.mktemp("hf"), "bin"))
    return model, cfg, params


def _hf_generate(model, prompt, **kw):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         pad_token_id=0, do_sample=False, top_k=None, top_p=None, temperature=None, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("opts", [
    dict(repetition_penalty=1.5, min_new_tokens=6, eos_token_id=[5, 9, 40], max_new_tokens=14),
    dict(bad_words_ids=[[7], [11, 12], [2]], repetition_penalty=0.8, no_repeat_ngram_size=2, max_new_tokens=12),
])
def test_engine_greedy_equals_transformers_generate(tiny_lm, opts):
    model, cfg, params = tiny_lm
    prompt = [1, 7, 11, 12, 7, 30, 31]
    ref = _hf_generate(model, prompt, **opts)
    s = SamplingConfig(**{k: (tuple(map(tuple, v)) if k == "bad_words_ids" else v) for k, v in opts.items()})
    got, _ = generate(cfg, params, [prompt], s)
    # transformers pads finished rows; ours stops at the EOS (which both keep)
    assert got[0] == ref[:len(got[0])] and (len(got[0]) == len(ref) or ref[len(got[0]) - 1] in (5, 9, 40, 2))


def test_rows_with_different_options_decode_as_alone(tiny_lm):
    _, cfg, params = tiny_lm
    prompts = [[1, 5, 6, 7], [1, 9, 9, 9, 9, 9, 9], [1, 40]]
    cfgs = [SamplingConfig(max_new_tokens=8, repetition_penalty=1.7),
            SamplingConfig(max_new_tokens=5, no_repeat_ngram_size=2, eos_token_id=(3, 4)),
            SamplingConfig(max_new_tokens=11, min_new_tokens=11)]
    batched, _ = generate(cfg, params, prompts, cfgs)
    for p, c, b in zip(prompts, cfgs, batched):
        assert b == generate(cfg, params, [p], c)[0][0]
    assert [len(b) <= c.max_new_tokens for b, c in zip(batched, cfgs)] == [True] * 3


def test_num_return_sequences_gives_rows_per_prompt(tiny_lm):
    _, cfg, params = tiny_lm
    s = SamplingConfig(do_sample=True, max_new_tokens=6, num_return_sequences=3, eos_token_id=(127,))
    out, _ = generate(cfg, params, [[1, 2, 3], [1, 4]], s, seed=0)
    assert len(out) == 6 and len({tuple(o) for o in out[:3]}) > 1  # independent draws per row


# ------------------------------------------------------------------------------------ failures
def test_nonfinite_logits_stop_with_a_clear_error(tiny_lm):
    _, cfg, params = tiny_lm
    poisoned = jax.tree.map(lambda a: a, params)
    emb = np.array(poisoned["embed"]["embedding"])
    emb[50] = np.nan  # the logits after token 50 turn NaN
    poisoned["embed"]["embedding"] = jnp.asarray(emb)
    only_50 = np.ones((cfg.vocab_size,), bool)
    only_50[50] = False
    with pytest.raises(GenerationError, match=r"non-finite .* prompt 0 \(output row 0\) at new token 1"):
        generate(cfg, poisoned, [[1, 5]], SamplingConfig(max_new_tokens=5), banned=only_50)


def test_bans_that_leave_nothing_are_an_error(tiny_lm):
    _, cfg, params = tiny_lm
    only_eos = np.ones((cfg.vocab_size,), bool)
    only_eos[2] = False
    with pytest.raises(GenerationError, match="every token was removed"):
        generate(cfg, params, [[1, 5]], SamplingConfig(max_new_tokens=5, min_new_tokens=2), banned=only_eos)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=10**12), r"max_new_tokens=1000000000000 is out of range"),
    (dict(max_new_tokens=2.7), r"max_new_tokens must be an integer, got 2.7"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 is out of range"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer"),
    (dict(top_k=-1), r"top_k=-1 is out of range"),
    (dict(do_sample=True, temperature=float("nan")), r"temperature must be a finite number"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be > 0 when sampling"),
    (dict(top_p=float("inf")), r"top_p must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=float("nan")), r"repetition_penalty must be a finite number"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0"),
    (dict(no_repeat_ngram_size=1000), r"no_repeat_ngram_size=1000 is out of range"),
    (dict(num_return_sequences=2), r"needs do_sample=True"),
    (dict(eos_token_id=[]), r"eos_token_id is an empty list"),
    (dict(bad_words_ids=[5, 6]), r"bad_words_ids\[0\] must be a list of token ids"),
    (dict(bad_words_ids=[[]]), r"bad_words_ids\[0\] is empty"),
    (dict(stop_strings=[""]), r"stop_strings\[0\] must be a non-empty string"),
    (dict(do_sample="yes"), r"do_sample must be True or False"),
])
def test_bad_options_are_refused_by_name(kw, match):
    with pytest.raises(GenerationError, match=match):
        SamplingConfig(**kw)


def test_option_ids_outside_the_vocabulary(tiny_lm):
    _, cfg, params = tiny_lm
    with pytest.raises(GenerationError, match=r"outside the model's vocabulary of 128"):
        generate(cfg, params, [[1, 2]], SamplingConfig(eos_token_id=500))
