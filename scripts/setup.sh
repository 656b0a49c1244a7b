#!/usr/bin/env bash
# Create .venv and install labelassist. torch goes first and pinned: with 2.13.0 in place,
# the project's torch range installs nothing more (a bare `torch` would pull a CUDA build).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test,studio
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extras:+[$extras]}"
# Only the CLIP BPE vocabulary file is used from this wheel (labelassist.toy.tiny);
# --no-deps keeps it from pulling torchvision.
python -m pip install -q --no-deps "open_clip_torch>=2.20"
echo "labelassist installed in .venv (activate with: . .venv/bin/activate)" >&2
