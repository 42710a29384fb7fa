"""The serving engine (serve/engine.py): continuous batching is exact, slots are independent, the prefix
cache is used and bounded, bad requests are refused before they run."""
import numpy as np
import pytest

from spiritlm_jax.infer.engine import SamplingConfig, generate
from spiritlm_jax.serve.engine import Engine, PrefixCache, Request, ServeError


SLOTS, MAX_LEN = 4, 256  # as in test_serve_http: the compiled programs are shared


@pytest.fixture(scope="module")
def lm():
    from spiritlm_jax.spiritlm import SpiritLM
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints()
    return SpiritLM.from_pretrained("spirit-lm-base-7b", checkpoints=root, variant="base", with_speech=False)


def _offline(lm, prompt, n):
    return generate(lm.cfg, lm.params, [prompt], SamplingConfig(max_new_tokens=n), eos_id=2)[0][0]


def _collect(engine, schedule):
    """Submit (step, request) pairs at their steps while the engine runs; returns new ids per request."""
    out = {id(r): [] for _, r in schedule}
    for _, r in schedule:
        r.on_token = (lambda r, inner: lambda t, *a: (out[id(r)].append(t), bool(inner and inner(t, *a)))[1])(
            r, r.on_token)
    pending = sorted(schedule, key=lambda x: x[0])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.submit(pending.pop(0)[1])
        engine.step()
        step += 1
        assert step < 2000, "the engine did not finish"
    return [out[id(r)] for _, r in schedule]


def test_greedy_equals_offline_generate_with_random_arrivals_and_sampling_neighbours(lm):
    rng = np.random.default_rng(0)
    V = lm.cfg.vocab_size
    shared = [1] + rng.integers(3, V, size=19).tolist()  # a 2.5-block prefix several prompts share
    # 117 + 20 tokens cross the 128-position attention window: a row's result does not depend on the window
    greedy_prompts = [[1] + rng.integers(3, V, size=int(n)).tolist() for n in (4, 11, 19, 117)]
    greedy_prompts += [shared + rng.integers(3, V, size=int(n)).tolist() for n in (2, 9)]
    n_new = 20
    # one batched offline call: each row of `generate` decodes exactly as that prompt alone (its contract)
    plain = generate(lm.cfg, lm.params, greedy_prompts, SamplingConfig(max_new_tokens=n_new), eos_id=2)[0]
    # the history-dependent processors per slot (the engine runs infer/processors.py, as offline generate):
    # the banned words are taken from the plain outputs, so each option changes its row
    configs = [SamplingConfig(max_new_tokens=n_new, **kw) for kw in (
        {"repetition_penalty": 1.5}, {}, {"no_repeat_ngram_size": 2},
        {"bad_words_ids": [[plain[3][4]], plain[3][7:9]]}, {}, {"min_new_tokens": n_new, "repetition_penalty": 0.7})]
    expected = generate(lm.cfg, lm.params, greedy_prompts, configs, eos_id=2)[0]
    assert all(expected[i] != plain[i] for i in (0, 2, 3))  # the options are not no-ops here
    # small prefill chunks and budget: prompts are prefilled in several chunks, several rows per call, and a
    # row that does not fit a call waits for the next one
    # the gathered decode calls (dense_decode=False; the in-place step over every slot has its own test below)
    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, prefix_block=8, prefill_chunk=16,
                    prefill_budget=32, dense_decode=False)
    # weights that cost nothing in the grouping's cost model: every decode step splits its rows by window (at
    # the tiny model's real sizes one call is cheaper, as it is for the 135 M model without long rows)
    engine._weight_bytes = 0
    # and prefill calls that cost so much that rows always share one (the default weighs padding against calls)
    engine.prefill_call_cost = 10 ** 6
    greedy = [Request(p, n_new, c) for p, c in zip(greedy_prompts, configs)]
    noise = [Request([1] + rng.integers(3, V, size=9).tolist(), int(rng.integers(5, 30)),
                     SamplingConfig(do_sample=True, temperature=1.3, top_p=0.8, repetition_penalty=1.2), seed=i)
             for i in range(4)]
    cancelled = Request([1, 5, 6], 100, SamplingConfig(do_sample=True), seed=9)
    failing = Request([1, 8, 9], 50)  # its consumer raises: it fails alone, the others go on
    schedule = [(int(s), r) for s, r in zip(rng.integers(0, 40, size=len(greedy) + len(noise)), greedy + noise)]
    schedule += [(3, cancelled), (5, failing)]
    cancelled.on_token = lambda t, *a: cancelled.n_generated >= 5 and cancelled.cancel()
    failing.on_token = lambda t, *a: 1 / 0 if failing.n_generated >= 3 else False
    got = _collect(engine, schedule)
    for prompt, want, have in zip(greedy_prompts, expected, got):
        assert have == want, f"prompt of {len(prompt)} tokens: engine {have} != offline {want}"
    assert cancelled.finish_reason == "cancelled" and cancelled.n_generated < 100
    assert failing.finish_reason == "error" and failing.n_generated == 3
    assert engine.prefix.hits >= 1 and engine.prefix.hit_tokens >= 16  # the shared prefix was reused
    assert engine.active_slots == 0 and engine.queue_depth == 0
    # the batched paths ran: prefill calls of two rows, decode steps split into calls by window, calls
    # of fewer rows than slots
    prof = engine.profile
    assert any(rows == 2 for rows, _, _ in prof.prefill_shapes), prof.summary()
    assert any(len(calls) >= 2 for calls in prof.steps_by_shape), prof.summary()
    assert any(rows < SLOTS for calls in prof.steps_by_shape for rows, _, _ in calls), prof.summary()


def _always_dense(engine):
    """Make the cost model pick the in-place step over every slot (``_decode_all``) for every decode step."""
    engine._dense_cost = lambda: -1
    return engine


def test_in_place_step_over_every_slot_equals_offline_while_other_slots_prefill(lm):
    """The in-place decode step runs every slot, free and prefilling ones included (they get the pad token at
    the last position, and keep their history): greedy rows still equal offline ``generate``, with prompts
    prefilled in chunks while other slots decode and a cached prefix copied in."""
    rng = np.random.default_rng(1)
    V = lm.cfg.vocab_size
    shared = [1] + rng.integers(3, V, size=23).tolist()
    prompts = [[1] + rng.integers(3, V, size=int(n)).tolist() for n in (5, 40, 70)]
    prompts += [shared + rng.integers(3, V, size=int(n)).tolist() for n in (3, 30)]
    configs = [SamplingConfig(max_new_tokens=24, **kw) for kw in
               ({}, {"repetition_penalty": 1.4}, {"no_repeat_ngram_size": 2}, {}, {})]
    expected = generate(lm.cfg, lm.params, prompts, configs, eos_id=2)[0]
    engine = _always_dense(Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, prefix_block=8,
                                  prefill_chunk=16, prefill_budget=32))
    requests = [Request(p, 24, c) for p, c in zip(prompts, configs)]
    noise = Request([1, 9, 10], 30, SamplingConfig(do_sample=True, temperature=1.2), seed=4)
    got = _collect(engine, [(0, requests[0]), (3, requests[1]), (9, requests[2]), (4, requests[3]),
                            (12, requests[4]), (2, noise)])
    for prompt, want, have in zip(prompts, expected, got):
        assert have == want, f"prompt of {len(prompt)} tokens: engine {have} != offline {want}"
    assert engine.prefix.hits >= 1
    calls = [shape for step in engine.profile.steps_by_shape for shape in step]
    assert calls and all(rows == SLOTS and window == MAX_LEN for rows, _, window in calls), engine.profile.summary()
    assert any(live < SLOTS for _, live, _ in calls)  # steps with free or prefilling slots beside the live ones


def test_prefill_batches_pieces_of_like_length_and_weighs_padding_against_calls(lm):
    """One long and three short prompts admitted together: the long piece is not batched with the short ones
    (the former rule padded all four to its length: one 4 x 128 call for 180 tokens), the short ones go two in
    one call and one alone (rows bucket x length, PREFILL_CALL_COST per call); each output is still exact."""
    rng = np.random.default_rng(3)
    V = lm.cfg.vocab_size
    prompts = [[1] + rng.integers(3, V, size=n - 1).tolist() for n in (120, 20, 20, 20)]
    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, prefill_chunk=128,
                    prefill_budget=512)
    requests = [Request(p, 4) for p in prompts]
    outputs = _collect(engine, [(0, r) for r in requests])
    window = MAX_LEN  # every row ends below PREFILL_WINDOW = 256 = max_len
    assert dict(engine.profile.prefill_shapes) == {(1, 128, window): 1, (2, 64, window): 1, (1, 32, window): 1}
    assert outputs == [_offline(lm, p, 4) for p in prompts]


def test_cost_model_picks_the_in_place_step_for_mixed_long_rows(lm):
    """A few long rows among short ones: one in-place call over every slot beats gathered windows (which copy
    GATHER_COST times the bytes); short rows alone keep the gathered call over their small window."""
    engine = Engine(lm.cfg, lm.params, slots=16, max_len=1152, eos_id=2)
    engine._weight_bytes = 540 * 2 ** 20  # the 135 M model's fp32 weights (the tiny model's are negligible)
    live = list(range(16))
    engine.host["position"][:] = 100
    assert engine._groups(live) == [sorted(live)]
    engine.host["position"][:4] = 1030
    assert engine._groups(live) is None
    assert Engine(lm.cfg, lm.params, slots=16, max_len=1152, eos_id=2, dense_decode=False)._groups(live) is not None


@pytest.mark.parametrize("in_place", [True, False])
def test_short_slots_are_exact_and_leave_the_long_slots_to_long_requests(lm, in_place):
    import jax

    """Two slots of 256 positions and two of 64 (``short_slots``): each request goes to the shortest free slot
    that holds it, a long request with no free long slot waits while later short ones start in the short
    slots, and then takes the first long slot that frees; a prefix cached from a long slot is copied into a
    short one (cut to its 64 positions). Every greedy output equals offline ``generate``, with the in-place
    step over both tiers and with gathered calls per tier."""
    rng = np.random.default_rng(5)
    V = lm.cfg.vocab_size
    shared = [1] + rng.integers(3, V, size=23).tolist()
    long_ = [shared + rng.integers(3, V, size=96).tolist(), [1] + rng.integers(3, V, size=130).tolist(),
             [1] + rng.integers(3, V, size=100).tolist()]
    short = [shared + rng.integers(3, V, size=8).tolist(), [1] + rng.integers(3, V, size=20).tolist(),
             [1] + rng.integers(3, V, size=12).tolist()]
    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, prefix_block=8, prefill_chunk=64,
                    prefill_budget=128, short_slots=2, short_len=64)
    if in_place:
        _always_dense(engine)
    else:
        engine.dense_decode = False
    assert [(t.first, t.slots, t.length) for t in engine.tiers] == [(0, 2, MAX_LEN), (2, 2, 64)]
    # L0, L1 fill the long slots; L2 (long) waits for L0's; S1, S2 start in the short slots at once, S0 when
    # S2's frees
    requests = {"L0": Request(long_[0], 6), "L1": Request(long_[1], 30), "S0": Request(short[0], 30),
                "L2": Request(long_[2], 10), "S1": Request(short[1], 20), "S2": Request(short[2], 12)}
    placed = []
    place = engine._place
    engine._place = lambda req, i: (placed.append((next(k for k, r in requests.items() if r is req), i)),
                                    place(req, i))[1]
    arrivals = [(0, "L0"), (0, "L1"), (1, "L2"), (4, "S0"), (2, "S1"), (2, "S2")]  # S0 once L0 is cached
    outputs = _collect(engine, [(step, requests[name]) for step, name in arrivals])
    got = {name: out for (_, name), out in zip(arrivals, outputs)}
    for name, req in requests.items():
        assert got[name] == _offline(lm, req.prompt, req.max_tokens), name
    slot_of = dict(placed)
    assert {slot_of["L0"], slot_of["L1"]} == {0, 1} and slot_of["L2"] == slot_of["L0"]  # L0 ends first
    assert all(slot_of[k] >= 2 for k in ("S0", "S1", "S2")), placed  # short requests in the short slots
    order = [name for name, _ in placed]
    assert order.index("S1") < order.index("L2") and order.index("S2") < order.index("L2"), placed  # passed L2
    entry_lengths = [jax.tree.leaves(e["tree"])[0].shape[-2] for e in engine.prefix.entries.values()]
    assert max(entry_lengths) > 64, entry_lengths
    assert requests["S0"].cached_tokens == 24  # the shared prefix: an entry of 128 positions from L0's long slot
    calls = [shape for step in engine.profile.steps_by_shape for shape in step]
    if in_place:
        assert all(rows == SLOTS for rows, _, _ in calls)
    else:
        assert all(window <= 64 or rows <= 2 for rows, _, window in calls), engine.profile.summary()


def test_short_slot_options_are_checked(lm):
    with pytest.raises(ServeError, match=r"short_slots must be in \[0, slots - 1\] = \[0, 3\]"):
        Engine(lm.cfg, lm.params, slots=4, max_len=MAX_LEN, short_slots=4)
    with pytest.raises(ServeError, match=r"short_len must be in \[2, max_len\) = \[2, 256\), got 256"):
        Engine(lm.cfg, lm.params, slots=4, max_len=MAX_LEN, short_slots=2, short_len=256)
    engine = Engine(lm.cfg, lm.params, slots=4, max_len=MAX_LEN, short_slots=3, short_len=32)
    assert [engine.slot_length(i) for i in range(4)] == [MAX_LEN, 32, 32, 32]


def test_sampling_stream_is_per_slot(lm):
    """A seeded sampled request gives the same tokens alone and beside other requests."""
    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2)
    s = SamplingConfig(do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    alone = engine.run_to_completion([Request([1, 7, 8, 9], 25, s, seed=1234)])[0]
    crowd = engine.run_to_completion([Request([1, 3, 4], 30, SamplingConfig(do_sample=True), seed=5),
                                      Request([1, 7, 8, 9], 25, s, seed=1234), Request([1, 10, 11, 12, 13], 12)])
    assert crowd[1] == alone
    # a top_k=0 neighbour needs the full-vocabulary variant of the step: the top_k=20 row still draws the
    # same tokens as through the 64-candidate variant (the static structure never changes a row's result)
    full_vocab = SamplingConfig(do_sample=True, top_k=0, top_p=0.5)
    mixed = engine.run_to_completion([Request([1, 7, 8, 9], 25, s, seed=1234), Request([1, 3, 4], 30, full_vocab, seed=7)])
    assert mixed[0] == alone and len(mixed[1]) >= 1
    top1 = engine.run_to_completion([Request([1, 7, 8, 9], 10, SamplingConfig(do_sample=True, top_k=1), seed=3)])[0]
    assert top1 == _offline(lm, [1, 7, 8, 9], 10)  # top-k 1 is greedy


@pytest.mark.parametrize("req, message", [
    (Request([], 5), "empty"),
    (Request([1, 2], 0), "max_tokens"),
    (Request([1] * 200, 70), "positions but a slot holds 256"),
    (Request([1, 99999], 5), "outside"),
    (Request([1], 5, SamplingConfig(bad_words_ids=[[40000]])), "outside the model's vocabulary"),
    (Request([1], 5, seed=-1), "seed"),
    (Request([1], 5, {"temperature": 0.5}), "SamplingConfig"),
    (Request([1], 5, banned=np.ones(32667, bool)), "bans every token"),
])
def test_bad_requests_are_refused_before_running(lm, req, message):
    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2)
    with pytest.raises(ServeError, match=message):
        engine.submit(req)
    assert engine.queue_depth == 0


def test_prefix_cache_hash_chain_and_eviction():
    import jax.numpy as jnp

    cache = PrefixCache(block=4, budget_bytes=2 * 4 * 16 * 4)  # room for two 16-token entries of 4 fp32 each
    make = lambda L: {"k": jnp.zeros((1, L, 4), jnp.float32)}  # noqa: E731
    a, b, c = list(range(1, 17)), list(range(1, 9)) + [50] * 8, [60] * 16
    for ids in (a, b):
        entry, n = cache.lookup(ids)
        cache.store(ids, n, make, lambda n: n)
    assert cache.lookup(b + [7])[1] == 16
    assert cache.lookup(list(range(1, 11)))[1] == 8  # a shared leading run of two blocks (held by a and b)
    assert cache.lookup(a + [7])[1] == 16  # a is now the most recently used
    cache.lookup(c)
    cache.store(c, 0, make, lambda n: n)  # over budget: evicts the least recently used entry, b
    assert len(cache.entries) == 2
    assert cache.lookup(b + [7])[1] == 8  # b's own blocks are gone; the two it shared with a are still served
    assert cache.lookup(a + [7])[1] == 16 and cache.lookup(c + [1])[1] == 16
    assert cache.nbytes <= cache.budget


@pytest.mark.parametrize("short_slots", [0, 2])
def test_slots_sharded_over_a_mesh_give_the_same_greedy_output(lm, short_slots):
    """Slots split over the mesh's data axis (the cache is sharded like activations; params replicated), with
    one tier and with two (each tier's cache sharded over the axis; the in-place step over both)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from spiritlm_jax.sharding import make_mesh

    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    params = jax.device_put(lm.params, NamedSharding(mesh, PartitionSpec()))
    engine = Engine(lm.cfg, params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, mesh=mesh, short_slots=short_slots,
                    short_len=64)
    if short_slots:
        _always_dense(engine)
    prompts = [[1, 7, 8, 9], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    got = engine.run_to_completion([Request(p, 12) for p in prompts])
    assert got == generate(lm.cfg, lm.params, prompts, SamplingConfig(max_new_tokens=12), eos_id=2)[0]
    assert all(len(leaf.sharding.device_set) == 2 for leaf in jax.tree.leaves(engine.caches))


def _cache_leaf_copies(compiled_text: str, leaf_shape: tuple[int, ...]) -> int:
    """How many ``copy`` instructions of a whole cache leaf a compiled program holds."""
    want = "f32[" + ",".join(map(str, leaf_shape)) + "]"
    return sum(1 for line in compiled_text.splitlines() if " copy(" in line and want in line.split(" copy(")[0])


def test_decode_and_prefill_update_the_cache_in_place(lm):
    """A one-row call in a many-slot engine touches its row only: the compiled decode step and prefill hold
    no copy of a whole (slots, KV, max_len, D) cache leaf (there were 2 per layer, 1.36 GB per step at 135 M,
    until the write-back was made to depend on the logits; see serve/engine.py ``_write_rows``)."""
    import jax
    import jax.numpy as jnp

    from spiritlm_jax.serve import engine as engine_module

    engine = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2)
    leaf_shape = jax.tree.leaves(engine.caches[0])[0].shape
    assert leaf_shape[0] == SLOTS and MAX_LEN in leaf_shape
    one = jnp.zeros((1,), jnp.int32)
    flags = engine.flags([engine_module.GREEDY])
    decode = engine_module._decode_step.lower(
        lm.params, engine.caches[0], engine.banned, engine.seen, engine.history, one, one, one, one + 3, one,
        engine._row_params_for((0,)), jnp.zeros((1,), jnp.uint32), cfg=lm.cfg, flags=flags, window=128).compile()
    prefill = engine_module._prefill.lower(lm.params, engine.caches[0], one, jnp.zeros((1, 16), jnp.int32), one, one + 15,
                                           cfg=lm.cfg, window=128).compile()
    dense = engine_module._decode_all.lower(
        lm.params, engine.caches[0], engine.banned, engine.seen, engine.history, jnp.ones((SLOTS,), bool),
        jnp.zeros((SLOTS,), jnp.int32), jnp.full((SLOTS,), 3, jnp.int32), jnp.zeros((SLOTS,), jnp.int32),
        engine._row_params_for(tuple(range(SLOTS))), jnp.zeros((SLOTS,), jnp.uint32), cfg=lm.cfg, flags=flags).compile()
    assert _cache_leaf_copies(decode.as_text(), leaf_shape) == 0
    assert _cache_leaf_copies(prefill.as_text(), leaf_shape) == 0
    assert _cache_leaf_copies(dense.as_text(), leaf_shape) == 0
    # the detector sees the copy where XLA makes one: a donated leaf updated in place while a read of it
    # that the update does not depend on is still pending (the pattern the engine had)
    leaf = jax.tree.leaves(engine.caches[0])[0]
    racing = jax.jit(lambda c: (c.at[0, :, 3].set(1.0), c[0:1] * 2), donate_argnums=0).lower(leaf).compile()
    assert _cache_leaf_copies(racing.as_text(), leaf_shape) >= 1
    # the in-place step over two tiers (short_slots) updates both where they lie
    tiered = Engine(lm.cfg, lm.params, slots=SLOTS, max_len=MAX_LEN, eos_id=2, short_slots=2, short_len=64)
    dense = engine_module._decode_all.lower(
        lm.params, tiered._dense_cache(), tiered.banned, tiered.seen, tiered.history, jnp.ones((SLOTS,), bool),
        jnp.zeros((SLOTS,), jnp.int32), jnp.full((SLOTS,), 3, jnp.int32), jnp.zeros((SLOTS,), jnp.int32),
        tiered._row_params_for(tuple(range(SLOTS))), jnp.zeros((SLOTS,), jnp.uint32), cfg=lm.cfg, flags=flags).compile()
    shapes = {jax.tree.leaves(c)[0].shape for c in tiered.caches}
    assert len(shapes) == 2 and all(_cache_leaf_copies(dense.as_text(), shape) == 0 for shape in shapes)


def test_a_request_with_non_finite_logits_fails_alone_and_writes_no_kv(lm):
    """Weights that turn one token's logits NaN: the request holding it ends with an error (in prefill, even
    in a chunk before its last), its neighbours' greedy output is unchanged, and a later request in the
    same slot is exact (no NaN KV was written there)."""
    import jax

    NAN_TOKEN = 5
    params = jax.tree.map(lambda x: x, lm.params)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[NAN_TOKEN].set(float("nan"))
    engine = Engine(lm.cfg, params, slots=2, max_len=MAX_LEN, eos_id=2, prefill_chunk=16, prefill_budget=64)
    finished = {}

    def request(prompt, n):
        r = Request(prompt, n)
        r.on_finish = lambda reason, error, r=r: finished.__setitem__(id(r), (reason, error))
        return r

    bad_short = request([1, 7, NAN_TOKEN, 8], 6)
    bad_chunked = request([1, NAN_TOKEN] + list(range(10, 40)), 6)  # 32 tokens: the NaN is in the first chunk
    good = request([1, 20, 21, 22], 8)
    later = request([1, 30, 31], 8)
    got = _collect(engine, [(0, bad_short), (0, good), (1, bad_chunked), (6, later)])
    for bad in (bad_short, bad_chunked):
        reason, error = finished[id(bad)]
        assert reason == "error" and isinstance(error, ServeError) and "non-finite" in str(error)
    assert got[0] == [] and got[2] == []
    assert finished[id(good)][0] == finished[id(later)][0] == "length"
    assert got[1] == _offline(lm, [1, 20, 21, 22], 8)
    assert got[3] == _offline(lm, [1, 30, 31], 8)


def test_a_row_turning_non_finite_in_an_in_place_step_leaves_no_nan_in_its_slot(lm):
    """The in-place step writes every row's KV before its logits are known: a row whose fed token turns it
    NaN has its position zeroed, so the next request in that slot (which reads the whole row, with weight 0
    past its position: 0·NaN would be NaN) is exact."""
    import jax

    prompt = [1] + list(range(40, 59))  # 20 tokens: the NaN lands at position 20, past the later request's
    first = _offline(lm, prompt, 1)[0]  # prefill (16 positions) and decode (to position 10)
    assert first not in prompt and first != 2
    params = jax.tree.map(lambda x: x, lm.params)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[first].set(float("nan"))
    engine = _always_dense(Engine(lm.cfg, params, slots=2, max_len=MAX_LEN, eos_id=2))
    finished = {}
    bad = Request(prompt, 6)
    bad.on_finish = lambda reason, error: finished.__setitem__("bad", (reason, error))
    got_bad = _collect(engine, [(0, bad)])[0]
    reason, error = finished["bad"]
    assert got_bad == [first] and reason == "error" and "non-finite" in str(error)
    later = [1, 50, 51]
    want = generate(lm.cfg, params, [later], SamplingConfig(max_new_tokens=8), eos_id=2)[0][0]
    assert first not in want  # the reference itself never feeds the NaN token
    assert _collect(engine, [(0, Request(later, 8))])[0] == want


def test_precompile_builds_every_program_a_workload_then_uses(lm):
    """``Engine.precompile`` (``serve --precompile``) compiles each prefill shape, decode shape and variant and
    the prefix-cache programs up front: a mixed workload afterwards (chunked prompts, a cached prefix, greedy
    and sampled rows, windows crossed) compiles nothing, and gives the same tokens as offline ``generate``."""
    from spiritlm_jax.serve.engine import Profile

    engine = Engine(lm.cfg, lm.params, slots=2, max_len=128, eos_id=2, prefix_block=8, prefill_chunk=32,
                    prefill_budget=64)
    assert engine.precompile() >= 0
    rng = np.random.default_rng(3)
    V = lm.cfg.vocab_size
    shared = [1] + rng.integers(3, V, size=30).tolist()
    prompts = [shared + [7, 8], [1, 5, 6], shared + rng.integers(3, V, size=40).tolist(), [1] * 50]
    before = Profile.programs()
    requests = [Request(p, 20) for p in prompts] + [Request([1, 9], 30, SamplingConfig(do_sample=True), seed=2)]
    got = _collect(engine, [(i, r) for i, r in enumerate(requests)])
    assert Profile.programs() == before, engine.profile.summary()
    assert got[:4] == generate(lm.cfg, lm.params, prompts, SamplingConfig(max_new_tokens=20), eos_id=2)[0]
    assert engine.prefix.hits >= 1
    with pytest.raises(ServeError, match="before the engine takes requests"):
        engine.submit(Request([1, 2, 3], 5))
        engine.precompile()
