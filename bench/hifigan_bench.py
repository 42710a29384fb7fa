"""HiFi-GAN unit vocoder: ours (JAX) vs the ORIGINAL PyTorch ``HifiGANVocoder`` side by side, in one
process, at the real sizes (512 initial channels, upsample 5·4·4·4·2, kernels 11/8/8/8/4,
resblocks 3/7/11 with dilations 1/3/5, embedding 128: ~14 M parameters Base, ~15 M Expressive), on
random weights written in the original checkpoint format.

The original is read from an export OUTSIDE the repository (never committed):

    mkdir -p /tmp/orig && git --git-dir=/work/.mirror/facebookresearch+spiritlm/repo archive HEAD | tar -x -C /tmp/orig
    python bench/hifigan_bench.py --orig /tmp/orig [--append bench/RESULTS.md]

Its ``hifigan_vocoder.py`` needs only torch and numpy, so it is loaded as a single file (no
torchaudio stand-in needed). Each measurement is the best (and the median) of ``--repeats`` timed
calls after one warm-up (the machine is shared: the best run is the least disturbed one); ours and
the original alternate call by call so machine noise hits both alike. Compile time (our first call per shape) is reported separately. 10 s of speech = 250 units, dur_pred=False
(exactly 250 frames for both implementations, so both do identical work).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEAK_FLOPS = 180e9  # this machine's fp32 matmul limit, 2 threads (shared/spec/BASELINES.md)

REAL = {
    "resblock": "1", "upsample_rates": [5, 4, 4, 4, 2], "upsample_kernel_sizes": [11, 8, 8, 8, 4],
    "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": 501, "embedding_dim": 128,
    "multispkr": "from_input_file", "num_speakers": 4, "code_hop_size": 640, "sampling_rate": 16000,
    "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
}
BASE = dict(REAL, multistyle="from_input_file", num_styles=100, model_in_dim=384)
EXPRESSIVE = dict(REAL, num_f0_tokens=64, f0_hop_size=1280, num_style_tokens=100, style_hop_size=16000,
                  model_in_dim=512)


def load_original(orig_root: Path):
    f = orig_root / "spiritlm" / "speech_tokenizer" / "hifigan" / "hifigan_vocoder.py"
    if not f.exists():
        sys.exit(f"original not found at {f}; export it first (see this script's docstring)")
    spec = importlib.util.spec_from_file_location("orig_hifigan_vocoder", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HifiGANVocoder


def timeit(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orig", default="/tmp/orig", help="root of the exported original repository")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--variants", default="base,expressive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", default=None, help="append a markdown results block to this file")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]

    import torch

    torch.set_num_threads(args.threads)
    import jax

    from spiritlm_jax.converters.hifigan import write_random_original
    from spiritlm_jax.models.hifigan import generator_flops, param_count
    from spiritlm_jax.vocoder import HifiGANVocoder

    OrigVocoder = load_original(Path(args.orig))
    batches = [int(b) for b in args.batches.split(",")]
    n_units = int(round(args.seconds * 25))
    rng = np.random.default_rng(0)
    lines = []
    tmp = Path(tempfile.mkdtemp(prefix="hifigan_bench_"))
    for variant in args.variants.split(","):
        raw = {"base": BASE, "expressive": EXPRESSIVE}[variant]
        d = write_random_original(tmp / variant, raw, seed=1)
        orig = OrigVocoder(str(d / "generator.pt"), default_speaker=2, default_style=8).eval()
        ours = HifiGANVocoder.from_pretrained(d)
        n_params = param_count(ours.params)
        seqs = []
        for _ in range(max(batches)):
            u = {"hubert": rng.integers(0, 500, n_units)}
            if variant == "expressive":
                u["pitch"] = rng.integers(0, 64, -(-n_units // 2))
                u["style"] = rng.integers(0, 100, -(-n_units // 25))
            seqs.append(u)

        def run_orig(u):
            with torch.inference_mode():
                return orig(u["hubert"], speaker_id=2, dur_pred=False,
                            f0_code=u.get("pitch"), style_code=u.get("style")).numpy()

        # compile: our first call per batch shape, timed before anything else ran that shape
        first_call = {}
        for b in batches:
            t = time.perf_counter()
            if b == 1:
                ours.vocode(seqs[0], dur_pred=False)
            else:
                ours.vocode_batch(seqs[:b], dur_pred=False)
            first_call[b] = time.perf_counter() - t
        # correctness on these real-size random weights
        ref = run_orig(seqs[0])
        got = ours.vocode(seqs[0], speaker_id=2, dur_pred=False)
        err = float(np.abs(ref - got).max()) if ref.shape == got.shape else float("nan")
        flops = generator_flops(ours.cfg, n_units)
        lines.append(f"| {variant} | params {n_params / 1e6:.2f} M | max abs diff vs original {err:.2e} "
                     f"| generator {flops / 1e9:.1f} GFLOP per {args.seconds:g} s | | | |")
        for b in batches:
            batch = seqs[:b]
            def f_ours():
                if b == 1:
                    ours.vocode(batch[0], dur_pred=False)
                else:
                    ours.vocode_batch(batch, dur_pred=False)

            def f_orig():
                for u in batch:  # the original supports batch 1 only
                    run_orig(u)

            f_orig()  # warm-up
            t_o, t_j = [], []
            for _ in range(args.repeats):
                t_o += timeit(f_orig, 1)
                t_j += timeit(f_ours, 1)
            mo, mj = min(t_o), min(t_j)
            medo, medj = statistics.median(t_o), statistics.median(t_j)
            audio = b * args.seconds
            lines.append(
                f"| {variant} | {b} | {mo:.3f} s (median {medo:.3f}; RTF {audio / mo:.1f}×) "
                f"| {mj:.3f} s (median {medj:.3f}; RTF {audio / mj:.1f}×) "
                f"| **{mo / mj:.2f}×** (medians {medo / medj:.2f}×) | {b * flops / mj / 1e9:.0f} GFLOP/s = "
                f"{b * flops / mj / PEAK_FLOPS:.0%} of 180 (original {b * flops / mo / PEAK_FLOPS:.0%}) "
                f"| ≈ {max(0.0, first_call[b] - mj):.1f} s (first call {first_call[b]:.1f} s) |")
            print(lines[-1], flush=True)
    info = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({args.threads} threads), jax {jax.__version__}, python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}; {args.seconds:g} s of speech = {n_units} units, dur_pred=False; "
            f"best and median of {args.repeats} alternating runs; load average before the run {load0:.1f}")
    header = ["| variant | batch | original (best) | ours (best) | speed-up | FLOP rate (best) | our compile |",
              "|---|---|---|---|---|---|---|"]
    block = "\n".join(["", f"Run: {info}", "", *header, *lines, ""])
    print(block)
    if args.append:
        p = Path(args.append)
        text = p.read_text() if p.exists() else "# Benchmarks\n"
        head = "## HifiGAN vocoder"
        if head not in text:
            text = text.rstrip() + f"\n\n{head}\n"
        # append inside our own section (before the next '## ' heading, if any)
        start = text.index(head) + len(head)
        nxt = text.find("\n## ", start)
        if nxt < 0:
            text = text.rstrip() + "\n" + block
        else:
            text = text[:nxt].rstrip() + "\n" + block + text[nxt:]
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
