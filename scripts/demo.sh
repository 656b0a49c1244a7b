#!/usr/bin/env bash
# From a clean clone: install, make an example folder and a workspace (demo/), pre-label it,
# print the predictions, compare a vague description of the classes with one by their
# members, and say what's next.
# Without a model hub (as on an offline machine) it uses the toy-world CLIP, whose weights
# ship with labelassist (a few seconds to unpack); set LABELASSIST_MODEL to a hub id or directory to use a real CLIP instead, with
# your own folder in DEMO_PHOTOS and label file in DEMO_LABELS.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
mkdir -p demo
unset LABELASSIST_DB  # the demo's workspace decides: demo/labelassist.toml
photos="$(realpath -m "${DEMO_PHOTOS:-demo/photos}")"
labels="$(realpath "${DEMO_LABELS:-examples/toyworld/labels.toml}")"
if [ -z "${DEMO_PHOTOS:-}" ] && [ ! -d demo/photos ]; then
  python -m labelassist.toy.world images demo/photos --count 300
fi
if [ -z "${LABELASSIST_MODEL:-}" ]; then
  echo "unpacking the toy-world CLIP (shipped with labelassist) into ~/.cache/labelassist ..." >&2
  LABELASSIST_MODEL="$(python -m labelassist.toy.world train "$HOME/.cache/labelassist")"
fi
# One workspace: every labelassist command run in demo/ finds this database, label file,
# model and image root without a flag.
root="$(realpath demo)"
[ -n "${DEMO_PHOTOS:-}" ] && root="$photos"
labelassist init demo --labels "$labels" --model "$LABELASSIST_MODEL" --root "$root"
unset LABELASSIST_MODEL  # from here on the workspace says which model
repo="$(pwd)"
cd demo
# predict for a label file (nothing is done twice) and print its model_version
version_for() {
  labelassist -q predict --labels "$1" 2>&1 | grep -o '^[^ ]*@[0-9a-f]*' | head -1
}
if [ -z "${DEMO_PHOTOS:-}" ] && [ -z "${DEMO_LABELS:-}" ]; then
  # The lesson's vague description first: the workspace's own label file then makes the
  # newest version, which is what `labelassist push` sends by default.
  labelassist -q ingest "$photos" >/dev/null
  labelassist -q predict --labels "$repo/examples/toyworld/labels-vague.toml" >/dev/null
fi
labelassist run "$photos"
labelassist status
labelassist predictions --version "$(version_for "$labels")" --format csv > predictions.csv
echo "wrote demo/predictions.csv ($(($(wc -l < predictions.csv) - 1)) images); first rows:" >&2
python - <<'PY'
import csv
with open("predictions.csv", newline="") as fh:
    for row in list(csv.DictReader(fh))[:3]:
        print(f"  {row['path'].rsplit('/', 1)[-1]:<28} {row['label']:<6} "
              f"confidence {float(row['confidence']):.3f}")
PY
if [ -z "${DEMO_PHOTOS:-}" ] && [ -z "${DEMO_LABELS:-}" ]; then
  # The seed's lesson on the toy world: one model, two ways to describe the classes,
  # scored against the pictures' own truth (a file name starts with its colour).
  echo "describing a class by its members, against a vague description:" >&2
  for file in labels-vague.toml labels.toml; do
    labelassist predictions --version "$(version_for "$repo/examples/toyworld/$file")" \
      | FILE="$file" python -c '
import json, os, sys
from labelassist.toy.world import WARM
rows = [json.loads(line) for line in sys.stdin]
right = sum((r["path"].rsplit("/", 1)[-1].split("_")[0] in WARM) == (r["label"] == "warm")
            for r in rows)
name = os.environ["FILE"]
print(f"  examples/toyworld/{name:<18} {right / len(rows):6.1%} right on {len(rows)} pictures")'
  done
fi
studio_hint=""
command -v label-studio >/dev/null || studio_hint="   (first: scripts/setup.sh studio)"
cat >&2 <<NEXT

Next: review in Label Studio, then export. demo/labelassist.toml holds the database,
label file, model and image root, so no command below needs a flag:
  . .venv/bin/activate && cd demo
  labelassist studio        # in another shell, in demo/$studio_hint
  labelassist push          # then review at the URL push prints, and:
  labelassist pull && labelassist report --html report.html && labelassist export dataset/
NEXT
