"""Tiny random transformers Llama models saved in every HF on-disk variant (shared by the Llama tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VARIANTS = ("bin", "sharded_bin", "safetensors", "sharded_safetensors")


def tiny_hf_config(*, gqa=False, tied=False, theta=1e4, vocab=256, hidden=64, layers=2, heads=4, inter=96, maxpos=128):
    from transformers import LlamaConfig as HFConfig

    return HFConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=(heads // 2 if gqa else heads),
                    rms_norm_eps=1e-5, rope_theta=theta, max_position_embeddings=maxpos,
                    tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)


def make_hf_model(seed=0, **kw):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**kw)).float().eval()
    # Random norm weights too, so a converter that drops or swaps them fails.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def save_hf(model, out: Path, variant: str) -> Path:
    """Write ``model`` as an HF directory in one of VARIANTS."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(out / "config.json"))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if variant == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    elif variant == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out / "model.safetensors"))
    elif variant in ("sharded_bin", "sharded_safetensors"):
        keys = sorted(sd)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for j, part in enumerate(halves):
            if variant == "sharded_bin":
                name = f"pytorch_model-{j + 1:05d}-of-00002.bin"
                torch.save({k: sd[k] for k in part}, out / name)
            else:
                from safetensors.torch import save_file

                name = f"model-{j + 1:05d}-of-00002.safetensors"
                save_file({k: sd[k] for k in part}, str(out / name))
            weight_map.update({k: name for k in part})
        idx = "pytorch_model.bin.index.json" if variant == "sharded_bin" else "model.safetensors.index.json"
        (out / idx).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(variant)
    return out


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()
