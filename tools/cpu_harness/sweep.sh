#!/bin/sh
# The eight issue-6 decode cases through decode_hb: T=threads (2), R=reps (8).
cd "$(dirname "$0")"
for a in "8 0 0" "8 1 0" "32 0 0" "32 1 0" "8 0 1" "8 1 1" "32 0 1" "32 1 1"; do
  OMP_NUM_THREADS=${T:-2} ./decode_hb perf $a ${R:-8}
done
