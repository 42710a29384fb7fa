"""A seeded fuzz test of every entry point: malformed inputs of each fault class, generated from one seed,
all held to ONE contract (what the brief demands of bad input):

* a non-zero exit code;
* exactly one line naming the problem (``error: …``, or argparse's ``spiritlm-jax CMD: error: …``);
* no traceback;
* nothing silently wrong (no output file that looks complete);
* nothing valid moved or deleted (every valid file the case starts from is byte-identical after).

The classes: train configs (out-of-range and mistyped values, unknown keys, seq_len beyond the context,
zero batches), resuming a checkpoint with a changed model, hostile and damaged checkpoint files, malformed
audio (random bytes, empty, too short, non-finite), generation options (non-finite sampling parameters,
integers out of range), output paths (an existing file, a folder, a missing folder), corpora whose every
input is skipped, and eval options. SEED fixes every generated value; a failing case prints its argv.
"""
from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.cli import main as cli_main

SEED = 18
TINY_TRAIN = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128",
              "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=4",
              "model.max_position_embeddings=64", "model.dtype=float32", "model.remat=none", "data.batch_size=8",
              "data.seq_len=16", "steps=2", "checkpoint.every=2", "progress=false", "tensorboard=false"]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def assert_contract(argv: list[str], capsys, *, valid: Path | None = None, must_not_exist: Path | None = None,
                    names: str | None = None) -> str:
    """Run one malformed case through the CLI and check the contract; return the error line."""
    before = _snapshot(valid) if valid is not None else None
    rc, err = _run(argv, capsys)
    where = f"argv={argv}\nstderr:\n{err[-3000:]}"
    assert rc != 0, where
    assert "Traceback" not in err, where
    lines = [ln for ln in err.splitlines()
             if ln.startswith("error:") or (ln.startswith("spiritlm-jax") and ": error:" in ln)]
    assert len(lines) == 1, where
    if names is not None:
        assert names in lines[0], where
    if valid is not None:
        assert _snapshot(valid) == before, f"a valid file was changed, moved or deleted: {where}"
    if must_not_exist is not None:
        assert not must_not_exist.exists(), f"{must_not_exist} was created: {where}"
    return lines[0]


# ---------------------------------------------------------------------------------------------- train

def _bad_train_overrides(rng: random.Random) -> list[tuple[str, str]]:
    """(override, word the error must contain): out-of-range, mistyped and unknown values."""
    big = rng.randint(65, 10_000)
    return [
        (f"data.batch_size={-rng.randint(0, 64)}", "data.batch_size"),
        (f"data.seq_len={rng.choice([0, 1])}", "data.seq_len"),
        (f"data.seq_len={big}", "data.seq_len"),  # beyond max_position_embeddings=64
        (f"steps={-rng.randint(0, 5)}", "steps"),
        (f"optim.grad_accum={-rng.randint(0, 3)}", "optim.grad_accum"),
        (f"optim.lr=-{rng.random():.3g}", "optim"),
        (f"optim.schedule={rng.choice(['linear', 'COSINE', ''])}", "optim.schedule"),
        (f"model.remat={rng.choice(['some', 'yes'])}", "remat"),
        (f"model.hidden_size={rng.choice(['abc', '6.5', ''])}", "model.hidden_size"),
        (f"log_every={rng.choice(['0', '-1'])}", "log_every"),
        (f"distributed_timeout_s={rng.choice(['0', '-5', '1e9'])}", "distributed_timeout_s"),
        (f"optim.{''.join(rng.choices('xyzq', k=5))}=1", "unknown key"),
        (f"{''.join(rng.choices('abc', k=4))}.lr=1", "unknown key"),
        (f"mesh.fsdp={rng.choice([3, 5, 7])}", "mesh"),
        (f"checkpoint.keep={rng.choice([0, -1])}", "checkpoint"),
    ]


def test_train_config_faults(tmp_path, capsys):
    rng = random.Random(SEED)
    for override, word in _bad_train_overrides(rng):
        ck = tmp_path / f"run-{abs(hash(override)) % 10**8}"
        assert_contract(["train", *TINY_TRAIN, f"checkpoint.dir={ck}", override], capsys, names=word,
                        must_not_exist=ck / "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A valid 2-step tiny checkpoint directory (the 'valid data' resume cases must not touch)."""
    d = tmp_path_factory.mktemp("trained") / "run"
    assert cli_main(["train", *TINY_TRAIN, f"checkpoint.dir={d}"]) == 0
    return d


def test_resume_with_a_changed_model_moves_nothing(trained, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    changes = rng.sample(["model.hidden_size=32", "model.intermediate_size=96", "model.num_hidden_layers=3",
                          "model.num_key_value_heads=2", "model.vocab_size=512", "optim.clip_norm=0"], 3)
    for change in changes:
        run = tmp_path / f"copy-{change.split('=')[0]}"
        shutil.copytree(trained, run)
        assert_contract(["train", *TINY_TRAIN, f"checkpoint.dir={run}", "steps=4", change], capsys,
                        valid=run, names=change.split("=")[0], must_not_exist=run / "corrupt")


# ---------------------------------------------------------------------------------------------- checkpoints

class _Hostile:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _damaged_checkpoints(rng: random.Random, src: Path, out: Path) -> list[tuple[Path, str]]:
    """Copies of the golden HF LM folder whose weights file is truncated, overwritten with random bytes,
    emptied, or replaced by a hostile pickle."""
    import os

    import torch

    weights = next(p for p in src.iterdir() if p.suffix in (".bin", ".safetensors") or p.name.endswith(".pth"))
    data = weights.read_bytes()
    cases = []
    for kind in ("truncated", "random", "empty", "hostile"):
        d = out / kind
        shutil.copytree(src, d)
        f = d / weights.name
        if kind == "truncated":
            f.write_bytes(data[: rng.randint(1, len(data) - 1)])
        elif kind == "random":
            f.write_bytes(rng.randbytes(rng.randint(10, 4096)))
        elif kind == "empty":
            f.write_bytes(b"")
        else:
            f.unlink()
            f = d / "pytorch_model.bin"
            for other in d.glob("*.safetensors*"):
                other.unlink()
            torch.save({"w": torch.zeros(2), "x": _Hostile(rng.choice([os.system, eval]), "echo 1")}, f)
        cases.append((d, kind))
    return cases


def test_damaged_and_hostile_checkpoints_are_refused(golden_dir, tmp_path, capsys):
    rng = random.Random(SEED + 2)
    src = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"
    for d, kind in _damaged_checkpoints(rng, src, tmp_path / "in"):
        out = tmp_path / f"out-{kind}"
        line = assert_contract(["convert", "llama", str(d), str(out)], capsys, valid=d)
        assert not (out / "config.json").exists(), f"{kind}: a complete-looking output was left: {line}"
        if kind == "hostile":
            assert "REFUSED" in line and "corrupt" not in line, line
    # non-finite weights (bf16 included), and --overwrite of a VALID earlier output by a failing conversion
    nan = tmp_path / "in" / "nan"
    shutil.copytree(src, nan)
    _nan_weights(src / "pytorch_model.bin", nan / "pytorch_model.bin", rng)
    assert_contract(["convert", "llama", str(nan), str(tmp_path / "out-nan")], capsys, valid=nan,
                    names="NaN or Inf", must_not_exist=tmp_path / "out-nan")
    good = tmp_path / "earlier-output"
    assert cli_main(["convert", "llama", str(src), str(good)]) == 0
    capsys.readouterr()
    assert_contract(["convert", "llama", str(nan), str(good), "--overwrite"], capsys, valid=good)
    assert not list(tmp_path.glob(".*partial*"))  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------- audio

def _malformed_audio(rng: random.Random, d: Path) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = []
    f = d / "random_bytes.wav"
    f.write_bytes(rng.randbytes(rng.randint(1, 2000)))
    files.append(f)
    f = d / "empty.wav"
    f.write_bytes(b"")
    files.append(f)
    f = d / "too_short.wav"  # under the 1280-sample receptive field
    sf.write(f, np.random.default_rng(rng.randint(0, 99)).standard_normal(rng.randint(1, 1279)).astype(np.float32), 16000)
    files.append(f)
    f = d / "non_finite.wav"
    x = np.zeros(8000, np.float32)
    x[rng.randint(0, 7999)] = rng.choice([np.nan, np.inf, -np.inf])
    sf.write(f, x, 16000, subtype="FLOAT")
    files.append(f)
    f = d / "riff_header_only.wav"
    f.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    files.append(f)
    return files


def test_malformed_audio_through_tokenize(golden_dir, tmp_path, capsys):
    files = _malformed_audio(random.Random(SEED + 3), tmp_path / "audio")
    out = tmp_path / "units.jsonl"
    line = assert_contract(["tokenize", str(tmp_path / "audio"), "--checkpoints", str(golden_dir / "checkpoints"),
                            "--out", str(out)], capsys, valid=tmp_path / "audio")
    assert f"{len(files)} of {len(files)} files failed" in line
    rows = out.read_text().splitlines()
    assert len(rows) == len(files) and all('"error"' in r for r in rows)  # nothing silently tokenized


def test_output_paths_are_checked_before_any_model_loads(golden_dir, tmp_path, capsys):
    rng = random.Random(SEED + 4)
    valid = tmp_path / "valid"
    valid.mkdir()
    (valid / "earlier.wav").write_bytes(rng.randbytes(64))
    (valid / "earlier.jsonl").write_text('{"audio": "kept"}\n')
    wav = tmp_path / "ok.wav"
    sf.write(wav, np.zeros(4000, np.float32), 16000)
    ck = str(golden_dir / "checkpoints")
    cases = [
        ["generate", "--text", "hi", "--checkpoints", ck, "--output-modality", "speech", "--out",
         str(valid / "earlier.wav")],
        ["generate", "--text", "hi", "--checkpoints", ck, "--out", str(valid / "earlier.wav" / "sub")],
        ["tokenize", str(wav), "--checkpoints", ck, "--out", str(valid)],
        ["tokenize", str(wav), "--checkpoints", ck, "--out", str(valid / "earlier.jsonl")],
        ["tokenize", str(wav), "--checkpoints", ck, "--out", str(tmp_path / "missing" / "u.jsonl")],
    ]
    for argv in rng.sample(cases, len(cases)):
        assert_contract(argv, capsys, valid=valid, must_not_exist=tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- generation

def test_generation_options_out_of_range(golden_dir, tmp_path, capsys):
    rng = random.Random(SEED + 5)
    ck = str(golden_dir / "checkpoints")
    base = ["generate", "--text", "The weather", "--checkpoints", ck, "--output-modality", "text"]
    cases = [
        ["--max-new-tokens", str(rng.choice([0, -1, 10**12]))],
        ["--do-sample", "--temperature", rng.choice(["inf", "nan", "-1", "0"])],
        ["--do-sample", "--top-p", rng.choice(["nan", "0", "1.5", "-0.1"])],
        ["--top-k", str(-rng.randint(1, 9))],
        ["--max-new-tokens", rng.choice(["2.7", "abc", "1e3"])],
        ["--mesh", rng.choice(["1,x,1", "3,1,1", "1,-1,-1", "8", "1,2,3,4"])],
        ["--distributed", "--distributed-timeout-s", rng.choice(["0", "-5", "nan", "inf", "1e9"])],
    ]
    for extra in cases:
        assert_contract(base + extra, capsys)


# ---------------------------------------------------------------------------------------------- corpora, eval

def test_corpora_whose_every_input_is_skipped(tmp_path, capsys):
    rng = random.Random(SEED + 6)
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(rng.randint(1, 4)):
        (d / f"t{i}.txt").write_text(rng.choice(["", " ", "\n\n", "\t \n"]))
    out = tmp_path / "out"
    line = assert_contract(["prepare", "--text", str(d), "--output", str(out), "--name", "fz", "--no-progress"],
                           capsys, valid=d, must_not_exist=out / "spiritlm_corpus" / "fz" / "1.0.0")
    assert "was skipped" in line
    for argv in (["prepare", "--text", str(tmp_path / "nope"), "--output", str(out), "--name", "fz"],
                 ["prepare", "--text", str(d), "--output", str(out), "--name", rng.choice(["Bad-Name", "a b", "x/y"])],
                 ["prepare", "--text", str(d), "--output", str(out), "--name", "fz", "--batch-files", "0"]):
        assert_contract(argv, capsys, valid=d)


def test_eval_options(golden_dir, tmp_path, capsys):
    rng = random.Random(SEED + 7)
    for argv in (["eval", "swuggy", "--batch-size", str(-rng.randint(0, 4))],
                 ["eval", "".join(rng.choices("xyz", k=6))]):
        assert_contract(argv, capsys)


# ---------------------------------------------------------------------------------------------- model trees

def _tree_copy(golden_dir: Path, dst: Path) -> Path:
    """A symlink farm of the golden checkpoints tree: cheap to copy, and a case edits only its own links."""
    src = golden_dir / "checkpoints"
    for f in src.rglob("*"):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            t.symlink_to(f)
    return dst


def _nan_weights(src: Path, dst: Path, rng: random.Random) -> None:
    import torch

    sd = torch.load(src, map_location="cpu", weights_only=True)
    key = rng.choice(sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[rng.randrange(sd[key].numel())] = rng.choice([float("nan"), float("inf")])
    dst.unlink()
    torch.save(sd, dst)


def test_malformed_model_trees_are_refused_and_leave_no_output(golden_dir, tmp_path, capsys):
    # component identity (a vocoder of the other kind in a slot), a missing tokenizer.model, non-finite
    # weights: `convert all` validates first and certifies nothing; generate refuses the wrong component.
    rng = random.Random(SEED + 8)
    lm = "spiritlm_model/spirit-lm-base-7b"
    swapped = _tree_copy(golden_dir, tmp_path / "swapped")
    shutil.rmtree(swapped / "speech_tokenizer" / "hifigan_spiritlm_expressive_w2v2")
    shutil.copytree(golden_dir / "checkpoints" / "speech_tokenizer" / "hifigan_spiritlm_base",
                    swapped / "speech_tokenizer" / "hifigan_spiritlm_expressive_w2v2")
    no_tok = _tree_copy(golden_dir, tmp_path / "no_tokenizer")
    (no_tok / lm / "tokenizer.model").unlink()
    nan = _tree_copy(golden_dir, tmp_path / "nan")
    _nan_weights(golden_dir / "checkpoints" / lm / "pytorch_model.bin", nan / lm / "pytorch_model.bin", rng)
    for tree, variant in rng.sample([(swapped, "expressive"), (no_tok, "base"), (nan, "base")], 3):
        out = tmp_path / f"out-{tree.name}"
        assert_contract(["convert", "all", str(tree), str(out), "--variant", variant, "--no-self-check"], capsys,
                        valid=tree, must_not_exist=out)
    assert_contract(["generate", "--text", "hi", "--model", "spirit-lm-expressive-7b", "--checkpoints", str(swapped),
                     "--output-modality", "speech", "--out", str(tmp_path / "wavs")], capsys, valid=swapped,
                    must_not_exist=tmp_path / "wavs")
