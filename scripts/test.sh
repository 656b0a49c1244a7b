#!/usr/bin/env bash
# Set up from a clean clone and run every test. Label Studio is installed here and started
# by the test session itself (tests/conftest.py); PostgreSQL is expected on
# 127.0.0.1:5432 (set LABELASSIST_TEST_PG to point elsewhere).
# Usage: scripts/test.sh [PYTEST ARGS]   or   scripts/test.sh --plan (say what it would
# install, and do nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
# The HTML report is checked in a real headless browser: Debian's chromium, installed with
# apt-get when missing and this runs as root (elsewhere that test says how to get it).
need_chromium=false
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need_chromium=true
fi
if [ "${1:-}" = "--plan" ]; then
  scripts/setup.sh --plan test,studio
  $need_chromium && echo "test.sh: Debian's chromium, with apt-get (about 100 MB)" >&2
  echo "test.sh: then lint-imports and pytest" >&2
  exit 0
fi
scripts/setup.sh test,studio
if $need_chromium; then
  echo "test.sh: installing Debian's chromium with apt-get (about 100 MB, a minute or two)" >&2
  log="$(mktemp)"
  if ! (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
      2>&1 | tee "$log" | awk '/^Setting up / { n++; printf "  set up %d: %s\n", n, $3 > "/dev/stderr"; fflush("/dev/stderr") }'; then
    cat "$log" >&2
    exit 1
  fi
  rm -f "$log"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# One pytest worker (pytest-xdist) per core, at most 4 (each starts its own Label Studio
# when it runs a test that needs one): on the 2-core AVX512 EPYC the suite took 13 min
# 33 s that way (15 min 32 s while it retrained the toy model whole; see benchmarks/RESULTS.md).
# LABELASSIST_TEST_WORKERS=1 runs it in one process (easier to read when one test fails).
workers="${LABELASSIST_TEST_WORKERS:-$(python -c 'import os; print(min(os.cpu_count() or 1, 4))')}"
parallel=()
if [ "$workers" -gt 1 ]; then
  # --dist loadgroup: the Ray tests share one local cluster, so they run in one worker.
  parallel=(-n "$workers" --dist loadgroup)
  # Two workers share the cores, and OpenMP's threads spin while they wait for each other:
  # 100 steps of toy training took 48 s beside a busy core, 27 s with passive waiting,
  # 21 s alone. (The waiting policy changes no result.)
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fi
# The stages' import layers ([tool.importlinter] in pyproject.toml): a wrong import fails
# here, with its chain, before any test runs.
lint-imports
# pytest exits 5 when it collects nothing: set -e turns that into a failure.
python -m pytest "${parallel[@]}" "$@"
