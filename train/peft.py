"""Which parameters a run trains, and how the model is applied to them: full fine-tuning, freezing by
parameter path, LoRA and QLoRA (adapters from Google's ``qwix``).

A :class:`ParamPlan` splits the model's parameters into

* ``trainable``: what the optimizer updates, has AdamW moments and is checkpointed every
  ``checkpoint.every`` steps — all parameters (pretraining), those whose path matches
  ``optim.trainable`` (freezing by path), or only the LoRA adapters (``lora.rank > 0``);
* ``frozen``: everything else, rebuilt from ``model.init`` on every start (it never changes), stored
  in the compute dtype (``model.dtype``: no fp32 master copy of weights that are never updated), kept
  sharded by the same logical rules and passed to the jitted step as an argument (never a constant).
  With QLoRA (``lora.quantize``) the frozen weights of the adapted modules are stored quantized
  (``qwix.quantize``: int8 / int4 / nf4 with per-channel or ``lora.tile_size`` block scales) and go
  into the model as stored: ``Llama.layer_params`` dequantizes one layer at a time inside the layer
  scan (and its remat), so the step holds the 4-bit base plus one layer in the compute dtype.

LoRA: ``qwix.LoraProvider`` with one ``qwix.LoraRule(module_path=lora.modules, rank, alpha)`` wraps our
linen Llama (``qwix.apply_lora_to_model``). qwix intercepts the weight einsums of the matching modules
and adds ``x·A·B·alpha/rank`` (A: he-uniform, B: zeros, so training starts exactly at the base model),
creating ``<weight>_lora_a`` / ``<weight>_lora_b`` next to each weight with the weight's logical axis
names (``q_lora_a``: (embed, None), ``q_lora_b``: (None, heads, head_dim)), so the adapters are sharded
by the same rules table as everything else. Two qwix limitations shape this module, checked with
qwix 0.1.8 (notes/issue-14.md):

* its linen einsum path records a debug attribute on the module (``setattr(module,
  '<w>_lora_einsum_str', ...)``), which a linen ``@compact`` module refuses outside ``setup``
  (``SetAttributeFrozenModuleError``): :class:`LinenLoraProvider` opens that gate for the call only;
* its own QLoRA path (``LoraRule(weight_qtype=...)`` + ``qwix.quantize_params``) computes scales over
  the stacked ``layers`` axis of ``nn.scan`` (scale shape (1, …): the scan then fails) and, when two
  weights of a module have the same shape (k/v, gate/up), cannot tell them apart and silently gives
  them no adapter. QLoRA here therefore quantizes the frozen base with ``qwix.quantize`` (per layer,
  per output channel) and keeps qwix for the adapters only.

Merging (:func:`merge_lora`): ``W + (alpha/rank) · A·B`` per adapted weight, dequantized first under
QLoRA; the merged tree is a plain Llama parameter tree (tested: same logits as base + adapters).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from spiritlm_jax import sharding as shd
from spiritlm_jax.config import LlamaConfig, dtype_of
from spiritlm_jax.models.llama import OUTPUT_MAJOR, Llama

from .trainer import TrainingError

LORA_SUFFIXES = ("_lora_a", "_lora_b")
# The weights whose matmuls LoRA adapts and QLoRA quantizes, with the logical axes each matmul
# contracts (its inputs): per-output-channel scales are over the other axes.
ADAPTED_WEIGHTS = {"q": ("embed",), "k": ("embed",), "v": ("embed",), "o": ("heads", "head_dim"),
                   "gate": ("embed",), "up": ("embed",), "down": ("mlp",)}
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}


class PeftError(TrainingError):
    """A LoRA / freezing setting that cannot work (a rule that matches nothing, ...)."""


def path_name(path: tuple) -> str:
    """``("layers_3", "mlp", "up")`` → ``"layers_3/mlp/up"`` (the names ``optim.trainable`` matches)."""
    return "/".join(str(p) for p in path)


# ====================================================================== qwix

def _qwix():
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - qwix is a core training dependency
        raise PeftError("LoRA needs the qwix package: pip install 'spiritlm-jax[train]'") from e
    return qwix


def lora_provider(rank: int, alpha: float, modules: str):
    """A qwix LoRA provider with one rule, usable on our linen Llama."""
    qwix = _qwix()
    from qwix._src.utils import flax_util

    class LinenLoraProvider(qwix.LoraProvider):
        """qwix's LoRA provider; its einsum records a debug attribute on the current module, which a
        linen @compact module only accepts inside ``setup``: open that gate for the call. The adapter
        term is computed in the adapters' dtype (fp32); the result goes back to the activations' dtype
        (bf16 compute stays bf16, and nn.scan's carry keeps its type)."""

        def einsum(self, einsum_str, *operands, **kwargs):
            module = flax_util.get_current_module()
            state = module._state
            was = state.in_setup
            state.in_setup = True
            try:
                out = super().einsum(einsum_str, *operands, **kwargs)
            finally:
                state.in_setup = was
            return out.astype(operands[0].dtype)

    return LinenLoraProvider([qwix.LoraRule(module_path=modules, rank=rank, alpha=alpha)])


# ====================================================================== the plan

@dataclasses.dataclass
class ParamPlan:
    """How a run's parameters split and how the model is applied (see the module docstring)."""

    llama_cfg: LlamaConfig
    trainable: str = ""  # optim.trainable regex ("" = all)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_modules: str = ".*/(attn|mlp)"
    quantize: str = "none"
    tile_size: int = 0
    # (vocab_size,) bool: the rows of vocabulary-axis parameters that train (optim.trainable_rows); None = all
    row_mask: Any = None

    def __post_init__(self):
        self.model = Llama(self.llama_cfg)
        self.init_model = self.model
        if self.lora_rank and self.quantize != "none":
            # QLoRA: the quantized base goes into the model as stored; each layer is dequantized inside
            # the layer scan (and its remat), so one layer of compute-dtype weights exists at a time.
            self.model = Llama(self.llama_cfg, layer_params=functools.partial(
                dequantize_tree, dtype=dtype_of(self.llama_cfg.dtype)))
        self.apply_model = self.model
        if self.lora_rank:
            wrap = lambda m: _qwix().apply_lora_to_model(m, lora_provider(self.lora_rank, self.lora_alpha,
                                                                           self.lora_modules))
            self.apply_model = wrap(self.model)
            # Adapters are created with the compute dtype = the parameter dtype: qwix finds the weight an
            # einsum uses by identity there, while under jit-init a bf16 cast of a fresh weight can defeat
            # its tracer walk and leave it guessing by shape (q, k, v of equal shape: "Multiple candidate
            # params"). The parameter tree does not depend on the compute dtype.
            self.init_model = wrap(Llama(self.llama_cfg.replace(dtype=self.llama_cfg.param_dtype)))
        self._pattern = re.compile(self.trainable) if self.trainable else None
        self.vocab_axes = {}  # trained parameter path -> index of its vocabulary axis (set by check)

    @classmethod
    def from_config(cls, cfg, llama_cfg: LlamaConfig, modality=None) -> "ParamPlan":
        """``modality``: the (vocab_size,) token-modality table (trainer.modality_table), for
        ``optim.trainable_rows=speech``."""
        lo = cfg.lora
        rows = trainable_row_mask(cfg.optim.trainable_rows, llama_cfg.vocab_size, modality)
        return cls(llama_cfg, cfg.optim.trainable, lo.rank, lo.alpha, lo.modules, lo.quantize, lo.tile_size, rows)

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def trains_everything(self) -> bool:
        return not self.is_lora and self._pattern is None

    # -------------------------------------------------------------- params
    def boxed_params(self, rng):
        """All parameters (adapters included) with their logical-axis boxes; use under eval_shape/jit."""
        return self.init_model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    def is_trainable(self, path: tuple) -> bool:
        name = path_name(path)
        if self.is_lora:
            return name.endswith(LORA_SUFFIXES)
        return self._pattern is None or self._pattern.search(name) is not None

    def split(self, tree) -> tuple[dict, dict]:
        """A full parameter tree → (trainable, frozen) subtrees (nested dicts, same leaves)."""
        flat = traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))
        tr = {k: v for k, v in flat.items() if self.is_trainable(k)}
        fr = {k: v for k, v in flat.items() if not self.is_trainable(k)}
        return traverse_util.unflatten_dict(tr), traverse_util.unflatten_dict(fr)

    def check(self, abstract_full) -> None:
        """Refuse a plan that trains nothing (a LoRA rule or ``optim.trainable`` that matches nothing, or
        ``optim.trainable_rows`` with no trained vocabulary-axis parameter); note where the vocabulary axis
        of each trained parameter is (for the row mask)."""
        boxed = traverse_util.flatten_dict(abstract_full, is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))
        self.vocab_axes = {k: tuple(b.names).index("vocab") for k, b in boxed.items()
                           if self.is_trainable(k) and isinstance(b, nn.LogicallyPartitioned) and "vocab" in b.names}
        if self.row_mask is not None and not self.vocab_axes:
            raise PeftError(f"optim.trainable_rows selects rows of embed/embedding and lm_head, but neither trains "
                            f"under optim.trainable={self.trainable!r}: add them, e.g. '^(embed|lm_head)'")
        flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_full))
        names = [path_name(k) for k in flat]
        if any(self.is_trainable(k) for k in flat):
            return
        if self.is_lora:
            modules = sorted({n.rsplit("/", 1)[0] for n in names})
            raise PeftError(f"lora.modules={self.lora_modules!r} matches no module with a weight matmul, so there "
                            f"would be no adapter to train; module paths look like {modules[:6]} — e.g. "
                            f"lora.modules='.*/(attn|mlp)' (attention and MLP of every layer)")
        raise PeftError(f"optim.trainable={self.trainable!r} matches no parameter; parameter paths look like "
                        f"{names[:6]}" + (" (layers are stacked under 'layers' with model.scan_layers=true: set "
                                          "model.scan_layers=false to select single layers)"
                                          if "layers_" in self.trainable and self.llama_cfg.scan_layers else ""))

    def frozen_storage(self, tree):
        """Frozen floats are kept in the compute dtype (they are never updated: no fp32 master copy)."""
        dt = dtype_of(self.llama_cfg.dtype)
        return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    # -------------------------------------------------------------- row freezing
    def _row_where(self, new, old):
        """Leaves with a vocabulary axis: ``new`` on the trained rows, ``old`` on the others."""
        if self.row_mask is None:
            return new
        mask = jnp.asarray(self.row_mask)
        flat_new, flat_old = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
        for k, axis in self.vocab_axes.items():
            shape = [1] * flat_new[k].ndim
            shape[axis] = mask.shape[0]
            flat_new[k] = jnp.where(mask.reshape(shape), flat_new[k], flat_old[k])
        return traverse_util.unflatten_dict(flat_new)

    def mask_frozen_rows(self, grads):
        """Zero gradients on the frozen rows (before clipping: they do not count in the global norm)."""
        return self._row_where(grads, jax.tree.map(jnp.zeros_like, grads))

    def keep_frozen_rows(self, new_params, params):
        """The frozen rows of the updated parameters back to their old values, bit for bit (AdamW's
        decoupled weight decay would otherwise still move them)."""
        return self._row_where(new_params, params)

    # -------------------------------------------------------------- QLoRA storage
    def is_quantized(self, path: tuple) -> bool:
        if not self.is_lora or self.quantize == "none" or path[-1] not in ADAPTED_WEIGHTS:
            return False
        return re.fullmatch(self.lora_modules, path_name(path[:-1])) is not None

    def quantize_frozen(self, frozen, names_tree) -> dict:
        """Quantize the frozen weights of the adapted modules (QLoRA); others stay as they are.
        ``names_tree``: the logical axis names of each frozen leaf (same structure)."""
        qwix = _qwix()
        flat = traverse_util.flatten_dict(frozen)
        names = traverse_util.flatten_dict(names_tree, is_leaf=lambda _, x: isinstance(x, tuple))
        out = {}
        for k, w in flat.items():
            if not self.is_quantized(k):
                out[k] = w
                continue
            axes = names[k]
            contracted = [i for i, n in enumerate(axes) if n in ADAPTED_WEIGHTS[k[-1]]]
            channelwise = [i for i in range(w.ndim) if i not in contracted]
            tiles = {contracted[-1]: self.tile_size} if self.tile_size else None
            out[k] = qwix.quantize(w, QTYPES[self.quantize], channelwise_axes=channelwise, tiled_axes=tiles,
                                   scale_dtype=jnp.float32)
        return traverse_util.unflatten_dict(out)

    def dequantized_outside_layers(self, frozen) -> dict:
        """The frozen tree as the model takes it: quantized weights of the layers stay quantized (the
        model dequantizes them one layer at a time, ``Llama.layer_params``); any other quantized leaf is
        dequantized here."""
        dt = dtype_of(self.llama_cfg.dtype)
        return {k: (v if k == "layers" or k.startswith("layers_") else dequantize_tree(v, dt))
                for k, v in frozen.items()}

    # -------------------------------------------------------------- apply
    def full_params(self, trainable, frozen) -> dict:
        base = self.dequantized_outside_layers(frozen.get("params", {}))
        return merge_trees(base, trainable)

    def logits(self, trainable, frozen, tokens, positions, segment_ids):
        logits, _ = self.apply_model.apply({"params": self.full_params(trainable, frozen)}, tokens,
                                           positions=positions, segment_ids=segment_ids)
        return logits

    def reference_logits(self, trainable, frozen, tokens, positions, segment_ids):
        """The frozen starting model (DPO's reference): the base with the adapters off (LoRA, no second
        copy of the weights), or the starting trainable parameters kept in ``frozen['reference']``."""
        base = self.dequantized_outside_layers(frozen.get("params", {}))
        if self.is_lora:
            params = base
        else:
            params = merge_trees(base, frozen["reference"])
        logits, _ = self.model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
        return jax.lax.stop_gradient(logits)


def trainable_row_mask(spec: str, vocab_size: int, modality=None):
    """``optim.trainable_rows`` → a (vocab_size,) bool mask of the rows that train, or None (all rows)."""
    from .config import parse_row_ranges
    from .trainer import SPEECH

    if not spec:
        return None
    ranges = parse_row_ranges(spec)
    if ranges is None:  # "speech"
        if modality is None:
            raise PeftError("optim.trainable_rows=speech needs the vocabulary layout (model.vocab_layout)")
        mask = np.asarray(modality) == SPEECH
        if not mask.any():
            raise PeftError("optim.trainable_rows=speech, but the vocabulary layout (model.vocab_layout) has no "
                            "speech rows; set model.vocab_layout (e.g. speech=32000:32512) or give id ranges")
        return mask
    mask = np.zeros((vocab_size,), bool)
    for a, b in ranges:
        if b > vocab_size:
            raise PeftError(f"optim.trainable_rows range {a}:{b} is outside the vocabulary (0..{vocab_size})")
        mask[a:b] = True
    return mask


def dequantize_tree(tree, dtype):
    """Every ``qwix.QArray`` leaf of ``tree`` back in ``dtype`` (others unchanged)."""
    qwix = _qwix()
    return jax.tree.map(lambda x: qwix.dequantize(x).astype(dtype) if isinstance(x, qwix.QArray) else x, tree,
                        is_leaf=lambda x: isinstance(x, qwix.QArray))


def merge_trees(a: dict, b: dict) -> dict:
    """Union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


# ====================================================================== merging adapters

def lora_delta(a, b, weight_shape, scale: float, *, output_major: bool = False):
    """``scale · A·B`` in the weight's shape. A: (*stack, *inputs, r), B: (*stack, r, *outputs) — the layout
    qwix gives our einsum weights — and the weight (*stack, *inputs, *outputs), or (*stack, *outputs,
    *inputs) when ``output_major`` (the Llama's 2-D weights, ``models.llama.OUTPUT_MAJOR``)."""
    n_stack = a.ndim + b.ndim - 2 - len(weight_shape)
    stack = a.shape[:n_stack]
    ins, outs = a.shape[n_stack:-1], b.shape[n_stack + 1:]
    stored = tuple(stack) + (tuple(outs) + tuple(ins) if output_major else tuple(ins) + tuple(outs))
    if stored != tuple(weight_shape) or a.shape[-1] != b.shape[n_stack]:
        raise PeftError(f"adapter shapes A {a.shape}, B {b.shape} do not factor a weight of shape {weight_shape}")
    a2 = a.reshape(*stack, int(np.prod(ins)), a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*stack, b.shape[n_stack], int(np.prod(outs))).astype(jnp.float32)
    delta = jnp.einsum("...ir,...ro->...oi" if output_major else "...ir,...ro->...io", a2, b2)
    return (scale * delta).reshape(weight_shape)


def merge_lora(params: dict, rank: int, alpha: float, dtype=None) -> dict:
    """A parameter tree with ``<w>_lora_a/_lora_b`` leaves (base possibly quantized) → a plain Llama tree
    with ``W + (alpha/rank)·A·B`` (fp32 sum, cast to ``dtype`` or W's float dtype)."""
    qwix = _qwix()
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, qwix.QArray))
    flat = {k: (jax.tree.map(jnp.asarray, v) if isinstance(v, qwix.QArray) else jnp.asarray(v)) for k, v in flat.items()}
    out = {}
    for k, w in flat.items():
        if str(k[-1]).endswith(LORA_SUFFIXES):
            continue
        if isinstance(w, qwix.QArray):
            w = qwix.dequantize(w)
        ka, kb = k[:-1] + (f"{k[-1]}_lora_a",), k[:-1] + (f"{k[-1]}_lora_b",)
        if ka in flat:
            merged = w.astype(jnp.float32) + lora_delta(flat[ka], flat[kb], w.shape, alpha / rank,
                                                        output_major=k[-1] in OUTPUT_MAJOR)
            w = merged.astype(dtype or w.dtype)
        elif dtype is not None:
            w = w.astype(dtype)
        out[k] = w
    return traverse_util.unflatten_dict(out)


# ====================================================================== shardings of the frozen tree

def frozen_abstract(plan: ParamPlan, boxed_frozen, mesh, with_reference_of=None):
    """(abstract frozen tree with shardings, shardings) — quantized leaves get their weight's sharding
    for the values and a replicated-where-uneven sharding for the scales."""
    specs = nn.get_partition_spec(boxed_frozen)
    unboxed = nn.meta.unbox(boxed_frozen)
    names = jax.tree.map(lambda b: tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * b.ndim,
                         boxed_frozen, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    unboxed = jax.eval_shape(plan.frozen_storage, unboxed)
    abstract = unboxed
    if plan.is_lora and plan.quantize != "none":
        abstract = jax.eval_shape(lambda t: plan.quantize_frozen(t, names), unboxed)
        qwix = _qwix()
        flat_abs = traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: isinstance(x, qwix.QArray))
        flat_names = traverse_util.flatten_dict(names, is_leaf=lambda _, x: isinstance(x, tuple))
        sh = {}
        for k, a in flat_abs.items():
            spec = PartitionSpec(*flat_names[k])
            # a QArray's values and scales (size 1 on the contracted axes: replicated there) share the spec
            sh[k] = jax.tree.map(lambda leaf, spec=spec: shd.logical_sharding(spec, mesh, leaf), a)
        shardings = traverse_util.unflatten_dict(sh)
    else:
        shardings = shd.logical_sharding(specs, mesh, unboxed)
    tree = {"params": abstract}
    sh_tree = {"params": shardings}
    if with_reference_of is not None:
        ref_abs, ref_sh = with_reference_of
        tree["reference"], sh_tree["reference"] = jax.eval_shape(plan.frozen_storage, ref_abs), ref_sh
    abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh_tree)
    return abstract_sh, sh_tree



# ====================================================================== export

def export_merged(trainer, out_dir, *, adapters_only: bool = False, overwrite: bool = False):
    """Write a trained run as a converted spiritlm-jax Llama directory (``model.init`` / ``SpiritLM``
    load it like a ``spiritlm-jax convert llama`` output): the base with the LoRA adapters merged in
    (QLoRA: dequantized first), or the fully / partially fine-tuned parameters; the init directory's
    tokenizer files are copied. ``adapters_only``: write just the adapters (``adapters/``, small) and
    an ``adapter_config.json`` naming the base, restorable onto it with ``lora.*`` and ``model.init``."""
    import json
    import shutil
    from pathlib import Path

    import orbax.checkpoint as ocp

    from spiritlm_jax.converters.llama import TOKENIZER_FILES, WEIGHTS, converted_meta

    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass overwrite")
        shutil.rmtree(out)
    if trainer.state is None:
        trainer.initialize()
    plan, cfg = trainer.plan, trainer.llama_cfg
    trainable = jax.device_get(trainer.state["params"])
    out.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    if adapters_only:
        if not plan.is_lora:
            raise PeftError("adapters_only needs a LoRA run (lora.rank > 0)")
        ckptr.save(out / "adapters", trainable)
        ckptr.wait_until_finished()
        (out / "adapter_config.json").write_text(json.dumps(
            {"format": "spiritlm-jax/lora", "base": trainer.cfg.model.init, "rank": plan.lora_rank,
             "alpha": plan.lora_alpha, "modules": plan.lora_modules, "quantize": plan.quantize,
             "layout": "scan" if cfg.scan_layers else "unrolled", "weights": WEIGHTS}, indent=1))
        return out
    frozen = jax.device_get(trainer.frozen["params"])
    full = merge_trees(frozen, trainable)
    params = merge_lora(full, plan.lora_rank, plan.lora_alpha, jnp.float32) if plan.is_lora else full
    ckptr.save(out / "params", jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    meta = converted_meta(cfg, stored_dtype="float32", source=f"fine-tuned from {trainer.cfg.model.init} "
                                                            f"({trainer.cfg.recipe}{', LoRA' if plan.is_lora else ''})")
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    init = Path(trainer.cfg.model.init)
    for name in TOKENIZER_FILES:
        if init.is_dir() and (init / name).exists():
            shutil.copy2(init / name, out / name)
    return out


def export_peft_run(step_dir, cfg_dict: dict, dst, *, overwrite: bool = False, log=print):
    """``spiritlm-jax export RUN`` for a LoRA / partially frozen run (its checkpoints hold only the trained
    parameters): rebuild the base from the run's ``model.init``, restore the step, merge, write."""
    from pathlib import Path

    from spiritlm_jax import sharding as shd

    from .config import TrainConfig
    from .trainer import Trainer

    step_dir = Path(step_dir)
    cfg = TrainConfig.from_dict(cfg_dict).override(
        f"checkpoint.dir={step_dir.parent}", "checkpoint.resume=true", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
        f"data.batch_size={jax.device_count()}", "optim.grad_accum=1")  # no data is read
    trainer = Trainer(cfg, _NoData(), mesh=shd.make_mesh((1, -1, 1)))
    try:
        restored = trainer.ckpt.restore(int(step_dir.name), trainer.layout.abstract)
        trainer.state = restored[0]
        from .trainer import init_plan_state

        trainer.frozen = init_plan_state(trainer.plan, trainer.tx, trainer.layout, cfg.seed, trainer._init_params)[1]
        out = export_merged(trainer, dst, overwrite=overwrite)
    finally:
        trainer.close()
    log(f"merged the trained parameters of {step_dir} onto {cfg.model.init}")
    return out


class _NoData:
    """Export reads no data."""

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return {}

    def set_state(self, state):
        pass
