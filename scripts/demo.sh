#!/usr/bin/env bash
# From a clean clone: install, make an example folder, pre-label it, print the predictions.
# Without a model hub (as on an offline machine) it trains the toy-world CLIP (~2 min,
# cached); set LABELASSIST_MODEL to a hub id or directory to use a real CLIP instead, with
# your own folder in DEMO_PHOTOS and label file in DEMO_LABELS.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
mkdir -p demo
export LABELASSIST_DB="${LABELASSIST_DB:-sqlite:///demo/labelassist.db}"
photos="${DEMO_PHOTOS:-demo/photos}"
labels="${DEMO_LABELS:-examples/toyworld/labels.toml}"
if [ -z "${DEMO_PHOTOS:-}" ] && [ ! -d demo/photos ]; then
  python -m labelassist.toyworld images demo/photos --count 300
fi
if [ -z "${LABELASSIST_MODEL:-}" ]; then
  echo "training (or reusing) the toy-world CLIP in ~/.cache/labelassist ..." >&2
  LABELASSIST_MODEL="$(python -m labelassist.toyworld train "$HOME/.cache/labelassist")"
fi
labelassist run "$photos" --labels "$labels" --model "$LABELASSIST_MODEL"
labelassist status
labelassist predictions --format csv > demo/predictions.csv
echo "wrote demo/predictions.csv ($(($(wc -l < demo/predictions.csv) - 1)) images); first rows:" >&2
head -4 demo/predictions.csv | cut -c1-160
