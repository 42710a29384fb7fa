"""Synthetic prepared-corpus records for the data-pipeline tests (test_sequences, test_loader)."""
import numpy as np

SR = 16000
HOPS = {"hubert": 640, "pitch": 1280, "style": 16000}
N_UNITS = {"hubert": 500, "pitch": 64, "style": 100}


def synthetic_record(rng, n_words=40, expressive=False, kind="aligned", doc_id="doc", repeat_p=0.4):
    """An aligned record like prepare writes: words with gaps, raw units with runs (so dedup matters)."""
    t = int(rng.integers(0, 4000))
    starts, ends, words = [], [], []
    for i in range(n_words):
        d = int(rng.integers(1500, 8000))  # 94-500 ms words
        starts.append(t)
        ends.append(t + d)
        words.append(f"w{i}" + ("," if rng.random() < 0.1 else ""))
        t += d + int(rng.integers(0, 3000))
    n = t + int(rng.integers(0, 5000))
    rec = {"id": doc_id.encode(), "kind": kind.encode(), "text": " ".join(words).encode(), "num_samples": n,
           "words": [w.encode() for w in words], "word_start": np.array(starts, np.int64),
           "word_end": np.array(ends, np.int64)}
    for s in ("hubert", "pitch", "style") if expressive else ("hubert",):
        h = HOPS[s]
        m = (n - 720) // 640 + 1 if s == "hubert" else -(-n // h) if s == "style" else (n // 80 + 1) // 16
        vals = []
        for _ in range(m):
            if vals and rng.random() < repeat_p:
                vals.append(vals[-1])
            else:
                vals.append(int(rng.integers(N_UNITS[s])))
        st = h * np.arange(m, dtype=np.int64)
        rec[s] = np.array(vals, np.int32)
        rec[f"{s}_start"] = st.astype(np.int32)
        rec[f"{s}_end"] = np.minimum(st + h, n).astype(np.int32)
    if kind != "aligned":
        rec["words"], rec["word_start"], rec["word_end"] = [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    return rec


def text_record(text, doc_id="t", expressive=False):
    rec = {"id": doc_id.encode(), "kind": b"text", "text": text.encode(), "num_samples": 0, "words": [],
           "word_start": np.zeros(0, np.int64), "word_end": np.zeros(0, np.int64)}
    for s in ("hubert", "pitch", "style") if expressive else ("hubert",):
        for suf in ("", "_start", "_end"):
            rec[s + suf] = np.zeros(0, np.int32)
    return rec


def dedup(vals):
    out = []
    for v in vals:
        if not out or out[-1] != v:
            out.append(v)
    return out
