#!/usr/bin/env bash
# The long hunt: 45 minutes over the default space with no planted fault, on the real engine.
#   scripts/long_hunt.sh [hunt dir] [extra overrides...]
# Resumable: run it again with the same dir. Leaves HUNT_REPORT.md, findings.csv, plots and one
# repro/<finding>/ per distinct finding in the dir, and prints the findings table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-hunts/long-$(date +%Y%m%d-%H%M%S)}"
shift || true
export HF_HUB_OFFLINE=1 WANDB_SILENT=true
.venv/bin/python -m rollout_lab.hunt hunt.budget_s=2700 "hydra.run.dir=$dir" "$@"
sed -n '/^## Findings/,/^## Coverage/p' "$dir/HUNT_REPORT.md"
