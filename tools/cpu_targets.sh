#!/usr/bin/env bash
# The issue-21 CPU targets on this machine, into one results directory per CPU (about 20 minutes):
#   bash tools/cpu_targets.sh results/<cpu> [step ...]      steps: info tune issue6 overhead validate tokens tiers small
# (default: all of them, in that order). Run on an otherwise idle machine: every file records the load
# average and the time, and `pykernels info` the CPU.
#   info      info.txt: `pykernels info --peaks --refresh-peaks` (the CPU, its caches, the probes' peaks)
#   tune      tune.json, tune.log: `pykernels tune` (decode's prefetch settings and the GEMV's rows per step
#             measured here and cached, so that the steps after it run with them; their results record the
#             settings and their source; on a CPU without AVX-512 it says there is nothing to tune)
#   issue6    issue6.*: native vs torch for the quick sweep's cases, timed in turns, with the % of the compute
#             peak probes, the native read of the same rounds for memory-bound rows, and the targets
#   overhead  overhead.*: the fixed costs of small shapes (prepared calls, pk.gemm minus the prepared call)
#   validate  validate/: pykernels validate --backend native (with the performance section)
#   tokens    tokens-check/: pykernels tokens --check hf (transformers' Llama) for tiny and ref-7b-2k cut to
#             2 layers, fp32 and bf16, batch 1 and 8 (pip install -e ".[hf]"); it times the torch backend
#             only, so a change of the native kernels leaves it as it was
#   tiers     isa_tiers.md: every native tier the CPU has (amx, avx512, avx2 forced) against torch on the
#             quick sweep's cases; isa_tiers_avx2.md: the avx2 tier against torch capped to AVX2, fp32;
#             isa_tiers_portable.md: the portable tier beside the avx512 one (where the CPU has it)
#   small     small_gemm.md: tools/small_gemm.sh, 26 small and mid GEMMs and linears against torch per tier
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash tools/cpu_targets.sh results/<cpu> [info|tune|issue6|overhead|validate|tokens|tiers|small ...]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
R=${1%/}
shift
STEPS=${*:-info tune issue6 overhead validate tokens tiers small}
mkdir -p "$R"
for S in $STEPS; do
    case $S in
    info) pykernels info --peaks --refresh-peaks > "$R/info.txt" ;;
    tune) pykernels tune --out "$R/tune.json" > "$R/tune.log" 2>&1 || true ;;  # a CPU without AVX-512: nothing to tune
    issue6) python tools/issue6.py --out "$R/issue6" --budget 2 > "$R/issue6.log" ;;
    overhead) python tools/overhead.py --out "$R/overhead" --budget 2 > "$R/overhead.log" ;;
    validate) pykernels validate --backend native --out "$R/validate" > "$R/validate.log" || true ;;
    tokens)
        C=$R/tokens-check
        mkdir -p "$C"
        for B in 1 8; do
            python -m pykernels.tokens --check hf --model tiny --prompt 512 --context 512 --batch $B \
                --dtype float32 --dtype bfloat16 --out "$C" > "$C/tiny-b$B.log" || true
            python -m pykernels.tokens --check hf --model ref-7b-2k --layers 2 --prompt 512 --context 512 \
                --batch $B --dtype float32 --dtype bfloat16 --out "$C" > "$C/ref-7b-2k-L2-b$B.log" || true
        done ;;
    tiers)
        python tools/isa_tiers.py --rounds 5 --out "$R/isa_tiers.md" > "$R/isa_tiers.log"
        python tools/isa_tiers.py --tiers avx2 --torch-isa avx2 --dtype float32 --rounds 5 \
            --out "$R/isa_tiers_avx2.md" > "$R/isa_tiers_avx2.log"
        if python -c "import sys, pykernels._C as C; sys.exit('avx512' not in C.cpu_isas())"; then
            python tools/isa_tiers.py --tiers portable,avx512 --rounds 5 --out "$R/isa_tiers_portable.md" \
                > "$R/isa_tiers_portable.log"
        fi ;;
    small) bash tools/small_gemm.sh "$R/small_gemm.md" ;;
    *) echo "unknown step: $S (info tune issue6 overhead validate tokens tiers small)" >&2; exit 2 ;;
    esac
done
