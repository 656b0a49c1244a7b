#!/usr/bin/env bash
# Set up from a clean clone and run every test. Label Studio is installed here and started
# by the test session itself (tests/conftest.py); PostgreSQL is expected on
# 127.0.0.1:5432 (set LABELASSIST_TEST_PG to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,studio
# The HTML report is checked in a real headless browser: Debian's chromium.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# LABELASSIST_TEST_WORKERS=N runs N pytest workers (pytest-xdist). The default is one
# process: in two CI runs with two workers, a worker process went down ("node down: Not
# properly terminated") while test_four_workers_on_postgres ran, and the cause is not
# found yet (it passes alone and in parallel runs of its own file).
workers="${LABELASSIST_TEST_WORKERS:-1}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers")
  # Two workers share the cores, and OpenMP's threads spin while they wait for each other:
  # 100 steps of toy training took 48 s beside a busy core, 27 s with passive waiting,
  # 21 s alone. (The waiting policy changes no result.)
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fi
# pytest exits 5 when it collects nothing: set -e turns that into a failure.
python -m pytest "${parallel[@]}" "$@"
