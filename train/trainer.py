"""The Spirit LM trainer: a sharded, jitted train step and the loop around it.

Train state: ``{"params", "opt_state", "step"}``; params are the fp32 master weights, the model computes
in ``model.dtype`` (bf16) by casting them inside each layer, so gradients and AdamW moments are fp32.
Every array of the state gets its ``NamedSharding`` from the ONE rules table (spiritlm_jax.sharding) via
the parameters' logical axis names; AdamW's moments inherit their parameter's names because the
optimizer is initialised on the boxed (logically partitioned) parameters under ``jax.eval_shape``.

The step (``make_train_step``):
  * the global batch (B, T) is split into ``grad_accum`` micro-batches (rows i, i+A, i+2A, … so each
    micro-batch stays spread over the batch-sharded devices) and gradients are summed in fp32 under
    ``lax.scan``; the loss is normalised by the token count of the WHOLE batch, so any ``grad_accum``
    gives the same update (up to fp32 summation order);
  * cross-entropy over ``loss_mask`` tokens + optional z-loss ``z · log(Z)²``;
  * loss and accuracy per modality from the target token's id range (Vocab: text ids vs
    [Hu]/[Pi]/[St] speech ids; the [Text]/[Speech] markers and specials count in the total only);
  * optax chain: global-norm clipping → AdamW (no decay on 1-D params: norms) → warmup + cosine/constant.

Batches come from any iterator with ``__next__``, ``get_state()``, ``set_state(state)`` (grain's
``DatasetIterator`` qualifies). Each host's iterator yields only ITS rows of the global batch
(``batch_size / process_count``), which are assembled into one global array without copies between
hosts (``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from spiritlm_jax import sharding as shd
from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.models.llama import Llama

from .config import TrainConfig

log = logging.getLogger("spiritlm_jax.train")

BATCH_KEYS = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "targets": np.int32,
              "loss_mask": np.float32}

# Token modality codes (per target id).
OTHER, TEXT, SPEECH = 0, 1, 2


class TrainingError(RuntimeError):
    """The run cannot continue (bad batch, divergence)."""


class TrainingDivergedError(TrainingError):
    """Loss or gradient norm became NaN/inf; the run stopped before saving the bad state."""


class DataIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


# ====================================================================== model / vocabulary

def llama_config(mc, init_cfg: LlamaConfig | None = None) -> LlamaConfig:
    """The LlamaConfig to train: ``model.llama``, or the init checkpoint's shape with ``model.llama``'s
    run-time fields (dtype, param_dtype, remat, scan_layers)."""
    if init_cfg is None:
        return mc.llama
    runtime = {k: getattr(mc.llama, k) for k in ("dtype", "param_dtype", "remat", "scan_layers")}
    return init_cfg.replace(**runtime)


def modality_table(vocab_size: int, layout: str = "auto", init_dir: str | None = None) -> np.ndarray:
    """(vocab_size,) int8: TEXT for ordinary text ids, SPEECH for [Hu]/[Pi]/[St] ids, OTHER for markers,
    specials-free padding rows. See ModelConfig.vocab_layout for ``layout``."""
    from spiritlm_jax.text import Vocab, TextTokenizer

    table = np.full((vocab_size,), OTHER, np.int8)
    vocab = None
    if layout.startswith("speech="):
        try:
            a, b = (int(x) for x in layout[len("speech="):].split(":"))
        except ValueError:
            raise TrainingError(f"model.vocab_layout={layout!r}: expected speech=A:B (ids A..B-1 are speech)") from None
        if not 0 <= a <= b <= vocab_size:
            raise TrainingError(f"model.vocab_layout={layout!r}: range outside the vocabulary (0..{vocab_size})")
        table[:a] = TEXT
        table[a:b] = SPEECH
        return table
    if layout == "none":
        table[:] = TEXT
        return table
    if layout == "auto":
        if init_dir and (Path(init_dir) / "tokenizer.model").is_file():
            vocab = TextTokenizer.from_dir(init_dir, n_embed=vocab_size).vocab
        elif vocab_size in (32512, 32768):
            vocab = Vocab.spiritlm_default(expressive=vocab_size == 32768)
        else:
            table[:] = TEXT
            return table
    elif layout in ("base", "expressive"):
        vocab = Vocab.spiritlm_default(expressive=layout == "expressive")
    else:
        raise TrainingError(f"model.vocab_layout={layout!r}: use auto, base, expressive, none or speech=A:B")
    if vocab.n_embed != vocab_size:
        raise TrainingError(f"vocabulary layout has {vocab.n_embed} rows but the model has {vocab_size}; "
                            f"extend the checkpoint's vocabulary first (train/vocab.py) or set model.vocab_layout")
    table[vocab.text.start:vocab.text.stop] = TEXT
    for r in (vocab.hubert, vocab.pitch, vocab.style):
        table[r.start:r.stop] = SPEECH
    return table


# ====================================================================== optimizer

def learning_rate_schedule(oc, total_steps: int) -> optax.Schedule:
    warm = max(int(oc.warmup_steps), 0)
    if oc.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(oc.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, oc.lr, warm), optax.constant_schedule(oc.lr)], [warm])
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, warm, max(total_steps, warm + 1), oc.lr * oc.min_lr_ratio)


def make_optimizer(oc, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    sched = learning_rate_schedule(oc, total_steps)
    parts = []
    if oc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    # No weight decay on 1-D parameters (RMSNorm scales), as is usual for Llama-style training.
    parts.append(optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                             mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
    return optax.chain(*parts), sched


# ====================================================================== state and shardings

@dataclasses.dataclass
class StateLayout:
    """Abstract train state (ShapeDtypeStructs with shardings), its shardings, and the batch sharding."""

    abstract: Any
    shardings: Any
    batch_sharding: NamedSharding
    mesh: jax.sharding.Mesh
    # The frozen parameters (train/peft.py ParamPlan): an argument of the step, never checkpointed.
    frozen_abstract: Any = None
    frozen_shardings: Any = None


def _boxed_state(model: Llama, tx, rng):
    params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_layout(model: Llama, tx, mesh) -> StateLayout:
    boxed = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.PRNGKey(0)))
    specs = nn.get_partition_spec(boxed)
    abstract = nn.meta.unbox(boxed)
    shardings = shd.logical_sharding(specs, mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sh = NamedSharding(mesh, shd.logical_spec("batch", None))
    return StateLayout(abstract, shardings, batch_sh, mesh)


def init_state(model: Llama, tx, layout: StateLayout, seed: int = 0, params=None):
    """A sharded train state: random (``params`` None) or around given (already sharded) params."""
    with shd.mesh_context(layout.mesh):
        if params is None:
            fn = jax.jit(lambda k: nn.meta.unbox(_boxed_state(model, tx, k)), out_shardings=layout.shardings)
            return fn(jax.random.PRNGKey(seed))
        p_sh = layout.shardings["params"]
        params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, layout.abstract["params"])
        fn = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)},
                     in_shardings=(p_sh,), out_shardings=layout.shardings)
        return fn(params)


def plan_layout(plan, tx, mesh, *, reference: bool = False) -> StateLayout:
    """The layout of a :class:`~spiritlm_jax.train.peft.ParamPlan` run: the train state holds only the
    trainable parameters (and their AdamW moments); the frozen ones (plus, with ``reference``, a copy of
    the starting trainable parameters for DPO) get their own shardings."""
    from .peft import frozen_abstract

    boxed_full = jax.eval_shape(lambda: plan.boxed_params(jax.random.PRNGKey(0)))
    plan.check(boxed_full)
    boxed_tr, boxed_fr = plan.split(boxed_full)
    boxed = jax.eval_shape(lambda: {"params": boxed_tr, "opt_state": tx.init(boxed_tr),
                                    "step": jnp.zeros((), jnp.int32)})
    abstract = nn.meta.unbox(boxed)
    shardings = shd.logical_sharding(nn.get_partition_spec(boxed), mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ref = (abstract["params"], shardings["params"]) if reference and not plan.is_lora else None
    fr_abstract, fr_shardings = frozen_abstract(plan, boxed_fr, mesh, ref)
    batch_sh = NamedSharding(mesh, shd.logical_spec("batch", None))
    return StateLayout(abstract, shardings, batch_sh, mesh, fr_abstract, fr_shardings)


def init_plan_state(plan, tx, layout: StateLayout, seed: int = 0, params=None):
    """(train state, frozen tree), sharded: the frozen part from ``params`` (all base parameters, e.g. a
    loaded checkpoint) or a seeded random init; the trainable part from ``params`` too, except LoRA
    adapters, which always start from their seeded init (B = 0: the run starts at the base model)."""
    names = jax.eval_shape(lambda: plan.split(plan.boxed_params(jax.random.PRNGKey(0)))[1])
    names = jax.tree.map(lambda b: tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * b.ndim,
                         names, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    want_reference = "reference" in layout.frozen_abstract
    fr_sh = layout.frozen_shardings

    def build(key, given):
        full = nn.meta.unbox(plan.boxed_params(key))
        if given is not None:
            from .peft import merge_trees

            full = merge_trees(plan.split(full)[0] if plan.is_lora else {}, given)
        trainable, frozen = plan.split(full)
        trainable = jax.tree.map(lambda x, a: x.astype(a.dtype), trainable, layout.abstract["params"])
        frozen_tree = {"params": plan.quantize_frozen(plan.frozen_storage(frozen), names)}
        if want_reference:
            frozen_tree["reference"] = plan.frozen_storage(trainable)
        state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
        return state, frozen_tree

    # No mesh context here: qwix's adapter init re-boxes values under the logical rules and trips over
    # scan-stacked names; the out_shardings place every leaf anyway.
    out_sh = (layout.shardings, fr_sh)
    if params is None:
        return jax.jit(lambda k: build(k, None), out_shardings=out_sh)(jax.random.PRNGKey(seed))
    return jax.jit(build, out_shardings=out_sh)(jax.random.PRNGKey(seed), params)


# ====================================================================== loss and step

def loss_and_metrics(logits, targets, loss_mask, modality, z_loss: float, denom):
    """Summed (not averaged) losses and counts over the given tokens; normalised by ``denom`` outside.

    Returns (objective_sum / denom, dict of sums).
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    tgt_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - tgt_logit
    m = loss_mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    zl = z_loss * jnp.square(log_z) if z_loss else jnp.zeros_like(nll)
    mod = modality[targets]
    sums = {"nll": jnp.sum(nll * m), "z": jnp.sum(zl * m), "correct": jnp.sum(correct * m), "count": jnp.sum(m)}
    for name, code in (("text", TEXT), ("speech", SPEECH)):
        mm = m * (mod == code)
        sums[f"nll_{name}"] = jnp.sum(nll * mm)
        sums[f"correct_{name}"] = jnp.sum(correct * mm)
        sums[f"count_{name}"] = jnp.sum(mm)
    return (sums["nll"] + sums["z"]) / denom, sums


def make_train_step(model: Llama, tx, sched, modality: np.ndarray, *, grad_accum: int = 1, z_loss: float = 0.0,
                    plan=None):
    """``step(state, batch) -> (state, metrics)``; jit it with ``jit_train_step``. With a ``plan``
    (train/peft.py) the step is ``step(state, batch, frozen)`` and the model is applied through it."""
    modality = jnp.asarray(modality)

    def micro_grads(params, mb, denom, frozen):
        def f(p):
            if plan is None:
                logits, _ = model.apply({"params": p}, mb["tokens"], positions=mb["positions"],
                                        segment_ids=mb["segment_ids"])
            else:
                logits = plan.logits(p, frozen, mb["tokens"], mb["positions"], mb["segment_ids"])
            return loss_and_metrics(logits, mb["targets"], mb["loss_mask"], modality, z_loss, denom)

        (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, sums

    def step(state, batch, frozen=None):
        params = state["params"]
        denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if grad_accum == 1:
            grads, sums = micro_grads(params, batch, denom, frozen)
        else:
            B = batch["tokens"].shape[0]

            def split(x):  # (B, T) -> (A, B/A, T); micro-batch a = rows a, a+A, a+2A, …
                y = x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                return nn.with_logical_constraint(y, (None, "batch", "length"))

            mbs = jax.tree.map(split, batch)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

            def body(carry, mb):
                g_acc, s_acc = carry
                g, s = micro_grads(params, mb, denom, frozen)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                s_acc = jax.tree.map(jnp.add, s_acc, s)
                return (g_acc, s_acc), None

            s0 = jax.eval_shape(lambda: micro_grads(params, jax.tree.map(lambda x: x[0], mbs), denom, frozen)[1])
            s0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), s0)
            (grads, sums), _ = jax.lax.scan(body, (zeros, s0), mbs)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        if plan is not None:
            grads = plan.mask_frozen_rows(grads)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if plan is not None:
            new_params = plan.keep_frozen_rows(new_params, params)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        n = jnp.maximum(sums["count"], 1.0)
        metrics = {
            "loss": sums["nll"] / n,
            "z_loss": sums["z"] / n,
            "accuracy": sums["correct"] / n,
            "grad_norm": gnorm,
            "lr": sched(state["step"]),
            "loss_tokens": sums["count"],
        }
        for name in ("text", "speech"):
            c = sums[f"count_{name}"]
            metrics[f"loss_{name}"] = jnp.where(c > 0, sums[f"nll_{name}"] / jnp.maximum(c, 1.0), jnp.nan)
            metrics[f"accuracy_{name}"] = jnp.where(c > 0, sums[f"correct_{name}"] / jnp.maximum(c, 1.0), jnp.nan)
            metrics[f"tokens_{name}"] = c
        return new_state, metrics

    return step


def jit_train_step(step_fn, layout: StateLayout, donate: bool = True):
    batch_sh = {k: layout.batch_sharding for k in BATCH_KEYS}
    in_sh = (layout.shardings, batch_sh)
    if layout.frozen_shardings is not None:
        in_sh += (layout.frozen_shardings,)
    return jax.jit(step_fn, in_shardings=in_sh,
                   out_shardings=(layout.shardings, NamedSharding(layout.mesh, P())),
                   donate_argnums=(0,) if donate else ())


def abstract_batch(layout: StateLayout, batch_size: int, seq_len: int):
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), np.dtype(dt), sharding=layout.batch_sharding)
            for k, dt in BATCH_KEYS.items()}


# ====================================================================== FLOPs / MFU

def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 × forward), PaLM appendix-B convention:
    6 × (parameters touched by matmuls: all but the embedding lookup) + 12 · L · H · D · T for attention
    scores and values (no causal discount). Remat recomputation is not counted (MFU, not HFU)."""
    n_matmul = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim_ * seq_len
    return 6.0 * n_matmul + attn


# Dense bf16 peak per device (TFLOP/s), from the vendors' data sheets.
PEAK_TFLOPS = {"tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0, "tpu v4": 275.0,
               "tpu v6 lite": 918.0, "h100": 989.0, "h200": 989.0, "a100": 312.0}
CPU_MACHINE_TFLOPS = 0.18  # this machine's measured fp32 matmul rate (common brief), shared by all CPU devices


def peak_tflops_per_device(override: float = 0.0) -> float:
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v
    if jax.devices()[0].platform == "cpu":
        return CPU_MACHINE_TFLOPS / jax.local_device_count()
    return 0.0


# ====================================================================== batches

def check_batch(batch: dict, rows: int, seq_len: int, vocab_size: int) -> dict:
    missing = set(BATCH_KEYS) - set(batch)
    if missing:
        raise TrainingError(f"batch is missing {sorted(missing)}; a batch needs {sorted(BATCH_KEYS)}")
    out = {}
    for k, dt in BATCH_KEYS.items():
        a = np.asarray(batch[k])
        if a.shape != (rows, seq_len):
            raise TrainingError(f"batch[{k!r}] has shape {a.shape}, expected ({rows}, {seq_len}) "
                                f"(data.batch_size / process_count rows of data.seq_len)")
        out[k] = a.astype(dt, copy=False)
    for k in ("tokens", "targets"):
        lo, hi = int(out[k].min()), int(out[k].max())
        if lo < 0 or hi >= vocab_size:
            raise TrainingError(f"batch[{k!r}] holds ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size}); "
                                f"the data was tokenized for a different vocabulary")
    return out


def global_batch(batch: dict, layout: StateLayout, global_rows: int) -> dict:
    """This host's rows → one global batch-sharded array per key."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, layout.batch_sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(layout.batch_sharding, v, (global_rows,) + v.shape[1:])
            for k, v in batch.items()}


class SyntheticIterator:
    """Deterministic packed documents of a learnable pattern (each document is an arithmetic sequence
    mod the vocabulary with a random start and one of a few strides), for smoke tests and benchmarks.

    Host ``process_index`` of ``process_count`` yields its own rows of every global batch. State =
    the number of global batches served (``{"batch": n}``), so resuming replays exactly.
    """

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, *,
                 process_index: int = 0, process_count: int = 1, strides=(1, 2, 3), min_doc: int = 4):
        if batch_size % process_count:
            raise TrainingError(f"batch size {batch_size} does not split over {process_count} processes")
        self.B, self.T, self.V, self.seed = batch_size, seq_len, vocab_size, seed
        self.pi, self.pc = process_index, process_count
        self.strides, self.min_doc = tuple(strides), min_doc
        self.n = 0

    def get_state(self):
        return {"batch": self.n}

    def set_state(self, state):
        self.n = int(state["batch"])

    def __iter__(self):
        return self

    def _row(self, rng):
        T = self.T + 1
        seq = np.empty(T, np.int64)
        seg = np.empty(T, np.int32)
        pos = np.empty(T, np.int32)
        t, s = 0, 1
        while t < T:
            L = int(rng.integers(self.min_doc, max(self.min_doc + 1, self.T // 2)))
            L = min(L, T - t)
            start, stride = int(rng.integers(0, self.V)), int(rng.choice(self.strides))
            seq[t:t + L] = (start + stride * np.arange(L)) % self.V
            seg[t:t + L] = s
            pos[t:t + L] = np.arange(L)
            t, s = t + L, s + 1
        # Last row position may be a lone document start; the boundary mask below handles it.
        return seq, seg, pos

    def __next__(self):
        rows = self.B // self.pc
        out = {k: np.zeros((rows, self.T), dt) for k, dt in BATCH_KEYS.items()}
        for r in range(rows):
            g = self.pi * rows + r
            rng = np.random.default_rng([self.seed, self.n, g])
            seq, seg, pos = self._row(rng)
            out["tokens"][r] = seq[:-1]
            out["targets"][r] = seq[1:]
            out["segment_ids"][r] = seg[:-1]
            out["positions"][r] = pos[:-1]
            out["loss_mask"][r] = (seg[1:] == seg[:-1]).astype(np.float32)  # no loss across documents
        self.n += 1
        return out


# ====================================================================== the trainer

@dataclasses.dataclass
class StepRecord:
    step: int
    metrics: dict


class Trainer:
    """Owns the mesh, the jitted step, the checkpointer and the loop.

    ``Trainer(cfg, data_iter)``; ``train()`` runs to ``cfg.steps`` (or ``until``) and returns the logged
    history. Resumes from ``cfg.checkpoint.dir`` when it holds a checkpoint and ``checkpoint.resume``.
    ``params`` (optional) starts from given parameters instead of ``model.init`` (tests, vocab extension).

    The recipe (``cfg.recipe``): ``pretrain`` and ``sft`` share the next-token step (SFT batches carry a
    ``loss_mask`` on response tokens only); ``dpo`` takes preference-pair batches (train/dpo.py). Which
    parameters train — all, those matching ``optim.trainable``, or LoRA adapters — is the
    :class:`~spiritlm_jax.train.peft.ParamPlan` (``self.plan``); the frozen rest is ``self.frozen``.
    ``eval_data`` (optional): a callable returning a fresh held-out iterator, run every ``eval.every``.
    """

    def __init__(self, cfg: TrainConfig, data: DataIterator, *, mesh=None, params=None,
                 llama_cfg: LlamaConfig | None = None, modality: np.ndarray | None = None, console=None,
                 eval_data=None):
        from .checkpointing import Checkpointer

        self.cfg = cfg
        self.data = data
        self.console = console if console is not None else sys.stderr
        self.mesh = mesh if mesh is not None else shd.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
        mc = cfg.model
        init_cfg = llama_cfg
        if params is None and mc.init != "random":
            init_cfg, params = load_init_params(mc.init, self.mesh, mc.llama)
        self.llama_cfg = llama_config(mc, init_cfg)
        if cfg.data.seq_len > self.llama_cfg.max_position_embeddings:
            src = f"model.init {mc.init}" if init_cfg is not None else "model.max_position_embeddings"
            raise TrainingError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context of "
                                f"{self.llama_cfg.max_position_embeddings} positions ({src}); lower data.seq_len")
        self.model = Llama(self.llama_cfg)
        self.modality = modality if modality is not None else modality_table(
            self.llama_cfg.vocab_size, mc.vocab_layout, None if mc.init == "random" else mc.init)
        from .peft import ParamPlan

        self.plan = ParamPlan.from_config(cfg, self.llama_cfg, self.modality)
        self.tx, self.sched = make_optimizer(cfg.optim, cfg.steps)
        self.layout = plan_layout(self.plan, self.tx, self.mesh, reference=cfg.recipe == "dpo")
        if cfg.recipe == "dpo" and cfg.optim.grad_accum != 1:
            raise TrainingError("recipe=dpo runs one micro-batch per step: set optim.grad_accum=1 (and lower "
                                "data.batch_size, the number of pairs, to fit memory)")
        self.frozen = None
        self.eval_data = eval_data
        self._eval_fn = None
        self._init_params = params
        self.ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.state = None
        self.start_step = 0
        self.rows_per_host = cfg.data.batch_size // jax.process_count()
        if cfg.data.batch_size % jax.process_count():
            raise TrainingError(f"data.batch_size {cfg.data.batch_size} is not divisible by the "
                                f"{jax.process_count()} processes")
        n_batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        micro = cfg.data.batch_size // cfg.optim.grad_accum
        if micro % n_batch_shards:
            raise TrainingError(f"the micro-batch (data.batch_size {cfg.data.batch_size} / optim.grad_accum "
                                f"{cfg.optim.grad_accum} = {micro}) must be divisible by mesh data×fsdp = "
                                f"{n_batch_shards}: every batch-sharded device needs whole rows")
        self._step_fn = None
        self.compile_seconds = None
        self.history: list[StepRecord] = []
        from .validation import TaskRunner  # eval.tasks: benchmark tasks on the current parameters

        self.task_runner = TaskRunner(self) if cfg.eval.tasks else None

    # -------------------------------------------------------------- state
    def initialize(self) -> int:
        """Restore the newest good checkpoint, else build a fresh state. Returns the starting step."""
        restored = (self.ckpt.restore_latest(self.layout.abstract, config=self.cfg.to_dict())
                    if self.cfg.checkpoint.resume else None)
        if restored is not None:
            step, state, data_state, meta = restored
            self.state = state
            # The frozen parameters never change: rebuilt from model.init (the same seed / checkpoint).
            self.frozen = init_plan_state(self.plan, self.tx, self.layout, self.cfg.seed, self._init_params)[1]
            self.data.set_state(data_state)
            self.start_step = int(step)
            self._say(f"resumed from {self.ckpt.directory}/{step}")
        else:
            self.state, self.frozen = init_plan_state(self.plan, self.tx, self.layout, self.cfg.seed,
                                                      self._init_params)
            self.start_step = 0
        self._init_params = None
        self._forget_metrics_after(self.start_step)
        return self.start_step

    def _forget_metrics_after(self, step: int) -> None:
        """Drop ``metrics.jsonl`` rows past the step training restarts from: those steps are run again
        (after a crash, a kill, or a resume from an older checkpoint), so their rows would repeat."""
        f = Path(self.cfg.checkpoint.dir) / "metrics.jsonl"
        if jax.process_index() != 0 or not f.is_file():
            return
        lines = f.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and _row_step(ln) <= step]
        if len(kept) != len(lines):
            tmp = f.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(f)

    def _abstract_batch(self):
        if self.cfg.recipe == "dpo":
            from .dpo import abstract_pair_batch

            return abstract_pair_batch(self.layout, self.cfg.data.batch_size, self.cfg.data.seq_len)
        return abstract_batch(self.layout, self.cfg.data.batch_size, self.cfg.data.seq_len)

    def _check_batch(self, batch):
        if self.cfg.recipe == "dpo":
            from .dpo import check_pair_batch

            return check_pair_batch(batch, self.rows_per_host, self.cfg.data.seq_len, self.llama_cfg.vocab_size)
        return check_batch(batch, self.rows_per_host, self.cfg.data.seq_len, self.llama_cfg.vocab_size)

    def compile(self):
        if self._step_fn is None:
            if self.cfg.recipe == "dpo":
                from .dpo import make_dpo_step

                step = make_dpo_step(self.plan, self.tx, self.sched, self.cfg.dpo)
            else:
                step = make_train_step(self.model, self.tx, self.sched, self.modality, plan=self.plan,
                                       grad_accum=self.cfg.optim.grad_accum, z_loss=self.cfg.optim.z_loss)
            t0 = time.perf_counter()
            with shd.mesh_context(self.mesh):
                jitted = jit_train_step(step, self.layout)
                # The frozen arrays themselves (not their shapes): their device layouts (packed 4-bit
                # QLoRA weights) are what the compiled step must accept.
                self._step_fn = self._aot(jitted, self._abstract_batch())
            self.compile_seconds = time.perf_counter() - t0
        return self._step_fn

    # -------------------------------------------------------------- validation
    def evaluate(self) -> dict:
        """Held-out metrics on ``eval.batches`` batches of a fresh ``eval_data()`` iterator (same batches
        every time): token-weighted loss/accuracy per modality, or DPO's pair metrics averaged; plus the
        ``eval.tasks`` metrics (``<task>/<metric>``, train/validation.py)."""
        tasks = self.task_runner.run() if self.task_runner is not None else {}
        if self.eval_data is None:
            if tasks:
                return tasks
            raise TrainingError("eval.every is set but there is no held-out data: set eval.path (a prepared "
                                "dataset) or pass eval_data= to Trainer")
        if self._eval_fn is None:
            self._eval_fn = self._compile_eval()
        it = self.eval_data()
        totals, n = {}, 0
        for _ in range(self.cfg.eval.batches):
            try:
                raw = next(it)
            except StopIteration:
                break
            batch = global_batch(self._check_batch(raw), self.layout, self.cfg.data.batch_size)
            out = jax.device_get(self._eval_fn(self.state, batch, self.frozen))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        if n == 0:
            raise TrainingError("the held-out data (eval.path / eval.split) gave no batch")
        if self.cfg.recipe == "dpo":
            return {**{k: v / n for k, v in totals.items()}, **tasks}
        m = {"loss": totals["nll"] / max(totals["count"], 1.0), "accuracy": totals["correct"] / max(totals["count"], 1.0),
             "loss_tokens": totals["count"]}
        for name in ("text", "speech"):
            c = totals[f"count_{name}"]
            m[f"loss_{name}"] = totals[f"nll_{name}"] / c if c else float("nan")
            m[f"accuracy_{name}"] = totals[f"correct_{name}"] / c if c else float("nan")
        return {**m, **tasks}

    def _compile_eval(self):
        if self.cfg.recipe == "dpo":
            from .dpo import make_dpo_step

            fn = make_dpo_step(self.plan, self.tx, self.sched, self.cfg.dpo, train=False)
        else:
            modality = jnp.asarray(self.modality)
            plan = self.plan

            def fn(state, batch, frozen):
                logits = plan.logits(state["params"], frozen, batch["tokens"], batch["positions"],
                                     batch["segment_ids"])
                return loss_and_metrics(logits, batch["targets"], batch["loss_mask"], modality, 0.0, 1.0)[1]
        batch_sh = jax.tree.map(lambda a: a.sharding, self._abstract_batch())
        with shd.mesh_context(self.mesh):
            jitted = jax.jit(fn, in_shardings=(self.layout.shardings, batch_sh, self.layout.frozen_shardings),
                             out_shardings=NamedSharding(self.mesh, P()))
            return self._aot(jitted, self._abstract_batch())

    def _aot(self, jitted, batch):
        """Compile ahead of time for the state/batch/frozen layouts. QLoRA with 4-bit weights keeps the jit
        dispatch path instead: XLA:CPU may demand packed 4-bit layouts that arrays produced by another
        computation lack, and dispatch re-lays them out."""
        if self.plan.quantize in ("int4", "nf4"):
            return jitted
        frozen = self.frozen if self.frozen is not None else self.layout.frozen_abstract
        return jitted.lower(self.layout.abstract, batch, frozen).compile()

    # -------------------------------------------------------------- loop
    def train(self, until: int | None = None) -> list[StepRecord]:
        cfg = self.cfg
        if self.state is None:
            self.initialize()
        step_fn = self.compile()
        last = min(cfg.steps, until) if until is not None else cfg.steps
        writer = self._tb_writer()
        bar = self._progress(self.start_step, last)
        fpt = flops_per_token(self.llama_cfg, cfg.data.seq_len)
        peak = peak_tflops_per_device(cfg.peak_tflops_per_device) * 1e12 * jax.device_count()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * (2 if cfg.recipe == "dpo" else 1)
        pending = None  # (step, metrics on device) of the previous step, checked one step late
        t_log, steps_since = time.perf_counter(), 0
        try:
            step = self.start_step
            while step < last:
                batch = self._check_batch(next(self.data))
                data_state = self.data.get_state()
                self.state, metrics = step_fn(self.state, global_batch(batch, self.layout, cfg.data.batch_size),
                                              self.frozen)
                step += 1
                self.ckpt.check()  # a background save that failed (disk full) stops the run here
                steps_since += 1
                if pending is not None:
                    self._check(*pending)
                pending = (step, metrics)
                save_now = step % cfg.checkpoint.every == 0 or step == last
                if save_now or step % cfg.log_every == 0 or step == last:
                    m = self._check(*pending)
                    pending = None
                    dt = time.perf_counter() - t_log
                    m["tokens_per_s"] = tokens_per_step * steps_since / dt
                    m["mfu"] = (m["tokens_per_s"] * fpt / peak) if peak else float("nan")
                    m["step_time_s"] = dt / steps_since
                    t_log, steps_since = time.perf_counter(), 0
                    self._log(step, m, writer, bar)
                    if save_now:
                        self.ckpt.save(step, self.state, data_state,
                                       {"config": cfg.to_dict(), "metrics": _json_safe(m)})
                        t_log = time.perf_counter()  # the save's host time is not step time
                if cfg.eval.every and (step % cfg.eval.every == 0 or step == last):
                    self._log_eval(step, self.evaluate(), writer)
                    t_log = time.perf_counter()  # validation time is not step time
                if bar is not None:
                    bar.update(1)
            if pending is not None:
                self._check(*pending)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            self.ckpt.wait()
        self.start_step = step
        return self.history

    def close(self):
        self.ckpt.close()

    def _check(self, step: int, metrics) -> dict:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            self.ckpt.wait()
            good = self.ckpt.all_steps()
            where = f"{self.ckpt.directory}/{good[-1]}" if good else "none saved yet"
            raise TrainingDivergedError(
                f"non-finite training signal at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}. "
                f"Stopped without saving this state; the last good checkpoint is {where}. Lower optim.lr, "
                f"lengthen optim.warmup_steps, keep optim.clip_norm > 0, or check the data around this step.")
        return m

    # -------------------------------------------------------------- reporting
    def _say(self, msg: str):
        if jax.process_index() == 0:
            print(msg, file=self.console, flush=True)

    def _tb_writer(self):
        """TensorBoard (tensorboardX) and, with ``logging.wandb``, Weights & Biases, behind one
        ``add_scalar``/``flush``/``close`` writer; None when neither is on or on hosts other than 0."""
        if jax.process_index() != 0:
            return None
        writers = []
        if self.cfg.tensorboard:
            from tensorboardX import SummaryWriter

            writers.append(SummaryWriter(str(Path(self.cfg.checkpoint.dir) / "tensorboard")))
        if self.cfg.logging.wandb:
            writers.append(_WandbWriter(self.cfg))
        return _Writers(writers) if writers else None

    def _progress(self, start: int, last: int):
        if not self.cfg.progress or jax.process_index() != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=last, initial=start, desc="train", unit="step", file=self.console, dynamic_ncols=True)

    def _log(self, step: int, m: dict, writer, bar):
        self.history.append(StepRecord(step, m))
        if jax.process_index() != 0:
            return
        if writer is not None:
            for k, v in m.items():
                if math.isfinite(v):
                    writer.add_scalar(f"train/{k}", v, step)
            writer.flush()
        if self.cfg.recipe == "dpo":
            line = (f"step {step}: loss {m['loss']:.4f} pref acc {m['accuracy']:.3f} margin {m['reward_margin']:.3f} "
                    f"kl {m['kl']:.4f} gnorm {m['grad_norm']:.3f} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s")
        else:
            line = (f"step {step}: loss {m['loss']:.4f} acc {m['accuracy']:.3f} text {m['loss_text']:.3f} "
                    f"speech {m['loss_speech']:.3f} gnorm {m['grad_norm']:.3f} lr {m['lr']:.2e} "
                    f"{m['tokens_per_s']:.0f} tok/s mfu {m['mfu']:.1%}")
        if bar is not None:
            bar.set_postfix_str(f"loss {m['loss']:.4f}")
            bar.write(line, file=self.console)
        else:
            print(line, file=self.console, flush=True)
        with open(Path(self.cfg.checkpoint.dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **_json_safe(m)}) + "\n")


    def _log_eval(self, step: int, m: dict, writer):
        self.history.append(StepRecord(step, {f"eval/{k}": v for k, v in m.items()}))
        if jax.process_index() != 0:
            return
        if writer is not None:
            for k, v in m.items():
                if math.isfinite(v):
                    writer.add_scalar(f"eval/{k}", v, step)
            writer.flush()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "loss_tokens")
        print(f"eval step {step}: {shown}", file=self.console, flush=True)
        with open(Path(self.cfg.checkpoint.dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "split": "eval", **_json_safe(m)}) + "\n")


class _Writers:
    def __init__(self, writers):
        self.writers = writers

    def add_scalar(self, tag, value, step):
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


class _WandbWriter:
    """Weights & Biases run (``logging.wandb_mode=offline`` writes under <checkpoint.dir>/wandb, no network)."""

    def __init__(self, cfg):
        try:
            import wandb
        except ImportError:
            raise TrainingError("logging.wandb=true needs the wandb package: pip install wandb") from None
        self.run = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                              dir=str(Path(cfg.checkpoint.dir)), config=cfg.to_dict(), reinit=True)

    def add_scalar(self, tag, value, step):
        self.run.log({tag: value}, step=step)

    def flush(self):
        pass

    def close(self):
        self.run.finish()


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # an unreadable (half-written) row is dropped with the replayed ones


def _json_safe(m: dict) -> dict:
    return {k: (v if math.isfinite(v) else None) for k, v in m.items()}


def load_init_params(init: str, mesh, mc) -> tuple[LlamaConfig, Any]:
    """Parameters to start from: a converted spiritlm-jax dir (sharded restore) or an HF Llama dir."""
    from spiritlm_jax.converters.llama import FORMAT, load_converted, load_hf_params

    d = Path(init)
    if not (d / "config.json").is_file():
        raise TrainingError(f"model.init={init!r} is neither 'random' nor a model directory with a config.json")
    meta = json.loads((d / "config.json").read_text())
    if meta.get("format") == FORMAT:
        cfg, params = load_converted(d, mesh=mesh, dtype=mc.dtype, param_dtype=mc.param_dtype,
                                     scan_layers=mc.scan_layers, remat=mc.remat)
        return cfg, params
    cfg, params = load_hf_params(d, scan_layers=mc.scan_layers, dtype=mc.param_dtype)
    return cfg, params


def write_loss_curve(metrics_file: str | Path, out_png: str | Path) -> Optional[Path]:
    """Plot loss (total, text, speech) against step from ``metrics.jsonl`` (the last record of a step
    wins, so steps replayed after a resume are drawn once)."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return None
    rows = {}
    for line in metrics_file.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("split") != "eval":  # validation rows share the step numbers
                rows[r["step"]] = r
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "all tokens"), ("loss_text", "text tokens"), ("loss_speech", "speech tokens")):
        ys = [rows[s].get(key) for s in steps]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Spirit LM training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
