#!/usr/bin/env bash
# Run HERE, before a GPU check: fills .gpu/ (ignored by git) with what
# benchmarks/gpu_check.sh needs on a GPU machine that has torch, transformers, Pillow,
# numpy, typer, rich, jinja2 and httpx but nothing else of ours and no network:
#   - the project's own wheel (migrations and templates inside);
#   - wheels of the missing dependencies for that machine's Python (GPU_PYTHON, 3.12);
#   - two real photos (scikit-learn's china.jpg and flower.jpg) for the agreement check.
# Then, with the device tool: run "bash benchmarks/gpu_check.sh" with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
py="${GPU_PYTHON:-3.12}"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/photos
"$python" -m pip wheel -q --no-deps . -w .gpu/wheels
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64)
"$python" -m pip download -q --only-binary=:all: --python-version "$py" "${platforms[@]}" \
  -d .gpu/wheels "sqlalchemy>=2,<3" greenlet "alembic>=1.13" mako pytest
# Only the CLIP BPE vocabulary is used from open_clip (labelassist.toy.tiny).
"$python" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "open_clip_torch>=2.20"
images="$("$python" -c 'import os, sklearn.datasets as d; print(os.path.join(os.path.dirname(d.__file__), "images"))')"
cp "$images"/china.jpg "$images"/flower.jpg .gpu/photos/
du -sh .gpu >&2
ls .gpu/wheels >&2
