"""Train a k-means speech-unit quantizer on a corpus: the tokenizer training the original never shipped.

  spiritlm-jax train-quantizer --speech-tokenizer ckpt/speech_tokenizer --audio corpus/ \\
      --units 500 --features hubert:11 --out my_tokenizer

Features come from the HuBERT checkpoint in --speech-tokenizer (``hubert_25hz/mhubert_base_25hz.pt``):
``hubert:LAYER`` (the encoder's output after LAYER transformer layers; the original quantizes layer 11),
``conv`` (the conv feature extractor), or ``log_mel[:N_MELS[:CONTEXT]]`` (log-mel frames on the encoder's
framing, weight-free; see spiritlm_jax/unit_features.py). k-means runs in JAX (train/kmeans.py): k-means++
init from --seed, exact Lloyd iterations over mini-batches sharded over the mesh, deterministic.

Output: OUT/hubert_25hz/ with kmeans.json (units, features, inertia, seed, frames) + centers.npy, and a
copy of the HuBERT checkpoint, so OUT is a speech-tokenizer folder that `prepare --speech-tokenizer OUT`,
`tokenize` and the eval harness read (the k-means quantizer replaces the linear one). With
--export-original also OUT/hubert_25hz/kmeans_<K>.pt in the original's k-means layout
({"cluster_centers": [K, d], "n_clusters": K}; hubert features only: the original reads no other).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HUBERT_FILE = "mhubert_base_25hz.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speech-tokenizer", required=True, metavar="DIR",
                   help="folder with hubert_25hz/mhubert_base_25hz.pt (the original speech_tokenizer layout)")
    p.add_argument("--audio", action="append", default=[], required=True, metavar="PATH",
                   help="audio file or folder (repeatable; folders are searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output speech-tokenizer folder")
    p.add_argument("--units", type=int, default=500, help="number of k-means units (default 500)")
    p.add_argument("--features", default="hubert:11", help="hubert[:LAYER] | conv | log_mel[:N_MELS[:CONTEXT]]")
    p.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-4, help="stop when the centre shift / data variance <= tol")
    p.add_argument("--batch-size", type=int, default=8192, help="feature frames per k-means mini-batch")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many frames (seeded sample; 0 = all)")
    p.add_argument("--mesh", default=None, metavar="D,F,T", help="shard over a (data, fsdp, tensor) mesh, e.g. 8,1,1")
    p.add_argument("--export-original", action="store_true", help="also write the original's k-means file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quantizer in OUT")
    p.add_argument("--no-progress", action="store_true")


def feature_extractor(hubert_ckpt: str | Path, spec, **kw):
    """A HubertTokenizer whose dense output is the frame features ``spec`` names."""
    import numpy as np

    from spiritlm_jax.converters.hubert import convert_hubert
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer
    from spiritlm_jax.models.quantizer import KmeansConfig

    layer = spec.layer if spec.layer is not None else 11
    ecfg, eparams = convert_hubert(hubert_ckpt, output_layer=layer)
    dim = spec.dim(ecfg)
    return HubertTokenizer(ecfg, eparams, KmeansConfig(1, dim), {"centers": np.zeros((1, dim), np.float32)},
                           hubert_layer=layer, features=spec, **kw)


def collect_features(extractor, files, *, batch: int = 16, progress: bool = True):
    """Dense features of every file, concatenated: (frames, dim) float32, and the per-file frame counts."""
    import numpy as np

    from spiritlm_jax.audio import load_audio

    feats, counts = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="features", unit="file")
    for s in range(0, len(files), batch):
        wavs = [load_audio(str(f)) for f in files[s:s + batch]]
        for f in extractor.encode_batch(wavs, dense=True):
            feats.append(np.asarray(f, np.float32))
            counts.append(len(f))
        if bar is not None:
            bar.update(len(wavs))
    if bar is not None:
        bar.close()
    return np.concatenate(feats), counts


def train_quantizer(speech_tokenizer: str | Path, audio: list, out: str | Path, *, units: int = 500,
                    features: str = "hubert:11", seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
                    batch_size: int = 8192, max_frames: int = 0, mesh=None, export_original: bool = False,
                    overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """The whole job (see the module docstring); returns kmeans.json's contents."""
    import numpy as np

    from spiritlm_jax.train.kmeans import fit_kmeans
    from spiritlm_jax.train.prepare import AUDIO_EXTENSIONS, PrepareError, _files
    from spiritlm_jax.unit_features import KMEANS_CONFIG, FeatureSpec, write_kmeans_dir

    spec = FeatureSpec.parse(features)
    src = Path(speech_tokenizer)
    hub_dir = src / "hubert_25hz" if (src / "hubert_25hz").is_dir() else src
    ckpt = hub_dir / HUBERT_FILE
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} not found: --speech-tokenizer must hold hubert_25hz/{HUBERT_FILE}")
    out_dir = Path(out) / "hubert_25hz"
    if (out_dir / KMEANS_CONFIG).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a quantizer; pass --overwrite to replace it")
    files = []
    for a in audio:
        try:
            files += _files(Path(a), AUDIO_EXTENSIONS)
        except PrepareError as e:
            raise FileNotFoundError(str(e)) from None
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {', '.join(map(str, audio))}")
    t0 = time.perf_counter()
    ext = feature_extractor(ckpt, spec, mesh=mesh)
    x, _ = collect_features(ext, files, progress=progress)
    t_feat = time.perf_counter() - t0
    n_all = len(x)
    if max_frames and n_all > max_frames:
        x = x[np.sort(np.random.default_rng(seed).choice(n_all, max_frames, replace=False))]
    log(f"{len(files)} files, {n_all} frames of {x.shape[1]}-d {spec.kind} features ({t_feat:.1f} s); "
        f"k-means with {units} units on {len(x)} frames")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="k-means", unit="iter")

    def on_iter(it, inertia):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"inertia {inertia:.4g}")

    t1 = time.perf_counter()
    res = fit_kmeans(x, units, seed=seed, max_iter=max_iter, tol=tol, batch_size=batch_size, mesh=mesh,
                     progress=on_iter)
    if bar is not None:
        bar.close()
    info = {"inertia": res.inertia, "inertia_per_frame": res.inertia / len(x), "n_iter": res.n_iter,
            "converged": res.converged, "seed": seed, "frames": len(x), "files": len(files),
            "feature_seconds": t_feat, "kmeans_seconds": time.perf_counter() - t1}
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / HUBERT_FILE).exists() or not (out_dir / HUBERT_FILE).samefile(ckpt):
        shutil.copyfile(ckpt, out_dir / HUBERT_FILE)
    write_kmeans_dir(out_dir, res.centers, spec, **info)
    if export_original:
        if spec.kind != "hubert":
            raise ValueError(f"--export-original: the original k-means reads HuBERT features only, not {spec.kind}")
        import torch

        torch.save({"cluster_centers": torch.from_numpy(res.centers), "n_clusters": units},
                   out_dir / f"kmeans_{units}.pt")
    log(f"final inertia {res.inertia:.6g} ({res.inertia / len(x):.4g} per frame) after {res.n_iter} iterations"
        f"{'' if res.converged else ' (not converged: raise --max-iter)'}; wrote {out_dir}")
    return {"units": units, "features": spec.to_json(), **info}


def run(args: argparse.Namespace) -> int:
    from spiritlm_jax.train.kmeans import KmeansError
    from spiritlm_jax.unit_features import FeatureSpecError

    try:
        mesh = None
        if args.mesh:
            from spiritlm_jax.sharding import make_mesh

            mesh = make_mesh(tuple(int(v) for v in args.mesh.split(",")))
        train_quantizer(args.speech_tokenizer, args.audio, args.out, units=args.units, features=args.features,
                        seed=args.seed, max_iter=args.max_iter, tol=args.tol, batch_size=args.batch_size,
                        max_frames=args.max_frames, mesh=mesh, export_original=args.export_original,
                        overwrite=args.overwrite, progress=not args.no_progress)
    except (KmeansError, FeatureSpecError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
