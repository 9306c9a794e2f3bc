#!/usr/bin/env bash
# One GPU check for a short window (issue 12): bash benchmarks/gpu_check.sh OUTDIR
#
# Stages, each timed, each under its own time limit, none stopping the next when it fails:
#   build  pip install --no-build-isolation --no-deps -e .   (the C++/CUDA extension, no network)
#   cuda   the CUDA kernels' registers/shared memory, fail on spills or local memory (cuobjdump)
#   tests  the GPU tests (pytest -m gpu)
#   bench  alignkern bench --quick (every op family, bf16, the peers that are installed): CSV + PNG
#   tune   every Triton kernel's autotuner once at the benchmark sizes (benchmarks/tune.py)
# Everything lands in OUTDIR: <stage>.log, summary.txt, bench/ (CSV, figure), tuning.json/.csv.
# The limits add up to 8 minutes; ALIGNKERN_CHECK_LIMITS="build=150 tests=60 ..." overrides them.
# Without a GPU (torch.cuda.is_available() is false) the GPU stages say what they skipped and the
# rest runs.
set -uo pipefail

out="${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"

declare -A limit=([build]=230 [cuda]=10 [tests]=60 [bench]=110 [tune]=70)
for item in ${ALIGNKERN_CHECK_LIMITS:-}; do limit[${item%%=*}]=${item#*=}; done

summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
started_all=$SECONDS

# stage NAME COMMAND...: run under the stage's limit, log to OUTDIR/NAME.log, print the time.
stage() {
  local name=$1; shift
  local t0=$SECONDS rc
  echo "== $name (limit ${limit[$name]} s): $*"
  timeout -s INT --kill-after=15 "${limit[$name]}" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local state="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="TIMED OUT"; elif [ $rc -ne 0 ]; then state="FAILED (rc $rc)"; fi
  tail -n 15 "$out/$name.log"
  say "$(printf '%-6s %-14s %4d s  (log: %s)' "$name" "$state" $((SECONDS - t0)) "$out/$name.log")"
}

skip() { say "$(printf '%-6s %-14s %4d s  %s' "$1" "SKIPPED" 0 "$2")"; }

has_gpu=0
if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  has_gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
  say "GPU: $(head -n 1 "$out/gpu.txt")"
else
  say "no GPU: the GPU tests, the GPU benchmark and the tuning are skipped; build, CUDA resource" \
      "check and the CPU quick benchmark still run"
fi
"$python" - > "$out/environment.txt" 2>&1 <<'PY'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}")
PY
say "$(cat "$out/environment.txt")"

if [ $has_gpu -eq 1 ] && [ -z "${ALIGNKERN_CUDA_ARCHS:-}" ]; then
  # Build for this GPU's architecture only: about half the nvcc time of the default "80;90" (CI
  # and tests/test_gpu_compile.py compile and check both).
  ALIGNKERN_CUDA_ARCHS="$("$python" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")"
  export ALIGNKERN_CUDA_ARCHS
  say "building the CUDA kernels for sm_$ALIGNKERN_CUDA_ARCHS only"
fi
stage build "$python" -m pip install --no-build-isolation --no-deps -v -e .
# The build log holds nvcc's --resource-usage lines; keep them apart for reading.
grep -E "ptxas (info|warning)|Function properties|spill" "$out/build.log" > "$out/build-resources.log" || true

module="$("$python" -c "from alignkern import _C; print(_C.__file__ if _C.has_cuda() else '')" 2>/dev/null)"
if [ -n "$module" ]; then
  stage cuda "$python" tests/gpu_compile.py --cuda "$module"
else
  skip cuda "alignkern._C has no CUDA kernels (build failed or no CUDA compiler)"
fi

if [ $has_gpu -eq 1 ]; then
  stage tests "$python" -m pytest -q -m gpu -p no:cacheprovider tests
else
  skip tests "no GPU: pytest -m gpu"
fi

# On a GPU the quick run covers every op family in bf16 against the installed peers; without one it
# still exercises the runner (CPU cases).
# At its limit the stage gets SIGINT; alignkern bench then writes the op families it finished.
stage bench "$python" -m alignkern bench --quick --out "$out/bench"

if [ $has_gpu -eq 1 ]; then
  stage tune "$python" benchmarks/tune.py "$out"
else
  "$python" benchmarks/tune.py "$out" > "$out/tune.log" 2>&1
  skip tune "$(tail -n 1 "$out/tune.log")"
fi

say "total $((SECONDS - started_all)) s; outputs in $out:"
ls -R "$out" | sed 's/^/  /' | tee -a "$summary" > /dev/null
failed=$(grep -cE "FAILED|TIMED OUT" "$summary" || true)
exit $(( failed > 0 ? 1 : 0 ))
