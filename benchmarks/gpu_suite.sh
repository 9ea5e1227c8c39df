#!/usr/bin/env bash
# Every GPU check and benchmark of sinkserve in one run that fits in 10 minutes on one GPU,
# then one summary. Run from the repository root on a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_suite.sh            # logs and JSON under $OUT (default: gpu_suite_out/)
#
# Steps (each under its own time limit, so one slow step cannot eat the others):
#   1. the `-m gpu` tests: Triton kernels at full size against the PyTorch reference, sampler
#   2. decode roofline: TinyLlama-1.1B shape, dummy bf16 weights, batch 1, context 512
#   3. throughput: 256 requests, 512 in / 256 out, engine against transformers generate
#      (static batches of 256, sdpa), same weights
#   4. long context: decode tokens/s at 1k, 8k, 32k tokens, dense against 4 sinks + 1020 window
# Wheels of packages the machine lacks (llguidance, which the engine imports; fastapi, uvicorn...)
# can be put in .whl/ (installed to /tmp/site first): pip download --no-deps llguidance -d .whl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_suite_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc in $((SECONDS - start))s")
}

step gpu_tests 150 $PYTHON -m pytest -q -m gpu -p no:cacheprovider tests
step decode_roofline 90 $PYTHON benchmarks/decode_speed.py --shape tinyllama --contexts 512 \
    --result-json "$OUT/decode_roofline.json"
step throughput 200 $PYTHON benchmarks/bench_engine.py --model dummy-tinyllama --device cuda --dtype bfloat16 \
    --input-len 512 512 --output-len 256 256 --num-prompts 256 --baseline-prompts 8 --batch-size 256 \
    --threads 8 --result-json "$OUT/throughput.json"
step long_context 150 $PYTHON benchmarks/decode_speed.py --shape tinyllama --contexts 1024 8192 32768 \
    --modes dense sinks --decode-tokens 64 --result-json "$OUT/long_context.json"

echo
echo "== summary"
printf '%s\n' "${status[@]}"
tail -n 3 "$OUT/gpu_tests.log"
echo "-- decode roofline (batch 1, context 512)"
grep -E "^(mode|dense|sinks)" "$OUT/decode_roofline.log"
echo "-- throughput (engine vs transformers)"
grep -E "^(system|engine|HF)|_over_|greedy outputs" "$OUT/throughput.log"
echo "-- long context"
grep -E "^(mode|dense|sinks)" "$OUT/long_context.log"
