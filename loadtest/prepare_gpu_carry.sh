#!/usr/bin/env bash
# What travels to the GPU machine for loadtest/run_gpu.sh, made here (where PyPI is reachable):
#   .whl/            the server's packages the GPU image lacks (fastapi and its needs, uvicorn, orjson,
#                    gguf, python-multipart; typing-extensions and anyio at the versions pydantic needs),
#                    as CPython 3.12 manylinux x86-64 wheels, one version each,
#                    pinned to what this checkout's environment runs
#   .gpu/tokenizer/  the bundled SmolLM2 tokenizer (the GPU tests and random-init models borrow it)
# Both are git-ignored (.git/info/exclude). Then, on the device:  carry [".whl", ".gpu"] and run
#   loadtest/run_gpu.sh .gpu/tokenizer $OUT
# Usage: loadtest/prepare_gpu_carry.sh [PYTHON]   (default: python3; its pip downloads, its loramux exports)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done

# Not in the GPU image (device README: KINDS.md's package list); --no-deps, so every need is named here.
packages="fastapi starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc
  opentelemetry-api importlib-metadata uvicorn orjson gguf python-multipart typing-extensions anyio"
rm -rf .whl && mkdir -p .whl
for name in $packages; do
  version=$($py -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  spec=$name${version:+==$version}
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 -d .whl "$spec"
done
ls .whl
du -sh .whl

rm -rf .gpu/tokenizer && mkdir -p .gpu/tokenizer
$py -c "from loramux.engine.loader import load_checkpoint; load_checkpoint(None).tokenizer.save_pretrained('.gpu/tokenizer')"
du -sh .gpu
