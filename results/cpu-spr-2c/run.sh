#!/usr/bin/env bash
# Re-creates results/cpu-spr-2c/ (the 2-core Sapphire Rapids VM with AMX): the steps are in tools/cpu_targets.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/cpu_targets.sh results/cpu-spr-2c "$@"
