"""``spiritlm-jax convert all``: a whole original ``checkpoints/`` tree → the JAX-native model tree.

Every component is converted (not copied) into the layout of ``docs/model-format.md``: a JSON config
plus safetensors per speech component (HuBERT + quantizer, pitch VQ-VAE, FCPE from the torchfcpe
wheel, style encoder, both vocoders with their speaker/style lists) and the LM as an orbax
checkpoint. Afterwards every loader reads the tree without torch.

Order of work, so that a 7B conversion never fails at the end and never leaves something that looks
complete:

1. **validate** the whole source first: every component of each requested variant present, each
   vocoder's config matching its slot (a Base vocoder in the Expressive folder is an error naming
   both), the LM's tokenizer files present, every key and shape matching its config (the schema
   tables), every tensor finite. The speech components are converted in memory here; the LM's
   tensors are streamed once (memory-mapped) for their keys, shapes and finiteness.
2. **write** into a temporary folder beside DST, and rename it to DST only when everything is
   written (with ``--overwrite`` an existing DST is replaced only then, never before).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spiritlm_jax import model_dir
from spiritlm_jax.model_dir import ModelDirError, config_to_json

from .torch_io import CheckpointError

LM_FOLDER = "spiritlm_model"
SPEECH_FOLDER = "speech_tokenizer"
FCPE_FOLDER = "fcpe"
VARIANT_COMPONENTS = {
    "base": ("hubert_25hz", "hifigan_spiritlm_base"),
    "expressive": ("hubert_25hz", "vqvae_f0_quantizer", "style_encoder_w2v2", "hifigan_spiritlm_expressive_w2v2"),
}
ORIGINAL_FILES = {  # what each original component folder must hold
    "hubert_25hz": ("mhubert_base_25hz.pt", "L11_quantizer_500.pt"),
    "vqvae_f0_quantizer": ("config.yaml", "model.pt"),
    "style_encoder_w2v2": ("config.json",),
    "hifigan_spiritlm_base": ("config.json", "generator.pt"),
    "hifigan_spiritlm_expressive_w2v2": ("config.json", "generator.pt"),
}
LM_REQUIRED_FILES = ("config.json", "tokenizer.model")


def lm_name(variant: str) -> str:
    return f"spirit-lm-{variant}-7b"


def converted_tree_files(variant: str) -> list[str]:
    """Files a converted tree must hold for ``variant`` (relative paths)."""
    out = [f"{LM_FOLDER}/{lm_name(variant)}/{f}" for f in ("config.json", "tokenizer.model")]
    comps = list(VARIANT_COMPONENTS[variant]) + ([FCPE_FOLDER] if variant == "expressive" else [])
    for c in comps:
        out += [f"{SPEECH_FOLDER}/{c}/{model_dir.CONFIG_FILE}", f"{SPEECH_FOLDER}/{c}/{model_dir.WEIGHTS_FILE}"]
    return out


def is_converted_tree(root: str | os.PathLike) -> bool:
    return (Path(root) / model_dir.TREE_FILE).is_file()


# ------------------------------------------------------------------------------------------------
# one component: original folder → (kind, config, params, original config, extra files)
# ------------------------------------------------------------------------------------------------

class Converted:
    """A speech component converted in memory, ready to be written."""

    def __init__(self, kind: str, config: dict, params, original: Any, extra: dict | None = None,
                 copy_files: tuple[Path, ...] = ()):
        self.kind, self.config, self.params, self.original = kind, config, params, original
        self.extra, self.copy_files = extra or {}, copy_files

    def write(self, folder: Path) -> None:
        model_dir.write_component(folder, self.kind, self.config, self.params, original=self.original,
                                  extra=self.extra)
        for f in self.copy_files:
            shutil.copy2(f, folder / f.name)


TUPLE = "__tuple__"  # JSON has no tuples; the original's pickled configs do (fairseq's latent_temp)


def _jsonable(x, where: str):
    """A pickled config as JSON, tuples kept as {"__tuple__": [...]} so an export writes them back as tuples."""
    def enc(v):
        if isinstance(v, tuple):
            return {TUPLE: [enc(i) for i in v]}
        if isinstance(v, list):
            return [enc(i) for i in v]
        if isinstance(v, dict):
            return {k: enc(i) for k, i in v.items()}
        return v

    try:
        return json.loads(json.dumps(enc(x)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its config cannot be stored as JSON ({e})") from e


def from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {TUPLE}:
            return tuple(from_jsonable(i) for i in x[TUPLE])
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(i) for i in x]
    return x


def convert_hubert_folder(src: Path) -> Converted:
    from .hubert import SPIRITLM_HUBERT_LAYER, convert_hubert_checkpoint, load_hubert_checkpoint
    from .quantizer import convert_linear_quantizer
    from .torch_io import torch_load

    pt, qpt = src / "mhubert_base_25hz.pt", src / "L11_quantizer_500.pt"
    ck = load_hubert_checkpoint(pt)
    ecfg, eparams = convert_hubert_checkpoint(ck, str(pt), output_layer=None, keep_unused=True)
    unused = eparams.pop("original_only", {})
    qcfg, qparams = convert_linear_quantizer(qpt)
    if qcfg.widths[0] != ecfg.embed_dim:
        raise CheckpointError(f"{qpt}: the quantizer expects {qcfg.widths[0]}-d features but {pt} gives {ecfg.embed_dim}-d")
    original = {"hubert": _jsonable({k: v for k, v in ck.items() if k != "model_weight"}, str(pt)),
                "quantizer": _jsonable({"model_cfg": dict(torch_load(qpt)["model_cfg"])}, str(qpt))}
    config = {"encoder": config_to_json(ecfg), "hubert_layer": SPIRITLM_HUBERT_LAYER,
              "quantizer": {"kind": "linear", "config": config_to_json(qcfg)}}
    params = {"encoder": eparams, "quantizer": qparams}
    if unused:
        params["original_only"] = unused
    from .hubert import weight_norm_names

    return Converted("hubert", config, params, original,
                     extra={"export": {"weight_norm_names": weight_norm_names(ck["model_weight"], "encoder.pos_conv.0")}})


def convert_vqvae_folder(src: Path) -> Converted:
    from .f0_vqvae import load_f0_vqvae

    cfg, params = load_f0_vqvae(src)
    return Converted("f0-vqvae", config_to_json(cfg), params, {"config_yaml": (src / "config.yaml").read_text()})


def convert_style_folder(src: Path) -> Converted:
    from .hubert import weight_norm_names
    from .style import convert_style_state_dict, read_style_config
    from . import torch_io

    cfg = read_style_config(src)
    sd = dict(torch_io.iter_hf_tensors(src))
    params = convert_style_state_dict(sd, cfg, str(src), keep_unused=True)
    wn = weight_norm_names(sd, "wav2vec2.encoder.pos_conv_embed.conv")
    return Converted("style", config_to_json(cfg), params, {"config": json.loads((src / "config.json").read_text())},
                     extra={"export": {"weight_norm_names": wn}})


def convert_vocoder_folder(src: Path, variant: str) -> Converted:
    from spiritlm_jax.vocoder import check_vocoder_slot, vocoder_variant

    from .hifigan import load_hifigan

    ck = load_hifigan(src)
    try:
        check_vocoder_slot(src, ck.cfg, variant)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    files = tuple(src / n for n in ("speakers.txt", "styles.txt") if (src / n).exists())
    return Converted("hifigan", config_to_json(ck.cfg), ck.params, ck.raw_config,
                     extra={"variant": vocoder_variant(ck.cfg)}, copy_files=files)


def convert_fcpe_weights(path: Path | None = None) -> Converted:
    """The FCPE real weights, read ONCE from the torchfcpe wheel (or ``path``)."""
    from .fcpe import convert_state_dict, find_bundled_weights, load_fcpe
    from .torch_io import to_numpy, torch_load

    path = path or find_bundled_weights()
    cfg, params, consts = load_fcpe(path)
    ck = torch_load(path)
    unused_tree, _ = convert_state_dict({k: to_numpy(v) for k, v in ck["model"].items()}, cfg, str(path), keep_unused=True)
    out = {"net": params["net"], "consts": {k: np.asarray(v, np.float32) for k, v in consts.items()}}
    if "original_only" in unused_tree:
        out["original_only"] = unused_tree["original_only"]
    original = _jsonable({"config_dict": ck["config_dict"], "global_step": ck.get("global_step")}, str(path))
    return Converted("fcpe", config_to_json(cfg), out, original, extra={"source": path.name})


SPEECH_CONVERTERS: dict[str, Callable[[Path], Converted]] = {
    "hubert_25hz": convert_hubert_folder,
    "vqvae_f0_quantizer": convert_vqvae_folder,
    "style_encoder_w2v2": convert_style_folder,
    "hifigan_spiritlm_base": lambda p: convert_vocoder_folder(p, "base"),
    "hifigan_spiritlm_expressive_w2v2": lambda p: convert_vocoder_folder(p, "expressive"),
}


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def check_lm(lm_src: Path, allow_classes=(), progress: bool = False) -> None:
    """Every LM tensor: key and shape from the schema table, finite. Streams (memory-mapped)."""
    from spiritlm_jax.config import LlamaConfig

    from . import torch_io
    from .llama import iter_converted

    missing = [f for f in LM_REQUIRED_FILES if not (lm_src / f).is_file()]
    if missing:
        raise CheckpointError(f"{lm_src}: missing {', '.join(missing)} (the LM folder needs its config.json and its "
                              f"SentencePiece tokenizer.model)")
    cfg = LlamaConfig.from_hf(lm_src)
    for _ in iter_converted(torch_io.iter_hf_tensors(lm_src, allow_classes=allow_classes), cfg,
                            where=str(lm_src), progress=progress):
        pass  # iter_converted checks every key, shape and finiteness as the tensors stream


def validate(src: Path, variants: tuple[str, ...], *, allow_classes=(), log=print) -> dict[str, Converted]:
    """Check the whole tree; return the speech components converted in memory (nothing written)."""
    problems = []
    for v in variants:
        lm = src / LM_FOLDER / lm_name(v)
        if not lm.is_dir():
            problems.append(f"{lm} (the {v} LM) is missing")
        else:
            problems += [f"{lm / f} (the {v} LM's {'config' if f == 'config.json' else 'SentencePiece tokenizer'}) "
                         f"is missing" for f in LM_REQUIRED_FILES if not (lm / f).is_file()]
        for c in VARIANT_COMPONENTS[v]:
            for f in ORIGINAL_FILES[c]:
                if not (src / SPEECH_FOLDER / c / f).is_file():
                    problems.append(f"{src / SPEECH_FOLDER / c / f} (needed by the {v} variant) is missing")
    if problems:
        raise CheckpointError(f"{src} is not a complete original checkpoints/ tree:\n  " + "\n  ".join(problems))
    speech: dict[str, Converted] = {}
    for v in variants:
        for c in VARIANT_COMPONENTS[v]:
            if c not in speech:
                log(f"- checking {SPEECH_FOLDER}/{c}")
                speech[c] = SPEECH_CONVERTERS[c](src / SPEECH_FOLDER / c)
                try:
                    model_dir.check_finite(model_dir.flatten_params(speech[c].params), str(src / SPEECH_FOLDER / c))
                except ModelDirError as e:
                    raise CheckpointError(str(e)) from None
    if "expressive" in variants:
        log("- checking the FCPE weights of the installed torchfcpe")
        speech[FCPE_FOLDER] = convert_fcpe_weights()
    for v in variants:
        log(f"- checking the {v} LM (every tensor's key, shape and finiteness)")
        check_lm(src / LM_FOLDER / lm_name(v), allow_classes)
    return speech


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

def convert_all(src: str | os.PathLike, dst: str | os.PathLike, *, variants=("base", "expressive"),
                scan_layers: bool = True, dtype: str | None = None, allow_classes=(), overwrite: bool = False,
                self_check: Callable[[Path, Path], str] | None = None, log=print) -> Path:
    """Validate then convert; returns DST. Raises CheckpointError / FileExistsError before writing
    anything when the source or DST is not usable."""
    from .llama import convert_llama

    src, dst = Path(src), Path(dst).absolute()
    if not (src / LM_FOLDER).is_dir() and not (src / SPEECH_FOLDER).is_dir():
        raise CheckpointError(f"{src} is not an original checkpoints/ folder (no {LM_FOLDER}/ or {SPEECH_FOLDER}/)")
    if is_converted_tree(src):
        raise CheckpointError(f"{src} is already a converted spiritlm-jax tree ({model_dir.TREE_FILE}); use it directly")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it (it is replaced only "
                              f"after the new tree is complete)")
    if dst == src.absolute() or src.absolute() in dst.parents:
        raise CheckpointError(f"{dst} lies inside the source tree {src}; choose an output folder outside it")
    t0 = time.perf_counter()
    speech = validate(src, tuple(variants), allow_classes=allow_classes, log=log)
    log(f"- validated in {time.perf_counter() - t0:.1f} s; writing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for name, comp in speech.items():
            comp.write(tmp / SPEECH_FOLDER / name)
            log(f"  {SPEECH_FOLDER}/{name}: {comp.kind}")
        checks = {}
        for v in variants:
            lm_src, lm_dst = src / LM_FOLDER / lm_name(v), tmp / LM_FOLDER / lm_name(v)
            log(f"  {LM_FOLDER}/{lm_name(v)}: converting")
            convert_llama(lm_src, lm_dst, scan_layers=scan_layers, dtype=dtype, allow_classes=allow_classes,
                          progress=True)
            meta = json.loads((lm_dst / "config.json").read_text())
            meta["variant"] = v
            meta["source"] = str(lm_src)
            (lm_dst / "config.json").write_text(json.dumps(meta, indent=1))
            if self_check is not None:
                checks[v] = self_check(lm_src, lm_dst)
                log(f"  self-check: {checks[v]}")
        tree = {"format": model_dir.FORMAT_PREFIX + "tree", "version": model_dir.VERSION, "variants": list(variants),
                "components": {n: model_dir.FORMAT_PREFIX + c.kind for n, c in speech.items()},
                "source": str(src.absolute()), "self_check": checks}
        (tmp / model_dir.TREE_FILE).write_text(json.dumps(tree, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir.replace_folder(tmp, dst)


def check_converted_tree(root: Path, variant: str) -> list[str]:
    """Missing files of a converted tree for ``variant`` (empty when complete)."""
    return [f for f in converted_tree_files(variant) if not (root / f).is_file()]


__all__ = ["convert_all", "validate", "converted_tree_files", "is_converted_tree", "check_converted_tree",
           "VARIANT_COMPONENTS"]
