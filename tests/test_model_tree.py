"""The JAX-native model tree (`convert all`, docs/model-format.md): every component converted, read with
torch, torchfcpe and transformers absent, outputs equal to the original-layout path; validation before
any write; component identity checked wherever a tree is read."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.cli import main

BLOCKED = ("torch", "torchfcpe", "transformers")


@pytest.fixture(scope="module")
def converted(converted_tree):
    return converted_tree


def test_every_component_is_converted_not_copied(converted):
    tree = json.loads((converted / "spiritlm-jax-tree.json").read_text())
    assert tree["variants"] == ["base", "expressive"]
    st = converted / "speech_tokenizer"
    for name, fmt in tree["components"].items():
        assert json.loads((st / name / "config.json").read_text())["format"] == fmt
        assert (st / name / "model.safetensors").is_file()
    assert sorted(tree["components"]) == ["fcpe", "hifigan_spiritlm_base", "hifigan_spiritlm_expressive_w2v2",
                                          "hubert_25hz", "style_encoder_w2v2", "vqvae_f0_quantizer"]
    assert not list(converted.rglob("*.pt")) and not list(converted.rglob("*.bin"))
    assert (st / "hifigan_spiritlm_base" / "speakers.txt").is_file()


def _inputs(golden_dir, tmp: Path) -> dict:
    wav, sr = sf.read(golden_dir / "audio" / "7143-88743-0029.flac", dtype="float32")
    short, other = tmp / "prompt.wav", tmp / "other.wav"
    sf.write(short, wav[: sr * 2], sr)
    sf.write(other, wav[sr * 2: sr * 3], sr)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "t1", "good": "The cat sat on the mat.", "bad": "The cat sat on the the.", "modality": "text"},
        {"id": "s1", "good": str(short), "bad": str(other), "modality": "speech"},
    ]) + "\n")
    return {"short": short, "pairs": pairs, "audio": golden_dir / "audio"}


def _commands(ck: Path, out: Path, inp: dict) -> list[list[str]]:
    ckf = ["--checkpoints", str(ck)]
    return [
        ["tokenize", str(inp["audio"]), *ckf, "--variant", "expressive", "--out", str(out / "units.jsonl")],
        ["generate", "--text", "The weather today is", "--model", "spirit-lm-expressive-7b", *ckf,
         "--output-modality", "speech", "--max-new-tokens", "24", "--out", str(out / "t2s")],
        ["generate", "--speech", str(inp["short"]), "--model", "spirit-lm-base-7b", *ckf,
         "--output-modality", "text", "--max-new-tokens", "12", "--out", str(out / "s2t")],
        ["demo", *ckf, "--variant", "base", "--max-new-tokens", "30", "--out", str(out / "demo")],
        ["eval", "pairs", "--data", str(inp["pairs"]), "--model", "spirit-lm-base-7b", *ckf,
         "--output", str(out / "eval.json")],
    ]


SCRIPT = textwrap.dedent("""
    import json, sys
    for name in {blocked!r}:
        sys.modules[name] = None          # unimportable, before anything else is imported
    from spiritlm_jax.cli import main
    commands = json.loads(open(sys.argv[1]).read())
    for i, argv in enumerate(commands):
        print(f"### {{i}}", flush=True)
        rc = main(argv)
        if rc != 0:
            sys.exit(f"command {{argv[0]}} exited {{rc}}")
        print(f"### end {{i}}", flush=True)
    assert all(sys.modules[n] is None for n in {blocked!r})
""")


def _texts(stdout: str) -> list[str]:
    """The printed output of each command, between the markers (generate prints the text it made)."""
    out, cur = [], None
    for line in stdout.splitlines():
        if line.startswith("### end"):
            out.append("\n".join(cur))
            cur = None
        elif line.startswith("### "):
            cur = []
        elif cur is not None:
            cur.append(line)
    return out


def _wavs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sf.read(p, dtype="float32")[0] for p in sorted(folder.rglob("*.wav"))}


def test_torch_free_commands_on_the_converted_tree_equal_the_original_path(converted, golden_dir, tmp_path, capsys):
    inp = _inputs(golden_dir, tmp_path)
    free, orig = tmp_path / "free", tmp_path / "orig"
    free.mkdir()
    orig.mkdir()
    cmds = tmp_path / "cmds.json"
    cmds.write_text(json.dumps(_commands(converted, free, inp)))
    (tmp_path / "run.py").write_text(SCRIPT.format(blocked=BLOCKED))
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(cmds)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    free_text = _texts(proc.stdout)

    orig_text = [""]
    for argv in _commands(golden_dir / "checkpoints", orig, inp)[1:]:  # the original layout, torch present
        capsys.readouterr()
        assert main(argv) == 0
        orig_text.append(capsys.readouterr().out)

    # tokenize: the units of the original tokenizer itself (golden), which the original-layout path gives too
    rec = json.loads((free / "units.jsonl").read_text().splitlines()[0])
    ref = np.load(golden_dir / "cases" / "tokenizer_expressive_recording.npz")
    assert (rec["hubert"], rec["pitch"], rec["style"]) == (str(ref["units_hubert"]), str(ref["units_pitch"]),
                                                          str(ref["units_style"]))
    # generate (text→speech, speech→text) and the demo: identical texts and waveforms
    def outputs(text: str, root: Path) -> list[str]:  # generate's "[i] text: …" / "[i] speech: … -> file" lines
        return [ln.replace(str(root), "ROOT") for ln in text.splitlines() if re.match(r"\[\d+\] (text|speech):", ln)]

    for i in (1, 2):
        assert outputs(free_text[i], free) == outputs(orig_text[i], orig) != []
    for sub in ("t2s", "demo"):
        a, b = _wavs(free / sub), _wavs(orig / sub)
        assert a and a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), sub
    # eval: identical scores
    ev_free, ev_orig = (json.loads((d / "eval.json").read_text()) for d in (free, orig))
    assert ev_free["metrics"] == ev_orig["metrics"]


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def test_original_tree_without_torch_gives_the_convert_message(golden_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None
        from spiritlm_jax.cli import main
        sys.exit(main(["tokenize", {str(golden_dir / "audio")!r}, "--checkpoints", {str(golden_dir / "checkpoints")!r},
                       "--out", {str(tmp_path / "u.jsonl")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "original PyTorch checkpoint" in proc.stderr and "spiritlm-jax convert all" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_vocoder_in_the_wrong_slot_is_refused_before_anything_is_written(golden_dir, tmp_path, capsys):
    src = _copy_tree(golden_dir / "checkpoints", tmp_path / "src")
    st = src / "speech_tokenizer"
    shutil.rmtree(st / "hifigan_spiritlm_expressive_w2v2")
    shutil.copytree(st / "hifigan_spiritlm_base", st / "hifigan_spiritlm_expressive_w2v2")
    dst = tmp_path / "dst"
    assert main(["convert", "all", str(src), str(dst), "--no-self-check"]) == 1
    err = capsys.readouterr().err
    assert "hifigan_spiritlm_expressive_w2v2" in err and "Base vocoder" in err and "hifigan_spiritlm_base" in err
    assert not dst.exists() and not list(tmp_path.glob(".dst.partial-*"))
    # the same check where a tree is READ: SpeechTokenizer refuses it for the expressive variant
    from spiritlm_jax.speech import SpeechTokenizer
    from spiritlm_jax.vocoder import VocoderSlotError

    with pytest.raises(VocoderSlotError, match="Expressive slot"):
        SpeechTokenizer.from_checkpoints(src, "expressive")


def test_converted_component_in_the_wrong_folder_is_refused(converted, tmp_path):
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer
    from spiritlm_jax.model_dir import ModelDirError

    bad = tmp_path / "hubert_25hz"
    shutil.copytree(converted / "speech_tokenizer" / "style_encoder_w2v2", bad)
    with pytest.raises(ModelDirError, match="spiritlm-jax/style.*spiritlm-jax/hubert"):
        HubertTokenizer.from_checkpoint_dir(bad)


def test_non_finite_weights_and_missing_files_are_refused_first(golden_dir, tmp_path, capsys):
    import torch

    src = _copy_tree(golden_dir / "checkpoints", tmp_path / "src")
    gen = src / "speech_tokenizer" / "hifigan_spiritlm_base" / "generator.pt"
    sd = torch.load(gen, weights_only=True)
    sd["generator"]["dict.weight"][0, 0] = float("nan")
    torch.save(sd, gen)
    keep = tmp_path / "dst"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    assert main(["convert", "all", str(src), str(keep), "--no-self-check", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "hifigan_spiritlm_base" in err
    assert (keep / "precious.txt").read_text() == "x"  # nothing valid is touched by a failed conversion
    (src / "spiritlm_model" / "spirit-lm-base-7b" / "tokenizer.model").unlink()
    assert main(["convert", "all", str(src), str(tmp_path / "dst2"), "--no-self-check"]) == 1
    assert "tokenizer.model" in capsys.readouterr().err and not (tmp_path / "dst2").exists()
