#!/usr/bin/env bash
# The one command a session with an NVIDIA GPU runs from the repository root:
#
#     bash tools/gpu_check.sh [all|build|test|smoke|sanitize|perf] ...
#
# build     pip install --no-build-isolation -e . (CMake picks the GPU's architecture: 9.0 -> sm_90a),
#           then the kernels' resource usage and whether the SASS has HGMMA (wgmma) / HMMA (mma.sync)
# test      python -m pytest tests -x -q -k cuda
# smoke     tools/cuda_smoke.py on odd shapes, once per GEMM path (auto, mma, scalar, wgmma where built)
# sanitize  compute-sanitizer memcheck (and racecheck on attention/gemm, synccheck) on tools/cuda_smoke.py --small
# perf      tools/cuda_smoke.py --perf: native vs torch on the anchor shapes
# Default: all of them, in that order (over 10 minutes in all on an H100: run it as two calls,
# `build test smoke` then `sanitize perf`, on a machine kept warm). Logs go to results/cuda-check/ (or
# $PK_CHECK_DIR); when $OUT is set (the device tool) they are also packed into $OUT/cuda-check.tgz, with
# summary.txt, perf.json and smoke_auto.json beside it (the tool returns at most 8 files).
# A short table is printed last. Exit status: 0 when every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${PK_CHECK_DIR:-results/cuda-check}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
want() { for s in "${STAGES[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }
declare -a TABLE=()
FAILED=0
record() {  # name rc detail
  local st=pass
  [ "$2" -ne 0 ] && { st="FAIL(rc=$2)"; FAILED=1; }
  TABLE+=("$(printf '%-22s %-12s %s' "$1" "$st" "$3")")
}
PY=python3
command -v "$PY" >/dev/null || PY=python

echo "== device"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUTDIR/gpu.txt"
nvcc --version | tail -1 | tee -a "$OUTDIR/gpu.txt"

if want build; then
  echo "== build"
  start=$(date +%s)
  # The GPU machine has no package registry: the pure-Python dependencies (rich, pytest-benchmark and what
  # they need) come from a carried, git-ignored .whl/ folder made on a machine with one:
  #   pip download rich pytest-benchmark threadpoolctl -d .whl
  if [ -d .whl ]; then
    pip install --no-index --find-links .whl rich pytest-benchmark threadpoolctl >"$OUTDIR/deps.log" 2>&1
  fi
  pip install --no-build-isolation -e . >"$OUTDIR/build.log" 2>&1
  rc=$?
  tail -3 "$OUTDIR/build.log"
  record build $rc "$(( $(date +%s) - start )) s, log build.log"
  so=$($PY -c "import pykernels._C as m; print(m.__file__)" 2>/dev/null)
  if [ -n "$so" ] && command -v cuobjdump >/dev/null; then
    cuobjdump --dump-resource-usage "$so" >"$OUTDIR/resources.txt" 2>&1
    cuobjdump -sass "$so" >"$OUTDIR/sass.txt" 2>&1
    hg=$(grep -c HGMMA "$OUTDIR/sass.txt"); hm=$(grep -c HMMA "$OUTDIR/sass.txt")
    tma=$(grep -c UTMALDG "$OUTDIR/sass.txt"); ldl=$(grep -cE "\bLDL\b|\bSTL\b" "$OUTDIR/sass.txt")
    record sass 0 "HGMMA $hg, HMMA $hm, UTMALDG $tma, LDL/STL $ldl (resources.txt)"
    gzip -f "$OUTDIR/sass.txt"
  fi
fi

if want test; then
  echo "== pytest -k cuda"
  $PY -m pytest tests -x -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUTDIR/pytest.log" | tail -15
  rc=${PIPESTATUS[0]}
  record "pytest -k cuda" "$rc" "$(tail -1 "$OUTDIR/pytest.log")"
fi

if want smoke; then
  for path in auto mma scalar wgmma; do
    echo "== smoke, PK_CUDA_GEMM=$path"
    fams=gemm,attention,decode
    [ "$path" != auto ] && fams=gemm
    PK_CUDA_GEMM=$path timeout 500 $PY tools/cuda_smoke.py --families $fams --out "$OUTDIR/smoke_$path.json" \
      >"$OUTDIR/smoke_$path.log" 2>&1
    rc=$?
    grep -E "^FAIL|Error" "$OUTDIR/smoke_$path.log" | head -5
    record "smoke gemm=$path" $rc "$(tail -1 "$OUTDIR/smoke_$path.log")"
  done
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
      fams=gemm,attention,decode
      [ "$tool" = racecheck ] && fams=attention,gemm  # the kernels with shared-memory pipelines
      echo "== compute-sanitizer --tool $tool ($fams)"
      timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all \
        $PY tools/cuda_smoke.py --small --families $fams >"$OUTDIR/sanitize_$tool.log" 2>&1
      rc=$?
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Hazard" "$OUTDIR/sanitize_$tool.log" | sort | uniq -c | head -5
      record "sanitizer $tool" $rc "$(grep -E 'SUMMARY' "$OUTDIR/sanitize_$tool.log" | tail -1)"
    done
    echo "== compute-sanitizer memcheck, wgmma path"
    PK_CUDA_GEMM=wgmma timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
      $PY tools/cuda_smoke.py --small --families gemm >"$OUTDIR/sanitize_wgmma.log" 2>&1
    rc=$?
    record "sanitizer wgmma" $rc "$(grep -E 'SUMMARY' "$OUTDIR/sanitize_wgmma.log" | tail -1)"
  else
    record sanitize 1 "compute-sanitizer not found"
  fi
fi

if want perf; then
  echo "== perf"
  timeout 500 $PY tools/cuda_smoke.py --perf --no-check --out "$OUTDIR/perf.json" 2>&1 | tee "$OUTDIR/perf.log" \
    | grep "^perf"
  record perf "${PIPESTATUS[0]}" "perf.log / perf.json"
fi

{
  echo "== summary ($OUTDIR, stages: ${STAGES[*]})"
  for line in "${TABLE[@]}"; do echo "$line"; done
  [ -f "$OUTDIR/perf.log" ] && grep "^perf" "$OUTDIR/perf.log" | sed 's/^perf //' | cut -c1-150
} >"$OUTDIR/summary.txt"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/cuda-check.tgz" -C "$OUTDIR" . 2>/dev/null
  for f in summary.txt perf.json smoke_auto.json; do [ -f "$OUTDIR/$f" ] && cp "$OUTDIR/$f" "$OUT/"; done
fi
echo
cat "$OUTDIR/summary.txt"
exit $FAILED
