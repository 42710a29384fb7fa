"""grain loader: batch contract, determinism, checkpoint/restore mid-epoch, disjoint host shards, mixing."""
import numpy as np
import pytest

from data_helpers import synthetic_record, text_record
from spiritlm_jax.text import TextTokenizer
from spiritlm_jax.train.loader import BATCH_KEYS, LoaderConfig, LoaderError, make_dataset
from spiritlm_jax.train.sequences import SequenceConfig


class Recording:
    """A random-access source that remembers which records were read."""

    def __init__(self, records):
        self.records = records
        self.read = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.records[i]


@pytest.fixture(scope="module")
def tok(golden_dir):
    return TextTokenizer.from_dir(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b")


def _sources():
    rng = np.random.default_rng(0)
    aligned = [synthetic_record(rng, n_words=int(rng.integers(8, 60)), doc_id=f"a{i}") for i in range(23)]
    text = [text_record(f"document number {i} " * int(rng.integers(1, 30)), doc_id=f"t{i}") for i in range(17)]
    return {"aligned": Recording(aligned), "text": Recording(text)}


def _cfg(**kw):
    base = dict(data_dir="<memory>", tokenizer="<given>", seq_len=96, batch_size=3, seed=5, shard_index=0,
                shard_count=1, sequence=SequenceConfig(text_span=(3, 6), speech_span=(2, 4)))
    base.update(kw)
    return LoaderConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in BATCH_KEYS) for x, y in zip(a, b))


def test_batch_contract(tok):
    batches = _take(iter(make_dataset(_cfg(), tokenizer=tok, sources=_sources())), 6)
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape == (3, 96)
            assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
        seg, pos, tokens, tgt, mask = (b[k] for k in ("segment_ids", "positions", "tokens", "targets", "loss_mask"))
        assert ((seg == 0) <= (mask == 0)).all()  # padding never counts
        for r in range(3):
            for s in np.unique(seg[r][seg[r] > 0]):
                m = np.nonzero(seg[r] == s)[0]
                assert (pos[r][m] == np.arange(len(m))).all()
                assert (tgt[r][m[:-1]] == tokens[r][m[1:]]).all()  # next token within the document
                assert (mask[r][m[:-1]] == 1).all()
        assert (tokens[seg > 0] < len(tok)).all()


def test_same_order_across_runs_and_after_restore(tok):
    cfg = _cfg()
    run1 = _take(iter(make_dataset(cfg, tokenizer=tok, sources=_sources())), 14)
    run2 = _take(iter(make_dataset(cfg, tokenizer=tok, sources=_sources())), 14)
    assert _same(run1, run2)
    it = iter(make_dataset(cfg, tokenizer=tok, sources=_sources()))
    _take(it, 5)  # mid-epoch (40 documents; an epoch is more than 5 batches of 3 rows)
    state = it.get_state()
    rest = _take(it, 9)
    assert _same(rest, run1[5:])
    fresh = iter(make_dataset(cfg, tokenizer=tok, sources=_sources()))  # a new process resuming
    fresh.set_state(state)
    assert _same(_take(fresh, 9), run1[5:])
    other = _take(iter(make_dataset(_cfg(seed=6), tokenizer=tok, sources=_sources())), 5)
    assert not _same(other, run1[:5])  # the seed matters


def test_two_hosts_read_disjoint_shards_that_cover_the_data(tok):
    # one split at a time: a finite mixture stops when its first component runs out (grain's mix)
    for split in ("aligned", "text"):
        reads = []
        for host in range(2):
            src = _sources()
            cfg = _cfg(shard_index=host, shard_count=2, num_epochs=1, weights={split: 1.0})
            assert sum(1 for _ in iter(make_dataset(cfg, tokenizer=tok, sources=src))) > 0
            reads.append(src[split].read)
            other = "text" if split == "aligned" else "aligned"
            assert not src[other].read
        a, b = reads
        n = len(_sources()[split])
        assert not (a & b)  # each host reads only its own records
        assert a | b == set(range(n))  # together they cover the split
        assert a == set(range(0, n, 2)) and b == set(range(1, n, 2))


def test_mixture_weights_and_errors(tok):
    only_text = _take(iter(make_dataset(_cfg(weights={"text": 1.0, "aligned": 0.0}), tokenizer=tok,
                                        sources=_sources())), 3)
    assert all((b["tokens"][b["segment_ids"] > 0] != tok.vocab.speech_marker).all() for b in only_text)
    with pytest.raises(LoaderError, match="does not have"):
        make_dataset(_cfg(weights={"video": 1.0}), tokenizer=tok, sources=_sources())
    with pytest.raises(LoaderError, match="no split has a positive weight"):
        make_dataset(_cfg(weights={"text": 0.0}), tokenizer=tok, sources=_sources())
    with pytest.raises(LoaderError, match="too few for 64 hosts"):
        make_dataset(_cfg(shard_index=63, shard_count=64), tokenizer=tok, sources=_sources())
    with pytest.raises(LoaderError, match=r"shard_index must be in \[0, shard_count\)"):
        make_dataset(_cfg(shard_index=2, shard_count=2), tokenizer=tok, sources=_sources())


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(LoaderError, match="run `spiritlm-jax prepare` first"):
        make_dataset(_cfg(data_dir=str(tmp_path)))
