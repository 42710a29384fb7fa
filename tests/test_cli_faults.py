"""Fault classes of the inference CLIs, each closed where it is decided: output paths checked before any
model loads (spiritlm_jax/outputs.py), partial tokenize failures reported with a non-zero exit, and audio
shorter than the encoder's receptive field refused (speech.ShortAudioError)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.cli import main
from spiritlm_jax.speech import ShortAudioError


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file"])
def test_generate_out_is_checked_before_the_model_loads(golden_dir, tmp_path, capsys, case):
    f = tmp_path / "taken.wav"
    f.write_bytes(b"valid earlier output")
    out = f if case == "out_is_a_file" else f / "sub"
    t0 = time.perf_counter()
    assert main(["generate", "--text", "hi", "--checkpoints", str(golden_dir / "checkpoints"),
                 "--output-modality", "speech", "--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 5  # refused up front: loading the model alone takes longer
    assert "is not a folder" in _one_error_line(capsys.readouterr().err)
    assert f.read_bytes() == b"valid earlier output"


@pytest.mark.parametrize("flags, problem", [
    (["--mesh", "1,x,1"], "--mesh '1,x,1': give three integers DATA,FSDP,TENSOR"),
    (["--mesh", "3,1,1"], "mesh (3, 1, 1) needs 3 devices but 8 are available"),
    (["--mesh", "1,-1,-1"], "at most one mesh axis may be -1"),
    (["--distributed", "--distributed-timeout-s", "0"], "--distributed-timeout-s must be in [1, 3600] seconds"),
])
def test_generate_mesh_and_distributed_options_are_checked_before_the_model_loads(golden_dir, capsys, flags, problem):
    t0 = time.perf_counter()
    assert main(["generate", "--text", "hi", "--checkpoints", str(golden_dir / "checkpoints"), *flags]) == 2
    assert time.perf_counter() - t0 < 5  # refused up front: loading the model alone takes longer
    assert problem in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", ["a_folder", "missing_folder", "existing_file"])
def test_tokenize_out_is_checked_before_the_model_loads(golden_dir, tmp_path, capsys, case):
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(3200, np.float32), 16000)
    out = {"a_folder": tmp_path, "missing_folder": tmp_path / "nope" / "u.jsonl",
           "existing_file": tmp_path / "old.jsonl"}[case]
    if case == "existing_file":
        out.write_text('{"audio": "earlier result"}\n')
    argv = ["tokenize", str(wav), "--checkpoints", str(golden_dir / "checkpoints"), "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert {"a_folder": "is a folder", "missing_folder": "does not exist",
            "existing_file": "--overwrite"}[case] in line
    if case == "existing_file":
        assert out.read_text() == '{"audio": "earlier result"}\n'  # nothing valid replaced


@pytest.fixture(scope="module")
def mixed_audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sf.write(d / "good.wav", 0.1 * rng.standard_normal(8000).astype(np.float32), 16000)
    sf.write(d / "short.wav", 0.1 * rng.standard_normal(1000).astype(np.float32), 16000)  # < 1280 samples
    (d / "broken.wav").write_bytes(b"RIFF, but not audio")
    return d


def test_tokenize_partial_failure_is_a_non_zero_exit_with_a_summary(golden_dir, mixed_audio, tmp_path, capsys):
    out = tmp_path / "u.jsonl"
    argv = ["tokenize", str(mixed_audio), "--checkpoints", str(golden_dir / "checkpoints"), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tokenized 1 of 3 files" in err
    assert "error: 2 of 3 files failed; pass --keep-going" in err
    assert "broken.wav" in err and "short.wav" in err and "1280 samples" in err
    rows = {json.loads(x)["audio"].rsplit("/", 1)[1]: json.loads(x) for x in out.read_text().splitlines()}
    assert rows["good.wav"]["hubert"] and "error" in rows["short.wav"] and "error" in rows["broken.wav"]
    # --keep-going: the documented opt-in to a partial result
    assert main(argv + ["--keep-going", "--overwrite"]) == 0
    assert "warning: 2 of 3 files failed (--keep-going: exit 0)" in capsys.readouterr().err


def test_audio_shorter_than_the_receptive_field_is_an_error(golden_dir):
    from spiritlm_jax.speech import SpeechTokenizer

    tok = SpeechTokenizer.from_checkpoints(golden_dir / "checkpoints", "base", with_vocoder=False)
    with pytest.raises(ShortAudioError, match=r"1279 samples \(80 ms at 16 kHz\) is shorter than the 1280 samples"):
        tok.encode_units(np.zeros(1279, np.float32))
    assert tok.encode_units(np.zeros(1279, np.float32), strict_original=True)["hubert"] == ""  # the original's
    assert len(tok.encode_units(0.1 * np.ones(1280, np.float32))["hubert"].split()) >= 1
