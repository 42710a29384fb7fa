"""Pitch tokenization speed: ours (JAX) vs the original PyTorch path, side by side in one run.

    python bench/pitch_bench.py [--seconds 10] [--iters 2] [--orig /tmp/orig] [--deps /tmp/benchdeps]

* Original: Spirit LM's own ``F0Tokenizer`` (exported OUTSIDE the repo, see below) with torchfcpe
  0.0.4's bundled FCPE (real weights) and a VQ-VAE of the real-config estimate of REFERENCE.md §2.4
  (downs_t [4], strides_t [2], width 32, depth 4, dilation 3, emb 128, 64 bins) with random weights
  written in the original's format. Batch 1 = ``F0Tokenizer(wav)``; batch 16 = the same components
  called batched (``model.infer`` on (16, N, 1), per-row mean removal, ``VQVAE`` on (16, 2, T)).
* Ours: ``PitchTokenizer.encode_batch`` (FCPE + normalisation + VQ-VAE in one jit), converted from
  the same files.
* jax-fcpe (PyPI, F0 only, different post-processing), if importable from ``--deps``.

Setup (nothing of it lives in the repo):
    mkdir -p /tmp/orig && git --git-dir=<mirror>/facebookresearch+spiritlm/repo archive HEAD | tar -x -C /tmp/orig
    pip install --no-deps --target /tmp/benchdeps omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 jax-fcpe==0.0.6 audax
    pip install --no-deps torchfcpe==0.0.4   # in the venv (the real FCPE weights)
A stand-in ``torchaudio`` (soundfile loading; no resampling, never needed at 16 kHz) is written to a
temp dir and put on sys.path for this process only.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MACHINE_GFLOPS = 180.0  # fp32 matmul, this machine (COMMON.md)
MACHINE_GBS = 27.0

SHIM = '''
import numpy as np, soundfile as sf, torch
from . import transforms, functional
def load(path, *a, **k):
    d, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(d.T)), sr
'''
SHIM_T = '''
class Resample:
    def __init__(self, *a, **k):
        raise RuntimeError("stand-in torchaudio: no resampling (benchmark audio is 16 kHz)")
'''
SHIM_F = '''
def resample(*a, **k):
    raise RuntimeError("stand-in torchaudio: no resampling (benchmark audio is 16 kHz)")
'''

VQ_CONFIG = """features: norm_f0_interp,vuv
speaker_norm: false
encoder_params: {input_emb_width: 2, output_emb_width: 128, levels: 1, downs_t: [4], strides_t: [2], width: 32, depth: 4, m_conv: 1.0, dilation_growth_rate: 3}
decoder_params: {input_emb_width: 2, output_emb_width: 128, levels: 1, downs_t: [4], strides_t: [2], width: 32, depth: 4, m_conv: 1.0, dilation_growth_rate: 3, reverse_decoder_dilation: true}
vq_params: {l_bins: 64, emb_width: 128, mu: 0.99, levels: 1}
"""


def setup_original(orig: Path, deps: Path, work: Path):
    shim = work / "shim" / "torchaudio"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(SHIM)
    (shim / "transforms.py").write_text(SHIM_T)
    (shim / "functional.py").write_text(SHIM_F)
    sys.path.insert(0, str(work / "shim"))
    sys.path.append(str(deps))
    f0dir = orig / "spiritlm" / "speech_tokenizer" / "f0"
    if not f0dir.is_dir():
        raise SystemExit(f"original code not found at {orig}; export it (see this file's docstring)")
    spec = importlib.util.spec_from_file_location("orig_f0", f0dir / "__init__.py", submodule_search_locations=[str(f0dir)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["orig_f0"] = mod
    spec.loader.exec_module(mod)
    import torch
    from orig_f0 import vqvae as ovq
    from omegaconf import OmegaConf

    qdir = work / "vqvae_f0_quantizer"
    qdir.mkdir(exist_ok=True)
    (qdir / "config.yaml").write_text(VQ_CONFIG)
    torch.manual_seed(0)
    model = ovq.VQVAE(OmegaConf.create(VQ_CONFIG))
    with torch.no_grad():
        model.vq.level_blocks[0].k.normal_()
    torch.save({"model": model.state_dict()}, qdir / "model.pt")
    tok = mod.F0Tokenizer(f0_extractor_method="fcpe", quantizer_path=qdir / "model.pt", hop_length=80,
                          sampling_rate=16000, interpolate=True, device="cpu")
    return tok, qdir


def orig_batched(tok, wavs):
    """The original's components called batched (equal lengths)."""
    import torch

    x = torch.from_numpy(np.stack(wavs))[..., None]
    n = x.shape[1]
    with torch.no_grad():
        f0, uv = tok.f0_extractor.model.infer(x, sr=16000, decoder_mode="local_argmax", threshold=0.05, f0_min=50,
                                              f0_max=1100, interp_uv=True, output_interp_target_length=n // 80 + 1,
                                              retur_uv=True)
        f0, vuv = f0[..., 0], 1 - uv[..., 0]
        for i in range(f0.shape[0]):
            m = f0[i] != 0
            f0[i][m] = f0[i][m] - f0[i][vuv[i] != 0].mean()
        codes = tok.quantizer(torch.stack([f0, vuv], 1).float(), compute_pred=False)[0]
    return codes.numpy()


def fcpe_flops_per_second(cfg) -> float:
    H, M, D, I = cfg.hidden_dims, cfg.n_mels, cfg.out_dims, cfg.hidden_dims * cfg.expansion
    per_frame = 2 * (M * H * 3 + H * H * 3 + cfg.n_layers * (H * 2 * I + I * cfg.dw_kernel + I * H) + H * D)
    per_frame += 2 * 513 * M + 5 * 1024 * 10  # mel matmul + rfft
    return per_frame * (cfg.sr / cfg.hop_size)


def timeit(fn, iters):
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--orig", default="/tmp/orig")
    ap.add_argument("--deps", default="/tmp/benchdeps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from spiritlm_jax.pitch_tokenizer import PitchTokenizer

    work = Path(tempfile.mkdtemp(prefix="pitch_bench_"))
    otok, qdir = setup_original(Path(args.orig), Path(args.deps), work)
    ours = PitchTokenizer.from_checkpoints(qdir, bucket=16000)

    rec = np.load(REPO.parent / "shared" / "golden" / "cases" / "inputs.npz")["recording_wav"]
    n = int(args.seconds * 16000)
    base = np.tile(rec, n // len(rec) + 1)[:n]
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        wavs = [np.roll(base, int(rng.integers(0, n))).astype(np.float32) for _ in range(b)]
        audio_s = b * args.seconds
        t0 = time.perf_counter()
        got = ours.encode_batch(wavs)
        compile_s = time.perf_counter() - t0
        t_ours = timeit(lambda: ours.encode_batch(wavs), args.iters)
        if b == 1:
            ref = [otok(wavs[0]).numpy()]
            t_orig = timeit(lambda: otok(wavs[0]), args.iters)
        else:
            ref = list(orig_batched(otok, wavs))
            t_orig = timeit(lambda: orig_batched(otok, wavs), args.iters)
        same = all(np.array_equal(g, r) for g, r in zip(got, ref))
        gflops = fcpe_flops_per_second(ours.fcfg) * audio_s / 1e9
        rows.append(dict(batch=b, audio_s=audio_s, compile_s=compile_s, ours_s=t_ours, orig_s=t_orig,
                         ours_rtf=audio_s / t_ours, orig_rtf=audio_s / t_orig, ratio=t_orig / t_ours,
                         ours_gflops=gflops / t_ours, orig_gflops=gflops / t_orig, codes_equal=same))
        print(rows[-1], flush=True)

    jf = None
    try:
        sys.path.append(args.deps)
        import jax_fcpe
        from jax_fcpe.utils import convert_torch_weights_to_msgpack
        from spiritlm_jax.converters.fcpe import find_bundled_weights

        mp = work / "fcpe.msgpack"
        convert_torch_weights_to_msgpack(find_bundled_weights(), mp)
        model, params = jax_fcpe.load_model(str(mp))
        b = max(int(x) for x in args.batches.split(","))
        x = np.stack([np.roll(base, int(rng.integers(0, n))) for _ in range(b)]).astype(np.float32)
        jax_fcpe.get_f0(x, model=model, params=params).block_until_ready()
        t = timeit(lambda: jax_fcpe.get_f0(x, model=model, params=params).block_until_ready(), args.iters)
        t_f0 = timeit(lambda: ours.f0(list(x)), args.iters)
        jf = dict(batch=b, jax_fcpe_s=t, ours_f0_s=t_f0, ratio=t / t_f0)
        print("jax-fcpe", jf, flush=True)
    except Exception as e:  # optional comparison
        jf = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        print("jax-fcpe unavailable:", jf["error"], flush=True)

    write_results(args, rows, jf)


def write_results(args, rows, jf):
    import jax
    import torch

    load = os.getloadavg()
    lines = ["## Pitch tokenizer", "",
             f"`python bench/pitch_bench.py --seconds {args.seconds} --iters {args.iters}` — {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared; load average "
             f"{load[0]:.1f} at the end), jax {jax.__version__} CPU, torch {torch.__version__} with {args.threads} threads. "
             f"FCPE = real torchfcpe 0.0.4 weights; VQ-VAE = REFERENCE.md §2.4 real-config estimate, random weights "
             f"(same file for both). Input: the LibriSpeech recording tiled to {args.seconds:.0f} s per row, rows "
             f"rotated differently. Times are the best of {args.iters} after one warm-up/compile call.", "",
             "| batch | audio (s) | original (s) | ours (s) | speed-up | ours × real time | ours GFLOP/s (FCPE) | fraction of 180 GFLOP/s | compile (s) | codes equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['audio_s']:.0f} | {r['orig_s']:.2f} | {r['ours_s']:.2f} | {r['ratio']:.2f}× | "
                     f"{r['ours_rtf']:.0f}× | {r['ours_gflops']:.1f} (orig {r['orig_gflops']:.1f}) | "
                     f"{r['ours_gflops'] / MACHINE_GFLOPS:.2f} | {r['compile_s']:.1f} | {r['codes_equal']} |")
    lines.append("")
    if "error" in jf:
        lines.append(f"jax-fcpe 0.0.6 (PyPI): not run ({jf['error']}).")
    else:
        lines.append(f"jax-fcpe 0.0.6 (PyPI, F0 only, its own post-processing; installed in a throwaway target): "
                     f"batch {jf['batch']}: {jf['jax_fcpe_s']:.2f} s vs our F0 {jf['ours_f0_s']:.2f} s "
                     f"(ours {jf['ratio']:.2f}× faster).")
    lines.append("FLOPs counted: FCPE network + mel (~2.2 GFLOP per second of audio); the VQ-VAE is < 1% of that. "
                 "The FCPE is compute-bound (weights 24 MB, read once per call), so the bandwidth limit "
                 f"({MACHINE_GBS:.0f} GB/s) is not the binding one.")
    section = "\n".join(lines) + "\n"
    p = Path(args.results)
    text = p.read_text() if p.exists() else "# Benchmark results\n"
    if "## Pitch tokenizer" in text:
        start = text.index("## Pitch tokenizer")
        nxt = text.find("\n## ", start + 5)
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    p.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
