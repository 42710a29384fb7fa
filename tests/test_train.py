"""Train step and loop: loss falls, sharded == single-device, grad accumulation, config and batch errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax import sharding as shd
from spiritlm_jax.train.config import TrainConfig, TrainConfigError
from spiritlm_jax.train.trainer import (SPEECH, TEXT, SyntheticIterator, Trainer, TrainingError, check_batch,
                                        flops_per_token, global_batch, init_state, jit_train_step, llama_config,
                                        make_optimizer, make_train_step, modality_table, state_layout)
from spiritlm_jax.models.llama import Llama

# heads 8 / kv 4 / hidden 64 / mlp 128 / vocab 256: every sharded dimension divides every mesh used here.
TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=8", "model.num_key_value_heads=4", "model.max_position_embeddings=64",
        "model.vocab_layout=speech=200:256", "data.batch_size=8", "data.seq_len=32", "optim.warmup_steps=2",
        "progress=false", "tensorboard=false"]


def tiny_cfg(tmp_path, *extra) -> TrainConfig:
    return TrainConfig().override(*TINY, f"checkpoint.dir={tmp_path / 'ckpt'}", *extra)


def one_device_mesh():
    return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_loss_falls_on_tiny_corpus(tmp_path):
    # The training configuration proper: bf16 compute, fp32 master weights, full remat, z-loss, clipping.
    cfg = tiny_cfg(tmp_path, "steps=30", "log_every=5", "optim.lr=1e-2", "optim.z_loss=1e-4", "model.dtype=bfloat16",
                   "model.remat=full", "checkpoint.every=30")
    tr = Trainer(cfg, SyntheticIterator(8, 32, 256, seed=1), mesh=one_device_mesh())
    hist = tr.train()
    tr.close()
    losses = [r.metrics["loss"] for r in hist]
    assert np.log(256) - 0.5 < losses[0] < np.log(256) + 0.5  # a fresh model is near-uniform
    assert losses[-1] < losses[0] - 1.0, losses  # measured: 5.32 → 3.69 nats over 35 steps
    last = hist[-1].metrics
    assert last["accuracy"] > 0.2
    # per-modality: both kinds of target occur in the synthetic stream and both are learned
    assert last["tokens_text"] > 0 and last["tokens_speech"] > 0
    assert last["loss_text"] < losses[0] - 1.0 and last["loss_speech"] < losses[0] - 1.0
    assert last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1
    # params stay fp32 master weights while the model computes in bf16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr.state["params"]))
    assert (tmp_path / "ckpt" / "metrics.jsonl").is_file()


def _step_on_mesh(cfg, mesh, state0_host, batches):
    llama = llama_config(cfg.model)
    model = Llama(llama)
    tx, sched = make_optimizer(cfg.optim, cfg.steps)
    layout = state_layout(model, tx, mesh)
    state = jax.device_put(state0_host, layout.shardings)
    table = modality_table(llama.vocab_size, cfg.model.vocab_layout)
    step = make_train_step(model, tx, sched, table, grad_accum=cfg.optim.grad_accum, z_loss=cfg.optim.z_loss)
    metrics = []
    with shd.mesh_context(mesh):
        fn = jit_train_step(step, layout)
        for b in batches:
            state, m = fn(state, global_batch(b, layout, cfg.data.batch_size))
            metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("ref"), "steps=10", "optim.lr=1e-3", "optim.z_loss=1e-4",
                   "model.dtype=float32", "model.remat=none")
    llama = llama_config(cfg.model)
    model = Llama(llama)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    mesh = one_device_mesh()
    state0 = jax.device_get(init_state(model, tx, state_layout(model, tx, mesh), seed=3))
    it = SyntheticIterator(8, 32, 256, seed=2)
    batches = [next(it) for _ in range(3)]
    ref_state, ref_metrics = _step_on_mesh(cfg, mesh, state0, batches)
    return cfg, state0, batches, ref_state, ref_metrics


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Sharded vs single device: same math with different reduction splits. Measured after 3 AdamW steps on
# all three meshes: params 6e-8 (one fp32 ulp of the ~1.0 norm scales); 1e-6 leaves margin yet catches
# any wrong sharding (a mis-sharded step moves parameters by ~lr = 1e-3). The metrics are compared relative
# to their size: the loss (~5.5, fp32 ulp 4.8e-7) differed by 1.43e-6 = 3 ulp once the LM head became
# (V, E) (its dot splits differently per mesh); 1e-6 relative is 11 ulp there, 1,000x under a mis-sharding.
SHARD_TOL = 1e-6


def _metric_close(got, want) -> bool:
    return abs(float(got) - float(want)) <= SHARD_TOL * max(1.0, abs(float(want)))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(reference_run, mesh_shape):
    cfg, state0, batches, ref_state, ref_metrics = reference_run
    state, metrics = _step_on_mesh(cfg, shd.make_mesh(mesh_shape), state0, batches)
    assert _max_diff(state["params"], ref_state["params"]) <= SHARD_TOL
    assert _max_diff(state["opt_state"], ref_state["opt_state"]) <= SHARD_TOL
    for m, r in zip(metrics, ref_metrics):
        for k in ("loss", "accuracy", "loss_text", "loss_speech", "grad_norm", "z_loss"):
            assert _metric_close(m[k], r[k]), (k, m[k], r[k])
    assert int(state["step"]) == 3


def test_grad_accumulation_equals_one_big_batch(reference_run):
    cfg, state0, batches, ref_state, ref_metrics = reference_run
    acc = cfg.override("optim.grad_accum=4")
    state, metrics = _step_on_mesh(acc, shd.make_mesh((2, 2, 2)), state0, batches)
    # Same loss normalisation (whole-batch token count), only fp32 summation order differs: same bound.
    assert _max_diff(state["params"], ref_state["params"]) <= SHARD_TOL
    for m, r in zip(metrics, ref_metrics):
        assert _metric_close(m["loss"], r["loss"]), (m["loss"], r["loss"])


def test_loss_matches_hand_computation():
    # One tiny batch: the step's reported loss/accuracy equals a numpy cross-entropy over loss_mask tokens.
    cfg = TrainConfig().override(*TINY, "model.dtype=float32", "model.remat=none", "optim.z_loss=0")
    llama = llama_config(cfg.model)
    model = Llama(llama)
    tx, sched = make_optimizer(cfg.optim, 10)
    mesh = one_device_mesh()
    layout = state_layout(model, tx, mesh)
    state = init_state(model, tx, layout, seed=0)
    b = next(SyntheticIterator(8, 32, 256, seed=5))
    fwd = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, positions=pos, segment_ids=seg)[0])
    logits = np.asarray(fwd(state["params"], b["tokens"], b["positions"], b["segment_ids"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    m = b["loss_mask"]
    table = modality_table(256, "speech=200:256")
    sp = m * (table[b["targets"]] == SPEECH)
    step = make_train_step(model, tx, sched, table)
    with shd.mesh_context(mesh):
        _, got = jit_train_step(step, layout, donate=False)(state, global_batch(b, layout, 8))
    # fp32 logsumexp over 256 logits vs float64: measured 2e-7
    assert abs(float(got["loss"]) - (nll * m).sum() / m.sum()) < 1e-5
    assert abs(float(got["loss_speech"]) - (nll * sp).sum() / sp.sum()) < 1e-5
    assert float(got["loss_tokens"]) == m.sum()
    assert abs(float(got["accuracy"]) - ((logits.argmax(-1) == b["targets"]) * m).sum() / m.sum()) < 1e-6


def test_modality_tables():
    t = modality_table(32768, "auto")  # expressive layout from the vocab size
    assert t[0] == TEXT and t[31999] == TEXT and t[32000] == 0 and t[32001] == 0
    assert t[32002] == SPEECH and t[32666] == SPEECH and t[32667] == 0
    b = modality_table(32512, "auto")
    assert b[32502] == SPEECH and b[32503] == 0
    assert (modality_table(100, "auto") == TEXT).all()
    with pytest.raises(TrainingError, match="extend the checkpoint"):
        modality_table(32000, "expressive")
    with pytest.raises(TrainingError, match="speech=A:B"):
        modality_table(100, "speech=oops")


def test_flops_per_token_7b():
    from spiritlm_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=32768)
    n = cfg.num_params()
    assert 6.7e9 < n < 6.8e9
    f = flops_per_token(cfg, 4096)
    assert f == pytest.approx(6 * (n - 32768 * 4096) + 12 * 32 * 4096 * 4096)


# ----------------------------------------------------------------------------------- bad input

def test_config_overrides_and_errors(tmp_path):
    cfg = TrainConfig().override("optim.lr=1e-4", "model.scan_layers=false", "mesh.fsdp=-1", "model.init=/x")
    assert cfg.optim.lr == 1e-4 and cfg.model.llama.scan_layers is False and cfg.mesh.fsdp == -1
    f = tmp_path / "c.json"
    f.write_text('{"steps": 7, "optim": {"lr": 0.5}}')
    c2 = TrainConfig.load(f, ["optim.warmup_steps=3"])
    assert (c2.steps, c2.optim.lr, c2.optim.warmup_steps) == (7, 0.5, 3)
    with pytest.raises(TrainConfigError, match=r"unknown key.*optim\.lrr.*valid keys of optim"):
        TrainConfig().override("optim.lrr=1")
    with pytest.raises(TrainConfigError, match="steps: cannot read 'ten' as int"):
        TrainConfig().override("steps=ten")
    with pytest.raises(TrainConfigError, match="not key=value"):
        TrainConfig().override("steps")
    with pytest.raises(TrainConfigError, match="divisible by optim.grad_accum"):
        TrainConfig().override("data.batch_size=6", "optim.grad_accum=4")
    with pytest.raises(TrainConfigError, match="schedule"):
        TrainConfig().override("optim.schedule=linear")
    with pytest.raises(TrainConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TrainConfigError, match="cannot parse"):
        TrainConfig.load(tmp_path / "bad.json")


def test_bad_batches():
    b = next(SyntheticIterator(4, 16, 50))
    check_batch(b, 4, 16, 50)
    with pytest.raises(TrainingError, match="missing.*loss_mask"):
        check_batch({k: v for k, v in b.items() if k != "loss_mask"}, 4, 16, 50)
    with pytest.raises(TrainingError, match=r"shape \(4, 16\), expected \(4, 32\)"):
        check_batch(b, 4, 32, 50)
    with pytest.raises(TrainingError, match="outside the vocabulary"):
        check_batch(b, 4, 16, 10)


def test_batch_must_split_over_the_mesh(tmp_path):
    with pytest.raises(TrainingError, match="divisible by mesh data×fsdp = 8"):
        Trainer(tiny_cfg(tmp_path, "data.batch_size=4"), SyntheticIterator(4, 32, 256), mesh=shd.make_mesh((2, 4, 1)))


def test_bad_init_dir(tmp_path):
    with pytest.raises(TrainingError, match="neither 'random' nor a model directory"):
        Trainer(tiny_cfg(tmp_path, f"model.init={tmp_path / 'nope'}"), SyntheticIterator(8, 32, 256),
                mesh=one_device_mesh())


# ----------------------------------------------------------------------------------- CLI

CLI_TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "model.num_attention_heads=4", "model.num_key_value_heads=4", "model.dtype=float32", "model.remat=none",
            "data.batch_size=8", "data.seq_len=64", "optim.lr=1e-2", "optim.warmup_steps=2", "progress=false",
            "log_every=5", "checkpoint.every=10"]


def test_cli_trains_resumes_and_writes_outputs(tmp_path, capsys):
    from spiritlm_jax.cli import main

    ck = tmp_path / "run"
    argv = ["train", "model.vocab_size=256", *CLI_TINY, f"checkpoint.dir={ck}"]
    assert main(argv + ["steps=10"]) == 0
    assert main(argv + ["steps=20"]) == 0  # same dir, more steps: resumes from step 10
    err = capsys.readouterr().err
    assert f"resumed from {ck}/10" in err and "step 20: loss" in err
    assert (ck / "loss_curve.png").stat().st_size > 1000
    assert list((ck / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((ck / "train_config.json").read_text())["steps"] == 20
    steps = [json.loads(line)["step"] for line in (ck / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_cli_errors(tmp_path, capsys):
    from spiritlm_jax.cli import main

    assert main(["train", "optim.nope=1"]) == 2
    assert "unknown key(s) ['optim.nope']" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--extend-vocab", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err
    assert main(["train", "data.path=/nonexistent/ds", f"checkpoint.dir={tmp_path / 'c'}", "model.vocab_size=256",
                 *CLI_TINY]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["train", "--print-config", "steps=3"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_loss_falls_on_tiny_prepared_corpus(tmp_path, golden_dir, capsys):
    # End to end: `spiritlm-jax prepare` a tiny text corpus, then `spiritlm-jax train` reads it through
    # the grain loader (train/loader.py) and the loss falls; the checkpoint holds the grain iterator state.
    import random

    from spiritlm_jax.cli import main

    rnd = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park with a red ball while birds sang".split()
    (tmp_path / "txt").mkdir()
    for i in range(2):
        (tmp_path / "txt" / f"b{i}.txt").write_text(
            "\n\n".join(" ".join(rnd.choice(words) for _ in range(40)) for _ in range(15)))
    assert main(["prepare", "--text", str(tmp_path / "txt"), "--text-unit", "paragraph", "--output",
                 str(tmp_path / "ds"), "--name", "tiny"]) == 0
    ds = tmp_path / "ds" / "spiritlm_corpus" / "tiny" / "1.0.0"
    tok = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"
    ck = tmp_path / "run"
    assert main(["train", "model.vocab_size=32768", *CLI_TINY, f"data.path={ds}", f"data.tokenizer={tok}",
                 "steps=30", f"checkpoint.dir={ck}"]) == 0
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0, rows  # measured 7.2 → 2.3 nats (21-word vocabulary)
    assert rows[-1]["loss_speech"] is None  # text-only corpus: no speech targets
    state = json.loads(next((ck / "30" / "data").glob("process_0-of-1.json")).read_text())
    assert state  # grain's iterator state, restored on resume


def test_readme_train_command_runs(tmp_path, monkeypatch):
    """The README's tiny training command, exactly as written there, runs end to end."""
    import shlex
    from pathlib import Path

    from spiritlm_jax.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- readme:train -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.strip())
    assert argv[:2] == ["spiritlm-jax", "train"]
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    out = tmp_path / "runs" / "tiny"
    assert (out / "loss_curve.png").exists() and (out / "metrics.jsonl").exists()


def test_seq_len_beyond_the_context_and_zero_batches_are_config_errors(tmp_path, capsys):
    from spiritlm_jax.cli import main

    with pytest.raises(TrainConfigError, match=r"data.seq_len=128 is longer than the model's context "
                                               r"\(model.max_position_embeddings=64\)"):
        tiny_cfg(tmp_path, "data.seq_len=128")
    for bad in ("data.batch_size=0", "data.batch_size=-8"):
        with pytest.raises(TrainConfigError, match="data.batch_size must be >= 1"):
            tiny_cfg(tmp_path, bad)
        assert main(["train", *TINY, bad, f"checkpoint.dir={tmp_path / 'c'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: data.batch_size must be >= 1") and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_seq_len_beyond_an_init_checkpoints_context(tmp_path, golden_dir, capsys):
    # model.init's own max_position_embeddings decides (the random-model fields are not used then).
    from spiritlm_jax.cli import main

    init = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"
    ctx = json.loads((init / "config.json").read_text())["max_position_embeddings"]
    assert main(["train", f"model.init={init}", f"data.seq_len={ctx + 1}", "model.max_position_embeddings=100000",
                 "data.batch_size=8", "progress=false", f"checkpoint.dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert f"data.seq_len={ctx + 1} is longer than the model's context of {ctx} positions (model.init {init})" in err
