#!/bin/sh
# Builds and runs tools/cpu_harness/portable_harness.cpp (gemm, attention, decode against float64).
#   sh portable.sh               native x86-64 build, every tier this CPU runs (or: sh portable.sh avx2)
#   MARCH= sh portable.sh        the same without -march=native: the extension's PYKERNELS_NATIVE_ARCH=OFF
#                                build (the AVX-512 / AMX code reached through target attributes only)
#   ARCH=aarch64 sh portable.sh  cross-compiled with Debian's g++-aarch64-linux-gnu and run under
#                                qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user):
#                                the portable path on aarch64, correctness only (no timing claims)
set -e
cd "$(dirname "$0")"
SRC="portable_harness.cpp ../../csrc/cpu/cpu_features.cpp ../../csrc/cpu/probes.cpp ../../csrc/cpu/gemm.cpp ../../csrc/cpu/attention.cpp
     ../../csrc/cpu/decode.cpp ../../csrc/cpu/gemm_avx2.cpp ../../csrc/cpu/attention_avx2.cpp ../../csrc/cpu/decode_avx2.cpp ../../csrc/cpu/gemm_amx.cpp
     ../../csrc/cpu/attention_amx.cpp ../../csrc/cpu/attention_neon.cpp ../../csrc/cpu/decode_neon.cpp"
OUT=${TMPDIR:-/tmp}/pk_portable_harness.$$  # one per run: runs side by side do not share binaries
trap 'rm -f "$OUT" "$OUT".*' EXIT
if [ "${ARCH:-}" = aarch64 ]; then
  # shellcheck disable=SC2086
  aarch64-linux-gnu-g++ -std=c++17 -O3 -fno-math-errno -fopenmp -static -I../../csrc $SRC -o "$OUT.aarch64"
  OMP_NUM_THREADS=2 qemu-aarch64 "$OUT.aarch64" "$@"
else
  # the AVX2 and AMX files get the extension's flags (CMakeLists.txt); one compile per file
  objs=""
  for f in $SRC; do
    case "$f" in
      *_avx2.cpp) extra="-mavx2 -mfma -mf16c -mno-avx512f" ;;
      *_amx.cpp) extra="-mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma" ;;
      *) extra="" ;;
    esac
    o="$OUT.$(basename "$f" .cpp).o"
    # shellcheck disable=SC2086
    g++ -std=c++17 -O3 ${MARCH--march=native} $extra -fno-math-errno -fopenmp -I../../csrc -c "$f" -o "$o"
    objs="$objs $o"
  done
  # shellcheck disable=SC2086
  g++ -fopenmp $objs -o "$OUT"
  OMP_NUM_THREADS=2 "$OUT" "$@"
fi
