"""Port out: our models back to the ecosystem, tensor by tensor.

* :func:`export_run` — a training run (``spiritlm-jax train``'s ``checkpoint.dir``, or one step of it) → an
  LM model folder (``config.json`` + orbax ``params/`` + tokenizer files, the format ``convert llama``
  writes): parameters only (no optimizer state), cast to the requested dtype (default bfloat16), with the
  run's tokenizer (the extended vocabulary when the run started from an extended checkpoint).
* :func:`export_hf` — an LM model folder → a transformers ``LlamaForCausalLM`` folder: sharded
  safetensors + index, ``config.json``, ``generation_config.json`` and the tokenizer files.
* :func:`export_original` — a converted tree → the ORIGINAL's layout and formats (the converted-format
  mhubert ``.pt`` dict, the quantizer ``.pt``, ``config.yaml`` + ``model.pt``, the style encoder's HF
  folder, ``config.json`` + ``generator.pt`` with ``weight_g``/``weight_v`` pairs + speaker/style lists,
  the LM as an HF folder), readable by the original's loaders (``torch.load(weights_only=True)``, strict
  state dicts).

Every direction runs the schema tables (``converters/schema.py``) backwards. The LM is read one leaf
slice (one layer of one weight) at a time straight from its zarr arrays and written into safetensors
files whose header is laid out first, so the peak memory is a few tensors, never the model.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from spiritlm_jax import model_dir
from spiritlm_jax.config import LlamaConfig, dtype_of

from .schema import export_state_dict
from .torch_io import CheckpointError

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SHARD_BYTES = 5 * 2 ** 30
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


# ------------------------------------------------------------------------------------------------
# safetensors, written tensor by tensor
# ------------------------------------------------------------------------------------------------

class SafetensorsWriter:
    """A safetensors file whose header (names, dtypes, shapes, offsets) is written first, then each
    tensor's bytes in the declared order: one tensor in memory at a time. (The ``safetensors`` package
    serialises a whole dict of arrays at once.)"""

    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        off = 0
        for name, dt, shape in specs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            header[name] = {"dtype": _ST_DTYPES[np.dtype(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._order = [s[0] for s in specs]
        self._specs = {s[0]: (np.dtype(s[1]), tuple(s[2])) for s in specs}
        self._next = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, arr: np.ndarray) -> None:
        if self._order[self._next] != name:
            raise CheckpointError(f"safetensors writer: expected {self._order[self._next]!r}, got {name!r}")
        dt, shape = self._specs[name]
        arr = np.ascontiguousarray(np.asarray(arr).astype(dt, copy=False))
        if arr.shape != shape:
            raise CheckpointError(f"safetensors writer: {name} has shape {arr.shape}, declared {shape}")
        self._f.write(arr.tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise CheckpointError(f"safetensors writer: {len(self._order) - self._next} tensor(s) not written")
        self._f.close()


# ------------------------------------------------------------------------------------------------
# reading an LM folder leaf by leaf
# ------------------------------------------------------------------------------------------------

class LMReader:
    """Our LM folder, read one leaf (or one layer of a stacked leaf) at a time from its zarr arrays."""

    def __init__(self, lm_dir: str | os.PathLike):
        from .llama import read_converted_config

        self.dir = Path(lm_dir)
        self.cfg, self.layout = read_converted_config(self.dir)
        self._arrays: dict[tuple, Any] = {}
        self._full = None

    def _zarr(self, keys: tuple[str, ...]):
        import tensorstore as ts

        if keys not in self._arrays:
            path = self.dir / "params" / ".".join(keys)
            if not (path / ".zarray").is_file():
                return None
            self._arrays[keys] = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result()
        return self._arrays[keys]

    def get(self, keys: tuple[str, ...], layer: int | None) -> np.ndarray:
        """Our leaf ``keys`` (within a layer when ``layer`` is given)."""
        if layer is not None:
            full = ("layers",) + keys if self.layout == "scan" else (f"layers_{layer}",) + keys
        else:
            full = keys
        arr = self._zarr(full)
        if arr is None:  # an orbax layout we did not write leaf by leaf (e.g. OCDBT): restore once
            return self._restored(full, layer)
        return np.asarray((arr[layer] if (layer is not None and self.layout == "scan") else arr).read().result())

    def _restored(self, full, layer):
        if self._full is None:
            from .llama import load_converted

            _, self._full = load_converted(self.dir, dtype="float32", param_dtype=self._stored_dtype(),
                                           scan_layers=self.layout == "scan")
        node = self._full
        for k in full:
            node = node[k]
        node = np.asarray(node)
        return node[layer] if (layer is not None and self.layout == "scan") else node

    def _stored_dtype(self) -> str:
        return json.loads((self.dir / "config.json").read_text()).get("stored_dtype", "float32")


# ------------------------------------------------------------------------------------------------
# LM → Hugging Face
# ------------------------------------------------------------------------------------------------

def _prepare_dst(dst: Path, overwrite: bool) -> Path:
    dst = Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it (it is replaced only "
                              f"once the export is complete)")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp




def _hf_tokenizer_files(src: Path, out: Path, cfg: LlamaConfig) -> None:
    if not (src / "tokenizer.model").is_file():
        raise CheckpointError(f"{src} has no tokenizer.model; an HF export needs the SentencePiece model")
    shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")
    tc = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    tc = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
          "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings, "pad_token": None,
          "sp_model_kwargs": {}, **tc, "tokenizer_class": "LlamaTokenizer"}  # the source's own keys win (legacy!)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    sm = json.loads((src / "special_tokens_map.json").read_text()) if (src / "special_tokens_map.json").is_file() else \
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(sm, indent=2))
    gc = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").is_file() else {}
    gc = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **gc}
    (out / "generation_config.json").write_text(json.dumps(gc, indent=2))


def iter_lm_tensors(reader: LMReader, dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) for every tensor of the LM, one at a time, through the inverted schema."""
    from .llama import llama_rows, split_layer

    want = np.dtype(dtype) if dtype is not None else None
    for row in llama_rows(reader.cfg):
        keys, layer = split_layer(row.path)
        (arr,) = row.transform.inverse(reader.get(keys, layer))
        yield row.keys[0], (arr.astype(want) if want is not None else arr)


def export_hf(lm_dir: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, with_tokenizer: bool = True,
              log=print) -> Path:
    """Our LM folder → a transformers LlamaForCausalLM folder (sharded safetensors + index).
    ``with_tokenizer=False`` writes the weights and config only (benchmarks of weight-only folders)."""
    from .llama import llama_rows

    src = Path(lm_dir)
    reader = LMReader(src)
    cfg = reader.cfg
    stored = reader._stored_dtype()
    out_dtype = np.dtype(dtype_of(dtype or stored))
    rows = llama_rows(cfg)
    specs = [(r.keys[0], out_dtype, r.shapes[0]) for r in rows]
    shards: list[list[tuple]] = [[]]
    size = 0
    for s in specs:
        n = int(np.prod(s[2])) * out_dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    tmp = _prepare_dst(Path(dst), overwrite)
    try:
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        writers = {}
        weight_map = {}
        for name, shard in zip(names, shards):
            for s in shard:
                weight_map[s[0]] = name
        it = iter_lm_tensors(reader, out_dtype)
        for name, shard in zip(names, shards):
            w = SafetensorsWriter(tmp / name, shard)
            writers[name] = w
            for _ in shard:
                key, arr = next(it)
                w.write(key, arr)
            w.close()
        if len(shards) > 1:
            total = sum(int(np.prod(s[2])) * out_dtype.itemsize for s in specs)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
            "bfloat16" if out_dtype == np.dtype(ml_dtypes.bfloat16) else str(out_dtype)]
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(torch_dtype), indent=2))
        if with_tokenizer:
            _hf_tokenizer_files(src, tmp, cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  {len(specs)} tensors in {len(shards)} safetensors file(s), {torch_dtype}")
    return model_dir.replace_folder(tmp, Path(dst))


# ------------------------------------------------------------------------------------------------
# training run → LM model folder
# ------------------------------------------------------------------------------------------------

def find_step_dir(run: Path) -> Path:
    """``RUN_DIR`` (its newest step) or ``RUN_DIR/STEP``."""
    run = Path(run)
    if (run / "state").is_dir() and (run / "meta").is_dir():
        return run
    steps = sorted((int(p.name), p) for p in run.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir()) \
        if run.is_dir() else []
    if not steps:
        raise CheckpointError(f"{run} is not a training run: no step folders (<step>/state, <step>/meta) in it; pass the "
                              f"run's checkpoint.dir or one of its step folders")
    return steps[-1][1]


def run_config(step_dir: Path) -> dict:
    meta = step_dir / "meta" / "metadata"
    try:
        cfg = json.loads(meta.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{meta}: the run's config is unreadable ({e}); this step is incomplete") from None
    return cfg


def _run_llama_config(cfg: dict) -> tuple[LlamaConfig, str | None]:
    from spiritlm_jax.train.trainer import llama_config

    from .llama import FORMAT, read_converted_config

    from spiritlm_jax.train.config import TrainConfig

    mc = TrainConfig.from_dict({"model": cfg["model"]}).model  # model.* holds the flattened LlamaConfig fields
    init_cfg = None
    init = mc.init if mc.init != "random" else None
    if init:
        d = Path(init)
        if not (d / "config.json").is_file():
            raise CheckpointError(f"the run started from model.init={init}, which is gone; its shape is needed "
                                  f"to rebuild the model config")
        meta = json.loads((d / "config.json").read_text())
        init_cfg = read_converted_config(d)[0] if meta.get("format") == FORMAT else LlamaConfig.from_hf(d)
    return llama_config(mc, init_cfg), init


def export_run(run: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bfloat16",
               tokenizer: str | os.PathLike | None = None, overwrite: bool = False, log=print) -> Path:
    """Params of a training step (no optimizer state) → an LM model folder usable by every command."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from spiritlm_jax.models.llama import abstract_params

    from .llama import TOKENIZER_FILES, converted_meta
    from .orbax_io import StreamingWriter, leaf_items

    step_dir = find_step_dir(Path(run))
    cfg_dict = run_config(step_dir)
    if (cfg_dict.get("lora") or {}).get("rank") or (cfg_dict.get("optim") or {}).get("trainable"):
        # LoRA / partially frozen runs checkpoint only what they train: merge it onto the rebuilt base
        from spiritlm_jax.train.peft import export_peft_run

        return export_peft_run(step_dir, cfg_dict, dst, overwrite=overwrite, log=log)
    cfg, init = _run_llama_config(cfg_dict)
    tok_src = Path(tokenizer) if tokenizer else (Path(init) if init else
                                                   (Path(cfg_dict.get("data", {}).get("tokenizer") or "") or None))
    if tok_src is None or not (tok_src / "tokenizer.model").is_file():
        raise CheckpointError(
            f"the run in {step_dir.parent} has no tokenizer to export with it (model.init and data.tokenizer name "
            f"none); pass --tokenizer LM_DIR (a folder holding the tokenizer.model the run's data was made with)")
    from spiritlm_jax.text import TextTokenizer, VocabError

    try:
        TextTokenizer.from_dir(tok_src, n_embed=cfg.vocab_size)
    except (VocabError, OSError) as e:
        raise CheckpointError(f"the tokenizer in {tok_src} does not fit the run's model (vocab_size "
                              f"{cfg.vocab_size}): {e}") from None
    abstract = nn.meta.unbox(abstract_params(cfg))
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype_of(cfg.param_dtype)), abstract)}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), target)
    try:
        state = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types for a damaged or foreign checkpoint
        raise CheckpointError(f"{step_dir}/state: the parameters could not be restored ({type(e).__name__}: "
                              f"{str(e)[:300]}); is this step complete and of this run's config?") from e
    params = state["params"]
    out_dtype = np.dtype(dtype_of(dtype))
    tmp = _prepare_dst(Path(dst), overwrite)
    try:
        leaves = {k: (tuple(v.shape), out_dtype, False) for k, v in leaf_items(params)}
        writer = StreamingWriter(tmp / "params", leaves)
        for keys, leaf in leaf_items(params):
            writer.write(keys, np.asarray(jax.device_get(leaf)).astype(out_dtype))
        writer.close()
        meta = converted_meta(cfg, stored_dtype=str(dtype), source=str(step_dir),
                              step=int(step_dir.name) if step_dir.name.isdigit() else None, exported_from="training run")
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        for name in TOKENIZER_FILES:
            if (tok_src / name).is_file():
                shutil.copy2(tok_src / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  step {step_dir.name}: {len(leaves)} arrays in {dtype}, tokenizer from {tok_src}")
    return model_dir.replace_folder(tmp, Path(dst))


# ------------------------------------------------------------------------------------------------
# converted tree → the original's layout
# ------------------------------------------------------------------------------------------------

def _torch_save(obj, path: Path) -> None:
    from .torch_io import _require_torch

    torch = _require_torch()

    def conv(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.array(x, copy=True))
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    torch.save(conv(obj), path)


def _sd(pairs: Iterable[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in pairs}


def export_hubert(src: Path, out: Path) -> None:
    from spiritlm_jax.models.hubert import SpeechEncoderConfig
    from spiritlm_jax.models.quantizer import LinearQuantizerConfig

    from .hubert import encoder_rows
    from .quantizer import linear_quantizer_rows

    meta, params = model_dir.read_component(src, "hubert")
    c = meta["config"]
    ecfg = model_dir.config_from_json(SpeechEncoderConfig, c["encoder"])
    wn = meta.get("export", {}).get("weight_norm_names", "legacy")
    sd = _sd(export_state_dict(encoder_rows(ecfg, "fairseq", wn), params["encoder"]))
    sd.update(params.get("original_only", {}))
    if c["quantizer"]["kind"] != "linear":
        raise CheckpointError(f"{src}: only the linear quantizer has an original file format to export to")
    qcfg = model_dir.config_from_json(LinearQuantizerConfig, c["quantizer"]["config"])
    out.mkdir(parents=True, exist_ok=True)
    from .tree import from_jsonable

    _torch_save({**from_jsonable(meta["original"]["hubert"]), "model_weight": sd}, out / "mhubert_base_25hz.pt")
    qsd = _sd(export_state_dict(linear_quantizer_rows(qcfg), params["quantizer"]))
    _torch_save({"model_cfg": from_jsonable(meta["original"]["quantizer"]["model_cfg"]), "model_weight": qsd},
                out / "L11_quantizer_500.pt")


def export_vqvae(src: Path, out: Path) -> None:
    from spiritlm_jax.models.f0_vqvae import F0VQVAEConfig

    from .f0_vqvae import vqvae_rows

    meta, params = model_dir.read_component(src, "f0-vqvae")
    cfg = model_dir.config_from_json(F0VQVAEConfig, meta["config"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(meta["original"]["config_yaml"])
    _torch_save({"model": _sd(export_state_dict(vqvae_rows(cfg), params))}, out / "model.pt")


def export_style(src: Path, out: Path) -> None:
    from spiritlm_jax.models.style import StyleEncoderConfig

    from .style import style_rows

    meta, params = model_dir.read_component(src, "style")
    cfg = model_dir.config_from_json(StyleEncoderConfig, meta["config"])
    wn = meta.get("export", {}).get("weight_norm_names", "legacy")
    sd = _sd(export_state_dict(style_rows(cfg, wn), params))
    sd.update(params.get("original_only", {}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta["original"]["config"], indent=2))
    _torch_save(sd, out / "pytorch_model.bin")


def export_vocoder(src: Path, out: Path) -> None:
    from spiritlm_jax.models.hifigan import HifiGANConfig

    from .hifigan import conversion_table

    meta, params = model_dir.read_component(src, "hifigan")
    cfg = model_dir.config_from_json(HifiGANConfig, meta["config"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta["original"], indent=2))
    _torch_save({"generator": _sd(export_state_dict(conversion_table(cfg), params))}, out / "generator.pt")
    for n in ("speakers.txt", "styles.txt"):
        if (src / n).is_file():
            shutil.copy2(src / n, out / n)


COMPONENT_EXPORTERS = {"hubert": export_hubert, "f0-vqvae": export_vqvae, "style": export_style,
                       "hifigan": export_vocoder}


def export_original(tree: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, log=print) -> Path:
    """A converted tree → the original's checkpoints/ layout (the FCPE weights stay in the torchfcpe wheel,
    where the original reads them)."""
    from .tree import LM_FOLDER, SPEECH_FOLDER, is_converted_tree

    tree = Path(tree)
    if not is_converted_tree(tree):
        raise CheckpointError(f"{tree} is not a converted tree (no {model_dir.TREE_FILE}); export --to original takes "
                              f"the output of spiritlm-jax convert all")
    tmp = _prepare_dst(Path(dst), overwrite)
    try:
        st = tree / SPEECH_FOLDER
        for folder in sorted(p for p in st.iterdir() if p.is_dir()):
            kind = (model_dir.component_format(folder) or "").removeprefix(model_dir.FORMAT_PREFIX)
            if kind == "fcpe":
                continue
            if kind not in COMPONENT_EXPORTERS:
                raise CheckpointError(f"{folder}: unknown component format {kind!r}")
            COMPONENT_EXPORTERS[kind](folder, tmp / SPEECH_FOLDER / folder.name)
            log(f"  {SPEECH_FOLDER}/{folder.name}: {kind} -> original files")
        for lm in sorted(p for p in (tree / LM_FOLDER).iterdir() if p.is_dir()):
            export_hf(lm, tmp / LM_FOLDER / lm.name, log=log)
            log(f"  {LM_FOLDER}/{lm.name}: HF folder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir.replace_folder(tmp, Path(dst))
