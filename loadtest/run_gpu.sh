#!/usr/bin/env bash
# Every GPU check and measurement in one command, on a CUDA machine that has torch,
# triton, transformers and peft (no server packages needed):
#   loadtest/run_gpu.sh TOKENIZER_DIR [OUT_DIR]
# TOKENIZER_DIR: any HF tokenizer folder (e.g. ~/.cache/loramux/models/SmolLM2-*);
# the GPU tests and the random-init benchmarks borrow it. Results go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
tokenizer=${1:?usage: loadtest/run_gpu.sh TOKENIZER_DIR [OUT_DIR]}
out=${2:-loadtest/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORAMUX_TEST_TOKENIZER=$tokenizer
status=0
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" || status=1
for config in 1b 7b; do
  python loadtest/bench_kernels.py --device cuda --config $config --json "$out/bench_kernels_$config.json" \
    2>&1 | tee "$out/bench_kernels_$config.log" || status=1
done
python loadtest/bench_engine.py --device cuda --config 7b --tokenizer "$tokenizer" --new-tokens 128 \
  --json "$out/bench_engine_7b.json" 2>&1 | tee "$out/bench_engine_7b.log" || status=1
exit $status
