"""Training-data benchmark (not a test): preparation throughput and loader throughput.

1. ``prepare``: a synthetic aligned corpus (noise, TSV word timings) through the full TFDS + Beam
   DirectRunner pipeline with our batched tokenizers, in hours of audio per wall-clock hour; and, on
   the same files and weights, the one-file-at-a-time path the original code allows (batch 1:
   ``SpiritLMTokenizer`` takes one waveform per call) using our tokenizer per file, so the ratio shows
   what batching buys. The original's own PyTorch tokenizer speeds are in the HuBERT/pitch/style
   sections of RESULTS.md.
2. ``loader``: tokens per second (non-padding) out of the grain loader over the prepared corpus.

Default weights are the golden set's tiny random checkpoints (pipeline overhead dominates); pass
``--speech-tokenizer`` with real-size checkpoints for model-bound numbers.

    python bench/data_bench.py [--files 24] [--seconds 8] [--speech-tokenizer DIR] [--write]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GOLDEN = Path(os.environ.get("SPIRITLM_GOLDEN", HERE.parent.parent / "shared" / "golden"))


def make_corpus(root: Path, n_files: int, seconds: float, seed: int = 0) -> float:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n_files):
        n = int(seconds * 16000 * rng.uniform(0.7, 1.3))
        wav = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sf.write(root / f"u{i}.wav", wav, 16000, subtype="PCM_16")
        t, lines = 0.1, []
        while t + 0.5 < n / 16000:
            d = rng.uniform(0.15, 0.4)
            lines.append(f"w{len(lines)}\t{t:.3f}\t{t + d:.3f}\n")
            t += d + rng.uniform(0, 0.1)
        (root / f"u{i}.tsv").write_text("".join(lines))
        total += n / 16000
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--speech-tokenizer", default=str(GOLDEN / "checkpoints" / "speech_tokenizer"))
    ap.add_argument("--lm-dir", default=str(GOLDEN / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    a = ap.parse_args()

    from spiritlm_jax.train import prepare
    from spiritlm_jax.train.loader import LoaderConfig, make_dataset

    tmp = Path(tempfile.mkdtemp(prefix="data_bench_"))
    (tmp / "c").mkdir()
    audio_s = make_corpus(tmp / "c", a.files, a.seconds)
    items, _ = prepare.discover(aligned=[str(tmp / "c")])
    opts = prepare.PrepareOptions(speech_tokenizer=a.speech_tokenizer, progress=False)

    # warm-up (model load + compile) on a 2-file corpus, timed separately
    t = time.perf_counter()
    prepare.build_dataset({"aligned": items["aligned"][:2]}, str(tmp / "warm"), "warm", opts)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    data_dir, stats = prepare.build_dataset(items, str(tmp / "out"), "bench", opts)
    prep_s = time.perf_counter() - t

    # one file per call, same tokenizer, already compiled for these shapes by the runs above
    ex = prepare.UnitExtractor(a.speech_tokenizer)
    from spiritlm_jax.audio import load_audio

    wavs = [load_audio(it["audio"]) for it in items["aligned"]]
    ex(wavs[:1])
    t = time.perf_counter()
    for w in wavs:
        ex([w])
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    ex(wavs)
    batched_s = time.perf_counter() - t

    cfg = LoaderConfig(data_dir, a.lm_dir, seq_len=a.seq_len, batch_size=a.batch, shard_index=0, shard_count=1)
    it = iter(make_dataset(cfg))
    next(it)
    t = time.perf_counter()
    tokens = 0
    for _ in range(a.batches):
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
    load_s = time.perf_counter() - t

    from _speech_bench_common import machine_info, write_section

    rate = audio_s / prep_s  # audio seconds per wall second = audio hours per hour
    body = f"""Machine: {machine_info(int(os.environ.get('OMP_NUM_THREADS', os.cpu_count())))}.
Weights: `{a.speech_tokenizer}` ({'golden tiny random checkpoints: pipeline overhead, not model cost' if 'golden' in a.speech_tokenizer else 'given checkpoints'}).
Corpus: {a.files} aligned files, {audio_s:.0f} s of audio (synthetic noise + TSV word timings).

| measure | value |
|---|---|
| prepare, TFDS + Beam DirectRunner, end to end (excl. warm-up) | {prep_s:.1f} s = **{rate:.0f} h of audio per hour** |
| warm-up (model load + jit compile, 2-file corpus) | {warm_s:.1f} s |
| tokenizer only, batched (all files, one call) | {batched_s:.2f} s = {audio_s / batched_s:.0f} h/h |
| tokenizer only, one file per call (what the original's API allows) | {single_s:.2f} s = {audio_s / single_s:.0f} h/h |
| batched / one-per-call speed-up | **{single_s / batched_s:.2f}x** |
| loader (grain, seq {a.seq_len}, batch {a.batch}, base tokenizer): non-padding tokens/s | **{tokens / load_s:,.0f}** |

Packing efficiency over the measured batches: {tokens / (a.batches * a.batch * a.seq_len):.1%} non-padding.
No fraction of the machine's FLOP/s is given: with tiny weights the work is I/O, Beam and Python, not matmuls.
"""
    print(body)
    if a.write:
        write_section(HERE / "RESULTS.md", "Training data", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
