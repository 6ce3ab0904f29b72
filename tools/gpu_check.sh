#!/usr/bin/env bash
# The GPU checks of the runtime, as one command for a lent GPU machine (the device tool), from the repo root:
#   bash tools/gpu_check.sh                 on the GPU (results under $OUT, or ./gpu-check when $OUT is unset)
#   bash tools/gpu_check.sh --device cpu    the same steps on this machine's CPU: a dry run before the device
# Steps: install this checkout without network or dependencies (the GPU machine's image has CuPy, onnx, onnxruntime
# and numpy; wheels it lacks go in .gpu-wheels, made with `pip download --no-deps -d .gpu-wheels NAME==VERSION`);
# the GPU tests (`pytest -m gpu tests/runtime`: kernels against their references, the executor and the hybrid runtime
# on compressed models); the kernel roofline (ternary, hyperfunction, MatMulNBits 4/2-bit against cuBLAS fp32 and
# fp16) and the zoo models prepared in .gpu-models by
#   .venv/bin/python tools/bench_gpu.py --models fmnist-mlp,minilm-l3,mobilenetv2,ppocr-rec --work .gpu-models --prepare
# (feeds, reference outputs, originals, then variants, within 54 MiB; name .gpu-models in the device tool's carry list).
# Each step has a time limit (together 470 s: the whole fits 8 minutes); the exit status is the first failing step's.
set -uo pipefail
usage() { echo "usage: bash tools/gpu_check.sh [--device cuda|cpu]" >&2; exit 2; }
device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || usage; device="$2"; shift 2 ;;
    --device=*) device="${1#*=}"; shift ;;
    *) usage ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "--device: cuda or cpu, not '$device'" >&2; exit 2 ;; esac
out="${OUT:-gpu-check}"
models="${MODELS_DIR:-.gpu-models}"
python="${PYTHON:-python3}"
mkdir -p "$out"
start=$(date +%s)
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output in $out/NAME.log, and say how it went
  local name="$1" seconds="$2"; shift 2
  local began=$(date +%s)
  timeout -k 10 "$seconds" "$@" > "$out/$name.log" 2>&1
  local code=$?
  tail -25 "$out/$name.log"
  echo "== $name: exit $code in $(( $(date +%s) - began )) s" | tee -a "$out/steps.txt"
  [ "$code" -ne 0 ] && [ "$status" -eq 0 ] && status=$code
  return 0
}

if [ "$device" = cuda ]; then
  if compgen -G ".gpu-wheels/*.whl" >/dev/null; then step wheels 45 "$python" -m pip install -q --no-deps .gpu-wheels/*.whl; fi
  step install 45 "$python" -m pip install -q --no-deps --no-build-isolation -e .
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
  shapes="${SHAPES:-4096x4096,8192x8192,4096x11008,1536x384}" batches="${BATCHES:-1,8,32,64}"
  repeats="${REPEATS:-50}" runs="${RUNS:-20}"
else  # the dry run: small shapes, few repeats (numpy references: the timings mean nothing)
  shapes="${SHAPES:-512x256}" batches="${BATCHES:-1,8}" repeats="${REPEATS:-3}" runs="${RUNS:-3}"
fi
"$python" -c "import onnxruntime as o, onnx_ir; print('onnxruntime', o.__version__, o.get_available_providers(), 'onnx_ir', onnx_ir.__version__)" | tee -a "$out/device.txt"
"$python" -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null | tee -a "$out/device.txt"

step gpu-tests 150 env PYTHONUNBUFFERED=1 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/runtime
if [ "$device" = cpu ]; then  # no GPU test runs here: the hybrid runtime's own tests stand in
  step hybrid-tests 150 env PYTHONUNBUFFERED=1 "$python" -m pytest -q -p no:cacheprovider -m "not slow" tests/runtime/test_hybrid.py
fi
model_args=()
if [ -f "$models/manifest.json" ]; then
  model_args=(--models-dir "$models")
else
  echo "no $models/manifest.json: kernels only (prepare the models first, see the header)" | tee -a "$out/steps.txt"
fi
step bench 230 env PYTHONUNBUFFERED=1 "$python" tools/bench_gpu.py --device "$device" --shapes "$shapes" \
  --batches "$batches" --repeats "$repeats" --runs "$runs" ${model_args[@]+"${model_args[@]}"} --out "$out/benchmarks-gpu.md"
echo "gpu_check --device $device: exit $status in $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
exit "$status"
