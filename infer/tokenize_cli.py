"""Speech files or folders → Spirit LM units, one JSON line per file.

Each line: {"audio": path, "hubert": "12 12 7 …", "pitch": "…", "style": "…", "string": "[St71][Pi39][Hu99]…"}
(pitch/style only for the Expressive tokenizer), or {"audio": path, "error": "…"} for a file that could not
be tokenized: unreadable, or shorter than the encoder's receptive field (1280 samples = 80 ms at 16 kHz,
which gives no unit at all). The run goes on over the other files; at the end a summary names the failed
ones and the exit code is 1 if any failed (pass --keep-going to exit 0 when at least one file succeeded).
Files are tokenized in batches: every 100 s chunk of every file in a batch shares padded, jit-compiled
model calls. --out is checked before any model is loaded; an existing non-empty file needs --overwrite.

Models come from the original checkpoint tree (--checkpoints or $SPIRITLM_CHECKPOINTS_DIR:
speech_tokenizer/hubert_25hz, …/vqvae_f0_quantizer, …/style_encoder_w2v2).

Examples:
  spiritlm-jax tokenize recordings/ --variant expressive --out units.jsonl
  spiritlm-jax tokenize a.wav b.flac --variant base          # JSONL to stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from spiritlm_jax.cli import positive_int

AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}


def add_arguments(p):
    p.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("--checkpoints", default=None, help="original checkpoints/ folder (default: $SPIRITLM_CHECKPOINTS_DIR)")
    p.add_argument("--variant", choices=("base", "expressive"), default="base",
                   help="base: HuBERT units; expressive: HuBERT + pitch + style units")
    p.add_argument("--f0-backbone", choices=("fcpe", "pyaapt"), default="fcpe", help="pitch extractor (expressive)")
    p.add_argument("--out", default="-", help="output JSONL file (default: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="files per batched call (>= 1)")
    p.add_argument("--no-string", action="store_true", help="omit the interleaved unit string")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 when some (not all) files failed; they are still listed in the summary and JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def find_audio(inputs) -> list[Path]:
    files = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXT)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def run(args) -> int:
    from tqdm import tqdm

    from spiritlm_jax.outputs import OutputPathError, check_output_file
    from spiritlm_jax.speech import SpeechTokenizer

    try:
        files = find_audio(args.inputs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print("error: no audio files found (extensions: " + ", ".join(sorted(AUDIO_EXT)) + ")", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be ≥ 1", file=sys.stderr)
        return 2
    try:
        if args.out != "-":
            check_output_file(args.out, "--out", overwrite=args.overwrite)
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tok = SpeechTokenizer.from_checkpoints(args.checkpoints, args.variant, f0_backbone=args.f0_backbone,
                                               with_vocoder=False)
    except (FileNotFoundError, ValueError) as e:  # ValueError: CheckpointError / ModelDirError (bad or unreadable files)
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    failed: list[tuple[str, str]] = []
    try:
        bar = tqdm(total=len(files), unit="file", desc="tokenizing", file=sys.stderr)
        for i in range(0, len(files), args.batch_size):
            batch = files[i:i + args.batch_size]
            try:
                results = tok.encode_units_batch(batch)
            except Exception:  # one bad file must not sink the batch: retry one by one
                results = []
                for f in batch:
                    try:
                        results.append(tok.encode_units(f))
                    except Exception as e:  # noqa: BLE001 - reported per file
                        results.append({"audio": str(f.absolute()), "error": f"{type(e).__name__}: {e}"})
            for r in results:
                if "error" in r:
                    failed.append((r["audio"], r["error"]))
                elif not args.no_string:
                    r["string"] = tok.units2string(r)
                out.write(json.dumps(r) + "\n")
            bar.update(len(batch))
        bar.close()
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"tokenized {len(files) - len(failed)} of {len(files)} files", file=sys.stderr)
    if not failed:
        return 0
    for path, why in failed[:5]:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    if len(failed) > 5:
        print(f"  … and {len(failed) - 5} more (see the 'error' lines of the output)", file=sys.stderr)
    if args.keep_going and len(failed) < len(files):
        print(f"warning: {len(failed)} of {len(files)} files failed (--keep-going: exit 0)", file=sys.stderr)
        return 0
    print(f"error: {len(failed)} of {len(files)} files failed" +
          ("" if len(failed) == len(files) else "; pass --keep-going to accept a partial result"), file=sys.stderr)
    return 1
