"""Serving benchmark: the KV-layout decision, the prefix-cache TTFT ratio, and concurrent clients on loopback.

Model: the ~135 M benchmark config of lm_bench.py (hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary
32768), random weights, fp32, unrolled layers; the demo checkpoints' tokenizer and speech tokenizer/vocoder
(tiny: time to first audio here measures the pipeline, not a real-size HifiGAN — see hifigan_bench.py).

Parts (all by default; each bounded in requests and time, stopping by itself):
  layout  one decode step over a contiguous per-slot cache vs the same step gathering a paged cache
          through a page table (jnp.take, what a paged layout without a custom kernel costs on CPU), and
          the one-off cost of copying a cached 1,000-token prefix into a slot row.
  prefill what one prefill call costs by rows x length: the fixed cost per call, in tokens of compute.
  prefix  time to first token of a request whose 1,000-token prefix is cached vs cold (target ≤ 20%).
  audio   one speech-out request alone, streamed: time to first audio vs time to its last sample (target
          <= 25% for a >= 5 s output).
  load    an in-process server on 127.0.0.1; N concurrent clients (N = 1, 4, 16, 32; threads of a separate
          client process, as real clients are) with Poisson arrivals
          sending a mix: text completions (streamed), few-shot completions sharing a 1,000-token prefix, and
          speech-out native requests (streamed audio). Reports tokens/s, p50/p99 TTFT and TTFA, prefix-cache
          hit rate, lost/failed/duplicated requests, and the engine's profile of the row (prefill vs decode
          time, calls by rows x window, compiles during the row).
  sequential  the same request list one at a time through our server.
  hf      the same requests one at a time through HF transformers' generate (what a user of the original has).
  oneslot the same requests one at a time through a ONE-slot engine in process (batch-1 decode steps; only
          the shared few-shot prefix is cached, as in the server).
Targets: no request lost, failed or duplicated; 16 clients >= 4x the sequential tokens/s.

Run (one command; stops by itself within --budget, 480 s by default; a part that would not fit is skipped and
listed): python bench/serve_bench.py --out bench/serve_results.json
Quick check: python bench/serve_bench.py --quick --tiny
"""
from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PREFIX_TOKENS = 1000


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def build_tiny():
    """--tiny: the demo checkpoints themselves (a smoke run of this script, not a benchmark)."""
    import torch
    from transformers import LlamaForCausalLM

    from spiritlm_jax.spiritlm import SpiritLM
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints(log=lambda m: print(m, file=sys.stderr))
    lm = SpiritLM.from_pretrained("spirit-lm-base-7b", checkpoints=root, variant="base")
    hf = LlamaForCausalLM.from_pretrained(root / "spiritlm_model" / "spirit-lm-base-7b", dtype=torch.float32).eval()
    return lm, hf, sum(p.numel() for p in hf.parameters())


def build_model(seed: int = 0):
    """The 135 M benchmark LM (HF random init, converted) + the demo tokenizer/speech stack."""
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from spiritlm_jax.config import LlamaConfig
    from spiritlm_jax.converters import torch_io
    from spiritlm_jax.converters.llama import convert_tensors
    from spiritlm_jax.speech import SpeechTokenizer
    from spiritlm_jax.spiritlm import SpiritLM
    from spiritlm_jax.text import TextTokenizer
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    hf_cfg = HFConfig(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, rope_theta=1e5, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    cfg = LlamaConfig.from_hf(hf_cfg.to_dict(), scan_layers=False)
    params = convert_tensors(((k, torch_io.to_numpy(v)) for k, v in hf.state_dict().items()), cfg, scan_layers=False)
    params = jax.tree.map(jnp.asarray, params)
    root, _ = ensure_tiny_checkpoints(log=lambda m: print(m, file=sys.stderr))
    tok = TextTokenizer.from_dir(root / "spiritlm_model" / "spirit-lm-base-7b", n_embed=cfg.vocab_size)
    speech = SpeechTokenizer.from_checkpoints(root, "base")
    lm = SpiritLM(cfg, params, tok, speech, "base")
    n_params = sum(p.numel() for p in hf.parameters())
    return lm, hf, n_params


# ------------------------------------------------------------------------------------------ layout
def bench_layout(lm, slots: int, max_len: int, page: int = 16, reps: int = 5, short_slots: int = 12,
                 short_len: int = 256) -> dict:
    """Decode step (contiguous cache) vs the same cache read through a page table, the in-place step with
    ``short_slots`` of ``short_len`` positions, + prefix copy cost."""
    import jax
    import jax.numpy as jnp

    from spiritlm_jax.serve.engine import Engine, Request, _copy_prefix, _extract, _prefill

    cfg = lm.cfg
    eng = Engine(cfg, lm.params, slots=slots, max_len=max_len, eos_id=-1, prefix_cache_mb=0)
    eng.run_to_completion([Request([1] * 8, 3)])
    for _ in range(slots):  # every slot busy with a short row
        eng.submit(Request([1] * 8, max_len - 8))
    eng.step()

    def timed(fn, *a):
        out = fn(*a)
        jax.block_until_ready(out)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    # the engine's real steps (all slots active, short rows): gathered over all max_len positions, gathered
    # over the 128-position window the short rows need, and in place over every slot (no gather at all)
    live = list(range(slots))

    def step():
        eng._decode(live)
        return eng.caches[0]

    def in_place():
        eng._decode_dense(live)
        return eng.caches[0]

    eng.dense_decode = False
    natural_window = eng.window
    eng.window = lambda last, length=None: max_len
    contiguous = timed(step)
    eng.window = natural_window
    windowed = timed(step)
    dense = timed(in_place)
    # the serving mix: 4 of the rows past a 1,000-token few-shot prefix (gathered: the cost model's best split)
    eng.host["position"][:4] = min(PREFIX_TOKENS + 30, max_len - 2 * reps - 4)
    mixed_groups = [len(g) for g in eng._groups(live)]
    mixed_gathered = timed(step)
    mixed_dense = timed(in_place)
    eng.dense_decode = True
    # the same mix with short slots: the 4 long rows in the long tier, the 12 short ones in short slots
    tiered = Engine(cfg, lm.params, slots=slots, max_len=max_len, eos_id=-1, prefix_cache_mb=0,
                    short_slots=short_slots, short_len=short_len)
    for i in range(slots):
        tiered.submit(Request([1] * 8, (max_len if i < slots - short_slots else short_len) - 8))
    tiered.step()
    tiered.host["position"][:slots - short_slots] = eng.host["position"][0]

    def tiered_in_place():
        tiered._decode_dense(live)
        return tiered.caches
    mixed_tiered = timed(tiered_in_place)
    del tiered
    # the floor of any 16-row step: the model alone (no sampling) over an 8-position cache, weights only
    from spiritlm_jax.models.llama import init_cache
    from spiritlm_jax.models.quantization import llama_module

    @functools.partial(jax.jit, donate_argnums=(1,))
    def model_step(params, cache, tok):
        logits, cache = llama_module(cfg).apply({"params": params}, tok[:, None], positions=jnp.full_like(tok, 5)[:, None],
                                                cache=cache)
        return jnp.argmax(logits[:, 0], -1), cache

    floor_state = {"cache": init_cache(cfg, slots, 8)}

    def weights_only():
        out, floor_state["cache"] = model_step(lm.params, floor_state["cache"], jnp.zeros((slots,), jnp.int32))
        return out
    floor = timed(weights_only)
    del floor_state
    # a paged cache: a pool of pages and a page table per slot; every layer's K and V gathered per step
    n_pages = slots * max_len // page
    K, D = cfg.num_key_value_heads, cfg.head_dim_
    pool = jnp.zeros((n_pages, page, K, D), jnp.float32)
    table = jnp.asarray(np.random.default_rng(0).permutation(n_pages).reshape(slots, max_len // page), jnp.int32)

    q = jnp.ones((slots, K, D), jnp.float32)

    @jax.jit
    def gather_all_layers(pool, table):
        # what the attention reads per layer, K and V: the paged read is a gather into (B, S, KV, D); the
        # score einsum consumes all of it, so nothing can be optimised away
        total = jnp.zeros((slots, K, max_len), jnp.float32)
        for layer in range(cfg.num_hidden_layers):
            for kv in range(2):
                g = jnp.take(pool, table + (layer + kv) % 2, axis=0, mode="clip").reshape(slots, max_len, K, D)
                total = total + jnp.einsum("bkd,bskd->bks", q, g)
        return total

    @jax.jit
    def read_contiguous(cache_k):
        total = jnp.zeros((slots, K, max_len), jnp.float32)
        for layer in range(cfg.num_hidden_layers):
            for kv in range(2):
                total = total + jnp.einsum("bkd,bskd->bks", q, cache_k + (layer + kv))
        return total

    gather = timed(gather_all_layers, pool, table) - timed(read_contiguous, jnp.zeros((slots, max_len, K, D)))
    # one-off prefix copy: a 1,000-token entry written into a slot row (what the prefix cache costs)
    entry = _extract(eng.caches[0], jnp.int32(0), cfg=cfg, length=min(1024, max_len))
    tokens = jnp.zeros((1, 16), jnp.int32)
    row, start, last = jnp.zeros(1, jnp.int32), jnp.full(1, PREFIX_TOKENS, jnp.int32), jnp.full(1, 15, jnp.int32)
    window = eng.window(PREFIX_TOKENS + 15)

    def copy_prefill():
        eng.caches[0] = _copy_prefix(eng.caches[0], jnp.int32(0), entry, cfg=cfg)
        logits, eng.caches[0] = _prefill(lm.params, eng.caches[0], row, tokens, start, last, cfg=cfg, window=window)
        return logits

    def plain_prefill():
        logits, eng.caches[0] = _prefill(lm.params, eng.caches[0], row, tokens, start, last, cfg=cfg, window=window)
        return logits

    with_copy, without = timed(copy_prefill), timed(plain_prefill)
    kv_bytes = 2 * cfg.num_hidden_layers * slots * max_len * K * D * 4
    return {"slots": slots, "max_len": max_len, "page": page, "decode_step_contiguous_s": contiguous,
            "decode_step_window_128_s": windowed, "decode_step_in_place_s": dense,
            "mixed_4_long_gathered_s": mixed_gathered, "mixed_4_long_gathered_calls": mixed_groups,
            "mixed_4_long_in_place_s": mixed_dense, "short_slots": short_slots, "short_len": short_len,
            "mixed_4_long_in_place_short_slots_s": mixed_tiered, "model_step_weights_only_s": floor,
            "paged_gather_overhead_per_step_s": max(0.0, gather), "prefix_copy_1000_s": max(0.0, with_copy - without),
            "kv_cache_bytes": kv_bytes}


# ------------------------------------------------------------------------------------------ prefill
PREFILL_SHAPES = ((1, 32), (1, 128), (1, 256), (2, 128), (4, 64), (4, 256))  # (rows, padded length)


def bench_prefill(lm, slots: int, max_len: int, reps: int = 3) -> dict:
    """What a prefill call costs by shape, fitted as ``seconds = per_call + per_token × rows × length``:
    ``per_call / per_token`` is the call's fixed cost in tokens (the engine's PREFILL_CALL_COST)."""
    import jax
    import jax.numpy as jnp

    from spiritlm_jax.serve.engine import PREFILL_WINDOW, Engine, _prefill

    eng = Engine(lm.cfg, lm.params, slots=slots, max_len=max_len)
    times = {}
    for R, P in PREFILL_SHAPES:
        idx, z = jnp.arange(R, dtype=jnp.int32), jnp.zeros((R,), jnp.int32)
        tokens = jnp.ones((R, P), jnp.int32)

        def call():
            logits, eng.caches[0] = _prefill(lm.params, eng.caches[0], idx, tokens, z, z + P - 1, cfg=lm.cfg,
                                         window=PREFILL_WINDOW)
            return jax.block_until_ready(logits)

        call()  # compile
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        times[f"{R}x{P}"] = best
    padded = np.array([R * P for R, P in PREFILL_SHAPES], float)
    per_token, per_call = np.polyfit(padded, np.array(list(times.values())), 1)
    return {"seconds_by_rows_x_length": times, "per_call_s": float(per_call), "per_token_s": float(per_token),
            "call_cost_tokens": float(per_call / per_token),
            "gflops_per_s_at_1024": float(2 * layer_params(lm) * 1024 / times["4x256"] / 1e9)}


def layer_params(lm) -> int:
    """The weights a prefill token multiplies (the layers; the LM head runs at one position per row)."""
    import jax

    return sum(x.size for k, v in lm.params.items() if k.startswith("layers") for x in jax.tree.leaves(v))


# ------------------------------------------------------------------------------------------ prefix
def bench_prefix(lm, max_len: int, reps: int = 3) -> dict:
    from spiritlm_jax.serve.engine import Engine, Request

    rng = np.random.default_rng(1)
    eng = Engine(lm.cfg, lm.params, slots=2, max_len=max_len, eos_id=-1, prefix_block=16)

    def prompt(prefix):
        return prefix + rng.integers(3, 32000, size=24).tolist()

    def ttft(p):
        r = Request(p, 1)
        t = time.perf_counter()
        eng.run_to_completion([r])
        return r.first_token_at - t

    warm_prefix = [1] + rng.integers(3, 32000, size=PREFIX_TOKENS - 1).tolist()
    ttft(prompt(warm_prefix))  # compiles the full-length prefill
    ttft(prompt(warm_prefix))  # compiles the suffix-after-prefix prefill
    cold, warm = [], []
    for _ in range(reps):
        prefix = [1] + rng.integers(3, 32000, size=PREFIX_TOKENS - 1).tolist()
        cold.append(ttft(prompt(prefix)))  # nothing cached for this prefix
        warm.append(ttft(prompt(prefix)))  # the same 1,000 tokens, a different suffix
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": PREFIX_TOKENS, "suffix_tokens": 24, "ttft_cold_s": c, "ttft_cached_s": w,
            "ratio": w / c, "target": 0.20}


# ------------------------------------------------------------------------------------------ load
def warm_up(engine) -> None:
    """Compile what the workload needs before anything is timed: every program the scheduler can pick."""
    engine.precompile(log=lambda m: print(m, flush=True), progress=True)  # every shape (serve --precompile)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(lm, slots: int, max_len: int, short_slots: int = 0, short_len: int = 256):
    import uvicorn

    from spiritlm_jax.serve.app import Service, ServeOptions, build_app
    from spiritlm_jax.serve.engine import Engine, Request

    engine = Engine(lm.cfg, lm.params, slots=slots, max_len=max_len, eos_id=-1, short_slots=short_slots,
                    short_len=short_len)
    warm_up(engine)
    service = Service(lm, engine, ServeOptions(model_name="bench", audio_chunk_frames=16))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    return base, server, thread, service


def workload(n: int, seed: int, max_tokens: int, shared_prefix: list[int]) -> list[dict]:
    """n requests: 50% text, 25% few-shot (shared 1,000-token prefix), 25% speech out."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = ("text", "text", "fewshot", "speech")[i % 4]
        if kind == "text":
            ids = [1] + rng.integers(3, 32000, size=int(rng.integers(16, 96))).tolist()
        elif kind == "fewshot":
            ids = shared_prefix + rng.integers(3, 32000, size=int(rng.integers(8, 24))).tolist()
        else:
            units = "".join(f"[Hu{u}]" for u in rng.integers(0, 500, size=int(rng.integers(20, 60))))
            out.append({"kind": kind, "id": i, "prompt": "[Speech]" + units, "max_tokens": max_tokens})
            continue
        out.append({"kind": kind, "id": i, "prompt_ids": ids, "max_tokens": max_tokens})
    return out


def send(base: str, item: dict) -> dict:
    """One streamed request; returns its measurements (never raises)."""
    t0 = time.perf_counter()
    rec = {"id": item["id"], "kind": item["kind"], "ok": False, "tokens": 0, "ttft": None, "ttfa": None,
           "last_audio": None, "audio_s": 0.0}
    try:
        if item["kind"] == "speech":
            body = {"model": "bench", "prompt": item["prompt"], "output_modality": "speech",
                    "max_new_tokens": item["max_tokens"], "stream": True, **item.get("extra", {})}
            path = "/v1/spiritlm/generate"
        else:
            body = {"model": "bench", "prompt": item["prompt_ids"], "max_tokens": item["max_tokens"],
                    "temperature": 0, "stream": True}
            path = "/v1/completions"
        req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter() - t0
                if item["kind"] == "speech":
                    if ev["type"] == "audio":
                        rec["ttfa"] = now if rec["ttfa"] is None else rec["ttfa"]
                        rec["last_audio"] = now
                        width = 2 if ev["audio_format"] == "pcm_s16le" else 4
                        rec["audio_s"] += len(base64.b64decode(ev["audio"])) / width / ev["sample_rate"]
                    if ev["type"] == "done":
                        rec["tokens"] = ev["token_ids_count"]
                        rec["ok"] = ev["finish_reason"] in ("length", "stop")
                else:
                    if rec["ttft"] is None:
                        rec["ttft"] = now
                    if ev["choices"] and ev["choices"][0]["finish_reason"]:
                        rec["ok"] = True
            if item["kind"] != "speech":
                rec["tokens"] = item["max_tokens"]  # greedy with eos_id=-1: always max_tokens
    except Exception as e:  # recorded as a failure
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    return rec


def run_clients(base: str, items: list[dict], clients: int, rate_per_client: float, seed: int,
                time_limit: float) -> dict:
    """``clients`` threads share the request list; each waits an exponential gap (Poisson arrivals).
    No request starts after ``time_limit`` (those are reported as not sent); started ones finish."""
    queue = list(items)
    lock = threading.Lock()
    results = []
    deadline = time.monotonic() + time_limit

    def client(k):
        local = np.random.default_rng([seed, k])
        while time.monotonic() < deadline:
            if rate_per_client > 0:
                time.sleep(float(local.exponential(1.0 / rate_per_client)))
            with lock:
                if not queue:
                    return
                item = queue.pop(0)
            rec = send(base, item)
            with lock:
                results.append(rec)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    wall = time.perf_counter() - t
    ids = [r["id"] for r in results]
    tokens = sum(r["tokens"] for r in results if r["ok"])

    def pct(xs, q):
        xs = sorted(x for x in xs if x is not None)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    ttft = [r["ttft"] for r in results]
    ttfa = [r["ttfa"] for r in results]
    sent = len(items) - len(queue)
    return {"clients": clients, "requests": len(items), "sent": sent, "finished": len(results),
            "lost": sent - len(set(ids)), "duplicated": len(ids) - len(set(ids)),
            "failed": sum(not r["ok"] for r in results), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "ttfa_p50": pct(ttfa, 0.5), "ttfa_p99": pct(ttfa, 0.99),
            "errors": [r.get("error") for r in results if r.get("error")][:3]}


class ClientProcess:
    """The clients run in their own process, as real clients do (and as vLLM's serving benchmark does): 16
    client threads parsing SSE beside the server in one process held its GIL: the 16-client row's decode
    dispatch took 27 ms per step, 4 ms with the clients in their own process (bench/RESULTS.md session 7)."""

    def __init__(self):
        import concurrent.futures
        import multiprocessing

        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(self, *args, **kwargs) -> dict:
        return self.pool.submit(run_clients, *args, **kwargs).result()

    def close(self) -> None:
        self.pool.shutdown()


def hf_sequential(hf, lm, items: list[dict], max_tokens: int) -> dict:
    import torch

    t = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for it in items:
            ids = it.get("prompt_ids") or lm.tokenizer.encode(it["prompt"])
            x = torch.tensor([ids])
            hf.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(x))
            tokens += max_tokens
    wall = time.perf_counter() - t
    return {"requests": len(items), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def engine_sequential(lm, items: list[dict], max_tokens: int, max_len: int, shared_prefix: list[int]) -> dict:
    """The same requests one at a time through a ONE-slot engine in process (no HTTP): the best a single
    request stream gets from our engine (its decode step has batch 1)."""
    from spiritlm_jax.serve.engine import Engine, Request

    eng = Engine(lm.cfg, lm.params, slots=1, max_len=max_len, eos_id=-1)
    reqs = [it.get("prompt_ids") or lm.tokenizer.encode(it["prompt"]) for it in items]
    warm_up(eng)
    rng = np.random.default_rng(5)
    for ids in reqs:  # every shape these requests use, not timed; other tokens (only the shared few-shot
        # prefix is cached, as in the server) except where the prefix is
        head = ids[:PREFIX_TOKENS] if ids[:PREFIX_TOKENS] == shared_prefix else [1]
        other = head + rng.integers(3, 32000, size=len(ids) - len(head)).tolist()
        eng.run_to_completion([Request(other, max_tokens)])
    eng.profile.reset()
    t = time.perf_counter()
    tokens = sum(len(eng.run_to_completion([Request(ids, max_tokens)])[0]) for ids in reqs)
    wall = time.perf_counter() - t
    return {"requests": len(reqs), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "engine": eng.profile.summary()}


def bench_audio(base: str, tokens: int) -> dict:
    """One speech-out request alone, streamed: time to first audio vs time to the last sample."""
    rng = np.random.default_rng(3)
    units = "".join(f"[Hu{u}]" for u in rng.integers(0, 500, size=40))
    # sampled: greedy decoding of random weights loops on a few units, which deduplicate into a short output
    # (160 and 240 greedy tokens both gave 4.04 s of audio)
    rec = send(base, {"kind": "speech", "id": -1, "prompt": "[Speech]" + units, "max_tokens": tokens,
                      "extra": {"do_sample": True, "seed": 0}})
    ratio = rec["ttfa"] / rec["last_audio"] if rec["ttfa"] and rec["last_audio"] else None
    return {"tokens": rec["tokens"], "audio_s": rec["audio_s"], "ttfa_s": rec["ttfa"], "last_sample_s": rec["last_audio"],
            "ratio": ratio, "target": 0.25, "ok": rec["ok"], "error": rec.get("error")}


class Budget:
    """The whole run's time limit: a part that would not fit is skipped (and says so), never cut short."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, name: str, need: float, results: dict) -> bool:
        if self.left() >= need:
            return True
        results.setdefault("skipped", []).append(name)
        print(f"{name}: skipped, {self.left():.0f} s of the budget left (needs ~{need:.0f} s)", flush=True)
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="layout,prefill,prefix,audio,load,sequential,hf,oneslot",
                    help="layout, prefill (a prefill call's cost by shape), prefix, audio (one speech request "
                         "alone), load (the client rows), sequential "
                         "(one at a time through the server), hf, oneslot (one at a time through a one-slot engine)")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1152)
    ap.add_argument("--short-slots", type=int, default=None, help="of the slots, this many hold only --short-len "
                    "positions (serve --short-slots; default: three quarters, 12 of 16, as the mix is 75%% short "
                    "requests; 0: every slot holds --max-len)")
    ap.add_argument("--short-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8, help="requests per client count (at least the clients)")
    ap.add_argument("--sequential-requests", type=int, default=8)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate per client (requests/s)")
    ap.add_argument("--audio-tokens", type=int, default=240, help="new tokens of the time-to-first-audio request "
                    "(sampled; it reports the seconds of audio they made: the target is for >= 5 s)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run; parts that do not fit "
                                                                  "are skipped and listed")
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--warmup-passes", type=int, default=6, help="at most this many 16-client warm-up passes; "
                    "warm-up stops at the first pass that compiles no new program")
    ap.add_argument("--quick", action="store_true", help="clients 1,4; 8 requests; no HF run")
    ap.add_argument("--tiny", action="store_true", help="the demo model instead of 135 M (checks the script runs)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    a = ap.parse_args(argv)
    if a.quick:
        a.clients, a.requests, a.hf_requests, a.sequential_requests = "1,4", 4, 0, 4
    budget = Budget(a.budget)
    if a.short_slots is None:
        a.short_slots = a.slots * 3 // 4

    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
               "load_average_start": load_average(), "budget_s": a.budget}
    print(f"machine: {results['machine']}; load average {results['load_average_start']}", flush=True)
    lm, hf, n_params = build_tiny() if a.tiny else build_model()
    results["slots"] = {"slots": a.slots, "max_len": a.max_len, "short_slots": a.short_slots, "short_len": a.short_len}
    print(f"model: {n_params / 1e6:.1f} M params, slots {a.slots} x {a.max_len} positions, of which "
          f"{a.short_slots} hold only {a.short_len}", flush=True)
    parts = set(a.parts.split(","))
    if "layout" in parts and budget.allows("layout", 60, results):
        r = results["layout"] = bench_layout(lm, a.slots, a.max_len, reps=3,
                                             short_slots=a.short_slots or a.slots * 3 // 4, short_len=a.short_len)
        print(f"layout: decode step of {a.slots} short rows gathered over all {a.max_len} positions "
              f"{r['decode_step_contiguous_s'] * 1e3:.1f} ms, gathered over a 128-position window "
              f"{r['decode_step_window_128_s'] * 1e3:.1f} ms, in place over every slot "
              f"{r['decode_step_in_place_s'] * 1e3:.1f} ms; with 4 rows past the 1,000-token prefix: gathered "
              f"(calls of {r['mixed_4_long_gathered_calls']} rows) {r['mixed_4_long_gathered_s'] * 1e3:.1f} ms, in place "
              f"{r['mixed_4_long_in_place_s'] * 1e3:.1f} ms, in place with {r['short_slots']} short slots of "
              f"{r['short_len']} {r['mixed_4_long_in_place_short_slots_s'] * 1e3:.1f} ms; the model alone over an "
              f"8-position cache (the weights' floor) {r['model_step_weights_only_s'] * 1e3:.1f} ms; "
              f"a paged cache's extra gather per step {r['paged_gather_overhead_per_step_s'] * 1e3:.1f} ms; copying a cached "
              f"1,000-token prefix into a slot {r['prefix_copy_1000_s'] * 1e3:.2f} ms once per request "
              f"(load {load_average()})", flush=True)
    if "prefill" in parts and budget.allows("prefill", 90, results):
        r = results["prefill"] = bench_prefill(lm, a.slots, a.max_len)
        print("prefill: best of 3 by rows x length " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in
                                                          r["seconds_by_rows_x_length"].items())
              + f"; fit: {r['per_call_s'] * 1e3:.1f} ms per call + {r['per_token_s'] * 1e3:.2f} ms per padded token "
              f"= a call costs {r['call_cost_tokens']:.0f} tokens; 4 x 256 at {r['gflops_per_s_at_1024']:.0f} GFLOP/s "
              f"(load {load_average()})", flush=True)
    if "prefix" in parts and budget.allows("prefix", 60, results):
        r = results["prefix"] = bench_prefix(lm, a.max_len)
        print(f"prefix: TTFT cold {r['ttft_cold_s'] * 1e3:.0f} ms, cached 1,000-token prefix {r['ttft_cached_s'] * 1e3:.0f} ms "
              f"-> {r['ratio']:.1%} of cold (target <= 20%) (load {load_average()})", flush=True)
    shared = [1] + np.random.default_rng(7).integers(3, 32000, size=PREFIX_TOKENS - 1).tolist()
    seq_items = workload(a.sequential_requests, seed=16, max_tokens=a.max_tokens, shared_prefix=shared)
    load = results["load"] = {"rows": []}
    if parts & {"audio", "load", "sequential"} and budget.allows("load", 120, results):
        base, server, thread, service = start_server(lm, a.slots, a.max_len, a.short_slots, a.short_len)
        clients_process = ClientProcess()
        # warm-up (not recorded): the workload's shape at 16 clients with other prompts, until a pass compiles
        # nothing new (at most --warmup-passes): caches the shared prefix and compiles what precompile does not
        # cover (other processor variants), so the rows measure a server in its steady state (each row still
        # reports the programs it compiled: "new_programs")
        for p in range(a.warmup_passes):
            before = service.engine.profile.programs()
            clients_process.run(base, workload(16, seed=999 - p, max_tokens=a.max_tokens, shared_prefix=shared), 16, a.rate,
                        seed=999 - p, time_limit=max(1.0, budget.left() - 60))
            if p and service.engine.profile.programs() == before:
                break
        print(f"warm-up done after {p + 1} passes: {service.engine.profile.programs()} compiled programs "
              f"(load {load_average()})", flush=True)
        if "audio" in parts and budget.allows("audio", 60, results):
            r = load["audio"] = bench_audio(base, a.audio_tokens)
            r["load_average"] = load_average()
            print(f"audio: one speech request alone, {r['tokens']} tokens -> {r['audio_s']:.2f} s of audio; first audio "
                  f"{r['ttfa_s']} s, last sample {r['last_sample_s']} s -> {r['ratio']} (target <= 25%) "
                  f"(load {r['load_average']})", flush=True)
        for n in [int(x) for x in a.clients.split(",")] if "load" in parts else []:
            if not budget.allows(f"clients {n}", 30, results):
                continue
            items = workload(max(n, a.requests), seed=n, max_tokens=a.max_tokens, shared_prefix=shared)
            service.engine.profile.reset()
            row = clients_process.run(base, items, n, a.rate, seed=n, time_limit=budget.left() - 30)
            row["load_average"] = load_average()
            row["engine"] = service.engine.profile.summary()
            print(f"  engine: {row['engine']}", flush=True)
            load["rows"].append(row)
            print(f"clients {n:2d}: {row['tokens_per_s']:.1f} tok/s, TTFT p50/p99 {row['ttft_p50']}/{row['ttft_p99']} s, "
                  f"TTFA p50/p99 {row['ttfa_p50']}/{row['ttfa_p99']} s, sent {row['sent']}/{row['requests']}, lost "
                  f"{row['lost']} failed {row['failed']} dup {row['duplicated']} (load {row['load_average']})", flush=True)
        if "sequential" in parts and budget.allows("sequential (ours)", 30, results):
            seq = load["sequential_ours"] = clients_process.run(base, seq_items, 1, 0.0, seed=0, time_limit=budget.left() - 20)
            seq["load_average"] = load_average()
            print(f"sequential (ours, {a.slots}-slot server, one request at a time): {seq['tokens_per_s']:.1f} tok/s, "
                  f"sent {seq['sent']}/{seq['requests']} (load {seq['load_average']})", flush=True)
            by_n = {r["clients"]: r for r in load["rows"]}
            if 16 in by_n:
                load["speedup_16_vs_sequential"] = by_n[16]["tokens_per_s"] / seq["tokens_per_s"]
                print(f"16 clients / sequential: {load['speedup_16_vs_sequential']:.2f}x (target >= 4x)", flush=True)
        pe = service.engine.prefix
        load["prefix_cache_hit_rate"] = pe.hit_tokens / max(1, pe.prompt_tokens)
        print(f"prefix-cache token hit rate {load['prefix_cache_hit_rate']:.1%}", flush=True)
        clients_process.close()
        server.should_exit = True
        thread.join(timeout=60)
    if "hf" in parts and a.hf_requests and budget.allows("sequential (HF)", 30, results):
        hf_items = workload(a.hf_requests, seed=16, max_tokens=a.max_tokens, shared_prefix=shared)
        load["sequential_hf"] = h = hf_sequential(hf, lm, hf_items, a.max_tokens)
        h["load_average"] = load_average()
        print(f"sequential (HF transformers generate): {h['tokens_per_s']:.1f} tok/s (load {h['load_average']})")
    if "oneslot" in parts and budget.allows("sequential (one-slot engine)", 60, results):
        e1 = load["sequential_one_slot_engine"] = engine_sequential(lm, seq_items, a.max_tokens, a.max_len, shared)
        e1["load_average"] = load_average()
        by_n = {r["clients"]: r for r in load["rows"]}
        if 16 in by_n:
            load["speedup_16_vs_one_slot_engine"] = by_n[16]["tokens_per_s"] / e1["tokens_per_s"]
        print(f"sequential (one-slot engine, in process): {e1['tokens_per_s']:.1f} tok/s; 16 clients / it: "
              f"{load.get('speedup_16_vs_one_slot_engine', float('nan')):.2f}x (load {e1['load_average']})\n"
              f"  engine: {e1['engine']}", flush=True)
    results["load_average_end"] = load_average()
    results["wall_s"] = a.budget - budget.left()
    print(f"done in {results['wall_s']:.0f} s; skipped: {results.get('skipped', [])}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
