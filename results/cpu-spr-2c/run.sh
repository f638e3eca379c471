#!/usr/bin/env bash
# Re-creates results/cpu-spr-2c/: the CPU targets on the 2-core Sapphire Rapids VM (AMX), about 20 minutes.
# Run on an otherwise idle machine: every file records the load average and the time.
#   1. issue6.*    native vs torch for the quick sweep's cases, timed in turns, with the % of the compute
#                  peak probes and the issue-21 targets
#   2. overhead.*  the fixed costs of small shapes (prepared calls, pk.gemm minus the prepared call)
#   3. validate/   pykernels validate --backend native (with the performance section)
#   4. tokens-check/  pykernels tokens --check hf (transformers' Llama) for tiny and ref-7b-2k cut to 2
#                  layers, fp32 and bf16, batch 1 and 8 (pip install -e ".[hf]"); it times the torch
#                  backend only, so a change of the native kernels leaves it as it was
#   5. isa_tiers.md  every native tier (amx, avx512, avx2 forced) against torch on the quick sweep's cases;
#      isa_tiers_avx2.md  the avx2 tier against torch capped to AVX2 (ATen, oneDNN, MKL), fp32
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/cpu-spr-2c
pykernels info --peaks --refresh-peaks > $R/info.txt
python tools/issue6.py --out $R/issue6 --budget 2 > $R/issue6.log
python tools/overhead.py --out $R/overhead --budget 2 > $R/overhead.log
pykernels validate --backend native --out $R/validate > $R/validate.log || true
C=$R/tokens-check
mkdir -p $C
for B in 1 8; do
    python -m pykernels.tokens --check hf --model tiny --prompt 512 --context 512 --batch $B \
        --dtype float32 --dtype bfloat16 --out $C > $C/tiny-b$B.log || true
    python -m pykernels.tokens --check hf --model ref-7b-2k --layers 2 --prompt 512 --context 512 --batch $B \
        --dtype float32 --dtype bfloat16 --out $C > $C/ref-7b-2k-L2-b$B.log || true
done
python tools/isa_tiers.py --rounds 5 --out $R/isa_tiers.md > $R/isa_tiers.log
python tools/isa_tiers.py --tiers avx2 --torch-isa avx2 --dtype float32 --rounds 5 \
    --out $R/isa_tiers_avx2.md > $R/isa_tiers_avx2.log
