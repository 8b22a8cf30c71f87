#!/usr/bin/env bash
# Everything issue 6 needs from a GPU, in one run: a session lent an H100/H200 through the device
# tool has 15 minutes of device time in all, the machine's start included, so there is one
# prepared command, not an exploration.
#
#   1. the compiled kernels' correctness: the Triton tests CI runs in the interpreter, now on
#      the GPU, and the model and engine end to end on it (tests/test_device_exactness.py);
#   2. benchmarks/gpu_attention.py: ceilings, chunked-prefill and decode attention against
#      SDPA, end-to-end prefill MFU (JSON and table).
#
# The device image has torch, triton, transformers, tokenizers, safetensors, anyio, rich,
# pytest, but not pydantic, structlog, gguf or hypothesis. Fetch their wheels here, once
# (Python 3.12 there; the folder is ignored by git and travels with `carry`):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl pydantic==2.14.3 \
#     pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 structlog==26.1.0 \
#     gguf==0.19.0 hypothesis==6.170.15 sortedcontainers==2.4.0 typing_extensions==4.16.0
#
# Then, from the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"],
# timeout_s=480). The two steps are capped at 150 s and 270 s, so that a machine start (1-2
# minutes) plus one run fit the 15 minutes with room to spare. Results land in $OUT (gpu.txt,
# tests.txt, gpu_attention.txt, gpu_attention.json, status.txt: each step's exit status, 124
# for a step cut at its cap); copy gpu_attention.json to benchmarks/results/.
set -u -o pipefail
OUT=${OUT:-/tmp/medha-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import importlib.metadata as m, torch, triton, anyio, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "anyio", m.version("anyio"), torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  tests/test_triton_attention.py tests/test_decode_attention.py tests/test_attention_kernels.py \
  tests/test_device_exactness.py 2>&1 | tee "$OUT/tests.txt"
echo "tests: $?" | tee "$OUT/status.txt"

timeout 270 python3 benchmarks/gpu_attention.py --json "$OUT/gpu_attention.json" 2>&1 \
  | tee "$OUT/gpu_attention.txt"
echo "gpu_attention: $?" | tee -a "$OUT/status.txt"
