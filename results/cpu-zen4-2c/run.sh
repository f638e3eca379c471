#!/usr/bin/env bash
# Re-creates the quick sweep of results/cpu-zen4-2c/ on the 2-core CPU with fresh peaks, its report and plots,
# and the conformance reports (about 10 minutes). The issue-21 files (info, tune, issue6, overhead, the tier
# and small-GEMM tables, validate with its performance section) come from
# `bash tools/cpu_targets.sh results/cpu-zen4-2c` (see README.md here). Run on a machine that is otherwise idle;
# the load average is recorded in each file.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/cpu-zen4-2c

# 1. The quick sweep, every CPU backend, peaks re-measured (journal next to the JSON). Cold caches (the
#    last-level cache flushed before every timed call): the roofline's memory roof is DRAM bandwidth, and a
#    warm GEMV of a 64 MB weight or a decode over a 1 MB cache reads part of it from L3, above that roof.
pykernels bench --sweep quick --refresh-peaks --cold-cache \
    --backend native --backend torch --backend torch_ops --backend torch_compile --backend numpy \
    --backend jax --backend opencl \
    --json $R/quick.json -- -q > $R/quick.log 2>&1 || { tail -30 $R/quick.log; exit 1; }
# pytest-benchmark indents its JSON by 4; the same data without the indentation stays under 1 MB in git.
python -c "import json, sys; p = sys.argv[1]; d = json.load(open(p)); open(p, 'w').write(json.dumps(d, separators=(',', ':')) + '\n')" $R/quick.json

# 2. Penalty tables (terminal, Markdown, CSV) and the plots.
pykernels report $R/quick.json --md $R/report.md --csv $R/report.csv > $R/report.txt
pykernels plot $R/quick.json --out $R/plots

# 3. Conformance of the native backend (float64 reference, robustness, performance vs the others).
pykernels validate --backend native --out $R/validate

# 4. Conformance of the jax backend and of the OpenCL port (pip install -e ".[jax]"; PoCL and
#    ./examples/opencl_port installed), without the performance section.
pykernels validate --backend jax --no-perf --out $R/validate
pykernels validate --backend opencl --no-perf --out $R/validate
