#!/usr/bin/env bash
# Every GPU check and measurement of issue #13 in one command, on a CUDA machine with torch, triton,
# transformers and peft:
#   loadtest/run_gpu.sh TOKENIZER_DIR [OUT_DIR]
# TOKENIZER_DIR: any HF tokenizer folder (loadtest/prepare_gpu_carry.sh exports the bundled one to
# .gpu/tokenizer); the GPU tests and the random-init models borrow it. Everything printed goes to ONE
# file, OUT_DIR/gpu_results.txt (versions, test results, every table); the JSON of each benchmark lies
# beside it for plots. Steps, each with a time limit so the whole stays under 10 minutes (one device call):
#   1. every `-m gpu` test                      2. bench_kernels.py, 7B projection shapes
#   3. bench_engine.py, configs 1b and 7b       4. bench_paging.py, 1,000 adapters
#   5. the server on the random 1B model with 32 adapters, driven by `python -m loadtest`
#   6. bench_composites.py on the random 1B model: MoLE, MoR, MoRE batched with plain adapters
# Server packages the GPU machine lacks are installed from .whl/*.whl when that folder exists
# (loadtest/prepare_gpu_carry.sh downloads them). LORAMUX_GPU_SMOKE=1 runs the same steps on the CPU
# with tiny shapes in seconds (tests/test_gpu_harness.py does, in the default suite).
set -uo pipefail
cd "$(dirname "$0")/.."
tokenizer=$(realpath "${1:?usage: loadtest/run_gpu.sh TOKENIZER_DIR [OUT_DIR]}")
out=$(realpath -m "${2:-loadtest/results/gpu}")
mkdir -p "$out"
exec > >(tee "$out/gpu_results.txt") 2>&1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/loramux-site-XXXX)
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORAMUX_TEST_TOKENIZER=$tokenizer
work=$(mktemp -d /tmp/loramux-gpu-XXXX)
status=0

if [ "${LORAMUX_GPU_SMOKE:-0}" = 1 ]; then
  device=cpu; engine_configs="tiny"; engine_args="--requests 2 4 --prompt-len 8 --new-tokens 3 --rounds 1"
  paging_args="--config tiny --adapters 12 --ranks 8 16 --gpu-slots 3 --requests 12 --prompt-len 8 --new-tokens 2"
  kernel_args="--config tiny --batches 1 4 --slots 4 --repeat 1"; server_config=tiny; adapters=4
  load_args="--concurrency 2 --requests 4 --warmup 1 --prompt-len 4 --output-len 4"
  composites_args="--prompt-tokens 4 --new-tokens 3 --rounds 1"
  limit_tests=0 limit_kernels=60 limit_engine=120 limit_paging=120 limit_server=120 limit_composites=120
else
  device=cuda; engine_configs="1b 7b"
  engine_args="--requests 32 128 --prompt-len 128 --new-tokens 128 --peft-requests 32 --baseline-new-tokens 16 --rounds 1"
  paging_args="--config 250m --adapters 1000 --ranks 8 16 32 64 --gpu-slots 64 --requests 256 --prompt-len 64 --new-tokens 32 --adapter-files 2"
  kernel_args="--config 7b"; server_config=1b; adapters=32
  load_args="--concurrency 8 32 --requests 64 --warmup 4 --prompt-len 64 --output-len 64"
  composites_args="--prompt-tokens 16 --new-tokens 16 --rounds 2"
  limit_tests=100 limit_kernels=45 limit_engine=70 limit_paging=75 limit_server=55 limit_composites=90
fi

step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, records a failure, never stops the run
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ $rc = 0 ] || status=1
}

echo "=== loramux GPU run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$py -c "import sys, torch, triton, transformers, peft; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if [ "$limit_tests" != 0 ]; then
  step "gpu tests" "$limit_tests" $py -m pytest -q -m gpu -p no:cacheprovider -rfEs tests
fi
step "bench_kernels $kernel_args" "$limit_kernels" $py loadtest/bench_kernels.py --device $device $kernel_args \
  --json "$out/bench_kernels.json"
for config in $engine_configs; do
  step "bench_engine --config $config" "$limit_engine" $py loadtest/bench_engine.py --device $device --config $config \
    --tokenizer "$tokenizer" $engine_args --keep-model "$work/model-$config" --json "$out/bench_engine_$config.json"
  limit_engine=$((limit_engine * 2))  # the second config (7b) writes and loads a 7x larger model
done
step "bench_paging" "$limit_paging" $py loadtest/bench_paging.py --device $device $paging_args --tokenizer "$tokenizer" \
  --json "$out/bench_paging.json"
step "server + python -m loadtest" "$limit_server" $py loadtest/serve_random.py --model "$work/model-$server_config" \
  --adapters $adapters --device $device --out "$out" -- $load_args
step "bench_composites" "$limit_composites" $py loadtest/bench_composites.py --model "$work/model-$server_config" \
  $composites_args --note "run_gpu.sh" --json "$out/bench_composites.json"

rm -rf "$work"
echo; echo "=== done: status $status; results in $out/gpu_results.txt"
exit $status
