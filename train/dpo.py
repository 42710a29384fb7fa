"""Direct preference optimisation (``recipe=dpo``) for interleaved speech and text.

A batch holds B preference pairs: every array is (B, 2, T), index 0 = prompt + chosen response,
1 = prompt + rejected response (one sequence per row, padded; ``loss_mask`` is 1 on the positions
whose target is a response token, so the prompt is context only). With
``logp(y) = Σ_t loss_mask · log π(target_t | prefix)`` for the policy π and the frozen reference π_ref:

    h      = [logp_π(chosen) − logp_ref(chosen)] − [logp_π(rejected) − logp_ref(rejected)]
    sigmoid (Rafailov et al. 2023):  L = −(1−ε)·log σ(β h) − ε·log σ(−β h)      (ε = label smoothing)
    ipo     (Azar et al. 2023):      L = (h − 1/(2β))²

averaged over pairs. Logged: ``reward_chosen`` / ``reward_rejected`` (β × log-ratio), ``reward_margin``
(β h), ``accuracy`` (h > 0: the implicit reward prefers the chosen answer), ``policy_accuracy``
(logp_π(chosen) > logp_π(rejected): the policy itself prefers it), and ``kl`` — the mean per-token
KL(π ‖ π_ref) over response tokens, from the full distributions.

The reference log-probs are computed on the fly, in the same step, from the frozen starting model
(``ParamPlan.reference_logits``): with LoRA it is the base with the adapters off (no second copy of the
weights); a full fine-tune keeps one frozen copy of the starting trainable parameters. On the fly rather
than precomputed into the dataset: the dataset then does not depend on the model, and a LoRA reference
costs only one more forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .trainer import BATCH_KEYS, TrainingError


def sequence_logps(logits, targets, mask):
    """Σ_t mask · log softmax(logits)[target] per row: (..., T, V), (..., T) → (...)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(tok * mask, axis=-1)


def token_kl(logits, ref_logits, mask):
    """(Σ over masked tokens of KL(π ‖ π_ref), number of masked tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.sum(kl * mask), jnp.sum(mask)


def dpo_loss(policy_logps, reference_logps, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair loss and the implicit-reward terms from (B, 2) sequence log-probs (chosen, rejected)."""
    ratio = policy_logps - reference_logps  # (B, 2)
    h = ratio[:, 0] - ratio[:, 1]
    if loss == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    return per_pair, beta * ratio, h


def make_dpo_step(plan, tx, sched, dpo_cfg, *, train: bool = True):
    """``step(state, batch, frozen) -> (state, metrics)`` (``train=False``: ``metrics`` only, no update)."""

    def objective(params, batch, frozen):
        B, _, T = batch["tokens"].shape
        flat = {k: batch[k].reshape(2 * B, T) for k in BATCH_KEYS}  # rows 2i = chosen i, 2i+1 = rejected i
        logits = plan.logits(params, frozen, flat["tokens"], flat["positions"], flat["segment_ids"])
        ref_logits = plan.reference_logits(params, frozen, flat["tokens"], flat["positions"], flat["segment_ids"])
        mask = flat["loss_mask"]
        pol = sequence_logps(logits, flat["targets"], mask).reshape(B, 2)
        ref = sequence_logps(ref_logits, flat["targets"], mask).reshape(B, 2)
        per_pair, rewards, h = dpo_loss(pol, ref, beta=dpo_cfg.beta, loss=dpo_cfg.loss,
                                        label_smoothing=dpo_cfg.label_smoothing)
        kl_sum, kl_count = token_kl(logits, ref_logits, mask)
        aux = {
            "reward_chosen": jnp.mean(rewards[:, 0]),
            "reward_rejected": jnp.mean(rewards[:, 1]),
            "reward_margin": jnp.mean(rewards[:, 0] - rewards[:, 1]),
            "accuracy": jnp.mean((h > 0).astype(jnp.float32)),
            "policy_accuracy": jnp.mean((pol[:, 0] > pol[:, 1]).astype(jnp.float32)),
            "kl": kl_sum / jnp.maximum(kl_count, 1.0),
            "logp_chosen": jnp.mean(pol[:, 0]),
            "logp_rejected": jnp.mean(pol[:, 1]),
            "loss_tokens": kl_count,
        }
        return jnp.mean(per_pair), aux

    if not train:
        def evaluate(state, batch, frozen):
            loss, aux = objective(state["params"], batch, frozen)
            return {"loss": loss, **aux}

        return evaluate

    def step(state, batch, frozen):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], batch, frozen)
        grads = plan.mask_frozen_rows(grads)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = plan.keep_frozen_rows(optax.apply_updates(state["params"], updates), state["params"])
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": gnorm, "lr": sched(state["step"]), **aux}

    return step


def check_pair_batch(batch: dict, pairs: int, seq_len: int, vocab_size: int) -> dict:
    """A host's DPO batch: every key (pairs, 2, seq_len), ids inside the vocabulary."""
    missing = set(BATCH_KEYS) - set(batch)
    if missing:
        raise TrainingError(f"a DPO batch is missing {sorted(missing)}; it needs {sorted(BATCH_KEYS)}")
    out = {}
    for k, dt in BATCH_KEYS.items():
        a = np.asarray(batch[k])
        if a.shape != (pairs, 2, seq_len):
            raise TrainingError(f"DPO batch[{k!r}] has shape {a.shape}, expected ({pairs}, 2, {seq_len}): "
                                f"data.batch_size pairs per step (over all hosts), chosen and rejected rows")
        out[k] = a.astype(dt, copy=False)
    lo, hi = int(out["tokens"].min()), int(out["tokens"].max())
    if lo < 0 or hi >= vocab_size:
        raise TrainingError(f"DPO batch holds token ids in [{lo}, {hi}] outside the vocabulary [0, {vocab_size})")
    return out


def abstract_pair_batch(layout, pairs: int, seq_len: int):
    return {k: jax.ShapeDtypeStruct((pairs, 2, seq_len), np.dtype(dt), sharding=layout.batch_sharding)
            for k, dt in BATCH_KEYS.items()}
