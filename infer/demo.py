"""Run Spirit LM end to end: speech->speech, text->speech and speech->text, with plots.

With no checkpoints, the demo builds a TINY Spirit LM with RANDOM weights (every part written in the
original checkpoint formats, cached under ~/.cache/spiritlm-jax/demo-v1; override with --cache or
$SPIRITLM_JAX_CACHE), loads it through our converters exactly as it would load the released
checkpoints, and runs the three tasks on a bundled synthetic speech prompt (a 2.8 s vowel-like harmonic
glide with a pitch contour and pauses). The outputs are noise-like BY DESIGN: the point is that every
stage runs (HuBERT, pitch and style tokenizers, text tokenizer, Llama, ban lists, sampling, vocoder).

To run it on the real Spirit LM weights, point it at the original checkpoints/ folder (same layout as
the original repository: speech_tokenizer/{hubert_25hz, vqvae_f0_quantizer, style_encoder_w2v2,
hifigan_spiritlm_base, hifigan_spiritlm_expressive_w2v2} and spiritlm_model/spirit-lm-{base,expressive}-7b):

    spiritlm-jax demo --checkpoints /path/to/checkpoints
    SPIRITLM_CHECKPOINTS_DIR=/path/to/checkpoints spiritlm-jax demo      (same thing)

(The 7B LM needs ~28 GB of host memory in float32 on CPU, or an accelerator; --random forces the tiny
random model even when $SPIRITLM_CHECKPOINTS_DIR is set.)

Writes to --out (default ./spiritlm-demo): prompt.wav/.png, speech_to_speech.wav/.png,
text_to_speech.wav/.png, summary.json (settings, prompt units, every output, timings); the text
output is printed and stored in summary.json. Each PNG shows the waveform, its spectrogram, and the F0
track measured by our pitch tokenizer (FCPE, 200 Hz) with the pitch units it assigns (12.5 Hz) overlaid.

Robustness (why no run ends in a stack trace): generation samples (top-k 50) with a fixed seed, so runs
are reproducible. An Expressive speech continuation that contains no [Pi] token cannot be vocoded
(SpeechDecodeError); the tiny random LM is built so that pitch tokens are common in speech mode (its
[Pi] output rows are scaled, see spiritlm_jax.tiny_checkpoints), and if a continuation still cannot be
vocoded the task is retried with the next seeds (seed+1, seed+2) and the attempts are recorded. A
task that fails every attempt is reported with the reason, the other tasks still run, and the exit
status is 1. Bad checkpoints (missing files, wrong formats) give a one-paragraph error and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
RETRIES = 3  # seeds tried per speech task (seed, seed+1, seed+2)
TEXT_PROMPT = "A quiet morning on the river: the water was smooth and the boats were still."
DEBUG_ENV = "SPIRITLM_DEMO_DEBUG"  # set to 1 to see the traceback of an unexpected error

BANNER_RANDOM = """\
============================================================================================
 spiritlm-jax demo -- the weights are RANDOM.
 This is a tiny Spirit LM with random weights, built in the original checkpoint formats and
 loaded through our converters. Every stage really runs, but the speech it makes is noise-like
 and the text is a jumble of word pieces: that is expected.
 To use the real Spirit LM checkpoints (same folder layout as the original checkpoints/):
     spiritlm-jax demo --checkpoints /path/to/checkpoints
     SPIRITLM_CHECKPOINTS_DIR=/path/to/checkpoints spiritlm-jax demo
============================================================================================"""


class DemoError(Exception):
    """A problem the user can fix (bad checkpoint folder, unwritable output folder)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="spiritlm-demo", metavar="DIR", help="output folder (default: ./spiritlm-demo)")
    p.add_argument("--checkpoints", metavar="DIR", default=None,
                   help="the original Spirit LM checkpoints/ folder (default: $SPIRITLM_CHECKPOINTS_DIR, else the tiny "
                        "random-weight model)")
    p.add_argument("--random", action="store_true",
                   help="use the tiny random-weight model even if $SPIRITLM_CHECKPOINTS_DIR is set")
    p.add_argument("--variant", choices=("base", "expressive"), default="expressive",
                   help="Spirit LM Base (HuBERT units) or Expressive (+ pitch and style units); default expressive")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=120, help="new tokens per task (default 120)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where the tiny checkpoints are cached (default: $SPIRITLM_JAX_CACHE or ~/.cache/spiritlm-jax)")


# ------------------------------------------------------------------------------------------------
# the bundled synthetic prompt
# ------------------------------------------------------------------------------------------------
# (start s, end s, f0 knots in Hz, formants (F1, F2, F3) in Hz): three "syllables" separated by pauses
_SYLLABLES = (
    (0.15, 0.85, (110.0, 150.0, 170.0), (700.0, 1200.0, 2600.0)),  # rising /a/
    (1.10, 1.75, (185.0, 150.0, 120.0), (300.0, 2300.0, 3000.0)),  # falling /i/
    (2.00, 2.65, (130.0, 205.0, 140.0), (350.0, 800.0, 2400.0)),  # rise-fall /u/
)
PROMPT_SECONDS = 2.8


def synthetic_prompt(sr: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic vowel-like harmonic glide: three voiced syllables (glottal-like harmonic series
    shaped by three formant resonances, smooth pitch contours, 40 ms fades) separated by pauses, over a
    faint noise floor. float32, 16 kHz, peak 0.5."""
    n = int(PROMPT_SECONDS * sr)
    t = np.arange(n) / sr
    out = 1e-3 * np.random.default_rng(1234).standard_normal(n)
    for start, end, knots, formants in _SYLLABLES:
        i0, i1 = int(start * sr), int(end * sr)
        u = np.linspace(0.0, 1.0, i1 - i0)
        f0 = np.interp(u, np.linspace(0, 1, len(knots)), knots) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t[i0:i1]))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        seg = np.zeros(i1 - i0)
        for k in range(1, 64):
            fk = k * f0
            amp = (fk < 7600) / k ** 0.6  # spectral tilt
            amp = amp * sum(1.0 / (1.0 + ((fk - F) / (60.0 + 0.08 * F)) ** 2) for F in formants)
            seg += amp * np.sin(k * phase)
        fade = np.minimum(1.0, np.minimum(u, 1 - u) * (i1 - i0) / (0.04 * sr))
        out[i0:i1] += seg * fade
    out = 0.5 * out / np.max(np.abs(out))
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def _resolve_checkpoints(args) -> tuple[Path | None, str]:
    """(folder or None for the tiny model, where it came from)."""
    if args.checkpoints:
        return Path(args.checkpoints).expanduser(), "--checkpoints"
    env = os.environ.get("SPIRITLM_CHECKPOINTS_DIR")
    if env and not args.random:
        return Path(env).expanduser(), "$SPIRITLM_CHECKPOINTS_DIR"
    return None, "tiny random"


def check_layout(root: Path, variant: str, source: str) -> None:
    from spiritlm_jax.tiny_checkpoints import required_files

    if not root.is_dir():
        raise DemoError(f"the checkpoint folder {root} (from {source}) does not exist. It must be the original "
                        f"Spirit LM checkpoints/ folder, holding speech_tokenizer/ and spiritlm_model/.")
    from spiritlm_jax.converters.tree import check_converted_tree, is_converted_tree

    if is_converted_tree(root):  # written by `spiritlm-jax convert all`: read without torch
        missing = check_converted_tree(root, variant)
        if missing:
            raise DemoError(f"{root} (from {source}) is a converted tree but lacks {len(missing)} file(s) of the "
                            f"{variant} model:\n  " + "\n  ".join(missing) + "\nRe-run spiritlm-jax convert all.")
        return
    missing = [f for f in required_files(variant) if not (root / f).is_file()]
    if missing:
        shown = "\n  ".join(missing)  # at most 17 files
        raise DemoError(
            f"{root} (from {source}) is not a complete Spirit LM checkpoints/ folder for the {variant} model; "
            f"missing {len(missing)} file(s):\n  {shown}\nExpected the original layout: "
            f"speech_tokenizer/{{hubert_25hz, vqvae_f0_quantizer, style_encoder_w2v2, hifigan_spiritlm_base, "
            f"hifigan_spiritlm_expressive_w2v2}} and spiritlm_model/spirit-lm-{variant}-7b/.")


def load_model(root: Path, variant: str):
    from spiritlm_jax.spiritlm import SpiritLM

    try:
        return SpiritLM.from_pretrained(f"spirit-lm-{variant}-7b", checkpoints=root, variant=variant)
    except Exception as e:  # any failure here is about the files: CheckpointError, VocabError, torch/JSON errors
        raise DemoError(f"could not load the {variant} model from {root}: {type(e).__name__}: {e}") from e


def _pitch_analyser(lm, root: Path):
    """Our pitch tokenizer for the plots (the Base model has none of its own: built from the folder)."""
    st = lm.speech_tokenizer
    if st is not None and st.pitch is not None:
        return st.pitch, None
    try:
        from spiritlm_jax.pitch_tokenizer import PitchTokenizer

        return PitchTokenizer.from_checkpoints(root / "speech_tokenizer" / "vqvae_f0_quantizer"), None
    except Exception as e:  # the plots then omit the F0 panel and say why
        return None, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def write_wav(path: Path, wav: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), np.clip(np.asarray(wav, np.float32), -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


def analyse_pitch(pitch, wavs: list[np.ndarray]) -> list[dict]:
    """Per waveform: F0 track (Hz, 200 Hz frames, NaN where unvoiced) and pitch units (12.5 Hz) from our
    pitch tokenizer. All waveforms go through it in ONE padded batch (one compilation, not one per length)."""
    if pitch is None or not wavs:
        return [{} for _ in wavs]
    tracks = pitch.f0(wavs)
    coded = [i for i, w in enumerate(wavs) if len(w) >= pitch.min_samples]
    units = dict(zip(coded, pitch.encode_batch([wavs[i] for i in coded]))) if coded else {}
    hop = 80 / SAMPLE_RATE
    out = []
    for i, (f0, vuv) in enumerate(tracks):
        f0 = np.where(np.asarray(vuv) > 0.5, np.asarray(f0, np.float64), np.nan)
        u = np.asarray(units[i]).astype(int) if i in units else None
        out.append({"f0": f0, "f0_times": np.arange(len(f0)) * hop, "units": u, "unit_step": hop * pitch.stride,
                    "unit_times": None if u is None else (np.arange(len(u)) + 0.5) * hop * pitch.stride})
    return out


def plot(path: Path, wav: np.ndarray, title: str, analysis: dict, note: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(wav)) / SAMPLE_RATE
    dur = max(len(wav) / SAMPLE_RATE, 1e-3)
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.4, 1.2]})
    ax = axes[0]
    ax.plot(t, wav, lw=0.5, color="tab:blue")
    ax.set_ylabel("amplitude")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("waveform", fontsize=10, loc="left")
    ax = axes[1]
    if len(wav) >= 512:
        ax.specgram(wav, NFFT=512, Fs=SAMPLE_RATE, noverlap=384, cmap="magma", scale="dB", vmin=-120)
    ax.set_ylabel("frequency (Hz)")
    ax.set_ylim(0, SAMPLE_RATE / 2)
    ax.set_title("spectrogram", fontsize=10, loc="left")
    ax = axes[2]
    if analysis:
        ax.plot(analysis["f0_times"], analysis["f0"], color="tab:green", lw=1.5, label="F0 (FCPE, Hz)")
        ax.set_ylabel("F0 (Hz)", color="tab:green")
        ax.set_title("F0 track and pitch units (our pitch tokenizer)", fontsize=10, loc="left")
        if analysis["units"] is not None and len(analysis["units"]):
            ax2 = ax.twinx()
            edges = np.arange(len(analysis["units"]) + 1) * analysis["unit_step"]
            ax2.stairs(analysis["units"], edges, color="tab:orange", lw=1.2, label="pitch unit [Pi n]")
            ax2.plot(analysis["unit_times"], analysis["units"], "o", color="tab:orange", ms=3)
            ax2.set_ylabel("pitch unit n", color="tab:orange")
            ax2.set_ylim(-1, 64)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8,
                      frameon=False)
        if np.all(np.isnan(analysis["f0"])):
            ax.text(0.5, 0.5, "no voiced frame detected", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.text(0.5, 0.5, "no pitch tokenizer available" + (f"\n{note}" if note else ""), transform=ax.transAxes,
                ha="center", va="center", fontsize=9)
    ax.set_xlabel("time (s)")
    ax.set_xlim(0, dur)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the tasks
# ------------------------------------------------------------------------------------------------
TASKS = (
    ("speech_to_speech", "speech", "speech", "continue the prompt in speech"),
    ("text_to_speech", "text", "speech", "continue the text in speech"),
    ("speech_to_text", "speech", "text", "continue the prompt in text"),
)


def _run_task(lm, name, in_kind, out_mod, prompt_wav, args):
    from spiritlm_jax.speech import SpeechDecodeError

    inputs = [("speech", prompt_wav)] if in_kind == "speech" else [("text", TEXT_PROMPT)]
    tries = RETRIES if out_mod == "speech" else 1
    attempts = []
    for k in range(tries):
        seed = args.seed + k
        t0 = time.perf_counter()
        try:
            outs, prompt = lm.generate(inputs, output_modality=out_mod, max_new_tokens=args.max_new_tokens,
                                       do_sample=True, seed=seed, return_prompt=True)
        except SpeechDecodeError as e:
            attempts.append({"seed": seed, "error": str(e)})
            print(f"  [{name}] seed {seed}: the generated speech cannot be vocoded ({e}); trying seed {seed + 1}"
                  if k + 1 < tries else f"  [{name}] seed {seed}: the generated speech cannot be vocoded ({e})")
            continue
        return {"outputs": outs, "prompt_tokens": len(lm.tokenizer.encode(prompt)), "seed": seed,
                "attempts": attempts + [{"seed": seed, "error": None}], "seconds": time.perf_counter() - t0}
    return {"outputs": [], "seed": None, "attempts": attempts,
            "error": f"no vocodable speech in {tries} attempts (seeds {args.seed}..{args.seed + tries - 1})"}


def _demo(args) -> int:
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    timings = {}
    t_all = time.perf_counter()
    root, source = _resolve_checkpoints(args)
    random_weights = root is None
    if random_weights:
        print(BANNER_RANDOM, flush=True)
        t0 = time.perf_counter()
        root, built = ensure_tiny_checkpoints(args.cache, log=lambda m: print(m, flush=True))
        timings["build_checkpoints_s" if built else "find_cached_checkpoints_s"] = time.perf_counter() - t0
        print(f"tiny checkpoints ({'built now' if built else 'cached'}): {root}")
    else:
        print(f"spiritlm-jax demo on the checkpoints in {root} (from {source}).", flush=True)
        check_layout(root, args.variant, source)
    if args.max_new_tokens < 1:
        raise DemoError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")

    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the output folder {out}: {e}") from e

    t0 = time.perf_counter()
    print(f"converting and loading Spirit LM {args.variant} (original files -> our converters -> JAX) ...", flush=True)
    lm = load_model(root, args.variant)
    timings["convert_and_load_s"] = time.perf_counter() - t0
    pitch, pitch_note = _pitch_analyser(lm, root)

    prompt_wav = synthetic_prompt()
    write_wav(out / "prompt.wav", prompt_wav)
    t0 = time.perf_counter()
    prompt_units = lm.speech_tokenizer.encode_string(prompt_wav)
    timings["encode_prompt_s"] = time.perf_counter() - t0
    summary = {
        "random_weights": random_weights,
        "note": ("RANDOM weights: outputs are noise-like by design. Run with --checkpoints DIR or "
                 "SPIRITLM_CHECKPOINTS_DIR=DIR for the real model.") if random_weights else "real checkpoints",
        "checkpoints": str(root), "checkpoints_source": source, "variant": args.variant, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens, "sample_rate": SAMPLE_RATE,
        "prompt": {"wav": "prompt.wav", "png": "prompt.png", "seconds": len(prompt_wav) / SAMPLE_RATE,
                   "samples": len(prompt_wav), "text": TEXT_PROMPT, "speech_units": prompt_units},
        "tasks": {},
    }
    # (file stem, waveform, title, summary entry) of every waveform to plot, analysed together at the end
    to_plot = [("prompt", prompt_wav, "bundled synthetic prompt (input)", summary["prompt"])]
    failed = []
    for name, in_kind, out_mod, desc in TASKS:
        print(f"{name}: {desc} (max {args.max_new_tokens} new tokens, seed {args.seed}) ...", flush=True)
        r = _run_task(lm, name, in_kind, out_mod, prompt_wav, args)
        entry = {"input": in_kind, "output_modality": out_mod, "seed": r["seed"], "attempts": r["attempts"],
                 "prompt_tokens": r.get("prompt_tokens"), "seconds": r.get("seconds"), "outputs": [],
                 "error": r.get("error")}
        if entry["error"]:
            failed.append(name)
            print(f"  [{name}] FAILED: {entry['error']}")
        speech_i = 0
        for o in r["outputs"]:
            if o.content_type.value == "TEXT":
                entry["outputs"].append({"type": "text", "text": o.content})
                print(f"  [{name}] text: {o.content!r}" if o.content else f"  [{name}] text: (empty: the model "
                      f"ended the text at once)")
                continue
            stem = name if speech_i == 0 else f"{name}_{speech_i}"
            speech_i += 1
            wav = np.asarray(o.content, np.float32)
            write_wav(out / f"{stem}.wav", wav)
            title = f"{name}: {desc}" + (" -- RANDOM WEIGHTS, noise-like by design" if random_weights else "")
            item = {"type": "speech", "wav": f"{stem}.wav", "png": f"{stem}.png", "samples": int(len(wav)),
                    "seconds": len(wav) / SAMPLE_RATE}
            entry["outputs"].append(item)
            to_plot.append((stem, wav, title, item))
            print(f"  [{name}] speech: {len(wav) / SAMPLE_RATE:.2f} s -> {out / (stem + '.wav')}")
        summary["tasks"][name] = entry

    t0 = time.perf_counter()
    print("plotting (waveform, spectrogram, F0 track + pitch units) ...", flush=True)
    analyses = analyse_pitch(pitch, [w for _, w, _, _ in to_plot if len(w)])
    analyses = iter(analyses)
    for stem, wav, title, item in to_plot:
        an = next(analyses) if len(wav) else {}
        plot(out / f"{stem}.png", wav, title, an, pitch_note)
        item["pitch_units"] = None if an.get("units") is None else an["units"].tolist()
        item["voiced_fraction"] = None if "f0" not in an else round(float(np.mean(~np.isnan(an["f0"]))), 4)
        print(f"  {out / (stem + '.png')}")
    timings["analyse_and_plot_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"wrote {out}/summary.json ({timings['total_s']:.1f} s in all)")
    if random_weights:
        print("Reminder: these outputs come from RANDOM weights. For the real model: spiritlm-jax demo "
              "--checkpoints /path/to/checkpoints (or set SPIRITLM_CHECKPOINTS_DIR).")
    if failed:
        print(f"error: task(s) {', '.join(failed)} produced no output (see above and summary.json)", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    try:
        return _demo(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a last resort: one readable line, the traceback only on request
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: the demo failed unexpectedly: {type(e).__name__}: {e}\n(set {DEBUG_ENV}=1 to see the "
              f"traceback)", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spiritlm-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
