#!/usr/bin/env bash
# One script, <= 8 minutes, for a GPU machine with jax[cuda], flax, optax, orbax and transformers
# preinstalled: real-size bf16 numbers for the LM (prefill/decode at batch 1/16/64 with fraction of HBM
# bandwidth and of bf16 peak, vs transformers), the 7B-shape train step at reduced depth (MFU), HuBERT
# tokenization and vocoding throughput (audio seconds per second, vs the PyTorch implementations) —
# everything in one process per section, on the same GPU, written to $OUT (default bench/accelerator-out).
#
#   bash bench/accelerator.sh            # PEAK_TFLOPS / HBM_GBS override the H100/H200 defaults
#   DRY=1 bash bench/accelerator.sh      # CPU dry path: tiny sizes, torch on CPU (checks the script, ~2 min)
#
# Not run in this repository's CI or on the development CPU machine: no GPU was lent to the session that
# wrote it (see bench/RESULTS.md). Each section has its own time limit so one failure cannot eat the budget.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/accelerator-out}
mkdir -p "$OUT"
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # dense bf16 TFLOP/s (H100/H200 SXM)
HBM_GBS=${HBM_GBS:-4800}          # HBM GB/s (H200: 4.8 TB/s; H100 SXM: 3.35)
DRY=${DRY:-0}
export PEAK_TFLOPS HBM_GBS OUT DRY
[ "$DRY" = 1 ] || python -m pip install -q --no-deps -e . 2>&1 | tail -1
[ "$DRY" = 1 ] || python -m pip install -q --no-deps qwix sentencepiece 2>&1 | tail -1
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

section() {  # name, seconds, python code
  echo "=== $1 (limit $2 s)"
  timeout "$2" python - <<EOF 2>&1 | tee "$OUT/$1.log"
$3
EOF
}

section lm 200 '
import os, time, json, statistics, numpy as np, jax, jax.numpy as jnp, flax.linen as nn
from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.models.llama import Llama
from spiritlm_jax.infer.engine import SamplingConfig, generate
peak, hbm = float(os.environ["PEAK_TFLOPS"]) * 1e12, float(os.environ["HBM_GBS"]) * 1e9
# Llama-2-7B shapes at 8 of 32 layers (fits any 40+ GB GPU with a 64-row cache), bf16, unrolled
dry = os.environ["DRY"] == "1"; dev = "cpu" if dry else "cuda"; P = 16 if dry else 512
size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4) if dry else {}
cfg = LlamaConfig(vocab_size=32768, num_hidden_layers=2 if dry else 8, dtype="bfloat16", param_dtype="bfloat16",
                  scan_layers=False, precision="bfloat16", attention="cudnn", **size)
params = jax.jit(lambda k: nn.meta.unbox(Llama(cfg).init(k, jnp.zeros((1, 4), jnp.int32))["params"]))(jax.random.PRNGKey(0))
n = cfg.num_params(); wbytes = 2 * (n - cfg.vocab_size * cfg.hidden_size)
rows = []
for B in (1, 16, 64):
    prompts = [list(np.random.default_rng(b).integers(3, 32000, P)) for b in range(B)]
    for new in (1, 65):
        s = SamplingConfig(max_new_tokens=new)
        generate(cfg, params, prompts, s, eos_id=-1)
        t = time.perf_counter(); generate(cfg, params, prompts, s, eos_id=-1); rows.append((B, new, time.perf_counter() - t))
    pre, full = rows[-2][2], rows[-1][2]
    dec = (full - pre) / 64
    print(json.dumps({"batch": B, "prefill_tok_s": B * P / pre, "prefill_frac_bf16_peak": B * P * 2 * n / pre / peak,
                      "decode_tok_s": B / dec, "decode_frac_hbm": wbytes / dec / hbm,
                      "decode_frac_bf16_peak": B * 2 * n / dec / peak}), flush=True)
import torch, transformers
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32768, num_hidden_layers=cfg.num_hidden_layers,
        max_position_embeddings=4096, **size)).to(dev, torch.bfloat16).eval()
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for B in (1, 16, 64):
    x = torch.randint(3, 32000, (B, P), device=dev)
    with torch.no_grad():
        for new in (1, 65):
            kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            hf.generate(x, **kw); sync()
            t = time.perf_counter(); hf.generate(x, **kw); sync(); rows.append(("hf", B, new, time.perf_counter() - t))
    pre, full = rows[-2][3], rows[-1][3]
    print(json.dumps({"transformers_batch": B, "prefill_tok_s": B * P / pre, "decode_tok_s": B / ((full - pre) / 64)}), flush=True)
'

section train 150 '
import os, json, time, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.models.llama import Llama
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
dry = os.environ["DRY"] == "1"
size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4) if dry else {}
cfg = LlamaConfig(vocab_size=32768, num_hidden_layers=4, dtype="bfloat16", param_dtype="float32", remat="full",
                  precision="bfloat16", attention="cudnn", scan_layers=True, **size)
model = Llama(cfg)
params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))["params"]))(jax.random.PRNGKey(0))
tx = optax.adamw(1e-4); opt = tx.init(params)
B, T = (2, 64) if dry else (4, 4096)
tok = jnp.asarray(np.random.default_rng(0).integers(3, 32000, (B, T)), jnp.int32)
seg = jnp.ones((B, T), jnp.int32)
def loss(p):
    lg, _ = model.apply({"params": p}, tok[:, :-1], segment_ids=seg[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tok[:, 1:, None], -1))
@jax.jit
def step(p, o):
    l, g = jax.value_and_grad(loss)(p); u, o = tx.update(g, o, p); return optax.apply_updates(p, u), o, l
params, opt, l = step(params, opt); l.block_until_ready()
t = time.perf_counter()
for _ in range(3): params, opt, l = step(params, opt)
l.block_until_ready(); dt = (time.perf_counter() - t) / 3
n = cfg.num_params(); flops = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * T
print(json.dumps({"layers": 4, "tokens_per_s": B * T / dt, "mfu": B * T * flops / dt / peak}), flush=True)
'

section speech 120 '
import os, json, time, numpy as np, jax, jax.numpy as jnp
from spiritlm_jax.models.hubert import SpeechEncoderConfig, init_params, SpeechEncoder
from spiritlm_jax.models.hifigan import HifiGANConfig, init_params as hifi_init, CodeHifiGAN
cfg = SpeechEncoderConfig(conv_layers=((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 3, output_layer=11,
                          precision="float32")
dry = os.environ["DRY"] == "1"; dev = "cpu" if dry else "cuda"; NB, NS = (1, 16000) if dry else (16, 160000)
sync = (lambda: None) if dry else __import__("torch").cuda.synchronize
p = init_params(cfg)
wav = jnp.asarray(np.random.default_rng(0).standard_normal((NB, NS)), jnp.float32)
f = jax.jit(lambda p, w: SpeechEncoder(cfg).apply({"params": p}, w)["features"])
f(p, wav).block_until_ready(); t = time.perf_counter(); f(p, wav).block_until_ready(); dt = time.perf_counter() - t
print(json.dumps({f"hubert_audio_s_per_s_batch{NB}": NB * NS / 16000 / dt}), flush=True)
hc = HifiGANConfig(upsample_rates=(5, 4, 4, 4, 2), upsample_kernel_sizes=(11, 8, 8, 8, 4), upsample_initial_channel=512,
                   resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3, num_embeddings=501,
                   embedding_dim=128, model_in_dim=256, num_speakers=200, precision="float32")
hp = hifi_init(hc)
HB, HU = (1, 25) if dry else (8, 250)
codes = jnp.zeros((HB, HU), jnp.int32); z = jnp.zeros((HB,), jnp.int32)
g = jax.jit(lambda p, c: CodeHifiGAN(hc).apply({"params": p}, c, c, c, z, z, z, z + HU))
g(hp, codes).block_until_ready(); t = time.perf_counter(); g(hp, codes).block_until_ready(); dt = time.perf_counter() - t
print(json.dumps({f"hifigan_audio_s_per_s_batch{HB}": HB * HU / 25 / dt}), flush=True)
import torch, transformers
hub = transformers.HubertModel(transformers.HubertConfig()).to(dev).eval()
x = torch.randn(NB, NS, device=dev)
with torch.no_grad():
    hub(x); sync(); t = time.perf_counter(); hub(x); sync()
print(json.dumps({f"transformers_hubert_audio_s_per_s_batch{NB}": NB * NS / 16000 / (time.perf_counter() - t)}), flush=True)
'
echo "results in $OUT/*.log"
