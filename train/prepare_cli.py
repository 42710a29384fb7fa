"""Prepare a Spirit LM training corpus: text, speech and word-aligned speech → a TFDS ArrayRecord dataset.

Inputs (any mix; folders are searched recursively):
  --text PATH       .txt / .jsonl ("text" field) files: text-only documents (--text-unit file|paragraph|line)
  --audio PATH      audio files: speech-only documents
  --aligned PATH    audio files with a word alignment of the same name next to them (.TextGrid, .ctm,
                    .json, .tsv) or under --alignment-dir (same relative path: Montreal Forced Aligner's
                    output layout); a .txt/.lab transcript next to the audio is checked against it
  --manifest FILE   JSONL, one input per line: {"text": ...} | {"text_path": ...} | {"audio": ...} |
                    {"audio": ..., "alignment": ..., "transcript": ..., "format": ..., "tier": ...}
  --tts espeak TEXT...  synthesize every line of the TEXT files with eSpeak NG (espeakng-loader wheel):
                    16 kHz WAVs + word alignments from the engine's own word events (--tts-dir), then
                    prepared as --aligned inputs; --tts-voices/--tts-rates/--tts-pitches/--tts-seed vary
                    the speech; --list-voices prints the voices (train/tts.py)
  --sft FILE        JSONL of fine-tuning records: {"prompt": [items], "response": [items]} (SFT),
                    {"task": "asr"|"tts", "audio": ..., "text": ...} (the eval tasks' prompt formats),
                    {"prompt": [...], "chosen": [...], "rejected": [...]} (DPO); an item is {"text": ...}
                    or {"audio": path, "start": s, "end": s}. See docs/finetune.md.

Speech is tokenized with the batched HuBERT tokenizer (+ pitch and style with --expressive) from the
original speech_tokenizer checkpoints, keeping each unit's time range. The job runs on Apache Beam
through TFDS: the DirectRunner in this process by default; pass Beam flags after --beam for a cluster:

  spiritlm-jax prepare --aligned corpus/ --speech-tokenizer ckpt/speech_tokenizer \\
      --output gs://bucket/data --name mycorpus \\
      --beam --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp \\
             --setup_file=./setup.py

Output: OUTPUT/spiritlm_corpus/NAME/1.0.0 (splits text, speech, aligned) and summary.json beside it.
Bad inputs (unreadable audio, alignments that do not match the transcript or lie outside the audio,
empty transcripts, ...) are skipped and counted by reason in the summary. A split whose every input is
skipped is an error (exit 2) that prints that summary; no dataset is written. See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from spiritlm_jax.cli import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--text", action="append", default=[], metavar="PATH", help="text file or folder (repeatable)")
    g.add_argument("--audio", action="append", default=[], metavar="PATH", help="audio file or folder (repeatable)")
    g.add_argument("--aligned", action="append", default=[], metavar="PATH",
                   help="folder (or file) of audio with word alignments (repeatable)")
    g.add_argument("--alignment-dir", metavar="DIR", help="where --aligned's alignments live, if not beside the audio")
    g.add_argument("--manifest", action="append", default=[], metavar="FILE", help="JSONL manifest (repeatable)")
    g.add_argument("--sft", action="append", default=[], metavar="FILE",
                   help="JSONL of supervised {prompt, response} / shorthand {task: asr|tts, audio, text} / "
                        "preference {prompt, chosen, rejected} records (repeatable; docs/finetune.md) → the sft "
                        "and dpo splits")
    g.add_argument("--text-unit", choices=("file", "paragraph", "line"), default="file",
                   help="how a .txt file splits into documents (default: file)")
    g.add_argument("--tier", help="TextGrid tier holding the words (default: 'words' or the only interval tier)")
    s = p.add_argument_group("speech synthesis (aligned speech from text)")
    s.add_argument("--tts", choices=("espeak",), help="synthesize the TEXT files (one sentence per line)")
    s.add_argument("tts_text", nargs="*", metavar="TEXT", help="with --tts: text files or folders of .txt files")
    s.add_argument("--tts-dir", metavar="DIR", help="where the WAVs and alignments go (default: OUTPUT/tts/NAME)")
    s.add_argument("--tts-voices", default="en-us,en-us+m3,en-us+f2,en-gb-x-rp+m1",
                   help="comma-separated eSpeak NG voices, language[+variant] (default: %(default)s)")
    s.add_argument("--tts-rates", default="150,200", help="words per minute, lo,hi (default: %(default)s)")
    s.add_argument("--tts-pitches", default="35,65", help="pitch 0-100, lo,hi (default: %(default)s)")
    s.add_argument("--tts-seed", type=int, default=0, help="seed of the voice/rate/pitch draws (default 0)")
    s.add_argument("--list-voices", action="store_true", help="print eSpeak NG's voices and variants, then exit")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="DIR", help="TFDS data_dir (local or gs://...); required")
    o.add_argument("--name", help="corpus name (lower-case, digits, '_'): the TFDS config name; required")
    o.add_argument("--overwrite", action="store_true", help="rebuild if the dataset already exists")
    t = p.add_argument_group("tokenizers")
    t.add_argument("--speech-tokenizer", metavar="DIR",
                   help="the original speech_tokenizer folder (hubert_25hz/, and for --expressive "
                        "vqvae_f0_quantizer/ and style_encoder_w2v2/)")
    t.add_argument("--expressive", action="store_true", help="also extract pitch and style units")
    t.add_argument("--pitch-backbone", choices=("fcpe", "pyaapt"), default="fcpe")
    t.add_argument("--fcpe-path", help="FCPE weights (default: the ones bundled with torchfcpe 0.0.4)")
    t.add_argument("--batch-files", type=positive_int, default=16, help="audio files per tokenizer call (default 16)")
    t.add_argument("--max-batch-samples", type=positive_int, default=1_600_000,
                   help="audio samples per padded device batch (default 1.6M = 100 s)")
    t.add_argument("--duration-tolerance", type=float, default=0.05,
                   help="seconds a word may end past the audio's end before the file is skipped (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--beam", nargs=argparse.REMAINDER, default=[], metavar="FLAG",
                   help="everything after --beam is passed to Beam's PipelineOptions (--runner=..., ...)")


def _range(text: str, name: str) -> tuple[int, int]:
    from spiritlm_jax.train.tts import TTSError

    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise TTSError(f"--tts-{name} {text!r}: expected two integers lo,hi") from None
    return lo, hi


def synthesize(args: argparse.Namespace) -> str:
    """--tts: synthesize the TEXT files into --tts-dir; returns that folder (prepared as --aligned)."""
    from spiritlm_jax.train import tts

    if not args.tts_text:
        raise tts.TTSError("--tts espeak needs TEXT files (one sentence per line) after the options")
    opts = tts.SynthesisOptions(voices=tuple(v.strip() for v in args.tts_voices.split(",") if v.strip()),
                                rates=_range(args.tts_rates, "rates"), pitches=_range(args.tts_pitches, "pitches"),
                                seed=args.tts_seed)
    sentences = tts.read_sentences(args.tts_text)
    out = args.tts_dir or f"{args.output}/tts/{args.name}"
    stats = tts.synthesize_corpus(sentences, out, opts, progress=not args.no_progress)
    skipped = sum(stats["skipped"].values())
    print(f"synthesized {stats['ok']} of {len(sentences)} sentences ({stats['seconds'] / 60:.1f} min of speech) "
          f"into {out}; skipped {skipped}" + "".join(f"\n  {r}: {n} (e.g. {stats['skipped_examples'][r][0]})"
                                                     for r, n in stats["skipped"].items()), file=sys.stderr)
    if not stats["ok"]:
        raise tts.TTSError("no sentence could be synthesized (see the skip reasons above)")
    return out


def run(args: argparse.Namespace) -> int:
    import logging

    from spiritlm_jax.train import prepare
    from spiritlm_jax.train.cli import drop_logged_tracebacks
    from spiritlm_jax.train.tts import TTSError

    # Beam logs a failing transform with its traceback before re-raising; build_dataset turns the failures
    # users cause (every input skipped) into one PrepareError with the skip summary.
    logging.getLogger("apache_beam.runners.common").addFilter(drop_logged_tracebacks)

    if args.list_voices:
        from spiritlm_jax.train.tts import list_voices

        langs, variants = list_voices()
        print("languages: " + " ".join(langs))
        print("variants (language+variant, e.g. en-us+m3): " + " ".join(variants))
        return 0
    if not args.output or not args.name:
        print("error: --output and --name are required", file=sys.stderr)
        return 2
    if args.tts_text and not args.tts:
        print(f"error: unexpected arguments {args.tts_text}: TEXT files are synthesized only with --tts espeak",
              file=sys.stderr)
        return 2
    if args.tts and not args.speech_tokenizer:
        print("error: --tts makes aligned speech, which needs the speech tokenizer checkpoints (--speech-tokenizer DIR)",
              file=sys.stderr)
        return 2
    try:
        if args.tts:
            args.aligned = list(args.aligned) + [synthesize(args)]
        items, skipped = prepare.discover(text=args.text, audio=args.audio, aligned=args.aligned,
                                    alignment_dir=args.alignment_dir, manifests=args.manifest,
                                    text_unit=args.text_unit, tier=args.tier, sft=args.sft)
        opts = prepare.PrepareOptions(speech_tokenizer=args.speech_tokenizer, expressive=args.expressive,
                                pitch_backbone=args.pitch_backbone, fcpe_path=args.fcpe_path,
                                batch_files=args.batch_files, max_batch_samples=args.max_batch_samples,
                                duration_tolerance=args.duration_tolerance, progress=not args.no_progress)
        print(f"inputs: {len(items['text'])} text, {len(items['speech'])} speech, {len(items['aligned'])} aligned "
              f"file(s), {len(items['sft'])} sft and {len(items['dpo'])} dpo record(s); {len(skipped)} skipped "
              f"before processing", file=sys.stderr)
        data_dir, stats = prepare.build_dataset(items, args.output, args.name, opts, beam_args=args.beam,
                                          discovery_skips=skipped, overwrite=args.overwrite)
    except (prepare.PrepareError, TTSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(v is None for v in stats.values()):
        print(f"{data_dir} already existed and was reused (pass --overwrite to rebuild)", file=sys.stderr)
        return 0
    summary = {"dataset": data_dir, "splits": stats, "total": prepare.merge_stats(stats.values())}
    prepare._write_text(f"{data_dir.rstrip('/').rsplit('/', 1)[0]}/summary.json", json.dumps(summary, indent=1))
    print(prepare.format_summary(stats))
    print(f"\ndataset: {data_dir}")
    return 0 if summary["total"]["ok"] else 1
