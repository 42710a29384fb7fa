"""The `spiritlm-jax demo` command end to end (tiny random checkpoints built in a tmp cache), the original
layout it writes, the --checkpoints / $SPIRITLM_CHECKPOINTS_DIR paths and their errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spiritlm_jax.cli import main as cli_main
from spiritlm_jax import tiny_checkpoints
from spiritlm_jax.infer import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch):
    monkeypatch.delenv("SPIRITLM_CHECKPOINTS_DIR", raising=False)
    monkeypatch.delenv(demo.DEBUG_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """The demo tree, built once through the cache (as the command does)."""
    cache = tmp_path_factory.mktemp("cache")
    root, built = tiny_checkpoints.ensure_tiny_checkpoints(cache, log=lambda m: None)
    assert built
    return cache, root


def _check_wav(path: Path, summary_item: dict) -> np.ndarray:
    info = sf.info(str(path))
    assert info.samplerate == 16000 and info.channels == 1 and info.format == "WAV"
    wav, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000 and wav.ndim == 1 and len(wav) == summary_item["samples"] > 0
    assert np.isfinite(wav).all() and np.abs(wav).max() > 1e-3  # not silence
    assert summary_item["seconds"] == pytest.approx(len(wav) / 16000)
    return wav


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # something is drawn


def _check_pitch_units(item: dict) -> None:
    units = item["pitch_units"]
    assert units is not None and all(0 <= u < 64 for u in units)
    # one unit per 80 ms (FCPE 200 Hz frames ÷ the VQ-VAE's stride 16), REFERENCE §14.1
    assert abs(len(units) - item["samples"] / 1280) <= 2


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
def test_demo_end_to_end_on_the_tiny_random_model(tiny_tree, tmp_path, capsys):
    cache, _ = tiny_tree
    out = tmp_path / "out"
    rc = cli_main(["demo", "--out", str(out), "--cache", str(cache), "--seed", "0", "--max-new-tokens", "100"])
    std = capsys.readouterr()
    assert rc == 0, std.err
    assert "Traceback" not in std.err
    first = std.out.strip().splitlines()[:3]
    assert any("RANDOM" in ln for ln in first)  # said plainly and first
    assert "--checkpoints" in std.out and "SPIRITLM_CHECKPOINTS_DIR" in std.out

    s = json.loads((out / "summary.json").read_text())
    assert s["random_weights"] is True and s["variant"] == "expressive" and s["max_new_tokens"] == 100
    assert Path(s["checkpoints"]) == tiny_tree[1]
    assert set(s["tasks"]) == {"speech_to_speech", "text_to_speech", "speech_to_text"}

    prompt = _check_wav(out / "prompt.wav", s["prompt"])
    np.testing.assert_allclose(prompt, demo.synthetic_prompt(), atol=1 / 32768)  # PCM_16 of the bundled prompt
    _check_png(out / "prompt.png")
    _check_pitch_units(s["prompt"])
    assert s["prompt"]["speech_units"].startswith("[St") and "[Pi" in s["prompt"]["speech_units"]
    assert 0.3 < s["prompt"]["voiced_fraction"] < 0.9  # three syllables and pauses

    for name in ("speech_to_speech", "text_to_speech"):
        t = s["tasks"][name]
        assert t["error"] is None and t["output_modality"] == "speech" and t["prompt_tokens"] > 1
        assert t["attempts"][-1] == {"seed": t["seed"], "error": None}
        (item,) = t["outputs"]
        assert item["type"] == "speech" and item["wav"] == f"{name}.wav" and item["png"] == f"{name}.png"
        _check_wav(out / item["wav"], item)
        _check_png(out / item["png"])
        _check_pitch_units(item)
    t = s["tasks"]["speech_to_text"]
    (item,) = t["outputs"]
    assert item["type"] == "text" and isinstance(item["text"], str)
    assert repr(item["text"]) in std.out  # printed
    assert not any(f in item["text"] for f in ("[Hu", "[Pi", "[St", "[Text]", "[Speech]"))  # text mode bans them
    assert set(s["timings"]) >= {"convert_and_load_s", "total_s"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["prompt.wav", "prompt.png", "speech_to_speech.wav", "speech_to_speech.png", "text_to_speech.wav",
         "text_to_speech.png", "summary.json"])


def test_checkpoints_flag_on_an_original_layout_copy(tiny_tree, tmp_path, capsys):
    """A second copy of the tree, given as --checkpoints: the real-checkpoint path (no banner, no cache),
    here with the Base model (HuBERT units only; the plots build the pitch tokenizer from the folder)."""
    copy = tmp_path / "my checkpoints"
    shutil.copytree(tiny_tree[1], copy)
    (copy / tiny_checkpoints.MARKER).unlink()  # nothing of the cache machinery is needed
    out = tmp_path / "out"
    rc = cli_main(["demo", "--checkpoints", str(copy), "--variant", "base", "--out", str(out),
                   "--max-new-tokens", "40"])
    std = capsys.readouterr()
    assert rc == 0, std.err
    assert "weights are RANDOM" not in std.out and str(copy) in std.out
    s = json.loads((out / "summary.json").read_text())
    assert s["random_weights"] is False and s["checkpoints_source"] == "--checkpoints" and s["variant"] == "base"
    assert "[Pi" not in s["prompt"]["speech_units"] and "[Hu" in s["prompt"]["speech_units"]
    for name in ("speech_to_speech", "text_to_speech"):
        (item,) = s["tasks"][name]["outputs"]
        _check_wav(out / item["wav"], item)
        _check_png(out / item["png"])
    assert s["tasks"]["speech_to_text"]["outputs"][0]["type"] == "text"


# ------------------------------------------------------------------------------------------------
# bad checkpoint folders: one clear message, exit 2, no traceback
# ------------------------------------------------------------------------------------------------
def _run_err(capsys, *argv) -> str:
    rc = cli_main(["demo", *argv])
    std = capsys.readouterr()
    assert rc == 2, std.err
    assert "Traceback" not in std.err and std.err.startswith("error: ")
    return std.err


def test_missing_checkpoint_folder(tmp_path, capsys):
    err = _run_err(capsys, "--checkpoints", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert "does not exist" in err and "--checkpoints" in err and "speech_tokenizer" in err


def test_env_variable_is_honoured(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPIRITLM_CHECKPOINTS_DIR", str(tmp_path / "from-env"))
    err = _run_err(capsys, "--out", str(tmp_path / "o"))
    assert "$SPIRITLM_CHECKPOINTS_DIR" in err and "from-env" in err


def test_incomplete_checkpoint_folder_lists_missing_files(tmp_path, capsys):
    (tmp_path / "ck" / "speech_tokenizer" / "hubert_25hz").mkdir(parents=True)
    (tmp_path / "ck" / "speech_tokenizer" / "hubert_25hz" / "mhubert_base_25hz.pt").write_bytes(b"x")
    err = _run_err(capsys, "--checkpoints", str(tmp_path / "ck"), "--out", str(tmp_path / "o"))
    assert "not a complete Spirit LM checkpoints/ folder" in err
    assert "speech_tokenizer/hubert_25hz/L11_quantizer_500.pt" in err
    assert "spiritlm_model/spirit-lm-expressive-7b/tokenizer.model" in err
    assert "mhubert_base_25hz.pt" not in err  # present, so not listed


def test_garbage_checkpoint_file_names_the_file(tiny_tree, tmp_path, capsys):
    copy = tmp_path / "ck"
    shutil.copytree(tiny_tree[1], copy)
    bad = copy / "speech_tokenizer" / "hubert_25hz" / "mhubert_base_25hz.pt"
    bad.write_bytes(b"this is not a torch checkpoint")
    err = _run_err(capsys, "--checkpoints", str(copy), "--out", str(tmp_path / "o"))
    assert "could not load the expressive model" in err and "mhubert_base_25hz.pt" in err


def test_garbage_lm_config(tiny_tree, tmp_path, capsys):
    copy = tmp_path / "ck"
    shutil.copytree(tiny_tree[1], copy)
    (copy / "spiritlm_model" / "spirit-lm-base-7b" / "config.json").write_text("{not json")
    err = _run_err(capsys, "--checkpoints", str(copy), "--variant", "base", "--out", str(tmp_path / "o"))
    assert "could not load the base model" in err


def test_bad_max_new_tokens(tiny_tree, tmp_path, capsys):
    err = _run_err(capsys, "--cache", str(tiny_tree[0]), "--max-new-tokens", "0", "--out", str(tmp_path / "o"))
    assert "--max-new-tokens" in err


# ------------------------------------------------------------------------------------------------
# robustness of the speech tasks (a fake model: no compute)
# ------------------------------------------------------------------------------------------------
class _FakeTok:
    def encode(self, s):
        return list(range(len(s)))


class _FakeLM:
    """generate() raises SpeechDecodeError for the seeds in ``bad`` (as an Expressive LM without [Pi] does)."""

    def __init__(self, bad):
        self.bad, self.seeds, self.tokenizer = set(bad), [], _FakeTok()

    def generate(self, inputs, output_modality, max_new_tokens, do_sample, seed, return_prompt):
        from spiritlm_jax.prompting import ContentType, GenerationOutput
        from spiritlm_jax.speech import SpeechDecodeError

        self.seeds.append(seed)
        if seed in self.bad:
            raise SpeechDecodeError("an Expressive vocoder needs pitch units, but the speech has no [Pi] token")
        return [GenerationOutput(np.zeros(640, np.float32), ContentType.SPEECH)], "[Speech]"


class _Args:
    seed, max_new_tokens = 5, 10


def test_speech_task_retries_with_the_next_seed(capsys):
    lm = _FakeLM(bad={5})
    r = demo._run_task(lm, "speech_to_speech", "speech", "speech", np.zeros(16000, np.float32), _Args)
    assert lm.seeds == [5, 6] and r["seed"] == 6 and len(r["outputs"]) == 1
    assert r["attempts"][0]["seed"] == 5 and "[Pi]" in r["attempts"][0]["error"]
    assert r["attempts"][1] == {"seed": 6, "error": None}
    assert "trying seed 6" in capsys.readouterr().out


def test_speech_task_gives_up_cleanly():
    lm = _FakeLM(bad={5, 6, 7})
    r = demo._run_task(lm, "text_to_speech", "text", "speech", np.zeros(16000, np.float32), _Args)
    assert lm.seeds == [5, 6, 7] and r["outputs"] == [] and "3 attempts" in r["error"]


# ------------------------------------------------------------------------------------------------
# the assets
# ------------------------------------------------------------------------------------------------
def test_tree_has_the_original_layout_and_vocabulary(tiny_tree):
    from spiritlm_jax.text import TextTokenizer

    _, root = tiny_tree
    assert all((root / f).is_file() for f in tiny_checkpoints.required_files())
    for v in tiny_checkpoints.VARIANTS:
        lm_dir = root / "spiritlm_model" / tiny_checkpoints.lm_dir_name(v)
        cfg = json.loads((lm_dir / "config.json").read_text())
        assert cfg["vocab_size"] == 32667 and cfg["torch_dtype"] == "bfloat16" and "rope_theta" in cfg
        tok = TextTokenizer.from_dir(lm_dir)
        voc = tok.vocab
        # REFERENCE.md §9.1: the original ids
        assert (voc.text_marker, voc.speech_marker) == (32000, 32001)
        assert voc.hubert == range(32002, 32503) and voc.pitch == range(32503, 32567)
        assert voc.style == range(32567, 32667)
        assert tok.pieces[3] == "<0x00>" and tok.pieces[31999].startswith("<unused_")
        s = "[Text] the river[Speech][St3][Pi5][Hu10][Hu499]"
        ids = tok.encode(s)
        assert ids[:2] == [1, 32000] and ids[-4:] == [32570, 32508, 32012, 32501]
        assert all(i < tiny_checkpoints.n_trained_pieces((lm_dir / "tokenizer.model").read_bytes()) for i in ids[2:-5])
        assert tok.decode(ids) == s


def test_tokenizer_model_loads_in_sentencepiece_itself():
    import sentencepiece as spm

    buf = tiny_checkpoints.build_tokenizer_model()
    assert buf == tiny_checkpoints.build_tokenizer_model()  # deterministic
    sp = spm.SentencePieceProcessor(model_proto=buf)
    assert sp.get_piece_size() == 32667 and sp.id_to_piece(32000) == "[Text]" and sp.id_to_piece(32666) == "[St99]"
    assert sp.is_unused(31999) and not sp.is_unused(258) and sp.is_byte(258)
    assert sp.decode(sp.encode("the water was smooth")) == "the water was smooth"


def test_cache_is_reused_and_rebuilt_when_damaged(tmp_path):
    root, built = tiny_checkpoints.ensure_tiny_checkpoints(tmp_path, log=lambda m: None)
    assert built and tiny_checkpoints.cache_is_complete(root)
    assert tiny_checkpoints.ensure_tiny_checkpoints(tmp_path, log=lambda m: None) == (root, False)
    q = root / "speech_tokenizer" / "hubert_25hz" / "L11_quantizer_500.pt"
    good = q.read_bytes()
    q.write_bytes(good[:100])  # truncated file: fingerprint mismatch
    assert not tiny_checkpoints.cache_is_complete(root)
    assert tiny_checkpoints.ensure_tiny_checkpoints(tmp_path, log=lambda m: None) == (root, True)
    assert q.read_bytes() == good  # same seed, same bytes
    (root / tiny_checkpoints.MARKER).unlink()  # an interrupted build never got its marker
    assert tiny_checkpoints.ensure_tiny_checkpoints(tmp_path, log=lambda m: None)[1] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cache_location_env(monkeypatch, tmp_path):
    monkeypatch.setenv(tiny_checkpoints.CACHE_ENV, str(tmp_path / "c"))
    assert tiny_checkpoints.default_cache_dir() == tmp_path / "c"


def test_synthetic_prompt_is_deterministic_16k_audio():
    a, b = demo.synthetic_prompt(), demo.synthetic_prompt()
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and len(a) == int(demo.PROMPT_SECONDS * 16000)
    assert np.abs(a).max() == pytest.approx(0.5)
    assert np.abs(a[: int(0.1 * 16000)]).max() < 0.01  # starts with a pause
