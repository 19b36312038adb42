#!/usr/bin/env bash
# The one GPU check: run from the repository root on the GPU machine, with .whl/ carried (scripts/gpu_wheels.sh).
#   1. installs the wheels into /tmp/site (no index, no deps) and puts it and the checkout on PYTHONPATH;
#   2. prints the GPU (nvidia-smi -L) and the versions of python, torch, CUDA, transformers, TRL, datasets;
#   3. runs the GPU tests: python3 -m pytest -m gpu <files that mark gpu tests> -q -x  (GPU_TEST_TIMEOUT, 150 s)
#   4. runs the benchmark: python3 bench/bench_gpu.py --out $OUT/gpu      (limit: BENCH_TIMEOUT, 390 s;
#      the bench skips what would start after its own --budget of 360 s)
# Every step's output goes to $OUT/log.txt too; the bench writes $OUT/gpu.md and $OUT/gpu.json, and the
# results and child logs are copied to $OUT/ (bench/results/gpu.* is only written by a plain run of the bench).
# Worst case about 9 minutes; a failing step is reported and the next one still runs. Exit status: 0 when the
# bench wrote its report and the tests passed (or none are marked gpu), else 1.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; } 2>&1
{
  step "install wheels into /tmp/site"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
  else
    echo "no .whl/ here: TRL and datasets must already be importable (run scripts/gpu_wheels.sh and carry .whl)"
  fi
} 2>&1 | tee -a "$LOG"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  step "machine"
  nvidia-smi -L || echo "nvidia-smi failed"
  python3 - <<'PY'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| transformers", transformers.__version__)
for name in ("trl", "datasets", "accelerate", "peft", "vllm", "pytest"):
    try:
        mod = __import__(name)
        print(f"{name} {mod.__version__} ({mod.__file__})")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: not importable ({type(err).__name__}: {err})")
PY
} 2>&1 | tee -a "$LOG"
step "GPU tests: pytest -m gpu" 2>&1 | tee -a "$LOG"
# Only the test files that mark GPU tests are collected: collecting all of tests/ would stop at the modules
# that import Ray at the top (not installed on the GPU node) before any test ran.
GPU_FILES=$(grep -lE 'mark\.gpu|pytestmark.*gpu|gpu *= *pytest\.mark' tests/test_*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$GPU_FILES" ]; then
  echo "files with gpu-marked tests: $GPU_FILES" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout -k 10 "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu $GPU_FILES -q -x -p no:cacheprovider 2>&1 \
    | tee -a "$LOG"
  TESTS=${PIPESTATUS[0]}
else
  echo "no test file under tests/ marks a test gpu" | tee -a "$LOG"
  TESTS=5
fi
echo "pytest exit status $TESTS (5 = no test marked gpu; 124 = timed out)" | tee -a "$LOG"
step "benchmark: bench/bench_gpu.py" 2>&1 | tee -a "$LOG"
timeout -k 10 "${BENCH_TIMEOUT:-390}" python3 bench/bench_gpu.py --out "$OUT/gpu" --work /tmp/gpu_bench_work \
  --budget "${BENCH_BUDGET:-360}" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}
echo "bench exit status $BENCH (124 = timed out)" | tee -a "$LOG"
mkdir -p "$OUT/bench_logs"
cp /tmp/gpu_bench_work/*.log /tmp/gpu_bench_work/*.json "$OUT/bench_logs/" 2>/dev/null || true
rm -f "$OUT"/bench_logs/*.job.json
ls -l "$OUT" | tee -a "$LOG"
if [ -s "$OUT/gpu.json" ] && { [ "$TESTS" = 0 ] || [ "$TESTS" = 5 ]; }; then exit 0; fi
exit 1
