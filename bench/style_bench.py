"""Style encoder (wav2vec2 + projector + 1 s pooling + classifier → 1 Hz style units): ours (JAX) vs
the ORIGINAL PyTorch ``Wav2Vec2StyleEncoder`` side by side in one process, at wav2vec2-base size
(12 layers × 768, 12 heads, FFN 3072, conv 512×7 kernels 10,3,3,3,3,2,2 strides 5,2,2,2,2,2,2,
positional conv 128/16, projector 256, 100 styles; ≈95 M parameters), random weights saved in the
original's HF format (config.json + pytorch_model.bin).

    mkdir -p /tmp/orig && git --git-dir=/work/.mirror/facebookresearch+spiritlm/repo archive HEAD | tar -x -C /tmp/orig
    python bench/style_bench.py --orig /tmp/orig [--write bench/RESULTS.md]

The original's constructor fetches ``facebook/wav2vec2-base``'s preprocessor config from the HF hub;
with no network, this process answers that one lookup with a local copy of the same settings
(do_normalize=True, sampling_rate 16000). Batch 16 = 16 × 10 s: the original encodes one utterance
per call (its forward takes one waveform), ours one ``encode_batch``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _speech_bench_common import (PEAK_FLOPS, alternate, best_median, install_torchaudio_stub,  # noqa: E402
                                  load_original_package, machine_info, write_section)

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
            conv_bias=False, feat_extract_norm="group", num_conv_pos_embeddings=128,
            num_conv_pos_embedding_groups=16, do_stable_layer_norm=False, classifier_proj_size=256,
            num_labels=100)
PREPROCESSOR = {"do_normalize": True, "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                "return_attention_mask": False, "sampling_rate": 16000,
                "feature_extractor_type": "Wav2Vec2FeatureExtractor"}


def flops_per_item(n: int) -> float:
    f, L, cin = 0.0, n, 1
    for dim, k, s in zip(BASE["conv_dim"], BASE["conv_kernel"], BASE["conv_stride"]):
        L = (L - k) // s + 1
        f += 2 * L * dim * cin * k
        cin = dim
    T, D, F = L, BASE["hidden_size"], BASE["intermediate_size"]
    f += 2 * T * cin * D + 2 * T * D * (D // 16) * 128
    f += BASE["num_hidden_layers"] * (2 * T * (4 * D * D + 2 * D * F) + 4 * T * T * D)
    f += 2 * T * D * 256
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orig", default="/tmp/orig")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--write", default=None, help="write the '## Style encoder' section of this RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import transformers

    from spiritlm_jax.style_tokenizer import StyleTokenizer

    info = machine_info(args.threads)
    install_torchaudio_stub()
    tmp = Path(tempfile.mkdtemp(prefix="style_bench_"))
    pre = tmp / "wav2vec2-base-preprocessor"
    pre.mkdir()
    (pre / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    fe_cls = transformers.Wav2Vec2FeatureExtractor
    real_from_pretrained = fe_cls.from_pretrained.__func__

    def offline_from_pretrained(cls, name, *a, **k):  # the one hub lookup of the original's constructor
        return real_from_pretrained(cls, str(pre) if name == "facebook/wav2vec2-base" else name, *a, **k)

    fe_cls.from_pretrained = classmethod(offline_from_pretrained)
    load_original_package(Path(args.orig), "spiritlm/speech_tokenizer/style_encoder", "orig_style")
    from orig_style.w2v2_encoder import Wav2Vec2StyleEncoder

    torch.manual_seed(0)
    orig = Wav2Vec2StyleEncoder(transformers.Wav2Vec2Config(**BASE)).eval()
    model_dir = tmp / "style_encoder_w2v2"
    orig.save_pretrained(model_dir, safe_serialization=False)
    ours = StyleTokenizer.from_checkpoint_dir(model_dir)

    N = int(args.seconds * 16000)
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(N)).astype(np.float32) for _ in range(args.batch)]
    with torch.inference_mode():
        ref_u = orig(torch.from_numpy(wavs[0])).numpy()
    t0 = time.perf_counter()
    got = ours.encode(wavs[0], return_intermediates=True)
    first1 = time.perf_counter() - t0
    unit_eq = float(np.mean(got["units"] == ref_u))
    t0 = time.perf_counter()
    ours.encode(wavs[0])
    compile1 = max(first1 - (time.perf_counter() - t0), 0.0)
    t0 = time.perf_counter()
    ours.encode_batch(wavs)
    first_b = time.perf_counter() - t0

    def orig1():
        with torch.inference_mode():
            orig(torch.from_numpy(wavs[0]))

    def origB():
        with torch.inference_mode():
            for w in wavs:
                orig(torch.from_numpy(w))

    res1 = alternate({"ours": lambda: ours.encode(wavs[0]), "original": orig1}, args.repeats + 1)
    res1 = {k: v[1:] for k, v in res1.items()}
    resB = alternate({"ours": lambda: ours.encode_batch(wavs), "original": origB}, args.repeats_batch)
    compileB = max(first_b - min(resB["ours"]), 0.0)

    fl = flops_per_item(N)
    lines = [
        f"Machine: {info}. wav2vec2-base size (≈95 M params), random weights in the original's HF format, "
        f"{args.seconds:g} s per item, best (median) of {args.repeats} (batch 1) / {args.repeats_batch} "
        f"(batch {args.batch}) alternating runs after a warm-up.",
        "",
        "| batch | implementation | best s | median s | audio s / s | vs original | GFLOP/s | of 180 GFLOP/s peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for B, res in ((1, res1), (args.batch, resB)):
        ob = min(res["original"])
        for name in ("ours", "original"):
            b, m = best_median(res[name])
            gf = B * fl / b / 1e9
            lines.append(f"| {B} × {args.seconds:g} s | {name} | {b:.3f} | {m:.3f} | {B * args.seconds / b:.1f} | "
                         f"{ob / b:.2f}× | {gf:.0f} | {gf * 1e9 / PEAK_FLOPS:.0%} |")
    lines += [
        "",
        f"Compile (ours, first call per shape, excluded above): batch 1 {compile1:.1f} s, batch {args.batch} {compileB:.1f} s.",
        f"Work: ≈{fl / 1e9:.0f} GFLOP per {args.seconds:g} s item (conv stack, 12 layers, projector), so the 2-core "
        f"nominal ceiling is ≈{PEAK_FLOPS / fl * args.seconds:.0f} audio s/s (this CPU runs above the nominal 180 GFLOP/s when quiet).",
        f"Agreement (random weights, item 0): style units identical on {unit_eq:.0%} of seconds; the original "
        f"encodes one utterance per call, ours runs encode_batch (two jitted calls of 8 rows).",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(Path(args.write), "Style encoder", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
