"""A miniature Spirit LM trained end to end on speech synthesized from text, and the paper's
interleaving ablation measured by the eval harness (train/miniature.py; docs/miniature.md).

  spiritlm-jax miniature --out runs/miniature            # the full run (65 min on 2 shared CPU cores at load 6-11)
  spiritlm-jax miniature --out /tmp/mini --quick          # every stage on a tiny corpus (2.5 min)
  spiritlm-jax miniature --out runs/units --unit-study conv,hubert:1,hubert:11,log_mel   # which features carry words

Stages: a seeded grammar of 9-word sentences → eSpeak NG speech with engine word timings (several
voices, rates, pitches) → a k-means unit quantizer trained on it (train-quantizer) → a compact
SentencePiece + [HuN] tokenizer → prepare (Beam/TFDS) → three LMs of one shape trained for the same
token budget on (a) text-only + speech-only, (b) the same + word-level interleaved, (c) speech-only →
held-out evaluation: spoken lexical decision, continuation choice T, S, T→S, S→T, few-shot ASR, and
zero-shot ASR after a short SFT (recipe=sft) of the interleaved model.
Writes OUT/results.json, OUT/results.md (the table), OUT/miniature.png (curves and ablation bars).
Every number printed is measured in this run; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; stages are rewritten)")
    p.add_argument("--quick", action="store_true", help="tiny corpus, one model: every stage in about 2.5 minutes")
    p.add_argument("--steps", type=int, default=None, help="override the training steps of every model")
    p.add_argument("--seed", type=int, default=None, help="override the seed (grammar split, voices, k-means, LMs)")
    p.add_argument("--units", type=int, default=None, help="override the number of k-means units")
    p.add_argument("--features", default=None,
                   help="override the quantizer features: log_mel[:N_MELS[:CONTEXT]] (default), hubert[:LAYER], conv")
    p.add_argument("--unit-study", default=None, metavar="FEATURES",
                   help="instead of the LMs: synthesize the training speech, fit a k-means quantizer per feature "
                        "spec (comma-separated, e.g. conv,hubert:1,hubert:11,log_mel) and report each one's unit "
                        "purity and word-unit mutual information (OUT/unit_study.json, .md)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from spiritlm_jax.train.miniature import FULL, QUICK, run_miniature

    cfg = QUICK if args.quick else FULL
    over = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("units", args.units),
                              ("features", args.features)) if v is not None}
    try:
        cfg = dataclasses.replace(cfg, **over)
        if args.unit_study is not None:
            from spiritlm_jax.train.miniature import run_unit_study
            from spiritlm_jax.unit_features import FeatureSpec

            feats = [f.strip() for f in args.unit_study.split(",") if f.strip()]
            if not feats:
                raise ValueError("--unit-study needs at least one feature spec, e.g. --unit-study conv,hubert:11")
            for f in feats:
                FeatureSpec.parse(f)  # a bad spec fails before the synthesis
            run_unit_study(args.out, cfg, feats, progress=not args.no_progress,
                           echo=lambda m: print(m, file=sys.stderr, flush=True))
            from pathlib import Path

            print((Path(args.out) / "unit_study.md").read_text())
            return 0
        res = run_miniature(args.out, cfg, progress=not args.no_progress,
                            echo=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}; total {res['seconds']['total']:.0f} s")
    return 0
