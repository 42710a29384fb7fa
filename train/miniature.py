"""A miniature Spirit LM, end to end, and the paper's interleaving ablation in miniature.

Stages (each one the repository's own entry point or library, so the run tests the joints):

1. **text** — the seeded grammar of :mod:`spiritlm_jax.train.grammar` (9-word sentences; an agent fixes
   its ending), split into training and held-out (size, agent, verb) combinations;
2. **speech** — every sentence synthesized with eSpeak NG (:mod:`spiritlm_jax.train.tts`), several voices,
   rates and pitches, word timings from the engine; held-out sentences, isolated words and non-words too;
3. **units** — a k-means quantizer trained on the training speech (``train-quantizer``'s
   :func:`~spiritlm_jax.train.quantizer_cli.train_quantizer`) over the random-weight HuBERT checkpoint's
   framing; unit purity and word–unit mutual information are measured on the training alignments;
4. **tokenizer** — a SentencePiece BPE model trained on the training text, followed by ``[Text]``,
   ``[Speech]`` and one ``[HuN]`` piece per unit (Spirit LM's layout, compact);
5. **corpus** — ``prepare`` (Beam/TFDS) of the aligned training speech with the new speech tokenizer;
6. **three LMs** of one shape, trained by our trainer for the same steps × batch × length on:
   (a) ``text+speech`` — every aligned sentence written as text-only or speech-only, no interleaving;
   (b) ``interleaved`` — the same plus word-level interleaved sequences (``SequenceBuilder``'s rules);
   (c) ``speech`` — speech-only;
7. **evaluation** with the eval harness on held-out data: spoken-word lexical decision (word vs. non-word,
   sWUGGY-like), continuation choice in T, S, T→S, S→T (StoryCloze-like: the right ending vs. another
   agent's; each wrong ending is the right ending of a paired item, so a model that ignores the context
   scores exactly 50 %), and few-shot ASR (the ``eval asr`` prompt);
8. **ASR after SFT** — the models of ``sft_models`` tuned by a short ``recipe=sft`` run (train/sft.py) on
   the training utterances' ``{"task": "asr"}`` records, then scored zero-shot with the same prompt.

:func:`unit_study` (``miniature --unit-study``) measures which frame features give units that carry
the words (purity, word–unit mutual information): the random-weight HuBERT's layers vs. log-mel frames.

Outputs in ``OUT``: ``results.json``, ``results.md`` (the table), ``miniature.png`` (training curves and
the ablation bars), and every intermediate (``tts/``, ``speech_tokenizer/``, ``tokenizer/``, ``data/``,
``models/``, ``eval/``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from spiritlm_jax.train import grammar

__all__ = ["MiniatureConfig", "QUICK", "FULL", "ABLATIONS", "run_miniature", "binomial_threshold",
           "unit_word_statistics", "unit_study", "run_unit_study"]

# name → SequenceConfig.aligned_mixture (the corpus is all aligned speech; the mixture decides the form)
ABLATIONS = {
    "text+speech": {"text": 1.0, "speech": 1.0},
    "interleaved": {"text": 1.0, "speech": 1.0, "interleaved": 2.0},
    "speech": {"speech": 1.0},
}


@dataclasses.dataclass(frozen=True)
class MiniatureConfig:
    repeats: int = 2  # syntheses of every training sentence (voice/rate/pitch drawn per synthesis)
    held_out_fraction: float = 0.25
    units: int = 100
    features: str = "log_mel:40:1"
    kmeans_iter: int = 30
    text_vocab: int = 340  # SentencePiece pieces (256 byte pieces included)
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    intermediate: int = 1024
    seq_len: int = 192
    batch_size: int = 8
    steps: int = 200
    lr: float = 1.5e-3
    warmup: int = 20
    text_span: tuple[int, int] = (1, 5)
    speech_span: tuple[int, int] = (1, 5)
    asr_shots: int = 2  # few-shot ASR prompts must fit in seq_len (a shot is ~45 tokens)
    asr_items: int = 32
    models: tuple[str, ...] = tuple(ABLATIONS)  # which of the three LMs to train (the interleaved one always)
    # ASR after SFT (recipe=sft, train/sft.py): the pretrained models named here are tuned on the training
    # utterances' {"task": "asr"} records (the zero-shot `eval asr` prompt format), then scored zero-shot
    sft_models: tuple[str, ...] = ("interleaved",)
    sft_steps: int = 32
    sft_records: int = 0  # training utterances turned into ASR records (0 = all)
    sft_lr: float = 1e-3
    sft_warmup: int = 2
    voices: tuple[str, ...] = ("en-us", "en-us+m3", "en-us+f2", "en-gb-x-rp+m1", "en-us+m7", "en-gb-x-rp+f4")
    seed: int = 0


# The full run: ~11 M-parameter LMs (6 layers × 384), 200 steps × 8 × 192 = 307 k tokens per model.
# 60 steps (92 k tokens) left the interleaved model at chance even in text (loss 1.72 and falling); the
# 1.5 M shape learned cross-modal continuation with 245 k. Step time of this shape measured under the bench
# lock: 2.3–3.0 s at load ~5, 3.3–4.9 s at load ~7 (2 shared cores), so the three trainings take 25–45 min
# and the whole run fits the 1 h target (docs/miniature.md has the measured wall time).
FULL = MiniatureConfig()
# The quick run (CI): the 1.5 M-parameter shape (3 × 192), measured end to end at 90–104/128 held-out
# cross-modal items for the interleaved model (runs of the last three sessions) against the p < 0.001 bound
# of 82/128; 48 steps instead of 80 gave exactly 82/128, no margin, so it keeps 80. One LM: the test's
# claim is about the interleaved model alone (the controls are not asserted on, and each one costs as much
# as the interleaved model's training: the quick run must fit 3 minutes); the full run trains all three.
QUICK = dataclasses.replace(FULL, repeats=1, units=64, kmeans_iter=15, hidden=192, layers=3, heads=4,
                            intermediate=512, batch_size=16, steps=80, lr=2e-3, warmup=20, asr_items=8,
                            sft_steps=6, sft_records=64, models=("interleaved",))


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def binomial_threshold(n: int, alpha: float = 0.001) -> int:
    """Smallest k with P(X >= k) <= alpha for X ~ Binomial(n, 1/2): the correct count a model must reach
    on n two-way items before 'above chance' can be claimed at level alpha."""
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2.0 ** n
        if tail > alpha:
            return k + 1
    return 0


def unit_word_statistics(units: list[np.ndarray], starts: list[np.ndarray], ends: list[np.ndarray],
                         words: list[list[tuple[str, int, int]]], n_units: int) -> dict:
    """Frame-level unit purity and word–unit mutual information on aligned speech.

    Every HuBERT frame (unit) whose midpoint lies inside a word's span is labelled with that word (the
    interleaving rule); purity = Σ_u max_w P(u, w); MI = Σ P(u, w) log2 P(u, w) / (P(u) P(w)), with
    H(word) for scale, and purity of the word-majority baseline (every unit → the most frequent word).
    """
    vocab: dict[str, int] = {}
    pairs_u, pairs_w = [], []
    for u, s, e, ws in zip(units, starts, ends, words):
        mid2 = np.asarray(s) + np.asarray(e)
        for w, a, b in ws:
            key = w.lower().strip(".,!?")
            wi = vocab.setdefault(key, len(vocab))
            sel = (mid2 >= 2 * a) & (mid2 < 2 * b)
            pairs_u.append(np.asarray(u)[sel])
            pairs_w.append(np.full(int(sel.sum()), wi))
    u = np.concatenate(pairs_u)
    w = np.concatenate(pairs_w)
    joint = np.zeros((n_units, len(vocab)))
    np.add.at(joint, (u, w), 1.0)
    joint /= joint.sum()
    pu, pw = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (pu @ pw)[nz])).sum())
    hw = float(-(pw[pw > 0] * np.log2(pw[pw > 0])).sum())
    return {"frames": int(len(u)), "words": len(vocab), "purity": float(joint.max(1).sum()),
            "majority_baseline": float(pw.max()), "mutual_information_bits": mi, "word_entropy_bits": hw,
            "units_used": int((pu[:, 0] > 0).sum())}


def unit_study(speech_tokenizer: str | os.PathLike, aligned_dir: str | os.PathLike, features: list[str], *,
               units: int, seed: int = 0, max_iter: int = 30, log: Callable[[str], None] = print) -> list[dict]:
    """Which frame features make k-means units that carry the words: for each feature spec
    (``hubert:LAYER`` | ``conv`` | ``log_mel[:N:C]``, on the encoder's framing), a k-means quantizer of
    ``units`` centres fitted on every frame of ``aligned_dir``'s audio, then :func:`unit_word_statistics`
    of its units against the engine's word spans (``<stem>.json`` next to each ``<stem>.wav``)."""
    from spiritlm_jax.train.kmeans import fit_kmeans
    from spiritlm_jax.train.quantizer_cli import HUBERT_FILE, collect_features, feature_extractor
    from spiritlm_jax.unit_features import FeatureSpec

    wavs = sorted(Path(aligned_dir).glob("*.wav"))
    words = []
    for w in wavs:
        spans = json.loads(w.with_suffix(".json").read_text())
        words.append([(x["word"], round(x["start"] * 16_000), round(x["end"] * 16_000)) for x in spans])
    ckpt = Path(speech_tokenizer) / "hubert_25hz" / HUBERT_FILE
    rows = []
    for feat in features:
        t = time.perf_counter()
        spec = FeatureSpec.parse(feat)
        ext = feature_extractor(ckpt, spec)
        x, counts = collect_features(ext, wavs, progress=False)
        km = fit_kmeans(x, units, seed=seed, max_iter=max_iter)
        d2 = ((x ** 2).sum(1, keepdims=True) - 2 * x @ km.centers.T + (km.centers ** 2).sum(1))  # (frames, K)
        labels = np.argmin(d2, axis=1)
        hop, rf = ext.cfg.hop, ext.cfg.receptive_field
        per_file = np.split(labels, np.cumsum(counts)[:-1])
        starts = [hop * np.arange(n) for n in counts]  # frame j covers [hop·j, hop·j + rf)
        st = unit_word_statistics(per_file, starts, [s + rf for s in starts], words, units)
        rows.append({"features": feat, "dim": int(x.shape[1]), "units": units, **st,
                     "seconds": time.perf_counter() - t})
        log(f"unit study {feat}: purity {st['purity']:.3f} (majority {st['majority_baseline']:.3f}), MI "
            f"{st['mutual_information_bits']:.3f} of {st['word_entropy_bits']:.3f} bits, {st['units_used']} units "
            f"used ({rows[-1]['seconds']:.0f} s)")
    return rows


def unit_study_table(rows: list[dict]) -> str:
    out = ["| features → k-means | dim | units | purity | majority baseline | word–unit MI (bits) | H(word) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['features']}` | {r['dim']} | {r['units']} | {r['purity']:.3f} | "
                   f"{r['majority_baseline']:.3f} | {r['mutual_information_bits']:.2f} | {r['word_entropy_bits']:.2f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------

class _Log:
    def __init__(self, out: Path, echo: Callable[[str], None]):
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.echo = echo
        self.file = out / "miniature.log"

    def __call__(self, msg: str):
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        self.echo(line)
        with open(self.file, "a") as f:
            f.write(line + "\n")

    def stage(self, name: str, t_start: float):
        self.times[name] = time.perf_counter() - t_start
        self(f"stage {name}: {self.times[name]:.1f} s")


def _sentences(cfg: MiniatureConfig):
    train_c, held_c = grammar.split_combinations(cfg.seed, cfg.held_out_fraction)
    train, held = [], []
    for s in grammar.all_sentences():
        (train if (s.size, s.agent, s.verb) in train_c else held).append(s)
    return train, held


def _synthesize(cfg: MiniatureConfig, out: Path, train, held, log, progress: bool) -> dict:
    from spiritlm_jax.train import tts

    stats = {}
    train_items = [(f"train-{i:05d}", s.text) for i, s in enumerate(train * cfg.repeats)]
    held_items = [(f"held-{i:05d}", s.text) for i, s in enumerate(held)]
    lex = []
    for w in grammar.vocabulary():
        nw = grammar.nonword(w)
        if nw is not None:
            lex += [(f"word-{w}", w), (f"nonword-{w}", nw)]
    voices = tuple(cfg.voices)
    # different seeds per split: held-out speech is not a copy of any training rendering
    for name, items, seed in (("train", train_items, cfg.seed), ("heldout", held_items, cfg.seed + 101)):
        opts = tts.SynthesisOptions(voices=voices, seed=seed)
        stats[name] = tts.synthesize_corpus(items, out / "tts" / name, opts, progress=progress)
    # lexical items: each word and its non-word in the SAME voice/rate/pitch
    lex_dir = out / "tts" / "lexical"
    lex_dir.mkdir(parents=True, exist_ok=True)
    engine = tts.Espeak.get()
    lex_ok = []
    opts = tts.SynthesisOptions(voices=voices, seed=cfg.seed + 202)
    for k in range(0, len(lex), 2):
        d = opts.draw(k)
        pair = []
        for sid, text in lex[k:k + 2]:
            syn = engine.synthesize(text, d["voice"], d["rate"], d["pitch"])
            if syn.unreported or not syn.words or len(syn.audio) < 1280:
                break
            tts._write_wav(lex_dir / f"{sid}.wav", syn.audio)
            pair.append(sid)
        if len(pair) == 2:
            lex_ok.append((lex[k][1], lex[k + 1][1]))
    stats["lexical"] = {"ok": len(lex_ok), "pairs": lex_ok}
    for name in ("train", "heldout"):
        s = stats[name]
        log(f"synthesized {name}: {s['ok']} sentences, {s['seconds'] / 60:.1f} min, skipped {s['skipped']}")
    return stats


def _tiny_speech_tokenizer() -> Path:
    from spiritlm_jax.tiny_checkpoints import ensure_tiny_checkpoints

    root, _ = ensure_tiny_checkpoints(log=lambda *a, **k: None)
    return root / "speech_tokenizer"


def build_tokenizer(texts: list[str], n_units: int, vocab_size: int, out_dir: Path) -> Path:
    """SentencePiece BPE on ``texts`` + ``[Text]``, ``[Speech]``, ``[Hu0]``..``[Hu{n_units-1}]`` (compact ids)."""
    import sentencepiece as spm

    from spiritlm_jax.tiny_checkpoints import _PIECE_USER_DEFINED, _piece_record, _records

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, max_sentencepiece_length=16)
    recs = list(_records(model.getvalue()))
    extra = b"".join(_piece_record(p, 0.0, _PIECE_USER_DEFINED)
                     for p in ["[Text]", "[Speech]"] + [f"[Hu{n}]" for n in range(n_units)])
    last = max(i for i, (f, _) in enumerate(recs) if f == 1)
    buf = b"".join(r for _, r in recs[:last + 1]) + extra + b"".join(r for _, r in recs[last + 1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                               "legacy": False}))
    return out_dir


def _prepare(out: Path, speech_tokenizer: Path, progress: bool) -> tuple[str, dict]:
    from spiritlm_jax.train import prepare

    items, skipped = prepare.discover(aligned=[str(out / "tts" / "train")])
    opts = prepare.PrepareOptions(speech_tokenizer=str(speech_tokenizer), progress=progress, batch_files=32)
    data_dir, stats = prepare.build_dataset(items, str(out / "data"), "miniature", opts, discovery_skips=skipped,
                                            overwrite=True)
    return data_dir, stats


def _unit_stats(data_dir: str, n_units: int) -> dict:
    from spiritlm_jax.train.loader import open_sources
    from spiritlm_jax.train.sequences import decode_record

    sources, _ = open_sources(data_dir)
    src = sources["aligned"]
    docs = [decode_record(src[i]) for i in range(len(src))]
    return unit_word_statistics([d.units["hubert"] for d in docs], [d.starts["hubert"] for d in docs],
                                [d.ends["hubert"] for d in docs],
                                [list(zip(d.words, d.word_start, d.word_end)) for d in docs], n_units)


def _train_config(cfg: MiniatureConfig, vocab, ckpt_dir: Path, progress: bool, *, recipe: str = "pretrain",
                  steps: int | None = None, lr: float | None = None, warmup: int | None = None):
    from spiritlm_jax.train.config import TrainConfig

    steps = cfg.steps if steps is None else steps
    return TrainConfig.from_dict({
        "model": {"vocab_size": vocab.n_embed, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
                  "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
                  "num_key_value_heads": cfg.heads, "max_position_embeddings": 1024, "dtype": "float32",
                  "remat": "none", "scan_layers": True, "tie_word_embeddings": False,
                  "vocab_layout": f"speech={vocab.hubert.start}:{vocab.hubert.stop}"},
        "optim": {"lr": cfg.lr if lr is None else lr, "warmup_steps": cfg.warmup if warmup is None else warmup,
                  "weight_decay": 0.01},
        "data": {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "checkpoint": {"dir": str(ckpt_dir), "every": steps, "keep": 1, "async_save": False, "resume": False},
        "recipe": recipe, "steps": steps, "seed": cfg.seed, "log_every": max(steps // 16, 1), "tensorboard": False,
        "progress": progress,
    })


def _train_one(cfg: MiniatureConfig, name: str, data_dir: str, tok_dir: Path, vocab, out: Path, log,
               progress: bool):
    from spiritlm_jax.train.loader import LoaderConfig, make_iterator
    from spiritlm_jax.train.sequences import SequenceConfig
    from spiritlm_jax.train.trainer import Trainer

    ckpt = out / "models" / name.replace("+", "_")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    tcfg = _train_config(cfg, vocab, ckpt, progress)
    seq = SequenceConfig(text_span=cfg.text_span, speech_span=cfg.speech_span, aligned_mixture=ABLATIONS[name])
    it = make_iterator(LoaderConfig(data_dir, str(tok_dir / "tokenizer.model"), seq_len=cfg.seq_len,
                                    batch_size=cfg.batch_size, seed=cfg.seed, sequence=seq,
                                    weights={"aligned": 1.0}, shard_index=0, shard_count=1))
    trainer = Trainer(tcfg, it, console=io.StringIO() if not progress else None)
    trainer.train()
    trainer.close()
    hist = [{"step": r.step, "loss": r.metrics["loss"], "loss_text": r.metrics.get("loss_text"),
             "loss_speech": r.metrics.get("loss_speech")} for r in trainer.history]
    log(f"trained {name}: {tcfg.steps} steps, final loss {hist[-1]['loss']:.3f} "
        f"(text {hist[-1]['loss_text']:.3f}, speech {hist[-1]['loss_speech']:.3f})")
    return trainer.llama_cfg, trainer.state["params"], hist


def _sft_data(out: Path, syn_stats: dict, speech_tokenizer: Path, progress: bool, limit: int = 0) -> str:
    """The training utterances as ``{"task": "asr"}`` SFT records (train/sft.py: the zero-shot ``eval asr``
    prompt ``[Speech]<units>[Text]`` → ``<transcript>\\n``), prepared by ``prepare --sft``'s path."""
    from spiritlm_jax.train import prepare

    train_dir = out / "tts" / "train"
    manifest = out / "sft" / "asr_train.jsonl"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(
        json.dumps({"id": it["id"], "task": "asr", "audio": str(train_dir / f"{it['id']}.wav"),
                    "text": (train_dir / f"{it['id']}.txt").read_text().strip()}) + "\n"
        for it in syn_stats["train"]["items"][:limit or None]))
    items, skipped = prepare.discover(sft=[str(manifest)])
    opts = prepare.PrepareOptions(speech_tokenizer=str(speech_tokenizer), progress=progress, batch_files=32)
    data_dir, _ = prepare.build_dataset(items, str(out / "sft" / "data"), "miniature_sft", opts,
                                        discovery_skips=skipped, overwrite=True)
    return data_dir


def _sft_one(cfg: MiniatureConfig, name: str, llama_cfg, params, sft_data: str, tok_dir: Path, vocab, out: Path,
             log, progress: bool):
    """A short ``recipe=sft`` run of our trainer from the pretrained ``params`` (loss on the transcripts)."""
    from spiritlm_jax.train.sft import make_iterator as make_sft_iterator
    from spiritlm_jax.train.trainer import Trainer

    ckpt = out / "models" / (name.replace("+", "_") + "-asr-sft")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    tcfg = _train_config(cfg, vocab, ckpt, progress, recipe="sft", steps=cfg.sft_steps, lr=cfg.sft_lr,
                         warmup=cfg.sft_warmup)
    it = make_sft_iterator(sft_data, str(tok_dir / "tokenizer.model"), kind="sft", seq_len=cfg.seq_len,
                           batch_size=cfg.batch_size, seed=cfg.seed, shard_index=0, shard_count=1)
    trainer = Trainer(tcfg, it, params=params, llama_cfg=llama_cfg, console=io.StringIO() if not progress else None)
    trainer.train()
    trainer.close()
    hist = [{"step": r.step, "loss": r.metrics["loss"]} for r in trainer.history]
    log(f"ASR SFT of {name}: {tcfg.steps} steps, response loss {hist[0]['loss']:.3f} → {hist[-1]['loss']:.3f}")
    return trainer.state["params"], hist


# ------------------------------------------------------------------------------------------------
# evaluation data (the eval harness's JSONL layouts, docs/eval.md)
# ------------------------------------------------------------------------------------------------

def _cut(path: Path, a: int, b: int, dest: Path) -> str:
    import soundfile as sf

    wav, sr = sf.read(str(path), dtype="float32")
    sf.write(str(dest), wav[a:b], sr, subtype="PCM_16")
    return str(dest)


def _eval_data(out: Path, held, syn_stats: dict) -> dict:
    """Write lexical.jsonl, cloze.jsonl, asr_test.jsonl, asr_shots.jsonl under OUT/eval; returns their paths."""
    ev = out / "eval"
    cuts = ev / "audio"
    cuts.mkdir(parents=True, exist_ok=True)
    held_dir, train_dir = out / "tts" / "heldout", out / "tts" / "train"
    ok_ids = {it["id"] for it in syn_stats["heldout"]["items"]}
    by_agent: dict[str, list] = {}
    parts = {}
    for i, s in enumerate(held):
        sid = f"held-{i:05d}"
        if sid not in ok_ids:
            continue
        words = json.loads((held_dir / f"{sid}.json").read_text())
        k = grammar.N_CONTEXT_WORDS
        split = round(words[k]["start"] * 16_000)
        end = round(words[-1]["end"] * 16_000)
        parts[sid] = {"sentence": s,
                      "context_audio": _cut(held_dir / f"{sid}.wav", 0, split, cuts / f"{sid}-context.wav"),
                      "ending_audio": _cut(held_dir / f"{sid}.wav", split, end, cuts / f"{sid}-ending.wav")}
        by_agent.setdefault(s.agent, []).append(sid)
    # pair item i of agent A with item i of agent B (agents paired in a fixed rotation): both endings
    # appear once as right and once as wrong
    agents = sorted(by_agent)
    cloze = []
    for j in range(0, len(agents) - 1, 2):
        a, b = agents[j], agents[j + 1]
        for x, y in zip(by_agent[a], by_agent[b]):
            for me, other in ((x, y), (y, x)):
                p, q = parts[me], parts[other]
                cloze.append({"id": me, "context_text": " " + p["sentence"].context,
                              "correct_text": " " + p["sentence"].ending, "wrong_text": " " + q["sentence"].ending,
                              "context_audio": p["context_audio"], "correct_audio": p["ending_audio"],
                              "wrong_audio": q["ending_audio"]})
    lexical = [{"id": f"lex-{w}", "good": str(out / "tts" / "lexical" / f"word-{w}.wav"),
                "bad": str(out / "tts" / "lexical" / f"nonword-{w}.wav"), "modality": "speech"}
               for w, _nw in syn_stats["lexical"]["pairs"]]
    asr_test = [{"id": sid, "audio": str(held_dir / f"{sid}.wav"), "text": " " + parts[sid]["sentence"].text}
                for sid in sorted(parts)]
    asr_shots = [{"id": it["id"], "audio": str(train_dir / f"{it['id']}.wav"),
                  "text": " " + (train_dir / f"{it['id']}.txt").read_text().strip()}
                 for it in syn_stats["train"]["items"][:64]]
    paths = {}
    for name, rows in (("lexical", lexical), ("cloze", cloze), ("asr_test", asr_test), ("asr_shots", asr_shots)):
        p = ev / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(p)
    return paths


def _evaluate(cfg: MiniatureConfig, name: str, llama_cfg, params, tok, speech_tok, paths: dict, log) -> dict:
    from spiritlm_jax.evaluation import data as eval_data
    from spiritlm_jax.evaluation import tasks as eval_tasks
    from spiritlm_jax.spiritlm import SpiritLM

    lm = SpiritLM(llama_cfg, params, tok, speech_tok, "base")
    runner = eval_tasks.Runner(lm, batch_size=32)
    res: dict = {}
    lex = eval_tasks.run_pairs(runner, eval_data.read_pairs(paths["lexical"]), "lexical")
    res["lexical"] = lex.metrics
    cloze = eval_data.read_storycloze(paths["cloze"])
    for d in ("T", "S", "T2S", "S2T"):
        r = eval_tasks.run_storycloze(runner, cloze, d)
        res[f"cloze_{d}"] = {**r.metrics, "correct": int(sum(x["correct"] for x in r.items))}
    res.update(_asr(cfg, runner, paths, cfg.asr_shots, "asr"))
    log(f"eval {name}: lexical {100 * lex.metrics['accuracy']:.1f}%, "
        + ", ".join(f"{d} {100 * res[f'cloze_{d}']['accuracy']:.1f}%" for d in ("T", "S", "T2S", "S2T"))
        + f", ASR WER {res['asr']['wer']:.1f}%")
    return res


def _asr(cfg: MiniatureConfig, runner, paths: dict, n_shot: int, key: str) -> dict:
    """``eval asr`` (greedy, the harness's prompt) on the first ``asr_items`` held-out utterances; shots
    from the training utterances."""
    from spiritlm_jax.evaluation import data as eval_data
    from spiritlm_jax.evaluation import tasks as eval_tasks

    test = eval_data.read_utterances(paths["asr_test"])[:cfg.asr_items]
    shots = eval_data.read_utterances(paths["asr_shots"])
    asr = eval_tasks.run_asr(runner, test, n_shot=n_shot, shot_pool=shots, seed=cfg.seed, max_new_tokens=24)
    return {key: {**{k: asr.metrics[k] for k in ("wer", "n")}, "n_shot": n_shot}, f"{key}_examples": asr.items[:3]}


def _evaluate_sft_asr(cfg: MiniatureConfig, name: str, llama_cfg, params, tok, speech_tok, paths: dict, log) -> dict:
    from spiritlm_jax.evaluation import tasks as eval_tasks
    from spiritlm_jax.spiritlm import SpiritLM

    runner = eval_tasks.Runner(SpiritLM(llama_cfg, params, tok, speech_tok, "base"), batch_size=32)
    res = _asr(cfg, runner, paths, 0, "asr_sft")
    log(f"eval {name} after ASR SFT: zero-shot ASR WER {res['asr_sft']['wer']:.1f}%")
    return res


def _constant_asr_baseline(cfg: MiniatureConfig, paths: dict, sentence: str) -> dict:
    """WER of answering every ASR item with one fixed grammatical sentence: the floor a model reaches by
    knowing the grammar's shape and nothing of the audio (the articles and positions match)."""
    from spiritlm_jax.evaluation import data as eval_data
    from spiritlm_jax.evaluation import metrics

    refs = [u.text for u in eval_data.read_utterances(paths["asr_test"])[:cfg.asr_items]]
    return {"hypothesis": sentence, "wer": 100.0 * metrics.wer(refs, [sentence] * len(refs)), "n": len(refs)}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _table(results: dict) -> str:
    n = results["models"]["interleaved"]["cloze_T2S"]["n"]
    shots = results["config"]["asr_shots"]
    rows = [f"| model | lexical (word vs non-word) | T | S | T→S | S→T | ASR WER ({shots}-shot) | ASR WER after SFT "
            f"(0-shot) | final loss |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        def pct(k):
            return f"{100 * r[k]['accuracy']:.1f}"
        sft = f"{r['asr_sft']['wer']:.1f}" if "asr_sft" in r else "–"
        rows.append(f"| {name} | {pct('lexical')} | {pct('cloze_T')} | {pct('cloze_S')} | {pct('cloze_T2S')} | "
                    f"{pct('cloze_S2T')} | {r['asr']['wer']:.1f} | {sft} | {r['final_loss']:.3f} |")
    thr = binomial_threshold(n)
    base = results.get("asr_constant_baseline")
    if base:
        rows.append(f"| constant sentence (no model) | – | – | – | – | – | {base['wer']:.1f} | {base['wer']:.1f} | – |")
    rows.append("")
    params = {r["params"] for r in results["models"].values()}
    rows.append(f"Models: {'/'.join(f'{p / 1e6:.1f}' for p in sorted(params))} M parameters, "
                f"{results['config']['steps']} steps × {results['config']['batch_size']} × "
                f"{results['config']['seq_len']} tokens each; SFT: {results['config']['sft_steps']} steps of "
                f"`recipe=sft` on the training utterances' ASR records.")
    rows.append(f"Accuracies in % on held-out items (continuation: {n} items per direction, chance 50 %; "
                f"{thr}/{n} = {100 * thr / n:.1f} % is above chance at p < 0.001, one-sided binomial; lexical: "
                f"{results['models']['interleaved']['lexical']['n']} pairs).")
    return "\n".join(rows)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, r in results["models"].items():
        h = r["history"]
        line, = ax1.plot([x["step"] for x in h], [x["loss"] for x in h], label=name)
        if r.get("sft_history"):  # the ASR SFT continues the curve (loss on the transcripts only)
            ax1.plot([h[-1]["step"] + x["step"] for x in r["sft_history"]], [x["loss"] for x in r["sft_history"]],
                     ls="--", color=line.get_color(), label=f"{name}: ASR SFT (transcript loss)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training cross-entropy (nats/token)")
    ax1.set_title("training curves")
    ax1.grid(alpha=0.3)
    ax1.legend()
    tasks = [("lexical", "lexical"), ("cloze_T", "T"), ("cloze_S", "S"), ("cloze_T2S", "T→S"), ("cloze_S2T", "S→T")]
    names = list(results["models"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [100 * results["models"][name][k]["accuracy"] for k, _ in tasks]
        ax2.bar(np.arange(len(tasks)) + i * width, ys, width, label=name)
    ax2.axhline(50, color="k", lw=0.8, ls="--")
    ax2.set_xticks(np.arange(len(tasks)) + width * (len(names) - 1) / 2, [t for _, t in tasks])
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("interleaving ablation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_miniature(out: str | os.PathLike, cfg: MiniatureConfig = FULL, *, progress: bool = True,
                  echo: Callable[[str], None] = print) -> dict:
    """Every stage (module docstring) into ``out``; returns the results dict (also results.json)."""
    import jax

    from spiritlm_jax.speech import SpeechTokenizer
    from spiritlm_jax.text import TextTokenizer
    from spiritlm_jax.train.quantizer_cli import train_quantizer

    models = tuple(cfg.models)
    if "interleaved" not in models or not set(models) <= set(ABLATIONS):
        raise ValueError(f"models must include 'interleaved' and name only {', '.join(ABLATIONS)}; got {models}")
    out = Path(out).resolve()  # the eval JSONL files name audio by absolute path (relative = to the JSONL)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out, echo)
    log(f"miniature run into {out}: {dataclasses.asdict(cfg)}")
    train, held = _sentences(cfg)
    t = time.perf_counter()
    syn = _synthesize(cfg, out, train, held, log, progress)
    log.stage("synthesis", t)

    t = time.perf_counter()
    st_dir = out / "speech_tokenizer"
    q = train_quantizer(_tiny_speech_tokenizer(), [str(out / "tts" / "train")], st_dir, units=cfg.units,
                        features=cfg.features, seed=cfg.seed, max_iter=cfg.kmeans_iter, overwrite=True,
                        progress=progress, log=log)
    log.stage("quantizer", t)

    t = time.perf_counter()
    tok_dir = build_tokenizer([s.text for s in train], cfg.units, cfg.text_vocab, out / "tokenizer")
    tok = TextTokenizer(tok_dir / "tokenizer.model")
    data_dir, prep_stats = _prepare(out, st_dir, progress)
    units = _unit_stats(data_dir, cfg.units)
    log(f"prepared {prep_stats['aligned']['ok']} aligned sentences; vocabulary {tok.vocab.n_embed} tokens; units: "
        f"purity {units['purity']:.3f} (majority baseline {units['majority_baseline']:.3f}), word-unit MI "
        f"{units['mutual_information_bits']:.3f} of {units['word_entropy_bits']:.3f} bits")
    log.stage("prepare", t)

    t = time.perf_counter()
    paths = _eval_data(out, held, syn)
    speech_tok = SpeechTokenizer.from_checkpoints(_speech_root(st_dir), "base",
                                                  with_vocoder=False)
    log.stage("eval data", t)
    asr_baseline = _constant_asr_baseline(cfg, paths, train[0].text)
    log(f"ASR baseline: the constant hypothesis {train[0].text!r} scores WER {asr_baseline['wer']:.1f}%")

    results: dict = {"config": dataclasses.asdict(cfg), "units": units, "quantizer": q,
                     "synthesis": {k: {kk: v for kk, v in s.items() if kk not in ("items", "pairs")}
                                   for k, s in syn.items()},
                     "prepare": prep_stats["aligned"], "asr_constant_baseline": asr_baseline, "models": {},
                     "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                                 "load_average": os.getloadavg()}}
    sft_data = None
    # the interleaved model first: a run stopped early (a time limit) still has the central comparison's half
    order = sorted(models, key=lambda m: (m != "interleaved", list(ABLATIONS).index(m)))
    for name in order:
        t = time.perf_counter()
        llama_cfg, params, hist = _train_one(cfg, name, data_dir, tok_dir, tok.vocab, out, log, progress)
        log.stage(f"train {name}", t)
        t = time.perf_counter()
        res = _evaluate(cfg, name, llama_cfg, params, tok, speech_tok, paths, log)
        log.stage(f"eval {name}", t)
        res.update(history=hist, final_loss=hist[-1]["loss"], params=int(llama_cfg.num_params()))
        if name in cfg.sft_models and cfg.sft_steps > 0:
            t = time.perf_counter()
            if sft_data is None:
                sft_data = _sft_data(out, syn, st_dir, progress, cfg.sft_records)
            sft_params, sft_hist = _sft_one(cfg, name, llama_cfg, params, sft_data, tok_dir, tok.vocab, out, log,
                                            progress)
            res.update(_evaluate_sft_asr(cfg, name, llama_cfg, sft_params, tok, speech_tok, paths, log),
                       sft_history=sft_hist)
            log.stage(f"asr sft {name}", t)
        results["models"][name] = res
        results["models"] = {m: results["models"][m] for m in ABLATIONS if m in results["models"]}  # table order
        _write_results(out, results, log)  # after every model: a stopped run keeps what it measured
    (out / "results.md").write_text(_table(results) + "\n")
    _plot(results, out / "miniature.png")
    log(f"done in {results['seconds']['total']:.0f} s: {out / 'results.json'}")
    return results


def _write_results(out: Path, results: dict, log) -> None:
    results["seconds"] = dict(log.times, total=time.perf_counter() - log.t0)
    results["machine"]["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))


def run_unit_study(out: str | os.PathLike, cfg: MiniatureConfig, features: list[str], *, progress: bool = True,
                   echo: Callable[[str], None] = print) -> dict:
    """``miniature --unit-study``: the run's training speech (synthesis stage), then :func:`unit_study` of
    each feature spec with ``cfg.units`` units; writes ``unit_study.json`` and ``unit_study.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out, echo)
    train, held = _sentences(cfg)
    t = time.perf_counter()
    _synthesize(cfg, out, train, held, log, progress)
    log.stage("synthesis", t)
    rows = unit_study(_tiny_speech_tokenizer(), out / "tts" / "train", features, units=cfg.units, seed=cfg.seed,
                      max_iter=cfg.kmeans_iter, log=log)
    res = {"config": dataclasses.asdict(cfg), "rows": rows, "seconds": time.perf_counter() - log.t0,
           "load_average": os.getloadavg()}
    (out / "unit_study.json").write_text(json.dumps(res, indent=1, default=_jsonable))
    (out / "unit_study.md").write_text(unit_study_table(rows) + "\n")
    return res


def _speech_root(st_dir: Path) -> Path:
    """SpeechTokenizer.from_checkpoints reads ROOT/speech_tokenizer/hubert_25hz: ``st_dir`` is that
    speech_tokenizer folder, so its parent is the root."""
    if st_dir.name != "speech_tokenizer":
        raise ValueError(f"{st_dir}: the speech tokenizer folder must be named speech_tokenizer")
    return st_dir.parent


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x).__name__)
