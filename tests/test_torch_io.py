"""Checkpoint reading: every bad input gives a clear error that names the problem and the fix."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from spiritlm_jax.converters import torch_io
from spiritlm_jax.converters.llama import convert_llama, load_converted, load_hf_params
from spiritlm_jax.converters.torch_io import CheckpointError, UnsafePickleError

from llama_helpers import make_hf_model, save_hf


@pytest.fixture()
def hf_dir(tmp_path):
    return save_hf(make_hf_model(), tmp_path / "hf", "bin")


def test_truncated_file(hf_dir):
    f = hf_dir / "pytorch_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_hf_params(hf_dir)


def test_truncated_safetensors(tmp_path):
    d = save_hf(make_hf_model(), tmp_path / "hf", "safetensors")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf_params(d)


def test_missing_shard(tmp_path):
    d = save_hf(make_hf_model(), tmp_path / "hf", "sharded_bin")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"not in the directory: pytorch_model-00002-of-00002\.bin"):
        load_hf_params(d)


def test_shards_without_index(tmp_path):
    d = save_hf(make_hf_model(), tmp_path / "hf", "sharded_bin")
    (d / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(CheckpointError, match="no index JSON"):
        load_hf_params(d)


def test_config_weight_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \(96, 64\) but the config implies \(100, 64\)"):
        load_hf_params(hf_dir)


def test_unknown_and_missing_keys(hf_dir):
    f = hf_dir / "pytorch_model.bin"
    sd = torch.load(f, weights_only=True)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    del sd["model.norm.weight"]
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        load_hf_params(hf_dir)
    msg = str(e.value)
    assert "missing (1): model.norm.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.q_proj.bias" in msg


def test_legacy_rotary_buffer_is_ignored(hf_dir):
    f = hf_dir / "pytorch_model.bin"
    sd = torch.load(f, weights_only=True)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, f)
    load_hf_params(hf_dir)


class NotAllowed:  # a class the weights-only unpickler must refuse
    def __init__(self):
        self.x = 1


def test_pickle_with_non_allowlisted_class_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": NotAllowed()}, f)
    with pytest.raises(UnsafePickleError) as e:
        torch_io.torch_load(f)
    msg = str(e.value)
    assert "test_torch_io.NotAllowed" in msg and "--allow-pickle-class" in msg and "allow_classes" in msg
    # the explicit opt-in loads it
    obj = torch_io.torch_load(f, allow_classes=["test_torch_io.NotAllowed"])
    assert isinstance(obj["obj"], NotAllowed)


def test_ordered_dict_state_dict_loads(tmp_path):
    f = tmp_path / "sd.pt"
    torch.save(collections.OrderedDict(w=torch.arange(4, dtype=torch.bfloat16)), f)
    arr = torch_io.to_numpy(torch_io.torch_load(f)["w"])
    assert str(arr.dtype) == "bfloat16" and arr.astype(np.float32).tolist() == [0, 1, 2, 3]


def test_not_a_checkpoint_and_missing_files(tmp_path):
    f = tmp_path / "x.pt"
    f.write_text("hello")
    with pytest.raises(CheckpointError, match="x.pt"):
        torch_io.torch_load(f)
    with pytest.raises(CheckpointError, match="not found"):
        torch_io.torch_load(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        torch_io.hf_weight_files(tmp_path / "empty")


def test_converted_dir_errors(hf_dir, tmp_path):
    out = convert_llama(hf_dir, tmp_path / "conv")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_llama(hf_dir, tmp_path / "conv")
    with pytest.raises(CheckpointError, match="spiritlm-jax convert"):
        load_converted(hf_dir)  # an HF dir, not a converted one
    import json
    import shutil

    # a directory converted before the MLP / LM-head weights became output-major: refused, with the fix
    # (restoring it would give shape errors, or for a square MLP silently transposed weights)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["weights"]
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"older spiritlm-jax.*convert llama SRC .* --overwrite"):
        load_converted(old)
    assert (old / "params").is_dir()  # nothing of the user's is touched

    shutil.rmtree(out / "params")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_converted(out)


class _RunsShell:  # what a hostile pickle does: call os.system when unpickled
    def __reduce__(self):
        import os

        return (os.system, ("echo this-must-never-run",))


class _RunsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload, refused", [(_RunsShell(), "posix.system"), (_RunsEval(), "eval")])
def test_code_running_pickle_is_refused_by_name_not_called_corrupt(tmp_path, payload, refused):
    # torch 2.13 words the first "unsupported GLOBAL posix.system whose module posix is blocked"; the
    # message must name that global and say why, not send the user to re-copy a "corrupt" file.
    f = tmp_path / "hostile.pt"
    torch.save({"w": torch.zeros(2), "x": payload}, f)
    with pytest.raises(UnsafePickleError) as e:
        torch_io.torch_load(f)
    msg = str(e.value)
    assert f"'{refused}'" in msg and "REFUSED" in msg and "run code" in msg
    assert "corrupt" not in msg and "--allow-pickle-class" not in msg  # never offered for the allowlist
    with pytest.raises(UnsafePickleError):  # an allowlist entry does not open it either
        torch_io.torch_load(f, allow_classes=[{"posix.system": "os.system", "eval": "builtins.eval"}[refused]])
