#!/usr/bin/env bash
# The GPU checks of the runtime, as one command for a lent GPU machine (the device tool), from the repo root:
#   bash tools/gpu_check.sh            (results under $OUT, or ./gpu-check when $OUT is unset)
# That machine has no network: it installs this checkout without dependencies into its own Python (CuPy,
# onnx, onnxruntime, numpy are in its image), runs the GPU tests, then the kernel benchmarks at the issue's
# shapes and, when their files are there, the model benchmarks. Its image had onnx-ir 1.0.0 in 2026-11 (this
# project asks >= 1.1, but tests/runtime passes with 1.0.0: checked on CPU). Wheels it lacks go in .gpu-wheels,
# made here with `pip download --no-deps -d .gpu-wheels NAME==VERSION` and named in the device tool's carry
# list (ignore the folder in .git/info/exclude).
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then python3 -m pip install -q --no-deps .gpu-wheels/*.whl; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import cupy, onnx_ir; print('cupy', cupy.__version__, 'onnx_ir', onnx_ir.__version__)" | tee -a "$out/device.txt"
PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime 2>&1 | tee "$out/gpu-tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 tools/bench_gpu.py --device cuda --models "${MODELS:-}" --shapes "${SHAPES:-4096x4096,8192x8192,1536x384}" \
  --batches "${BATCHES:-1,8,32,64}" --out "$out/benchmarks-gpu.md" \
  2>&1 | tee "$out/bench.log" | tail -40
