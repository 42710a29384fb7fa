"""Fine-tuning recipes (docs/finetune.md): SFT data and its response-only loss, LoRA / QLoRA through qwix,
freezing by path, DPO, validation while training, sharding and resume. Tiny models, few steps."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.train import sft
from spiritlm_jax.train.config import TrainConfig, TrainConfigError
from spiritlm_jax.train.peft import ParamPlan, PeftError, merge_lora
from spiritlm_jax.train.trainer import Trainer

BOS, EOS, TXT, SPH = 1, 2, 20, 21
WORDS, UNITS = np.arange(4, 20), np.arange(24, 64)
K = 3  # words per prompt
DOC = K + 4 + 3 * K  # BOS [Text] w w w [Speech] 9 units EOS
LEXICON = {int(w): np.random.default_rng(0).choice(UNITS, 3, replace=False) for w in WORDS}

TINY = ["model.vocab_size=64", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.dtype=float32", "model.remat=none",
        "model.vocab_layout=speech=24:64", "progress=false", "tensorboard=false", "optim.warmup_steps=5",
        "optim.schedule=constant", "optim.weight_decay=0", "checkpoint.every=100000"]


def mapping_doc(words):
    """The synthetic lexicon task: text words → the concatenation of their fixed random unit triples."""
    ids = [BOS, TXT, *map(int, words), SPH] + [int(u) for w in words for u in LEXICON[int(w)]] + [EOS]
    return sft.supervised_features(np.array(ids, np.int32), K + 3)


class PackedIterator:
    """Two mapping documents packed per row (segment ids 1, 2; positions restart), checkpointable."""

    def __init__(self, triples, rows, seed=0):
        self.triples, self.rows, self.seed, self.n = triples, rows, seed, 0

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = int(state["n"])

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.n])
        self.n += 1
        out = []
        for _ in range(self.rows):
            a, b = (mapping_doc(self.triples[rng.integers(len(self.triples))]) for _ in range(2))
            row = {k: np.concatenate([a[k], b[k]]) for k in a}
            row["segment_ids"] = np.repeat([1, 2], DOC).astype(np.int32)
            row["positions"] = np.tile(np.arange(DOC), 2).astype(np.int32)
            out.append(row)
        return {k: np.stack([r[k] for r in out]) for k in out[0]}


def word_orders():
    triples = np.array(np.meshgrid(*[WORDS] * K, indexing="ij")).reshape(K, -1).T
    perm = np.random.default_rng(1).permutation(len(triples))
    return triples[perm[:3000]], triples[perm[3000:3256]]  # held out: word orders never trained on


def single_device():
    from spiritlm_jax import sharding as shd

    return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def tiny_cfg(tmp_path, *extra):
    return TrainConfig.load(None, [*TINY, f"checkpoint.dir={tmp_path}", *extra])


# ------------------------------------------------------------------------------------------ data


def test_records_render_in_the_eval_prompt_formats_and_tokenize_like_the_whole_string(golden_dir):
    from spiritlm_jax.evaluation.tasks import asr_example, tts_example
    from spiritlm_jax.text import TextTokenizer

    tok = TextTokenizer.from_dir(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b")
    units = "[Hu3][Hu7][Hu7][Hu1]"
    asr = sft.render(sft.parse_record({"task": "asr", "audio": "a.wav", "text": "hello world"}, "t"), [units])
    assert asr["prompt"] + asr["response"] == asr_example(units, "hello world")  # the eval task's own format
    tts = sft.render(sft.parse_record({"task": "tts", "audio": "a.wav", "text": "hi there"}, "t"), [units])
    assert tts["prompt"] + tts["response"] == tts_example("hi there", units)
    mixed = sft.render(sft.parse_record({"prompt": [{"text": "repeat:"}, {"audio": "a.wav", "start": 0, "end": 1}],
                                         "response": [{"text": "ok"}, {"audio": "b.wav"}]}, "t"), [units, "[Hu9]"])
    assert mixed == {"prompt": f"[Text]repeat:[Speech]{units}", "response": "[Text]ok[Speech][Hu9]"}
    for r in (asr, tts, mixed):
        ids, n_prompt = sft.supervised_ids(tok, r["prompt"], r["response"])
        assert list(ids) == tok.encode(r["prompt"] + r["response"], add_bos=True) + [tok.vocab.eos_id]
        assert list(ids[:n_prompt]) == tok.encode(r["prompt"], add_bos=True)
        f = sft.supervised_features(ids, n_prompt)
        # the loss falls exactly on the targets that are response tokens (and the closing EOS)
        assert f["loss_mask"].sum() == len(ids) - n_prompt
        assert (f["targets"][f["loss_mask"] > 0] == ids[n_prompt:]).all()


def test_bad_records_are_clear_errors():
    with pytest.raises(sft.SftError, match="empty text"):
        sft.parse_record({"prompt": [{"text": "q"}], "response": [{"text": "  "}]}, "m:1")
    with pytest.raises(sft.SftError, match="'chosen' equals 'rejected'"):
        sft.parse_record({"prompt": "q", "chosen": [{"text": "a"}], "rejected": [{"text": "a"}]}, "m:2")
    with pytest.raises(sft.SftError, match="needs 'audio'"):
        sft.parse_record({"task": "asr", "text": "hi"}, "m:3")
    with pytest.raises(sft.SftError, match="exactly one of 'text' or 'audio'"):
        sft.parse_record({"prompt": [{"txt": "q"}], "response": "a"}, "m:4")
    with pytest.raises(sft.SftError, match="0 <= start < end"):
        sft.parse_record({"task": "asr", "audio": "a.wav", "start": 2, "end": 1, "text": "x"}, "m:5")


def test_bad_eval_task_entries_are_clear_errors():
    from spiritlm_jax.train.trainer import TrainingError
    from spiritlm_jax.train.validation import parse_tasks, task_labels

    assert [a.task for a in parse_tasks(["pairs --data p.jsonl --limit 3"])] == ["pairs"]
    assert task_labels(parse_tasks(["pairs --data a", "mmlu --data m", "pairs --data b"])) == ["pairs_1", "mmlu", "pairs_2"]
    for line, msg in (("pairs --data p.jsonl --model base", "--model cannot be used here"),
                      ("pairs", "needs --data"), ("parse --data x", "invalid choice"),
                      ("stsp-score --ref_file a --pred_file b --data x", "not a model")):
        with pytest.raises(TrainingError, match=msg):
            parse_tasks([line])


def test_sft_loss_is_the_response_tokens_cross_entropy_by_hand(tmp_path):
    """The trainer's loss on a packed batch equals log-softmax cross-entropy over the response tokens only,
    computed here from each document run ALONE (so packing's segments and positions are checked too)."""
    cfg = tiny_cfg(tmp_path, "data.batch_size=2", f"data.seq_len={2 * DOC}", "steps=1", "recipe=sft")
    trainer = Trainer(cfg, PackedIterator(word_orders()[0], 2), mesh=single_device())
    trainer.initialize()
    batch = next(PackedIterator(word_orders()[0], 2))
    params = jax.device_get(trainer.state["params"])
    nll, count = 0.0, 0
    for r in range(2):
        for s in range(2):
            sl = slice(s * DOC, (s + 1) * DOC)
            logits = np.asarray(trainer.model.apply({"params": params}, batch["tokens"][r:r + 1, sl])[0][0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            ids = batch["tokens"][r, sl]
            for i in range(K + 2, DOC - 1):  # position i predicts ids[i+1]: the 9 units and EOS
                nll -= logp[i, ids[i + 1]]
                count += 1
    hist = trainer.train()  # its iterator yields this same first batch
    trainer.close()
    assert count == 2 * 2 * (3 * K + 1) == hist[0].metrics["loss_tokens"]
    assert abs(hist[0].metrics["loss"] - nll / count) < 1e-5, (hist[0].metrics["loss"], nll / count)


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_learns_a_held_out_mapping_base_frozen_merge_and_export(tmp_path):
    from spiritlm_jax.converters.llama import load_converted

    train_orders, held_out = word_orders()
    cfg = tiny_cfg(tmp_path / "run", "data.batch_size=16", f"data.seq_len={2 * DOC}", "steps=100", "log_every=25",
                   "optim.lr=1e-2", "lora.rank=8", "lora.alpha=16", "recipe=sft", "checkpoint.every=100")
    trainer = Trainer(cfg, PackedIterator(train_orders, 16), mesh=single_device())
    trainer.initialize()
    base_before = jax.device_get(trainer.frozen)
    trainer.train()
    batch = next(PackedIterator(held_out, 64, seed=99))
    logits = jax.jit(trainer.plan.logits)(trainer.state["params"], trainer.frozen, batch["tokens"], batch["positions"],
                                          batch["segment_ids"])
    m = batch["loss_mask"] > 0
    accuracy = float((np.argmax(np.asarray(logits), -1)[m] == batch["targets"][m]).mean())
    assert accuracy >= 0.90, accuracy  # 0.96 in a run of this setup with 4 kv heads (chance: 1/64)
    # every base parameter bit-identical; only the adapters (and their moments) are trained and saved
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(trainer.frozen))))
    names = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.state["params"])]
    assert names and all(n.split("'")[-2].endswith(("_lora_a", "_lora_b")) for n in names), names
    n_adapter = sum(x.size for x in jax.tree.leaves(trainer.state["params"]))
    E, H, KV, D, I = 64, 4, 2, 16, 128  # rank·(inputs + outputs) per adapted weight, 2 layers
    per_layer = 8 * ((E + H * D) + 2 * (E + KV * D) + (H * D + E) + 2 * (E + I) + (I + E))
    assert n_adapter == 2 * per_layer, n_adapter
    # merge(base, adapters) == base + adapters
    full = jax.device_get({**{}, **_merge(trainer.frozen["params"], trainer.state["params"])})
    merged = merge_lora(full, 8, 16.0)
    plain, _ = trainer.model.apply({"params": merged}, batch["tokens"], positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    assert float(jnp.max(jnp.abs(plain - logits))) < 1e-5  # fp32: merged W + s·A·B vs x·W + s·x·A·B
    # the export is a converted directory that loads as a plain Llama with the same logits
    from spiritlm_jax.train.peft import export_merged

    out = export_merged(trainer, tmp_path / "merged")
    trainer.close()
    cfg_loaded, params = load_converted(out)
    from spiritlm_jax.models.llama import Llama

    again, _ = Llama(cfg_loaded).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                       segment_ids=batch["segment_ids"])
    assert float(jnp.max(jnp.abs(again - logits))) < 1e-5


def _merge(a, b):
    from spiritlm_jax.train.peft import merge_trees

    return merge_trees(a, b)


def test_qlora_trains_on_a_4bit_base_and_its_merged_export_loads(tmp_path):
    import qwix

    from spiritlm_jax.converters.llama import load_converted
    from spiritlm_jax.models.llama import Llama
    from spiritlm_jax.train.peft import export_merged

    cfg = tiny_cfg(tmp_path / "run", "data.batch_size=8", f"data.seq_len={2 * DOC}", "steps=12", "log_every=4",
                   "optim.lr=1e-2", "lora.rank=8", "lora.quantize=nf4", "recipe=sft", "checkpoint.every=12")
    trainer = Trainer(cfg, PackedIterator(word_orders()[0], 8), mesh=single_device())
    hist = trainer.train()
    q = trainer.frozen["params"]["layers"]["attn"]["q"]
    assert isinstance(q, qwix.QArray) and q.qvalue.dtype == jnp.uint4  # the frozen base is stored in 4 bits
    assert not isinstance(trainer.frozen["params"]["embed"]["embedding"], qwix.QArray)  # only adapted modules
    assert hist[-1].metrics["loss"] < hist[0].metrics["loss"]
    out = export_merged(trainer, tmp_path / "merged")
    batch = next(PackedIterator(word_orders()[1], 4, seed=5))
    qlora_logits = trainer.plan.logits(trainer.state["params"], trainer.frozen, batch["tokens"], batch["positions"],
                                       batch["segment_ids"])
    trainer.close()
    cfg_loaded, params = load_converted(out)
    merged_logits, _ = Llama(cfg_loaded).apply({"params": params}, batch["tokens"], positions=batch["positions"],
                                               segment_ids=batch["segment_ids"])
    assert float(jnp.max(jnp.abs(merged_logits - qlora_logits))) < 1e-5


def test_lora_rule_or_freeze_pattern_that_matches_nothing_is_refused(tmp_path):
    for extra, msg in ((["lora.rank=4", "lora.modules=.*/ffn"], "matches no module"),
                       (["optim.trainable=layers_1/mlp"], "matches no parameter")):
        with pytest.raises(PeftError, match=msg):
            Trainer(tiny_cfg(tmp_path, "data.batch_size=2", "data.seq_len=16", *extra), PackedIterator([], 1), mesh=single_device())
    with pytest.raises(TrainConfigError, match="QLoRA"):
        tiny_cfg(tmp_path, "lora.quantize=nf4")


def test_freezing_by_path_and_by_vocabulary_row_trains_only_the_selected_weights(tmp_path):
    """Full fine-tune of the top layer plus only the speech rows of the embedding and LM head (the rows a
    vocabulary extension adds): the bottom layer and the text rows stay bit-identical through AdamW with
    weight decay (which would move any row it touches); the selected weights all move."""
    cfg = tiny_cfg(tmp_path, "data.batch_size=4", f"data.seq_len={2 * DOC}", "steps=3", "model.scan_layers=false",
                   "optim.trainable=^(layers_1/|lm_head|embed)", "optim.trainable_rows=speech", "optim.lr=1e-2",
                   "optim.weight_decay=0.1")
    trainer = Trainer(cfg, PackedIterator(word_orders()[0], 4), mesh=single_device())
    trainer.initialize()
    start = jax.device_get(trainer.state["params"])
    frozen = jax.device_get(trainer.frozen)
    trainer.train()
    end = jax.device_get(trainer.state["params"])
    trainer.close()
    assert sorted(end) == ["embed", "layers_1", "lm_head"]
    assert "layers_0" in frozen["params"] and "final_norm" in frozen["params"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(jax.device_get(trainer.frozen))))
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start["layers_1"]), jax.tree.leaves(end["layers_1"])))
    speech = np.arange(64) >= 24  # model.vocab_layout=speech=24:64
    for rows_first in (start["embed"]["embedding"], end["embed"]["embedding"]), (start["lm_head"], end["lm_head"]):
        before, after = rows_first
        assert np.array_equal(before[~speech], after[~speech])  # text rows: bit-identical
        assert (np.abs(after[speech] - before[speech]).max(-1) > 0).all()  # every speech row moved (decay at least)
    with pytest.raises(PeftError, match="neither trains"):
        Trainer(tiny_cfg(tmp_path / "b", "data.batch_size=2", "data.seq_len=16", "model.scan_layers=false",
                         "optim.trainable=^layers_1/", "optim.trainable_rows=speech"), PackedIterator([], 1),
                mesh=single_device())
    with pytest.raises(TrainConfigError, match="id ranges"):
        tiny_cfg(tmp_path, "optim.trainable_rows=speech_rows")


# ------------------------------------------------------------------------------------------ DPO

GOOD, BAD = UNITS[::2], UNITS[1::2]


def preference_pair(word, rng, seq_len):
    """Prompt: a word; chosen: 4 units from the even half of the unit ids, rejected: from the odd half."""
    prompt = [BOS, TXT, int(word), SPH]
    rows = []
    for pool in (GOOD, BAD):
        ids = np.array(prompt + [int(u) for u in rng.choice(pool, 4)] + [EOS], np.int32)
        rows.append(sft.pair_row(ids, len(prompt), seq_len))
    return {k: np.stack([rows[0][k], rows[1][k]]) for k in rows[0]}


class PairIterator:
    def __init__(self, words, pairs, seq_len, seed=0):
        self.words, self.pairs, self.T, self.seed, self.n = words, pairs, seq_len, seed, 0

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = int(state["n"])

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.n])
        self.n += 1
        ps = [preference_pair(self.words[rng.integers(len(self.words))], rng, self.T) for _ in range(self.pairs)]
        return {k: np.stack([p[k] for p in ps]) for k in ps[0]}


def test_dpo_loss_equals_a_hand_computation(tmp_path):
    from spiritlm_jax.train.dpo import make_dpo_step

    cfg = tiny_cfg(tmp_path, "recipe=dpo", "lora.rank=4", "data.batch_size=3", "data.seq_len=12", "dpo.beta=0.3")
    trainer = Trainer(cfg, PairIterator(WORDS, 3, 12), mesh=single_device())
    trainer.initialize()
    # make the policy differ from the reference: random adapters (B is zero at init)
    adapters = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape),
                            trainer.state["params"])
    batch = next(PairIterator(WORDS, 3, 12))
    # jitted, not eager: op-by-op dispatch of the qwix-wrapped model was most of this test's time
    got = jax.jit(make_dpo_step(trainer.plan, trainer.tx, trainer.sched, cfg.dpo, train=False))(
        {"params": adapters}, batch, trainer.frozen)
    full = merge_lora(_merge(jax.device_get(trainer.frozen["params"]), jax.device_get(adapters)), 4, 16.0)
    base = jax.device_get(trainer.frozen["params"])
    apply = jax.jit(lambda params, tokens: trainer.model.apply({"params": params}, tokens)[0])

    def logp(params, row):
        lg = np.asarray(apply(params, row["tokens"][None])[0], np.float64)
        lg = lg - lg.max(-1, keepdims=True)
        lsm = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        return sum(lsm[i, row["targets"][i]] for i in range(len(row["tokens"])) if row["loss_mask"][i])

    losses = []
    for b in range(3):
        rows = [{k: batch[k][b, j] for k in batch} for j in range(2)]
        h = (logp(full, rows[0]) - logp(base, rows[0])) - (logp(full, rows[1]) - logp(base, rows[1]))
        losses.append(np.log1p(np.exp(-0.3 * h)))  # -log sigmoid(beta h)
    assert abs(float(got["loss"]) - np.mean(losses)) < 1e-5, (float(got["loss"]), np.mean(losses))
    trainer.close()


def test_dpo_learns_the_preference_on_held_out_prompts_within_a_kl_bound(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "recipe=dpo", "lora.rank=8", "data.batch_size=8", "data.seq_len=12",
                   "steps=40", "log_every=10", "optim.lr=5e-3", "dpo.beta=0.5", "eval.every=40", "eval.batches=2")
    held_out = WORDS[12:]
    trainer = Trainer(cfg, PairIterator(WORDS[:12], 8, 12), eval_data=lambda: PairIterator(held_out, 8, 12, seed=7), mesh=single_device())
    trainer.initialize()
    before = trainer.evaluate()
    hist = trainer.train()
    after = [r.metrics for r in hist if "eval/policy_accuracy" in r.metrics][-1]
    trainer.close()
    assert 0.25 <= before["policy_accuracy"] <= 0.75, before  # chance: the random policy has no preference
    assert after["eval/policy_accuracy"] >= 0.90, after
    assert after["eval/accuracy"] >= 0.90, after
    assert after["eval/kl"] < 1.0, after  # per response token, nats: the stated bound (beta = 0.5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "eval" for r in rows)


# ------------------------------------------------------------------------------------------ scale and resume


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_sharded_lora_step_equals_single_device_and_resume_is_bit_exact(tmp_path, recipe):
    """Three trainers (not five): one uninterrupted single-device run gives both the step-1 reference for
    the 8-device run and the 4-step reference for the resume, which restarts from a copy of that run's
    folder holding only its step-2 checkpoint (what a kill after step 2 leaves)."""
    import shutil

    from spiritlm_jax import sharding as shd

    if recipe == "dpo":
        extra, make = ["recipe=dpo", "data.seq_len=12"], (lambda: PairIterator(WORDS, 8, 12))
    else:
        extra, make = ["recipe=sft", f"data.seq_len={2 * DOC}"], (lambda: PackedIterator(word_orders()[0], 8))
    common = ["lora.rank=4", "data.batch_size=8", "optim.lr=1e-2", "steps=4", "checkpoint.every=2",
              "checkpoint.async_save=false", *extra]
    straight = Trainer(tiny_cfg(tmp_path / "straight", *common), make(), mesh=single_device())
    straight.train(until=1)
    single = jax.device_get(straight.state["params"])
    sharded = Trainer(tiny_cfg(tmp_path / "sharded", *common, "steps=1"), make(), mesh=shd.make_mesh((2, 2, 2)))
    sharded.train()
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single),
                                                          jax.tree.leaves(jax.device_get(sharded.state["params"])))]
    sharded.close()
    assert max(diffs) < 1e-6, diffs
    straight.train()
    straight.close()
    shutil.copytree(tmp_path / "straight", tmp_path / "cut", ignore=shutil.ignore_patterns("4"))
    resumed = Trainer(tiny_cfg(tmp_path / "cut", *common), make(), mesh=single_device())
    assert resumed.initialize() == 2
    resumed.train()
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        assert np.array_equal(a, b)
    resumed.close()


def test_config_presets_load_and_embed_llama_config():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    names = {p.name for p in presets}
    assert {"finetune.json", "sft_full.json", "sft_lora.json", "sft_qlora.json", "dpo_lora.json",
            "pretrain_base_7b.json", "pretrain_expressive_7b.json"} <= names
    for p in presets:
        cfg = TrainConfig.load(p)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg = TrainConfig.load(None, ["model.hidden_size=64", "model.remat=dots"])
    assert cfg.model.llama.hidden_size == 64 and cfg.model.llama.remat == "dots"
    # docs/finetune.md's speech-rows command is a valid config (its run is the freezing test above)
    import shlex

    doc = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if "optim.trainable_rows=speech" in ln and ln.startswith("spiritlm-jax")]
    argv = shlex.split(line)
    cfg = TrainConfig.load(Path(__file__).resolve().parents[1] / argv[argv.index("--config") + 1],
                           [a for a in argv[4:] if "=" in a])
    assert cfg.optim.trainable_rows == "speech" and not cfg.model.llama.scan_layers
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    tasks = TrainConfig.load(None, ['eval.tasks=["pairs --data a.jsonl", "mmlu --data m --n-shot 0"]']).eval.tasks
    assert tasks == ("pairs --data a.jsonl", "mmlu --data m --n-shot 0")
    with pytest.raises(TrainConfigError, match="JSON list"):
        TrainConfig.load(None, ["eval.tasks=pairs --data a.jsonl"])
    with pytest.raises(TrainConfigError, match="remat"):
        TrainConfig.load(None, ["model.remat=sometimes"])


def test_expressive_pitch_and_style_units_go_through_prepare_sft_and_train(tmp_path, golden_dir, monkeypatch):
    """``prepare --sft --expressive``: the TTS response holds the Expressive tokenizer's own string
    ([Pi]/[St]/[Hu] by the original's rules: SpeechTokenizer.encode_string, an independent path) and SFT on
    it puts pitch and style tokens under the response-only loss. One 1 s clip: FCPE is real-size."""
    from pathlib import Path

    import soundfile as sf

    from spiritlm_jax.cli import main
    from spiritlm_jax.speech import SpeechTokenizer
    from spiritlm_jax.text import TextTokenizer

    monkeypatch.chdir(tmp_path)
    st_dir = golden_dir / "checkpoints" / "speech_tokenizer"
    lm_src = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-expressive-7b"
    wav = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    sf.write("clip.wav", wav, 16000)
    rec = {"task": "tts", "audio": "clip.wav", "text": "a calm voice"}
    Path("records.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["prepare", "--sft", "records.jsonl", "--speech-tokenizer", str(st_dir), "--expressive",
                 "--output", "data", "--name", "expr"]) == 0
    assert main(["convert", "llama", str(lm_src), "lm"]) == 0
    tok = TextTokenizer.from_dir("lm")
    units = SpeechTokenizer.from_checkpoints(st_dir, "expressive", with_vocoder=False).encode_string(wav)
    assert "[Pi" in units and "[St" in units
    want = sft.render(sft.parse_record(rec, "t"), [units])
    it = sft.make_iterator("data/spiritlm_corpus/expr/1.0.0", "lm", kind="sft", seq_len=128, batch_size=1, num_epochs=1)
    batch = next(it)
    ids, n_prompt = sft.supervised_ids(tok, want["prompt"], want["response"])
    assert list(batch["tokens"][0, :len(ids) - 1]) == list(ids[:-1])  # the prepared record, token for token
    answer = batch["targets"][batch["loss_mask"] > 0]
    vocab = tok.vocab
    for stream in (vocab.pitch, vocab.style, vocab.hubert):
        assert any(int(t) in stream for t in answer), stream  # every stream is trained on
    assert not any(int(t) in vocab.pitch for t in batch["targets"][0, :n_prompt - 1])  # the prompt is text only
    assert main(["train", "recipe=sft", "model.init=lm", "data.path=data/spiritlm_corpus/expr/1.0.0",
                 "data.batch_size=8", "data.seq_len=128", "steps=2", "checkpoint.dir=run", "progress=false",
                 "tensorboard=false", "model.remat=none", "model.dtype=float32"]) == 0
    rows = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()]
    per_record = sum(int(t) in vocab.pitch or int(t) in vocab.style or int(t) in vocab.hubert for t in answer)
    # the speech tokens trained per step: whole records' responses (rows pack copies of the one record)
    assert rows[-1]["tokens_speech"] > 0 and rows[-1]["tokens_speech"] % per_record == 0, (rows[-1], per_record)
    assert np.isfinite(rows[-1]["loss_speech"])
