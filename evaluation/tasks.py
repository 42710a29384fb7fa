"""The evaluation tasks of the Spirit LM paper on our engine (docs/eval.md has the formats and layouts).

Likelihood tasks (one jit forward per batch, ``evaluation/scoring.py``):
  * ``pairs``      sWUGGY / sBLIMP / BLiMP / whole-utterance spoken StoryCloze: the higher score wins.
  * ``storycloze`` StoryCloze / topic-StoryCloze in T, S, T→S, S→T: the correct ending must score higher.
  * ``intent``     few-shot intent classification: every label is scored as the continuation, argmax wins.
Generation tasks (one engine call per batch, ``infer/engine.py``):
  * ``stsp``  Speech-Text Sentiment Preservation (REFERENCE §10), every direction, zero- and few-shot.
  * ``asr``   few-shot ASR (WER), ``tts`` few-shot TTS (CER through a pluggable ASR model).

The score of a continuation is its token-normalised log-likelihood (``mean``: sum of log-probs of the
continuation tokens / their number) unless ``normalization="sum"``. A tie counts as a failure, so a
model that cannot tell the two apart scores 0, never 50%.

Every task returns an ``EvalResult`` (metrics, settings, the exact prompts/templates, the sampled
shot ids, per-item records) that serialises to the run's results JSON.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from spiritlm_jax import prompting
from spiritlm_jax.evaluation import metrics
from spiritlm_jax.evaluation.data import ClozeItem, DataError, PairItem, Utterance
from spiritlm_jax.evaluation.scoring import Scores, score_continuations

TEXT, SPEECH = prompting.TEXT_PROMPT_PREFIX, prompting.SPEECH_PROMPT_PREFIX
_UNIT_RUN = re.compile(r"^(?:\[(?:Hu|Pi|St)\d+\])+")

# The paper's numbers (arXiv 2402.05755v2), recorded next to ours in every result.
PAPER = {
    "swuggy": {"base": 69.0}, "sblimp": {"base": 58.3}, "storycloze": {"base": 61.0},
    "topic-storycloze": {"base": 82.9}, "mmlu": {"base": 36.9},
    "asr": {"base": 21.9}, "tts": {"base": 45.5}, "stsp": {"base": 41.0, "expressive": 48.0},  # zero-shot average over directions
}


class EvalError(ValueError):
    pass


@dataclasses.dataclass
class EvalResult:
    task: str
    metrics: dict
    settings: dict
    prompts: dict
    items: list

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ runner
class Runner:
    """What every task needs from a loaded ``SpiritLM``: tokenize, encode speech (cached per file),
    score continuations, generate. ``lm`` needs ``cfg``, ``params``, ``tokenizer``, ``speech_tokenizer``
    and ``expressive``."""

    def __init__(self, lm, *, batch_size: int = 16, mesh=None, normalization: str = "mean"):
        if normalization not in ("mean", "sum"):
            raise EvalError(f"normalization must be 'mean' (token-normalised) or 'sum', got {normalization!r}")
        self.lm = lm
        self.batch_size = int(batch_size)
        self.mesh = mesh if mesh is not None else getattr(lm, "mesh", None)
        self.normalization = normalization
        self._speech: dict[str, str] = {}

    # ---- speech
    def encode_speech(self, sources: Sequence[Any]) -> list[str]:
        """Audio paths or arrays → unit strings, batched; paths are encoded once per run."""
        st = self.lm.speech_tokenizer
        if st is None:
            raise EvalError("this task needs speech, but the model was loaded without a speech tokenizer")
        keys = [str(s) if isinstance(s, (str, Path)) else None for s in sources]
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._speech]
        uniq: dict[Any, int] = {}
        work = []
        for i in todo:
            k = keys[i] if keys[i] is not None else ("array", i)
            if k not in uniq:
                uniq[k] = len(work)
                work.append(sources[i])
        strings: list[str] = []
        for s in range(0, len(work), self.batch_size):
            strings += st.encode_string_batch(work[s:s + self.batch_size])
        out = [None] * len(sources)
        for i, k in enumerate(keys):
            if k is not None and k in self._speech:
                out[i] = self._speech[k]
        for i in todo:
            k = keys[i] if keys[i] is not None else ("array", i)
            out[i] = strings[uniq[k]]
            if keys[i] is not None:
                self._speech[keys[i]] = out[i]
        for i, s in enumerate(out):
            if not s:
                raise EvalError(f"speech input {sources[i] if keys[i] else i} gives no units (shorter than the "
                                f"tokenizer's minimum chunk?)")
        return out

    # ---- scoring
    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context + continuation`` split at the context: the tokens of the joint
        encoding after its longest common prefix with the context's own encoding are scored (a
        context token that merges with the continuation is scored with it)."""
        tok = self.lm.tokenizer
        full = tok.encode(context + continuation)
        ctx = tok.encode(context)
        k = 0
        while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
            k += 1
        if k == len(full):
            raise EvalError(f"continuation {continuation[:60]!r} adds no token to its context")
        return full[:k], full[k:]

    def score(self, requests: Sequence[tuple[str, str]]) -> np.ndarray:
        ids = [self.split(c, x) for c, x in requests]
        s: Scores = score_continuations(self.lm.cfg, self.lm.params, [a for a, _ in ids], [b for _, b in ids],
                                        batch_size=self.batch_size, mesh=self.mesh)
        return s.get(self.normalization)

    # ---- generation
    def generate(self, prompts: Sequence[str], modality, sampling, seed: int) -> list[list[int]]:
        from spiritlm_jax.infer.engine import generate as engine_generate

        lm = self.lm
        mod = prompting.to_output_modality(modality)
        if mod is prompting.OutputModality.ARBITRARY:
            banned = np.zeros((lm.cfg.vocab_size,), bool)
        else:
            banned = prompting.forbidden_mask(mod, lm.tokenizer.vocab, lm.expressive, n_embed=lm.cfg.vocab_size)
        out: list[list[int]] = []
        for s in range(0, len(prompts), self.batch_size):
            ids = [lm.tokenizer.encode(p) for p in prompts[s:s + self.batch_size]]
            new, _ = engine_generate(lm.cfg, lm.params, ids, sampling, banned, seed=seed + s, mesh=self.mesh,
                                     eos_id=lm.tokenizer.vocab.eos_id)
            out += new
        return out

    def decode_full(self, prompt: str, new_ids: list[int]) -> str:
        tok = self.lm.tokenizer
        return tok.decode(tok.encode(prompt) + list(new_ids))


def _better(a: float, b: float) -> bool:
    return bool(a > b)  # strict: a tie is a failure


# ------------------------------------------------------------------------------------------ pairs
def pair_requests(runner: Runner, items: Sequence[PairItem]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(good request, bad request) per item; a request is (context, continuation) strings. Speech:
    context ``[Speech]``, continuation the unit string; text: context ``[Text]``, continuation the text."""
    if not items:
        raise EvalError("no pairs to evaluate")
    speech = [it for it in items if it.modality == "speech"]
    enc = dict(zip([id(x) for x in speech], zip(runner.encode_speech([x.good for x in speech]),
                                                runner.encode_speech([x.bad for x in speech]))))
    out = []
    for it in items:
        if it.modality == "speech":
            g, b = enc[id(it)]
            out.append(((SPEECH, g), (SPEECH, b)))
        else:
            out.append(((TEXT, it.good), (TEXT, it.bad)))
    return out


def run_pairs(runner: Runner, items: Sequence[PairItem], task: str = "pairs") -> EvalResult:
    reqs = pair_requests(runner, items)
    flat = [r for pair in reqs for r in pair]
    sc = runner.score(flat)
    good, bad = sc[0::2], sc[1::2]
    recs = [{"id": it.id, "good": float(g), "bad": float(b), "correct": _better(g, b), **it.meta}
            for it, g, b in zip(items, good, bad)]
    acc = float(np.mean([r["correct"] for r in recs]))
    mods = sorted({it.modality for it in items})
    return EvalResult(task, {"accuracy": acc, "n": len(items)},
                      {"normalization": runner.normalization, "modality": mods},
                      {"template": "context '[Speech]' + continuation <units> (speech) | context '[Text]' + "
                                   "continuation <text> (text); higher score wins",
                       "first_item": {"good": "".join(reqs[0][0]), "bad": "".join(reqs[0][1])}},
                      recs)


# ------------------------------------------------------------------------------------------ StoryCloze
DIRECTIONS = {"t": ("t", "t"), "s": ("s", "s"), "t2t": ("t", "t"), "s2s": ("s", "s"), "t2s": ("t", "s"),
              "s2t": ("s", "t")}


def parse_direction(d: str) -> tuple[str, str]:
    key = str(d).lower().replace("→", "2").replace("->", "2").replace(">", "2").replace("_", "2")
    key = {"text2text": "t2t", "speech2speech": "s2s", "text2speech": "t2s", "speech2text": "s2t"}.get(key, key)
    if key not in DIRECTIONS:
        raise EvalError(f"unknown direction {d!r}: use T, S, T2S (T→S) or S2T (S→T)")
    return DIRECTIONS[key]


def cloze_requests(runner: Runner, items: Sequence[ClozeItem], direction: str):
    """(correct request, wrong request) per story for a direction (context modality → ending modality).

    context string = marker(ctx) + context [+ marker(ending) when the modality changes];
    continuation = the ending: " " + text after a text context, the text itself after a marker,
    the unit string for speech (same-modality speech is concatenated, as the wrapper does)."""
    ci, co = parse_direction(direction)
    need = {"t": ("context_text",), "s": ("context_audio",)}[ci] + \
        {"t": ("correct_text", "wrong_text"), "s": ("correct_audio", "wrong_audio")}[co]
    for it in items:
        miss = [k for k in need if not getattr(it, k)]
        if miss:
            raise DataError(f"story {it.id} lacks {miss}, needed for direction {ci.upper()}→{co.upper()}")
    if not items:
        raise EvalError("no stories to evaluate")
    n = len(items)
    ctx = runner.encode_speech([it.context_audio for it in items]) if ci == "s" else [it.context_text for it in items]
    if co == "s":
        ends = runner.encode_speech([it.correct_audio for it in items] + [it.wrong_audio for it in items])
        good, bad = ends[:n], ends[n:]
    else:
        good, bad = [it.correct_text for it in items], [it.wrong_text for it in items]
    out = []
    for c, g, b in zip(ctx, good, bad):
        head = (TEXT if ci == "t" else SPEECH) + c
        if ci != co:
            head += TEXT if co == "t" else SPEECH
        elif co == "t":
            g, b = " " + g.lstrip(), " " + b.lstrip()
        out.append(((head, g), (head, b)))
    return out


def run_storycloze(runner: Runner, items: Sequence[ClozeItem], direction: str = "t",
                   task: str = "storycloze") -> EvalResult:
    ci, co = parse_direction(direction)
    reqs = cloze_requests(runner, items, direction)
    sc = runner.score([r for pair in reqs for r in pair])
    good, bad = sc[0::2], sc[1::2]
    recs = [{"id": it.id, "correct_score": float(g), "wrong_score": float(b), "correct": _better(g, b)}
            for it, g, b in zip(items, good, bad)]
    acc = float(np.mean([r["correct"] for r in recs]))
    name = ci.upper() if ci == co else f"{ci.upper()}→{co.upper()}"
    return EvalResult(task, {"accuracy": acc, "n": len(items), "direction": name},
                      {"normalization": runner.normalization, "direction": name},
                      {"template": "marker(context) + context [+ marker(ending) if the modality changes] | ending",
                       "first_item": {"context": reqs[0][0][0], "correct": reqs[0][0][1], "wrong": reqs[0][1][1]}},
                      recs)


# ------------------------------------------------------------------------------------------ few-shot prompts
def sample_shots(n_pool: int, n_shot: int, seed: int) -> list[int]:
    """``n_shot`` distinct indices of a pool, drawn with numpy's PCG64 seeded by ``seed`` (recorded)."""
    if n_shot < 0:
        raise EvalError(f"n_shot must be ≥ 0, got {n_shot}")
    if n_shot > n_pool:
        raise EvalError(f"{n_shot} shots requested but the shot pool has only {n_pool} items")
    return sorted(np.random.default_rng(seed).choice(n_pool, n_shot, replace=False).tolist())


def asr_example(units: str, text: str) -> str:
    return f"{SPEECH}{units}{TEXT}{text}\n"


def tts_example(text: str, units: str) -> str:
    return f"{TEXT}{text}{SPEECH}{units}\n"


def asr_prompt(shots: Sequence[tuple[str, str]], units: str) -> str:
    """``[Speech]<units>[Text]<transcript>\\n`` per shot, then ``[Speech]<units>[Text]``."""
    return "".join(asr_example(u, t) for u, t in shots) + f"{SPEECH}{units}{TEXT}"


def tts_prompt(shots: Sequence[tuple[str, str]], text: str) -> str:
    """``[Text]<transcript>[Speech]<units>\\n`` per shot, then ``[Text]<text>[Speech]``."""
    return "".join(tts_example(t, u) for t, u in shots) + f"{TEXT}{text}{SPEECH}"


def intent_context(shots: Sequence[tuple[str, str, str]], head: str) -> str:
    """Shots ``<input>[Text]<label>\\n`` (input = ``[Speech]<units>`` or ``[Text]<text>``), then the
    test ``<input>[Text]``; each label is scored as the continuation."""
    return "".join(f"{h}{TEXT}{lab}\n" for h, lab in shots) + f"{head}{TEXT}"


def _pool_and_eval(items: list, shot_pool: list | None, n_shot: int, seed: int):
    same = shot_pool is None
    pool = items if same else shot_pool
    idx = sample_shots(len(pool), n_shot, seed)
    shots = [pool[i] for i in idx]
    ev = [it for i, it in enumerate(items) if not (same and i in set(idx))]
    if not ev:
        raise EvalError("no evaluation items left after taking the shots from the same data; pass a separate "
                        "shot pool (--shots) or fewer shots")
    return shots, ev


def _text_for_prompt(t: str, lowercase: bool) -> str:
    return t.lower() if lowercase else t


# ------------------------------------------------------------------------------------------ ASR / TTS
def run_asr(runner: Runner, items: Sequence[Utterance], *, n_shot: int = 10, shot_pool=None, seed: int = 0,
            max_new_tokens: int = 200, lowercase: bool = True) -> EvalResult:
    from spiritlm_jax.infer.engine import SamplingConfig

    shots, ev = _pool_and_eval(list(items), None if shot_pool is None else list(shot_pool), n_shot, seed)
    for it in list(shots) + ev:
        if not it.audio or it.text is None:
            raise DataError(f"utterance {it.id} needs audio and a transcript for ASR")
    units = runner.encode_speech([s.audio for s in shots] + [e.audio for e in ev])
    su, eu = units[:len(shots)], units[len(shots):]
    shot_pairs = [(u, _text_for_prompt(s.text, lowercase)) for u, s in zip(su, shots)]
    prompts = [asr_prompt(shot_pairs, u) for u in eu]
    sampling = SamplingConfig(do_sample=False, max_new_tokens=max_new_tokens)
    new = runner.generate(prompts, "text", sampling, seed)
    hyps = []
    for p, nid in zip(prompts, new):
        cont = runner.decode_full(p, nid)[len(p):]
        hyps.append(cont.lstrip(" ").split("\n")[0].strip())
    refs = [e.text for e in ev]
    c = metrics.wer_counts(refs, hyps)
    recs = [{"id": e.id, "ref": r, "hyp": h} for e, r, h in zip(ev, refs, hyps)]
    return EvalResult("asr", {"wer": 100.0 * metrics.wer(refs, hyps), "n": len(ev), "substitutions": c.substitutions,
                              "deletions": c.deletions, "insertions": c.insertions, "ref_words": c.ref_len},
                      {"n_shot": n_shot, "seed": seed, "greedy": True, "max_new_tokens": max_new_tokens,
                       "lowercase_prompts": lowercase, "normalization": "lower-case, punctuation removed"},
                      {"template": "([Speech]<units>[Text]<transcript>\\n) x n_shot + [Speech]<units>[Text]; "
                                   "hypothesis = generated text up to the first newline",
                       "shot_ids": [s.id for s in shots], "shared_prefix": asr_prompt(shot_pairs, "")[:-len(SPEECH + TEXT)]},
                      recs)


AsrFn = Callable[[list], list]


def load_callable(spec, kind: str):
    """A callable, ``"module:function"``, or a local Hugging Face model folder (loaded offline with
    ``transformers.pipeline``; ``kind`` = "asr" | "text-classification" | "audio-classification")."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise EvalError(f"a {kind} model must be a callable, 'module:function' or a model folder; got {spec!r}")
    if Path(spec).is_dir():
        return _hf_pipeline(spec, kind)
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"cannot load {spec!r} ({e}); give 'module:function' importable on PYTHONPATH") from None
        if not callable(f):
            raise EvalError(f"{spec!r} is not callable")
        return f
    raise EvalError(f"{spec!r} is neither a folder nor 'module:function'")


def _hf_pipeline(folder: str, kind: str):
    from transformers import pipeline

    task = {"asr": "automatic-speech-recognition"}.get(kind, kind)
    pipe = pipeline(task, model=folder, local_files_only=True) if kind == "asr" else \
        pipeline(task, model=folder, top_k=None)
    if kind == "asr":
        return lambda wavs: [pipe({"raw": np.asarray(w, np.float32), "sampling_rate": 16000})["text"] for w in wavs]
    if kind == "audio-classification":
        return lambda wavs: [max(pipe({"raw": np.asarray(w, np.float32), "sampling_rate": 16000}),
                                 key=lambda d: d["score"])["label"] for w in wavs]
    return lambda texts: [max(r, key=lambda d: d["score"])["label"] for r in pipe(list(texts))]


def leading_speech(s: str) -> str:
    """The run of unit tokens a generation starts with (the answer, up to the first text/newline)."""
    m = _UNIT_RUN.match(s.lstrip())
    return m.group(0) if m else ""


def run_tts(runner: Runner, items: Sequence[Utterance], asr, *, n_shot: int = 10, shot_pool=None, seed: int = 0,
            max_new_tokens: int = 300, temperature: float = 0.8, top_p: float = 0.95, do_sample: bool = True,
            lowercase: bool = True, speaker_id: int = 2) -> EvalResult:
    from spiritlm_jax.infer.engine import SamplingConfig

    asr_fn = load_callable(asr, "asr")
    shots, ev = _pool_and_eval(list(items), None if shot_pool is None else list(shot_pool), n_shot, seed)
    for it in shots:
        if not it.audio or it.text is None:
            raise DataError(f"shot {it.id} needs audio and a transcript for TTS")
    for it in ev:
        if it.text is None:
            raise DataError(f"utterance {it.id} needs a transcript for TTS")
    su = runner.encode_speech([s.audio for s in shots])
    shot_pairs = [(_text_for_prompt(s.text, lowercase), u) for s, u in zip(shots, su)]
    prompts = [tts_prompt(shot_pairs, _text_for_prompt(e.text, lowercase)) for e in ev]
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    new = runner.generate(prompts, "arbitrary", sampling, seed)
    st = runner.lm.speech_tokenizer
    speech, wavs = [], []
    for nid in new:
        s = leading_speech(runner.lm.tokenizer.decode(nid))
        speech.append(s)
        wav = None
        if "[Hu" in s:
            try:
                wav = st.decode(s, speaker_id=speaker_id)
            except ValueError:
                wav = None
        wavs.append(wav)
    ok = [i for i, w in enumerate(wavs) if w is not None and len(w)]
    texts = list(asr_fn([wavs[i] for i in ok])) if ok else []
    if len(texts) != len(ok):
        raise EvalError(f"the ASR model returned {len(texts)} transcripts for {len(ok)} waveforms")
    hyps = [""] * len(ev)
    for i, t in zip(ok, texts):
        hyps[i] = str(t)
    refs = [e.text for e in ev]
    recs = [{"id": e.id, "ref": r, "asr": h, "n_units": s.count("[Hu"), "vocoded": w is not None}
            for e, r, h, s, w in zip(ev, refs, hyps, speech, wavs)]
    return EvalResult("tts", {"cer": 100.0 * metrics.cer(refs, hyps), "n": len(ev), "n_no_speech": len(ev) - len(ok)},
                      {"n_shot": n_shot, "seed": seed, "do_sample": do_sample, "temperature": temperature,
                       "top_p": top_p, "max_new_tokens": max_new_tokens, "output_modality": "arbitrary",
                       "lowercase_prompts": lowercase, "speaker_id": speaker_id,
                       "asr_model": asr if isinstance(asr, str) else getattr(asr, "__name__", repr(asr))},
                      {"template": "([Text]<transcript>[Speech]<units>\\n) x n_shot + [Text]<text>[Speech]; the "
                                   "answer = the leading run of unit tokens of the generation (it ends at the first "
                                   "newline or text token)",
                       "shot_ids": [s.id for s in shots],
                       "shared_prefix": "".join(tts_example(t, u) for t, u in shot_pairs)},
                      recs)


# ------------------------------------------------------------------------------------------ intent
def run_intent(runner: Runner, items: Sequence[Utterance], *, n_shot: int = 10, shot_pool=None, seed: int = 0,
               modality: str = "speech", labels: Sequence[str] | None = None) -> EvalResult:
    shots, ev = _pool_and_eval(list(items), None if shot_pool is None else list(shot_pool), n_shot, seed)
    for it in list(shots) + ev:
        if it.label is None:
            raise DataError(f"utterance {it.id} has no label")
        if modality == "speech" and not it.audio:
            raise DataError(f"utterance {it.id} has no audio (modality speech)")
        if modality == "text" and it.text is None:
            raise DataError(f"utterance {it.id} has no text (modality text)")
    labs = sorted(set(labels) if labels else {it.label for it in list(shots) + ev})
    if modality == "speech":
        units = runner.encode_speech([s.audio for s in shots] + [e.audio for e in ev])
        heads = [SPEECH + u for u in units]
    else:
        heads = [TEXT + it.text for it in list(shots) + ev]
    sh, eh = heads[:len(shots)], heads[len(shots):]
    shot_pairs = [(h, s.label) for h, s in zip(sh, shots)]
    ctxs = [intent_context(shot_pairs, h) for h in eh]
    sc = runner.score([(c, lab) for c in ctxs for lab in labs]).reshape(len(ev), len(labs))
    preds = [labs[int(np.argmax(r))] for r in sc]
    refs = [e.label for e in ev]
    recs = [{"id": e.id, "label": r, "pred": p, "scores": dict(zip(labs, map(float, s)))}
            for e, r, p, s in zip(ev, refs, preds, sc)]
    return EvalResult("intent", {"accuracy": metrics.accuracy(refs, preds), "n": len(ev), "n_labels": len(labs)},
                      {"n_shot": n_shot, "seed": seed, "modality": modality, "normalization": runner.normalization,
                       "labels": labs},
                      {"template": "(<input>[Text]<label>\\n) x n_shot + <input>[Text] | <label> scored for every "
                                   "label; input = [Speech]<units> or [Text]<text>",
                       "shot_ids": [s.id for s in shots],
                       "shared_prefix": "".join(f"{h}{TEXT}{lab}\n" for h, lab in shot_pairs)},
                      recs)


# ------------------------------------------------------------------------------------------ STSP
STSP_FEW_SHOT_FILES = {("t", "t"): "t2t", ("s", "t"): "s2t", ("t", "s"): "t2s", ("s", "s"): "s2s"}
STSP_GENERATION = {"t": dict(temperature=0.8, top_p=0.95, max_new_tokens=50, do_sample=True),
                   "s": dict(temperature=0.8, top_p=0.95, max_new_tokens=300, do_sample=True)}


def _halves(path: str) -> tuple[np.ndarray, np.ndarray]:
    from spiritlm_jax.audio import load_audio

    wav = load_audio(path)
    h = len(wav) // 2
    return wav[:h], wav[h:]


def stsp_few_shot_prompt(runner: Runner, rows: Sequence[dict], direction, n_shot: int, seed: int,
                         data_root: str | Path) -> tuple[str, list[int]]:
    """The original's ``build_few_shot_prompt``: ``ceil(n_shot/3)`` rows per sentiment (groups in sorted
    order, seeded draw without replacement), each ``marker+prompt`` then ``marker+generation``; speech
    prompts use the first half of their audio, speech generations the second half; rows joined with
    "\\n" plus a final "\\n". Returns (prompt, chosen row indices)."""
    ci, co = parse_direction(direction) if isinstance(direction, str) else direction
    if n_shot > len(rows):
        raise EvalError(f"{n_shot} shots requested but the few-shot file has {len(rows)} rows")
    per = math.ceil(n_shot / 3)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r["sentiment"]), []).append(i)
    chosen = []
    for s in sorted(groups):
        if per > len(groups[s]):
            raise EvalError(f"{per} shots per sentiment requested but sentiment {s!r} has {len(groups[s])} rows")
        chosen += [groups[s][j] for j in rng.choice(len(groups[s]), per, replace=False)]
    root = Path(data_root)
    audio = []
    if ci == "s":
        audio += [_halves(str(root / rows[i]["prompt"]))[0] for i in chosen]
    if co == "s":
        audio += [_halves(str(root / rows[i]["generation"]))[1] for i in chosen]
    units = runner.encode_speech(audio) if audio else []
    k = len(chosen)
    pu = units[:k] if ci == "s" else None
    gu = units[k if ci == "s" else 0:] if co == "s" else None
    parts = []
    for j, i in enumerate(chosen):
        p = SPEECH + pu[j] if ci == "s" else TEXT + rows[i]["prompt"]
        g = SPEECH + gu[j] if co == "s" else TEXT + rows[i]["generation"]
        parts.append(p + g)
    return "\n".join(parts) + "\n", chosen


def _classify(outputs: list, classifier, out_mod: str) -> list[str]:
    fn = load_callable(classifier, "audio-classification" if out_mod == "s" else "text-classification")
    labels = [str(x).lower() for x in fn(outputs)]
    if len(labels) != len(outputs):
        raise EvalError(f"the classifier returned {len(labels)} labels for {len(outputs)} inputs")
    out = []
    for lab in labels:
        if out_mod == "s" and lab in metrics.SPEECH_CLASSIFIER_TO_SENTIMENT:
            lab = metrics.SPEECH_CLASSIFIER_TO_SENTIMENT[lab]
        if lab not in metrics.SENTIMENTS:
            raise EvalError(f"the sentiment classifier returned {lab!r}; expected one of {metrics.SENTIMENTS} (or, for "
                            f"speech, {sorted(metrics.SPEECH_CLASSIFIER_TO_SENTIMENT)})")
        out.append(lab)
    return out


def run_stsp(runner: Runner, records: Sequence[dict], direction: str, classifier, *, data_root: str | Path,
             few_shot_rows: Sequence[dict] | None = None, n_shot: int = 0, seed: int = 0, retries: int = 3,
             label: str = "sentiment", speaker_id: int = 2, max_new_tokens: int | None = None,
             write_wav_output: str | Path | None = None) -> EvalResult:
    """STSP prediction + metric. ``records``: the manifest (``id``, ``wav_path`` (relative to
    ``data_root``), ``asr``, ``sentiment``/``emotion``). ``classifier``: callable/spec (see
    ``load_callable``) mapping generated texts (T output) or 16 kHz waveforms (S output) to labels.

    Few-shot (fixed bug, REFERENCE §10.2): the prompt is the few-shot prefix FOLLOWED BY the test
    input (the original passes only the prefix, so every item gets the same prompt)."""
    from spiritlm_jax.infer.engine import SamplingConfig

    ci, co = parse_direction(direction)
    records = list(records)
    if not records:
        raise EvalError("empty STSP manifest")
    root = Path(data_root)
    if ci == "s":
        for r in records:
            if "wav_path" not in r:
                raise DataError(f"STSP record {r.get('id')} has no wav_path (needed for speech input)")
        inputs = runner.encode_speech([str(root / r["wav_path"]) for r in records])
    else:
        for r in records:
            if "asr" not in r:
                raise DataError(f"STSP record {r.get('id')} has no 'asr' transcript (needed for text input)")
        inputs = [r["asr"] for r in records]
    prefix, chosen = "", []
    if n_shot > 0:
        if not few_shot_rows:
            raise EvalError("few-shot STSP needs the direction's few-shot file (manifest/few_shot/<dir>.jsonl)")
        prefix, chosen = stsp_few_shot_prompt(runner, few_shot_rows, (ci, co), n_shot, seed, root)
    out_mod = "text" if co == "t" else "speech"
    prompts = [prefix + prompting.build_prompt([("speech" if ci == "s" else "text", x)], out_mod, encode_speech=lambda s: s)
               for x in inputs]
    gen = dict(STSP_GENERATION[co])
    if max_new_tokens is not None:  # a deviation from the original's settings, recorded in the result
        gen["max_new_tokens"] = int(max_new_tokens)
    sampling = SamplingConfig(**gen)
    st = runner.lm.speech_tokenizer
    decode = (lambda s: st.decode(s, speaker_id=speaker_id)) if co == "s" else (lambda s: s)
    outputs: list = [None] * len(records)
    attempts = [0] * len(records)
    errors: dict[int, str] = {}
    todo = list(range(len(records)))
    for attempt in range(retries):
        if not todo:
            break
        new = runner.generate([prompts[i] for i in todo], out_mod, sampling, seed + 7919 * attempt)
        failed = []
        for i, nid in zip(todo, new):
            attempts[i] = attempt + 1
            full = runner.decode_full(prompts[i], nid)
            try:
                o = prompting.decode_generated_output(full, prompts[i], out_mod, decode)[0].content
                if co == "s" and not len(o):
                    raise ValueError("empty waveform")
                outputs[i] = o
                errors.pop(i, None)
            except ValueError as e:
                errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                failed.append(i)
        todo = failed
    ok = [i for i in range(len(records)) if outputs[i] is not None]
    labels = _classify([outputs[i] for i in ok], classifier, co) if ok else []
    preds = {i: lab for i, lab in zip(ok, labels)}
    pred_recs = [{"id": r["id"], "pred": preds.get(i, "failed")} for i, r in enumerate(records)]
    score = metrics.stsp_accuracy(records, pred_recs, label=label)
    items = []
    for i, r in enumerate(records):
        rec = {"id": r["id"], "pred": preds.get(i, "failed"), "attempts": attempts[i]}
        if co == "t" and outputs[i] is not None:
            rec["generation"] = outputs[i]
        elif write_wav_output and outputs[i] is not None:  # the original's --write_wav_output
            rec["generation"] = _write_wav(outputs[i], Path(write_wav_output))
        if i in errors:
            rec["error"] = errors[i]
        items.append(rec)
    name = f"{ci.upper()}→{co.upper()}"
    return EvalResult("stsp", {"accuracy": score.accuracy, "n": score.n_scored, "n_failed": len(records) - len(ok),
                               "skipped": score.skipped, "direction": name},
                      {"direction": name, "n_shot": n_shot, "seed": seed, "retries": retries, "label": label,
                       "generation": gen, "top_k": sampling.top_k, "speaker_id": speaker_id,
                       "few_shot_fix": "test input appended after the few-shot prefix (the original drops it)"},
                      {"few_shot_prefix": prefix, "few_shot_rows": chosen,
                       "template": "<few-shot prefix> + [Text]<asr> | [Speech]<units>, then the output marker",
                       "first_prompt": prompts[0]},
                      items)


def _write_wav(wav, folder: Path) -> str:
    """Save a 16 kHz waveform under ``folder`` with a random name (as the original); returns its path."""
    import uuid

    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4()}.wav"
    soundfile.write(str(path), np.asarray(wav, np.float32), 16000)
    return str(path)


__all__ = ["EvalError", "EvalResult", "Runner", "PAPER", "pair_requests", "run_pairs", "cloze_requests",
           "run_storycloze", "parse_direction", "sample_shots", "asr_prompt", "tts_prompt", "intent_context",
           "run_asr", "run_tts", "run_intent", "stsp_few_shot_prompt", "run_stsp", "load_callable", "leading_speech"]


# ------------------------------------------------------------------------------------------ MMLU
def mmlu_block(item, with_answer: bool) -> str:
    """One question in the standard MMLU prompt format (Hendrycks et al.; as lm-eval-harness)."""
    s = item.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", item.choices)) + "\nAnswer:"
    return s + (f" {'ABCD'[item.answer]}\n\n" if with_answer else "")


def mmlu_context(subject: str, shots, item) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return TEXT + head + "".join(mmlu_block(s, True) for s in shots) + mmlu_block(item, False)


def run_mmlu(runner: Runner, test: dict, dev: dict | None = None, *, n_shot: int = 5) -> EvalResult:
    """MMLU in text (the paper's 36.9 for Spirit LM Base is 5-shot): for each question the continuations
    " A".." D" are scored after the standard prompt (prefixed by [Text]) and the best is the prediction.
    Accuracy is averaged over questions (micro) and over subjects (macro); both are reported."""
    recs, per_subject = [], {}
    for subject, items in test.items():
        shots = list((dev or {}).get(subject, []))[:n_shot]
        if n_shot and len(shots) < n_shot:
            raise EvalError(f"MMLU subject {subject!r}: {n_shot} shots asked but dev/ has {len(shots)} questions")
        ctxs = [mmlu_context(subject, shots, it) for it in items]
        sc = runner.score([(c, f" {L}") for c in ctxs for L in "ABCD"]).reshape(len(items), 4)
        preds = sc.argmax(-1)
        for it, p, s in zip(items, preds, sc):
            recs.append({"id": it.id, "answer": "ABCD"[it.answer], "pred": "ABCD"[int(p)],
                         "scores": [float(x) for x in s]})
        per_subject[subject] = float(np.mean(preds == np.array([it.answer for it in items])))
    acc = float(np.mean([r["answer"] == r["pred"] for r in recs])) if recs else 0.0
    return EvalResult("mmlu", {"accuracy": acc, "accuracy_macro": float(np.mean(list(per_subject.values()))),
                               "n": len(recs), "per_subject": per_subject},
                      {"n_shot": n_shot, "normalization": runner.normalization},
                      {"template": "[Text]The following are multiple choice questions (with answers) about <subject>."
                                   "\\n\\n(<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <X>\\n\\n) x n_shot + "
                                   "<question>\\nA. …\\nAnswer: | ' A'..' D' scored"},
                      recs)
