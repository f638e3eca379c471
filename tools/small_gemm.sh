#!/usr/bin/env bash
# Small and mid GEMMs and linears, native vs torch, on every tier the CPU has (about 3 minutes on 2 cores):
#   bash tools/small_gemm.sh results/<cpu>/small_gemm.md
# 18 GEMMs (32^3-512^3, short wide ones, 4-16 rows) and 8 linears (layout=nt, pk.linear against F.linear), warm
# inputs, 2 threads: fp32 on the default tier, on the avx2 tier against torch capped to AVX2 (what the tier faces
# on an AVX2-only CPU; x86 only), on the portable tier, and bf16 on the default tier. Each table is the output of
# one `pykernels bench` call, under its command; the file's head records the time, the commit and the CPU.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash tools/small_gemm.sh results/<cpu>/small_gemm.md" >&2
    exit 2
fi
OUT=$1
cd "$(dirname "$0")/.."
SHAPES=""
for S in 32,32,32 64,64,64 80,80,80 96,96,96 112,112,112 128,128,128 192,192,192 256,256,256 384,384,384 \
    512,512,512 32,512,512 64,512,256 24,1024,128 100,100,1000 64,64,64,nt 128,128,128,nt 256,256,256,nt \
    24,1024,128,nt 64,512,256,nt 4,256,256 8,256,256 16,256,256 12,100,1000 4,1024,64,nt 8,1024,64,nt \
    16,1024,64,nt; do
    IFS=, read -r M N K L <<< "$S"
    SHAPES="$SHAPES --shape M=$M,N=$N,K=$K${L:+,layout=$L}"
done
CPU=$(python -c "from pykernels.harness import device as d; f = d.cpu_fingerprint()
print(f\"{d.device_label(f)}, family/model {f.get('family_model', '?')}\")")
TORCH=$(python -c "import torch; print(torch.__version__)")
ISA=$(python -c "import pykernels._C as C; print(' '.join(C.cpu_isas()))")
section() {  # title, environment (may be empty), dtype
    local cmd="pykernels bench --kernel gemm$SHAPES --backend native --backend torch --dtype $3"
    [ -n "$2" ] && cmd="$2 $cmd"
    printf '## %s\n\ncommand: `%s`\n\n```\n' "$1" "$cmd" >> "$OUT"
    env $2 pykernels bench --kernel gemm $SHAPES --backend native --backend torch --dtype "$3" >> "$OUT"
    printf '```\n\n' >> "$OUT"
}
{
    echo "# Small and mid GEMMs and linears, native vs torch, per tier (2 threads)"
    echo
    echo "Made by \`bash tools/small_gemm.sh $OUT\` at $(date -u '+%H:%M UTC on %Y-%m-%d'), code of" \
        "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc pykernels || echo ' with uncommitted changes'), $CPU," \
        "torch $TORCH, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start. Warm inputs: % of peak is of the" \
        "compute peak where they fit one core's L2, of the DRAM roofline otherwise. Shapes ending in -nt are" \
        "pk.linear (B stored [N, K]) against torch's F.linear. The last column of each table is native's speed over" \
        "torch's; \"(~...)\" is inside the noise. Which path takes which shape: notes/cpu_gemm.md."
    echo
} > "$OUT"
section "default tier, torch uncapped" "" float32
case " $ISA " in *" avx2 "*)
    section "avx2 tier forced, torch capped to AVX2 (as tools/isa_tiers.py --torch-isa avx2)" \
        "PYKERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" float32 ;;
esac
section "portable tier forced, torch uncapped" "PYKERNELS_CPU_ISA=portable" float32
section "bf16, default tier, torch uncapped" "" bfloat16
echo "wrote $OUT"
