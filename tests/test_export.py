"""Port out: `spiritlm-jax export` — a converted tree back to the original formats (state dicts equal, and
the parity command passes on the exported tree), an LM to transformers (no missing/unexpected keys,
logits ≤ 1e-5, the same tokenization), and a training run to a model every command takes."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from spiritlm_jax.cli import main

# (file, key of the state dict inside it; None: the file IS the state dict)
ORIGINAL_FILES = [
    ("hubert_25hz/mhubert_base_25hz.pt", "model_weight"),
    ("hubert_25hz/L11_quantizer_500.pt", "model_weight"),
    ("vqvae_f0_quantizer/model.pt", "model"),
    ("style_encoder_w2v2/pytorch_model.bin", None),
    ("hifigan_spiritlm_base/generator.pt", "generator"),
    ("hifigan_spiritlm_expressive_w2v2/generator.pt", "generator"),
]


@pytest.fixture(scope="module")
def exported(converted_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("exported") / "checkpoints"
    assert main(["export", str(converted_tree), str(dst), "--to", "original"]) == 0
    return dst


def _fold(sd, v_key):
    from spiritlm_jax.converters.transforms import fold_weight_norm

    g_key = v_key[:-1] + ("g" if v_key.endswith("weight_v") else "0")
    return fold_weight_norm(sd[g_key].numpy(), sd[v_key].numpy(), 2 if "pos_conv" in v_key else 0)


@pytest.mark.parametrize("name,key", ORIGINAL_FILES, ids=[f for f, _ in ORIGINAL_FILES])
def test_export_of_import_gives_the_original_state_dict(golden_dir, exported, name, key):
    import torch

    a = torch.load(golden_dir / "checkpoints" / "speech_tokenizer" / name, weights_only=True)
    b = torch.load(exported / "speech_tokenizer" / name, weights_only=True)  # what the original's loaders do
    if key is not None:
        assert set(a) == set(b)
        for k in set(a) - {key}:
            assert a[k] == b[k], k  # model_cfg, task_cfg, dictionaries_symbols: identical, tuples included
        a, b = a[key], b[key]
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if k.endswith(("weight_g", "original0")):
            continue  # the (g, v) pair is not unique: compared folded, with its v below
        if k.endswith(("weight_v", "original1")):
            # g·v/‖v‖ in float64, rounded once: our inverse stores v = w, g = ‖w‖, so refolding gives back w
            # to fp32 rounding (measured 0 on set A)
            np.testing.assert_allclose(_fold(b, k), _fold(a, k), rtol=2e-7, atol=0)
        else:
            assert torch.equal(a[k], b[k]), k


def test_exported_configs_and_lists_are_the_originals(golden_dir, exported):
    src, out = golden_dir / "checkpoints" / "speech_tokenizer", exported / "speech_tokenizer"
    assert (out / "vqvae_f0_quantizer" / "config.yaml").read_text() == (src / "vqvae_f0_quantizer" / "config.yaml").read_text()
    for d in ("hifigan_spiritlm_base", "hifigan_spiritlm_expressive_w2v2", "style_encoder_w2v2"):
        assert json.loads((out / d / "config.json").read_text()) == json.loads((src / d / "config.json").read_text())
    for f in ("hifigan_spiritlm_base/speakers.txt", "hifigan_spiritlm_base/styles.txt"):
        assert (out / f).read_text() == (src / f).read_text()


# One case file per exported speech component: HuBERT + quantizer, the VQ-VAE (with FCPE), the style
# encoder, both vocoders. The LM goes out through export_hf, whose logits are held to 1e-5 against ours
# below. The full round trip (every case file, the LM's included) is run by the command in
# docs/model-format.md; CI runs this selection to stay within its time budget.
ROUND_TRIP_CASES = "hubert_synth_odd,f0_fcpe_synth_odd,style_synth_odd,hifigan_expressive,hifigan_base_recunits"


def test_parity_passes_on_the_exported_tree(golden_dir, exported, tmp_path):
    g = tmp_path / "golden"
    g.mkdir()
    for d in ("cases", "audio"):
        (g / d).symlink_to(golden_dir / d)
    (g / "checkpoints").symlink_to(exported)
    out = tmp_path / "parity.json"
    assert main(["parity", str(g), "--only", ROUND_TRIP_CASES, "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert len({r["case"] for r in recs}) == len(ROUND_TRIP_CASES.split(",")) and all(r["pass"] for r in recs)


# ------------------------------------------------------------------------------------------------ HF
def test_export_hf_loads_in_transformers_with_equal_logits(converted_tree, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    from spiritlm_jax.converters.llama import load_converted
    from spiritlm_jax.models.llama import Llama
    from spiritlm_jax.text import TextTokenizer

    lm = converted_tree / "spiritlm_model" / "spirit-lm-expressive-7b"
    dst = tmp_path / "hf"
    assert main(["export", str(lm), str(dst), "--to", "hf", "--dtype", "float32"]) == 0
    for f in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors"):
        assert (dst / f).is_file(), f
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg, params = load_converted(lm, dtype="float32", param_dtype="float32")
    ours_tok = TextTokenizer.from_dir(lm, n_embed=cfg.vocab_size)
    text = "The weather[Hu12][Hu7][Pi3][St5] today"
    ids = ours_tok.encode(text)
    hf_tok = LlamaTokenizer.from_pretrained(dst)
    assert hf_tok(text)["input_ids"] == ids
    import jax.numpy as jnp

    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray([ids]))[0])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    # fp32 on both sides from the same weights: summation order only (measured ~5e-6 on set A's logits)
    assert np.abs(ours - ref).max() <= 1e-5


def test_export_hf_shards_with_an_index(converted_tree, tmp_path):
    from safetensors.numpy import load_file

    lm = converted_tree / "spiritlm_model" / "spirit-lm-base-7b"
    from spiritlm_jax.converters.export import export_hf

    dst = export_hf(lm, tmp_path / "hf", max_shard_bytes=300_000, log=lambda m: None)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    got = {k: v for s in shards for k, v in load_file(str(dst / s)).items()}
    assert set(got) == set(index["weight_map"]) and sum(v.nbytes for v in got.values()) == index["metadata"]["total_size"]


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The README's tiny train run, with Spirit LM's vocabulary size so a real tokenizer fits its rows."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- readme:train -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.strip())[1:]
    run = tmp_path_factory.mktemp("run") / "tiny"
    argv = [a for a in argv if not a.startswith(("checkpoint.dir=", "model.vocab_size=", "steps=", "checkpoint.every="))]
    assert main(argv + [f"checkpoint.dir={run}", "model.vocab_size=32768", "steps=4", "checkpoint.every=2"]) == 0
    return run


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (k,))
    else:
        yield prefix, np.asarray(tree)


def test_trained_run_exports_to_a_model_every_command_takes(tiny_run, golden_dir, tmp_path, capsys):
    import jax
    import orbax.checkpoint as ocp

    from spiritlm_jax.converters.llama import load_converted

    tok = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-expressive-7b"
    bf16, fp32 = tmp_path / "model", tmp_path / "model32"
    assert main(["export", str(tiny_run), str(bf16), "--tokenizer", str(tok)]) == 0
    assert main(["export", str(tiny_run / "4"), str(fp32), "--tokenizer", str(tok), "--dtype", "float32"]) == 0
    assert (bf16 / "tokenizer.model").read_bytes() == (tok / "tokenizer.model").read_bytes()
    assert not (bf16 / "opt_state").exists() and json.loads((bf16 / "config.json").read_text())["step"] == 4

    # params equal the checkpoint's bit for bit (fp32) and their exact bf16 rounding (default)
    state = ocp.PyTreeCheckpointer().restore(tiny_run / "4" / "state")
    ref = dict(_leaves(jax.device_get(state["params"])))
    for folder, dtype in ((fp32, "float32"), (bf16, "bfloat16")):
        _, got = load_converted(folder, dtype=dtype, param_dtype=dtype)
        got = dict(_leaves(jax.device_get(got)))
        assert got.keys() == ref.keys()
        for k in ref:
            want = ref[k].astype(jax.numpy.bfloat16) if dtype == "bfloat16" else ref[k]
            assert got[k].dtype == want.dtype and np.array_equal(got[k], want), k

    ck = ["--checkpoints", str(golden_dir / "checkpoints")]
    capsys.readouterr()
    assert main(["generate", "--text", "The weather today is", "--model", str(bf16), *ck, "--output-modality",
                 "text", "--max-new-tokens", "8"]) == 0
    assert "[0] text:" in capsys.readouterr().out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "1", "good": "The cat sat.", "bad": "The cat sat sat.", "modality": "text"}) + "\n")
    assert main(["eval", "pairs", "--data", str(pairs), "--model", str(bf16), *ck, "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]
    # and training starts from it
    assert main(["train", f"model.init={fp32}", "data.batch_size=8", "data.seq_len=16", "steps=1", "optim.warmup_steps=1",
                 f"checkpoint.dir={tmp_path / 'ft'}", "checkpoint.every=1", "log_every=1"]) == 0


def test_export_refuses_what_it_cannot_export(tiny_run, converted_tree, golden_dir, tmp_path, capsys):
    assert main(["export", str(tiny_run), str(tmp_path / "m")]) == 1  # no tokenizer named anywhere
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["export", str(tiny_run), str(tmp_path / "m"), "--tokenizer",
                 str(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b")]) == 0
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("x")
    assert main(["export", str(tiny_run), str(keep), "--tokenizer", str(tmp_path / "m")]) == 1  # DST not empty
    assert "--overwrite" in capsys.readouterr().err and (keep / "x").read_text() == "x"
    assert main(["export", str(golden_dir / "checkpoints"), str(tmp_path / "o"), "--to", "original"]) == 1
    assert "not a converted tree" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2


def test_fcpe_and_llama_tables_run_backwards_to_their_state_dicts(golden_dir):
    """The two kinds the tree export does not write as files: FCPE (its weights stay in the torchfcpe
    wheel) and the Llama table (written through export_hf): inverse(forward(x)) == x, key for key."""
    from spiritlm_jax.converters import torch_io
    from spiritlm_jax.converters.fcpe import IGNORED, fcpe_rows, find_bundled_weights
    from spiritlm_jax.converters.llama import llama_rows, split_layer
    from spiritlm_jax.converters.schema import export_state_dict, import_state_dict
    from spiritlm_jax.config import LlamaConfig
    from spiritlm_jax.models.fcpe import FCPEConfig

    ck = torch_io.torch_load(find_bundled_weights())
    sd = {k: torch_io.to_numpy(v) for k, v in ck["model"].items()}
    rows = fcpe_rows(FCPEConfig.from_torchfcpe(ck["config_dict"]))
    back = dict(export_state_dict(rows, import_state_dict(rows, sd, where="fcpe", unused=IGNORED, keep_unused=True)))
    assert back.keys() == sd.keys()
    from spiritlm_jax.converters.transforms import fold_weight_norm

    for k in sd:
        if k == "output_proj.weight_v":  # the pair compared folded (torch's dim-0 weight norm): refolding in
            # float64 and rounding once gives w back to fp32 rounding, so the bound is ~2 fp32 ulps (as above)
            np.testing.assert_allclose(fold_weight_norm(back["output_proj.weight_g"], back[k], 0),
                                       fold_weight_norm(sd["output_proj.weight_g"], sd[k], 0), rtol=2e-7, atol=0)
        elif k != "output_proj.weight_g":
            assert np.array_equal(back[k], sd[k]), k

    lm = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b"
    cfg = LlamaConfig.from_hf(lm)
    hf = dict(torch_io.iter_hf_tensors(lm))
    for r in llama_rows(cfg):
        (a,) = r.transform.inverse(r.transform.forward(hf[r.keys[0]]))
        assert a.dtype == hf[r.keys[0]].dtype and np.array_equal(a, hf[r.keys[0]]), r.keys[0]
    assert {r.keys[0] for r in llama_rows(cfg)} == set(hf) and split_layer(("layers", 3, "attn", "q")) == (("attn", "q"), 3)
