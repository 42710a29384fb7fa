"""docs/finetune.md, executed: every `<!-- finetune:step -->` command as written (on the golden random-weight
checkpoints, with size overrides appended to the train commands), then the Python API example."""
import json
import shlex
from pathlib import Path

import numpy as np
import soundfile as sf

DOC = Path(__file__).resolve().parents[1] / "docs" / "finetune.md"
TINY_RUN = ["steps=4", "data.batch_size=8", "data.seq_len=96", "eval.every=2", "eval.batches=1", "checkpoint.every=2",
            "progress=false", "model.remat=none"]


def blocks(marker: str, lang: str) -> list[str]:
    text = DOC.read_text()
    return [part.split(f"```{lang}", 1)[1].split("```", 1)[0].strip() for part in text.split(marker)[1:]]


def write_records(root: Path):
    rng = np.random.default_rng(0)
    (root / "records" / "clips").mkdir(parents=True)
    for i in range(3):
        sf.write(root / "records" / "clips" / f"{i}.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    train = [{"task": "asr", "audio": "clips/0.wav", "text": "the cat sat on the mat"},
             {"task": "tts", "audio": "clips/1.wav", "text": "a dog ran in the park"},
             {"prompt": [{"text": "Say it aloud:"}, {"text": "hello"}],
              "response": [{"audio": "clips/2.wav", "start": 0.0, "end": 0.8}]},
             {"task": "asr", "audio": "clips/missing.wav", "text": "no such file"}]  # a counted skip
    train += [{"prompt": [{"text": f"question {i}?"}], "response": [{"text": f" answer {i}"}]} for i in range(12)]
    held = [{"prompt": [{"text": f"held {i}?"}], "response": [{"text": f" reply {i}"}]} for i in range(4)]
    pairs = [{"id": str(i), "good": f"the cat {w} on the mat", "bad": f"the cat on {w} mat the", "modality": "text"}
             for i, w in enumerate(("sat", "slept", "sang", "stood"))]
    for name, recs in (("train", train), ("heldout", held), ("pairs", pairs)):
        (root / "records" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_finetune_doc_walkthrough_runs_as_written(tmp_path, golden_dir, monkeypatch, capsys):
    from spiritlm_jax.cli import main

    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "configs").symlink_to(DOC.parents[1] / "configs")
    write_records(tmp_path)
    env = {"$SPIRITLM": str(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"),
           "$SPEECH_TOKENIZER": str(golden_dir / "checkpoints" / "speech_tokenizer")}
    steps = blocks("<!-- finetune:step -->", "bash")
    assert len(steps) == 6, steps
    for cmd in steps:
        for k, v in env.items():
            cmd = cmd.replace(k, v)
        argv = shlex.split(cmd)
        assert argv[0] == "spiritlm-jax"
        if argv[1] == "train" and "--export" not in argv:
            argv += TINY_RUN
        assert main(argv[1:]) == 0, cmd
    out = capsys.readouterr()
    assert "unreadable_audio: 1" in out.out  # the record whose audio is missing is a counted skip
    rows = [json.loads(line) for line in (tmp_path / "runs" / "sft_lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["loss"]) for r in evals)
    assert all(r["pairs/n"] == 4 and 0 <= r["pairs/accuracy"] <= 1 for r in evals)  # eval.tasks beside the loss
    assert list((tmp_path / "runs" / "sft_lora" / "tensorboard").glob("events.*"))
    # W&B offline (no network): a run folder with its history
    assert list((tmp_path / "runs" / "sft_lora" / "wandb").glob("offline-run-*/run-*.wandb"))
    merged = tmp_path / "models" / "sft-lora-merged"
    assert (merged / "tokenizer.model").is_file()
    from spiritlm_jax.converters.llama import load_converted

    cfg, params = load_converted(merged)
    assert cfg.vocab_size == 32667 and "q_lora_a" not in params["layers"]["attn"]
    # the in-training task scored the step-4 parameters exactly as `spiritlm-jax eval` scores the export of step 4
    assert main(["eval", "pairs", "--model", str(merged), "--data", "records/pairs.jsonl", "--dtype", "bfloat16",
                 "--checkpoints", str(golden_dir / "checkpoints"), "--output", "pairs.json"]) == 0
    assert json.loads(Path("pairs.json").read_text())["metrics"]["accuracy"] == evals[-1]["pairs/accuracy"]
    hf = tmp_path / "models" / "sft-lora-hf"
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 32667
    assert list(hf.glob("*.safetensors"))


def test_finetune_doc_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(DOC.parents[1] / "configs")
    (code,) = blocks("<!-- finetune:python -->", "python")
    scope = {}
    exec(compile(code, str(DOC), "exec"), scope)
    history = scope["history"]
    assert history[-1].metrics["loss"] < history[0].metrics["loss"]
    assert (tmp_path / "models" / "api_demo" / "config.json").is_file()
