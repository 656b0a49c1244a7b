#!/usr/bin/env bash
# Create .venv and install labelassist. torch goes first and pinned: with 2.13.0 in place,
# the project's torch range installs nothing more (a bare `torch` would pull a CUDA build).
# Usage: scripts/setup.sh [EXTRAS]          e.g. scripts/setup.sh test,studio
#        scripts/setup.sh --plan [EXTRAS]   say what it would install, and install nothing
# It says what it installs before it does, and prints a line per package pip collects, so a
# first install (minutes) is never silent, in a terminal or in a log.
set -euo pipefail
cd "$(dirname "$0")/.."
plan_only=false
if [ "${1:-}" = "--plan" ]; then plan_only=true; shift; fi
extras="${1:-}"
target="$(pwd)/.venv"

plan() {
  [ -x .venv/bin/python ] || echo "setup: a virtual environment in $target (python3 -m venv)"
  echo "setup: into $target: torch==2.13.0 (the CPU build, first and pinned)"
  echo "setup: into $target: labelassist${extras:+[$extras]} (editable) and its dependencies:"
  EXTRAS="$extras" python3 - <<'PY' >&2
import os, sys
try:
    import tomllib
except ImportError:  # Python 3.10: the list is in pyproject.toml
    sys.exit()
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
wanted, seen = [e for e in os.environ["EXTRAS"].split(",") if e], set()
def direct(name):  # an extra's own requirements, its labelassist[...] extras unfolded
    for req in extras[name]:
        if req.startswith("labelassist["):
            for inner in req[len("labelassist["):-1].split(","):
                yield from direct(inner)
        elif req not in seen:
            seen.add(req)
            yield req
print("  " + ", ".join(project["dependencies"]))
for name in wanted:
    print(f"  [{name}] " + ", ".join(direct(name)))
PY
  echo "setup: into $target: open_clip_torch, without its dependencies (its CLIP vocabulary file)"
}

# pip install ARGS, with one progress line per package collected and the whole log on failure.
pip_install() {
  local log
  log="$(mktemp)"
  if ! python -m pip install "$@" 2>&1 | tee "$log" | awk '
      /^Collecting / { n++; printf "  collecting %d: %s\n", n, $2 > "/dev/stderr"; fflush("/dev/stderr") }
      /^Successfully installed / { printf "  installed %d packages\n", NF - 2 > "/dev/stderr" }'; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

plan >&2
$plan_only && exit 0
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install "torch==2.13.0"
pip_install -e ".${extras:+[$extras]}"
# Only the CLIP BPE vocabulary file is used from this wheel (labelassist.toy.tiny);
# --no-deps keeps it from pulling torchvision.
pip_install --no-deps "open_clip_torch>=2.20"
echo "labelassist installed in .venv (activate with: . .venv/bin/activate)" >&2
