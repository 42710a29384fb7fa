#!/usr/bin/env bash
# ONE command for the quiet-machine benchmark rerun of issue 17 (CPU): the LM decode/prefill table vs
# transformers, quantized decode (int8 / int4 / bf16 / fp32 vs transformers, logit error, 256-step greedy
# agreement), the HifiGAN and HuBERT side-by-side vs the ORIGINAL, the conv formulations and the
# small-M matmul rates (XLA vs torch, fp32 and int8-converted) behind the batch-16 and int8 decode numbers. Each part
# runs in its own process with its own time limit (so one failure cannot eat the budget); the rows for
# bench/RESULTS.md are printed and kept in $OUT/*.log. About 15 minutes on a quiet 2-core machine.
#
#   bash bench/run_quiet.sh                 # ORIG=<export of the original> OUT=<log folder> override
#
# Benchmarks need a quiet machine: the load average is printed before every part (check it is < 1.5).
# The original PyTorch repository is exported from the local mirror outside the repo (never committed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/spiritlm-bench.XXXX)}
ORIG=${ORIG:-/tmp/orig}
MIRROR=${MIRROR:-/work/.mirror/facebookresearch+spiritlm/repo}
mkdir -p "$OUT"
if [ ! -f "$ORIG/spiritlm/speech_tokenizer/hifigan/hifigan_vocoder.py" ]; then
  mkdir -p "$ORIG" && git --git-dir="$MIRROR" archive HEAD | tar -x -C "$ORIG" \
    || { echo "cannot export the original from $MIRROR: set ORIG to an export of facebookresearch/spiritlm"; exit 2; }
fi
echo "logs in $OUT; original at $ORIG; $(python -c 'import jax, torch; print("jax", jax.__version__, "torch", torch.__version__)')"

part() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit $limit s) — $(uptime | sed 's/.*load average/load average/')"
  timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee "$OUT/$name.log"
  echo "--- $name exit ${PIPESTATUS[0]}"
}

part lm        300 python bench/lm_bench.py --reps 3
part quant     420 python bench/quant_bench.py --reps 3 --batches 1,16
part hifigan   300 python bench/hifigan_bench.py --orig "$ORIG" --repeats 3
part hubert    240 python bench/hubert_bench.py --orig "$ORIG"
part conv      180 python bench/conv_bench.py --reps 5
part matmul    180 python bench/matmul_bench.py --reps 7
echo "=== done — $(uptime | sed 's/.*load average/load average/'); logs in $OUT"
