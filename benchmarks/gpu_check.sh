#!/usr/bin/env bash
# The prepared GPU check: one command on a fresh GPU machine, under 6 minutes.
#   here:   benchmarks/gpu_wheels.sh                  (wheels and photos into .gpu/)
#   there:  bash benchmarks/gpu_check.sh              (device tool, carry [".gpu"])
# Runs the tests that need a GPU (the device boundary on real CUDA, bf16 against fp32,
# both feeds) with the project installed from its wheel, then the GPU benchmark:
# benchmarks/throughput.py --device cuda. Logs go to $OUT (or /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-/tmp/gpu-check}"
site=/tmp/labelassist-site
mkdir -p "$out"
[ -d .gpu/wheels ] || { echo "no .gpu/wheels: run benchmarks/gpu_wheels.sh first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl \
  2>&1 | grep -v -i warning
export PYTHONPATH="$site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, transformers, os; print("torch", torch.__version__, "cuda",
    torch.version.cuda, "transformers", transformers.__version__, "cores", os.cpu_count())'
} 2>&1 | tee "$out/machine.txt"

# The tests run from a copy outside the repository, so `labelassist` is the wheel.
rm -rf /tmp/gpu-tests && mkdir /tmp/gpu-tests && cp -r tests /tmp/gpu-tests/
(cd /tmp/gpu-tests && timeout 150 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_gpu.py tests/test_devices.py tests/test_feed.py tests/test_zeroshot.py) \
  2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-270}" python3 "$repo/benchmarks/throughput.py" \
  --device "${GPU_CHECK_DEVICE:-cuda}" --photos "$repo/.gpu/photos" --workdir /tmp/gpu-bench \
  ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench" | tee -a "$out/bench.log"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
