"""Evaluate a Spirit LM on the paper's benchmarks (file layouts: docs/eval.md; nothing downloads).

  spiritlm-jax eval swuggy  --data zr2021/lexical/dev                   # sWUGGY (pairs, speech)
  spiritlm-jax eval sblimp  --data zr2021/syntactic/dev                 # sBLIMP
  spiritlm-jax eval pairs   --data blimp.jsonl                          # any minimal pairs (text/speech)
  spiritlm-jax eval storycloze --data cloze.jsonl --direction T2S       # T, S, T2S, S2T
  spiritlm-jax eval topic-storycloze --data tcloze.jsonl --direction S
  spiritlm-jax eval stsp --data stsp_data/manifest/emov/emov.test.jsonl --direction s2s --n-shot 3 \\
        --classifier stsp_data/model/speech_classifier
  spiritlm-jax eval stsp --model spirit-lm-base-7b --eval_manifest_path emov.test.jsonl --eval \\
        --write_pred pred_s_t.jsonl --input_output speech_text --classifier ...   # the original's flags
  spiritlm-jax eval stsp-score --ref_file ref.jsonl --pred_file pred.jsonl   # the original eval_stsp.py
  spiritlm-jax eval asr  --data LibriSpeech/test-clean --shots LibriSpeech/train-clean-100 --n-shot 10
  spiritlm-jax eval tts  --data LibriSpeech/test-clean --shots LibriSpeech/train-clean-100 --asr-model mypkg:asr
  spiritlm-jax eval intent --data stop_test.jsonl --shots stop_train.jsonl --n-shot 10
  spiritlm-jax eval mmlu --data mmlu_data --n-shot 5                    # data/{dev,test}/<subject>_*.csv

Likelihood tasks score a continuation by its token-normalised log-likelihood (--normalization sum for
the plain sum); generation tasks run through the batched engine. Every run writes a results JSON
(--output) with the model, the seed, the settings, the exact prompts and the sampled shot ids, and
prints a table next to the paper's number. --model / --checkpoints select the model as
'spiritlm-jax generate' does (variant name under the original checkpoints/ layout, or a folder).
Classifiers and ASR models: a local Hugging Face folder or 'module:function' (a callable taking a
list of texts or 16 kHz waveforms and returning labels / transcripts).
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from spiritlm_jax.cli import positive_int

TASKS = ("swuggy", "sblimp", "pairs", "storycloze", "topic-storycloze", "mmlu", "stsp", "stsp-score", "asr", "tts",
         "intent")
# the original predict_stsp.py's --input_output values
INPUT_OUTPUT = {"speech_speech": "s2s", "speech_text": "s2t", "text_speech": "t2s", "text_text": "t2t"}


def add_arguments(p):
    p.add_argument("task", choices=TASKS, help="the benchmark (stsp-score: the original eval_stsp.py, scores a "
                                                "prediction jsonl against a reference jsonl; no model)")
    p.add_argument("--data", "--eval_manifest_path", dest="data", default=None,
                   help="the benchmark data (file or folder; see docs/eval.md); --eval_manifest_path is the "
                        "original predict_stsp.py's name for the STSP manifest")
    p.add_argument("--model", default="spirit-lm-base-7b", help="variant name or model folder")
    p.add_argument("--checkpoints", default=None, help="original checkpoints/ folder (default: $SPIRITLM_CHECKPOINTS_DIR)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--mesh", default=None, metavar="D,F,T",
                   help="shard over a (data, fsdp, tensor) mesh, e.g. 8,1,1 (default: one device)")
    p.add_argument("--direction", default=None,
                   help="storycloze: T, S, T2S, S2T (default T); stsp: t2t, t2s, s2t, s2s (default s2s)")
    p.add_argument("--shots", default=None,
                   help="shot pool (asr/tts/intent; default: taken from --data and removed from it) or the STSP "
                        "few-shot jsonl (default: <stsp root>/manifest/few_shot/<dir>.jsonl)")
    p.add_argument("--n-shot", "--few_shot", dest="n_shot", type=int, default=None, help="number of shots (default: 10 asr/tts/intent, 5 mmlu, 0 stsp)")
    p.add_argument("--stsp-root", "--data_root_dir", dest="stsp_root", default=None,
                   help="STSP data root holding data/ and manifest/ (default: two folders above the manifest's "
                        "folder); the original's --data_root_dir (the data/ folder itself) is accepted too")
    p.add_argument("--classifier", default=None, help="STSP sentiment classifier (folder or module:function)")
    p.add_argument("--asr-model", default=None, help="TTS: ASR model for CER (folder or module:function)")
    p.add_argument("--modality", choices=("speech", "text"), default="speech", help="intent: input modality")
    p.add_argument("--normalization", choices=("mean", "sum"), default="mean",
                   help="likelihood score: token-normalised mean (default) or sum of log-probs")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (asr 200, tts 300; stsp: the original's 50 text / 300 speech)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per scoring/generation call (>= 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lowercase", action="store_true", help="asr/tts: keep transcripts' case in prompts")
    p.add_argument("--write-pred", "--write_pred", dest="write_pred", default=None,
                   help="stsp: also write the original's prediction jsonl here")
    stsp = p.add_argument_group("the original predict_stsp.py / eval_stsp.py flags (stsp, stsp-score)")
    stsp.add_argument("--input_output", choices=sorted(INPUT_OUTPUT), default=None,
                      help="stsp direction in the original's spelling (speech_text = --direction s2t, ...)")
    stsp.add_argument("--write_wav_output", default=None,
                      help="stsp with speech output: write each generated waveform here (random names, as the "
                           "original) and record its path as the prediction's 'generation'")
    stsp.add_argument("--eval", dest="original_eval", action="store_true",
                      help="accepted for the original's command lines: the accuracy is always computed")
    stsp.add_argument("--eval_type", default="emotion", help="accepted and unused, as in the original")
    stsp.add_argument("--ref_file", default=None, help="stsp-score: the reference jsonl (id + sentiment/emotion)")
    stsp.add_argument("--pred_file", default=None, help="stsp-score: the prediction jsonl (id + pred)")
    stsp.add_argument("--label", default="sentiment", help="stsp / stsp-score: sentiment (default) or emotion")
    p.add_argument("--output", default=None, help="results JSON (default: spiritlm-eval/<task>-<time>.json)")


def _limit(items, n):
    return items if n is None else items[: int(n)]


def _mesh(spec):
    if not spec:
        return None
    from spiritlm_jax.sharding import make_mesh

    try:
        shape = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh {spec!r}: expected three integers D,F,T, e.g. 8,1,1") from None
    return make_mesh(shape)


def run_task(args, lm):
    """Run one task on a loaded model; returns an EvalResult."""
    from spiritlm_jax.evaluation import data as eval_data
    from spiritlm_jax.evaluation import tasks as eval_tasks

    r = eval_tasks.Runner(lm, batch_size=args.batch_size, normalization=args.normalization)
    t = args.task
    if t in ("swuggy", "sblimp", "pairs"):
        return eval_tasks.run_pairs(r, _limit(eval_data.read_pairs(args.data), args.limit), t)
    if t == "mmlu":
        test = eval_data.read_mmlu(args.data, "test")
        if args.limit:
            test = {k: v[: args.limit] for k, v in test.items()}
        n = 5 if args.n_shot is None else args.n_shot
        return eval_tasks.run_mmlu(r, test, eval_data.read_mmlu(args.data, "dev") if n else None, n_shot=n)
    if t in ("storycloze", "topic-storycloze"):
        return eval_tasks.run_storycloze(r, _limit(eval_data.read_storycloze(args.data), args.limit), args.direction or "T", t)
    lower = not args.no_lowercase
    if t in ("asr", "tts"):
        items = _limit(eval_data.read_utterances(args.data), args.limit)
        pool = eval_data.read_utterances(args.shots) if args.shots else None
        n = 10 if args.n_shot is None else args.n_shot
        if t == "asr":
            return eval_tasks.run_asr(r, items, n_shot=n, shot_pool=pool, seed=args.seed,
                             max_new_tokens=args.max_new_tokens or 200, lowercase=lower)
        if not args.asr_model:
            raise eval_tasks.EvalError("tts needs --asr-model (a local HF ASR folder or module:function) to compute the CER")
        return eval_tasks.run_tts(r, items, args.asr_model, n_shot=n, shot_pool=pool, seed=args.seed,
                         max_new_tokens=args.max_new_tokens or 300, lowercase=lower)
    if t == "intent":
        items = _limit(eval_data.read_labelled(args.data), args.limit)
        pool = eval_data.read_labelled(args.shots) if args.shots else None
        return eval_tasks.run_intent(r, items, n_shot=10 if args.n_shot is None else args.n_shot, shot_pool=pool,
                            seed=args.seed, modality=args.modality)
    if t == "stsp":
        if args.input_output:
            if args.direction and args.direction != INPUT_OUTPUT[args.input_output]:
                raise eval_tasks.EvalError(f"--input_output {args.input_output} and --direction {args.direction} disagree; "
                                           f"give one of them")
            args.direction = INPUT_OUTPUT[args.input_output]
        if not args.classifier:
            raise eval_tasks.EvalError("stsp needs --classifier (the sentiment classifier: a local HF folder or "
                              "module:function); the original's come from the STSP archive's model/ folder")
        manifest = Path(args.data)
        root = Path(args.stsp_root) if args.stsp_root else manifest.resolve().parent.parent.parent
        if root.name == "data" and (root.parent / "manifest").is_dir():  # the original's --data_root_dir
            root = root.parent
        data_root = root / "data" if (root / "data").is_dir() else root
        ci, co = eval_tasks.parse_direction(args.direction or "s2s")
        n = args.n_shot or 0
        rows = None
        if n > 0:
            shots = Path(args.shots) if args.shots else root / "manifest" / "few_shot" / f"{eval_tasks.STSP_FEW_SHOT_FILES[(ci, co)]}.jsonl"
            rows = eval_data.read_jsonl(shots)
        res = eval_tasks.run_stsp(r, _limit(eval_data.read_jsonl(manifest), args.limit), args.direction or "s2s", args.classifier,
                         data_root=data_root, few_shot_rows=rows, n_shot=n, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, label=args.label,
                         write_wav_output=args.write_wav_output)
        if args.write_pred:
            with open(args.write_pred, "w", encoding="utf-8") as f:
                for it in res.items:
                    rec = {"id": it["id"], "pred": it["pred"]}
                    if "generation" in it:
                        rec["generation"] = it["generation"]
                    f.write(json.dumps(rec) + "\n")
        return res
    raise eval_tasks.EvalError(f"unknown task {t!r}")


def format_table(res, variant: str) -> str:
    from spiritlm_jax.evaluation.tasks import PAPER

    paper = PAPER.get(res.task, {}).get(variant)
    rows = [("task", res.task)]
    for k, v in res.metrics.items():
        if isinstance(v, float):
            v = f"{100 * v:.2f}%" if k == "accuracy" else f"{v:.2f}"
        if isinstance(v, list):
            v = f"{len(v)} ids"
        rows.append((k, str(v)))
    if paper is not None:
        rows.append((f"paper ({variant})", str(paper)))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def stsp_score(ref_file, pred_file, label: str = "sentiment") -> str:
    """The original ``eval_stsp.py --ref_file R --pred_file P``: its one output line."""
    from spiritlm_jax.evaluation import data as eval_data
    from spiritlm_jax.evaluation import metrics

    if not ref_file or not pred_file:
        raise metrics.MetricError("stsp-score needs --ref_file (reference jsonl) and --pred_file (prediction jsonl)")
    score = metrics.stsp_accuracy(eval_data.read_jsonl(ref_file), eval_data.read_jsonl(pred_file), label=label)
    return f"Accuracy: {score.accuracy * 100:0.2f}% for predictions from {pred_file}"


def run(args) -> int:
    import jax

    from spiritlm_jax.evaluation.data import DataError
    from spiritlm_jax.evaluation.tasks import EvalError
    from spiritlm_jax.evaluation.metrics import MetricError
    from spiritlm_jax.evaluation.scoring import ScoringError
    from spiritlm_jax.spiritlm import SpiritLM

    if args.task == "stsp-score":
        try:
            print(stsp_score(args.ref_file, args.pred_file, args.label))
        except (FileNotFoundError, DataError, MetricError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.data is None:
        print(f"error: eval {args.task} needs --data (the benchmark data; see docs/eval.md)", file=sys.stderr)
        return 2
    try:
        mesh = _mesh(args.mesh)
        lm = SpiritLM.from_pretrained(args.model, checkpoints=args.checkpoints, dtype=args.dtype, mesh=mesh)
        started = datetime.datetime.now(datetime.timezone.utc)
        res = run_task(args, lm)
    except (FileNotFoundError, EvalError, DataError, MetricError, ScoringError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {
        "task": res.task,
        "model": {"model": str(args.model), "checkpoints": args.checkpoints, "variant": lm.variant,
                  "dtype": lm.cfg.dtype, "vocab_size": lm.cfg.vocab_size, "layers": lm.cfg.num_hidden_layers},
        "seed": args.seed,
        "data": str(args.data),
        "argv": sys.argv[1:],
        "started": started.isoformat(),
        "versions": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()},
        **{k: v for k, v in res.to_json().items() if k != "task"},
    }
    path = Path(args.output) if args.output else Path("spiritlm-eval") / f"{res.task}-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False, default=_jsonable))
    print(format_table(res, lm.variant))
    print(f"results: {path}")
    return 0


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
