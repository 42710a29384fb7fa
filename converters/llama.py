"""Hugging Face Llama checkpoint (what Spirit LM ships) → our Flax parameters and an orbax checkpoint.

Input: an HF model directory with ``config.json`` and one of ``pytorch_model.bin``, sharded
``pytorch_model-0000x-of-0000y.bin`` + ``pytorch_model.bin.index.json``, ``model.safetensors`` or sharded
safetensors + index. Tensors stream one at a time (memory-mapped, pages released after use), so peak
memory is about one copy of the converted parameters.

Output directory (``convert_llama``)::

    config.json           {"format": "spiritlm-jax/llama", "llama": LlamaConfig fields, "layout": "scan"|"unrolled"}
    params/               orbax checkpoint of the parameter pytree (dtype as stored, or --dtype)
    tokenizer.model, tokenizer_config.json, special_tokens_map.json, generation_config.json  (copied if present)

The key mapping is the schema table ``llama_rows`` (our path, HF key, HF shape, transform with its
inverse; ``converters/schema.py``), which ``converters/export.py`` runs backwards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from spiritlm_jax.model_dir import is_float_dtype

from spiritlm_jax.config import LlamaConfig, dtype_of
from . import torch_io
from .schema import Row
from .torch_io import CheckpointError, check_keys, check_shape
from .transforms import COPY, heads_in, heads_out


# ---------------------------------------------------------------- the table (HF torch layout ↔ ours)

def llama_rows(cfg: LlamaConfig) -> list[Row]:
    """The schema: (our path, HF key, HF shape, transform) for every tensor. Layer rows carry the layer
    index after ``layers`` (stacked on a leading axis when scanned, ``layers_<i>`` when unrolled)."""
    E, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
    rows = [Row.one(("embed", "embedding"), "model.embed_tokens.weight", (V, E), COPY),
            Row.one(("final_norm", "scale"), "model.norm.weight", (E,), COPY)]
    if not cfg.tie_word_embeddings:
        rows.append(Row.one(("lm_head",), "lm_head.weight", (V, E), COPY))
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        rows += [
            Row.one(("layers", i, "attn", "q"), hf + "self_attn.q_proj.weight", (H * D, E), heads_in(H, D)),
            Row.one(("layers", i, "attn", "k"), hf + "self_attn.k_proj.weight", (K * D, E), heads_in(K, D)),
            Row.one(("layers", i, "attn", "v"), hf + "self_attn.v_proj.weight", (K * D, E), heads_in(K, D)),
            Row.one(("layers", i, "attn", "o"), hf + "self_attn.o_proj.weight", (E, H * D), heads_out(H, D)),
            Row.one(("layers", i, "mlp", "gate"), hf + "mlp.gate_proj.weight", (I, E), COPY),
            Row.one(("layers", i, "mlp", "up"), hf + "mlp.up_proj.weight", (I, E), COPY),
            Row.one(("layers", i, "mlp", "down"), hf + "mlp.down_proj.weight", (E, I), COPY),
            Row.one(("layers", i, "attn_norm", "scale"), hf + "input_layernorm.weight", (E,), COPY),
            Row.one(("layers", i, "mlp_norm", "scale"), hf + "post_attention_layernorm.weight", (E,), COPY),
        ]
    return rows


# Keys HF checkpoints may carry that hold no parameters.
IGNORED_KEYS = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"]


def expected_keys(cfg: LlamaConfig) -> dict[str, Row]:
    """HF key → its row."""
    return {r.keys[0]: r for r in llama_rows(cfg)}


def split_layer(path: tuple) -> tuple[tuple[str, ...], int | None]:
    """("layers", i, "attn", "q") → (("attn", "q"), i); a global path → (path, None)."""
    if len(path) > 1 and path[0] == "layers" and isinstance(path[1], int):
        return tuple(path[2:]), path[1]
    return tuple(path), None


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def iter_converted(tensors: Iterable[tuple[str, np.ndarray]], cfg: LlamaConfig, *, dtype: str | None = None,
                   where: str = "checkpoint", progress: bool = False):
    """Map (HF key, array) pairs through the table, checking every key and shape as they stream.

    Yields (our key path within one layer or globally, layer index or None, converted array). After the
    last tensor, raises one error listing every missing and unexpected key.
    """
    table = expected_keys(cfg)
    seen: set[str] = set()
    unexpected: list[str] = []
    if progress:
        import sys

        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(table), desc="converting tensors", unit="tensor", file=sys.stderr)
    for key, arr in tensors:
        if key not in table:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints still store the head; ours reuses the embedding
            unexpected.append(key)
            continue
        if key in seen:
            raise CheckpointError(f"{where}: tensor {key!r} appears twice (overlapping shards?)")
        seen.add(key)
        row = table[key]
        check_shape(key, arr, row.shapes[0], where=where)
        if is_float_dtype(arr.dtype) and not np.all(np.isfinite(arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr)):
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values; the checkpoint is damaged "
                                  f"(re-copy it from the release); nothing was converted")
        out = row.transform.forward(arr)
        out = np.array(out, dtype=np.dtype(dtype_of(dtype)) if dtype else out.dtype, copy=True)  # own contiguous copy
        keys, layer = split_layer(row.path)
        yield keys, layer, out
    check_keys(seen | set(unexpected), table.keys(), where=where, ignore=[re.compile(p) for p in IGNORED_KEYS])


def convert_tensors(tensors: Iterable[tuple[str, np.ndarray]], cfg: LlamaConfig, *, scan_layers: bool = True,
                    dtype: str | None = None, where: str = "checkpoint", progress: bool = False) -> dict:
    """Stream (HF key, array) pairs into our parameter pytree (numpy), in memory.

    ``dtype``: cast to this dtype ("float32", "bfloat16"); default keeps the stored dtype.
    """
    params: dict = {}
    L = cfg.num_hidden_layers
    stacked: dict = {}
    for keys, layer, out in iter_converted(tensors, cfg, dtype=dtype, where=where, progress=progress):
        if layer is None:
            _set(params, keys, out)
        elif scan_layers:
            if keys not in stacked:
                stacked[keys] = np.empty((L,) + out.shape, out.dtype)
                _set(params, ("layers",) + keys, stacked[keys])
            stacked[keys][layer] = out
        else:
            _set(params, (f"layers_{layer}",) + keys, out)
    return params


def load_hf_params(model_dir: str | Path, cfg: LlamaConfig | None = None, *, scan_layers: bool = True,
                   dtype: str | None = None, allow_classes=(), progress: bool = False) -> tuple[LlamaConfig, dict]:
    """Read an HF Llama directory into (config, numpy params) in memory — the converter without orbax."""
    model_dir = Path(model_dir)
    cfg = cfg or LlamaConfig.from_hf(model_dir)
    cfg = cfg.replace(scan_layers=scan_layers)
    params = convert_tensors(torch_io.iter_hf_tensors(model_dir, allow_classes=allow_classes), cfg,
                             scan_layers=scan_layers, dtype=dtype, where=str(model_dir), progress=progress)
    return cfg, params


def _stored_dtype(model_dir: Path, dtype: str | None) -> str:
    if dtype:
        return dtype
    declared = json.loads((model_dir / "config.json").read_text()).get("torch_dtype") or "float32"
    return declared if declared in ("float32", "bfloat16", "float16") else "float32"


def stream_convert(model_dir: Path, params_dir: Path, cfg: LlamaConfig, *, scan_layers: bool, dtype: str,
                   allow_classes=(), progress: bool = False) -> None:
    """Convert tensor by tensor straight into an orbax checkpoint (peak memory ≈ a few tensors)."""
    import flax.linen as nn

    from spiritlm_jax.models.llama import abstract_params
    from .orbax_io import StreamingWriter, leaf_items

    abstract = nn.meta.unbox(abstract_params(cfg.replace(scan_layers=scan_layers)))
    leaves = {}
    for keys, leaf in leaf_items(abstract):
        leaves[keys] = (leaf.shape, np.dtype(dtype_of(dtype)), scan_layers and keys[0] == "layers")
    writer = StreamingWriter(params_dir, leaves)
    src = np.dtype(dtype_of(dtype))
    for keys, layer, out in iter_converted(torch_io.iter_hf_tensors(model_dir, allow_classes=allow_classes), cfg,
                                           where=str(model_dir), progress=progress):
        if out.dtype.itemsize > src.itemsize:
            raise CheckpointError(
                f"{model_dir}: tensor for {'/'.join(keys)} is stored as {out.dtype}, wider than the output dtype "
                f"{src} (from config.json torch_dtype); pass --dtype float32 to keep full precision")
        if layer is None:
            writer.write(keys, out)
        elif scan_layers:
            writer.write(("layers",) + keys, out, index=layer)
        else:
            writer.write((f"layers_{layer}",) + keys, out)
    writer.close()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
FORMAT = "spiritlm-jax/llama"
# How the Llama weights are laid out in ``params/`` (models/llama.py): the 2-D ones (MLP, LM head)
# output-major. Directories written before this key existed hold them input-major and no longer load.
WEIGHTS = "2d-out-major"


def converted_meta(cfg: LlamaConfig, *, stored_dtype: str, source: str, **extra) -> dict:
    """The ``config.json`` of a converted Llama directory (every writer uses this: convert, export of a
    training run, fine-tuning export, vocabulary extension)."""
    return {"format": FORMAT, "weights": WEIGHTS, "layout": "scan" if cfg.scan_layers else "unrolled",
            "llama": {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype", "scan_layers", "remat")},
            "stored_dtype": stored_dtype, "source": source, **extra}


def convert_llama(model_dir: str | Path, out_dir: str | Path, *, scan_layers: bool = True, dtype: str | None = None,
                  allow_classes=(), overwrite: bool = False, progress: bool = False) -> Path:
    """HF Llama directory → our converted directory (orbax params + config + tokenizer files)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    cfg = LlamaConfig.from_hf(model_dir)
    dtype = _stored_dtype(model_dir, dtype)
    # Written into a temporary sibling and renamed at the end: a failed conversion leaves nothing that
    # looks complete, and an existing output (--overwrite) is replaced only by a finished one.
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        stream_convert(model_dir, tmp / "params", cfg, scan_layers=scan_layers, dtype=dtype,
                       allow_classes=allow_classes, progress=progress)
        meta = converted_meta(cfg.replace(scan_layers=scan_layers), stored_dtype=dtype, source=str(model_dir))
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_converted_config(conv_dir: str | Path, **runtime) -> tuple[LlamaConfig, str]:
    conv_dir = Path(conv_dir)
    try:
        meta = json.loads((conv_dir / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{conv_dir}: no config.json; is this a directory written by 'spiritlm-jax convert'?") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{conv_dir}/config.json is not a converted spiritlm-jax Llama (format={meta.get('format')!r}); "
                              f"convert the HF checkpoint first: spiritlm-jax convert llama SRC DST")
    if meta.get("weights") != WEIGHTS:
        raise CheckpointError(f"{conv_dir} was written by an older spiritlm-jax, whose MLP and LM-head weights were stored input-major "
                              f"(config.json has no \"weights\": \"{WEIGHTS}\"); re-convert it from the original: "
                              f"spiritlm-jax convert llama SRC {conv_dir} --overwrite")
    stored = meta["layout"] == "scan"
    return LlamaConfig.from_dict(meta["llama"], scan_layers=runtime.pop("scan_layers", stored), **runtime), meta["layout"]


def load_converted(conv_dir: str | Path, *, mesh=None, dtype: str = "float32", param_dtype: str = "float32",
                   scan_layers: bool | None = None, remat: str = "none") -> tuple[LlamaConfig, dict]:
    """Restore converted params. With a ``mesh``, every array is restored straight into its shards
    (NamedSharding from the logical rules) — the full model never sits on one device or host."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import flax.linen as nn

    from spiritlm_jax.models.llama import abstract_params, param_shardings, stack_layers, unstack_layers

    conv_dir = Path(conv_dir).absolute()
    runtime = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
    cfg, layout = read_converted_config(conv_dir, **runtime)
    stored_scan = layout == "scan"
    want_scan = stored_scan if scan_layers is None else scan_layers
    stored_cfg = cfg.replace(scan_layers=stored_scan)
    abstract = nn.meta.unbox(abstract_params(stored_cfg))
    if mesh is not None:
        shardings = param_shardings(stored_cfg, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype_of(param_dtype), sharding=s), abstract, shardings)
    else:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype_of(param_dtype)), abstract)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(conv_dir / "params", target)
    except Exception as e:
        raise CheckpointError(f"{conv_dir}/params could not be restored ({type(e).__name__}: {str(e)[:300]}); "
                              f"the checkpoint is incomplete or does not match its config.json") from e
    params = jax.tree.map(jnp.asarray, params)  # zero-copy on CPU when restored as numpy
    if want_scan != stored_scan:
        params = stack_layers(params, cfg.num_hidden_layers) if want_scan else unstack_layers(params, cfg.num_hidden_layers)
    return cfg.replace(scan_layers=want_scan), params
