#!/usr/bin/env bash
# Mutation testing, on request (never in CI: it is slow). For each module named, mutmut
# changes its code one small way at a time (a flipped comparison, a constant off by one, a
# dropped argument) and runs the fast tests that cover it: a mutant that no test notices
# marks a rule nobody checks. Runs in a copy of the tree ($MUTATE_DIR/MODULE, default
# /tmp/labelassist-mutate), never in this checkout; a rerun keeps the copy's results and
# tests again only what changed.
#
# Usage: scripts/mutate.sh [MODULE...]   MODULE: audit accept outofset learn reviews
#        zeroshot claims export pull risk (default: all of them, one after another)
# Then:  cd /tmp/labelassist-mutate/MODULE && mutmut results   (the survivors)
#        mutmut show NAME                                        (one mutant's diff)
# Needs the dev extra (scripts/setup.sh test,dev). MUTATE_CHILDREN: parallel runs (2);
# MUTATE_FUNCTIONS="class_threshold coverage": only the mutants of these functions.
# MUTATE_TESTS="tests/a.py tests/b.py": these test files instead of the module's own list.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A SOURCE=(
  [audit]=labelassist/trust/audit.py [accept]=labelassist/trust/accept.py
  [outofset]=labelassist/trust/outofset.py [learn]=labelassist/trust/learn.py
  [reviews]=labelassist/trust/reviews.py [zeroshot]=labelassist/model/zeroshot.py
  [claims]=labelassist/db/claims.py [export]=labelassist/outputs/export.py
  [pull]=labelassist/labelstudio/pull.py [risk]=labelassist/trust/risk.py)
# The fast tests (no Label Studio, nothing marked slow) that cover each module. mutmut
# runs, for each mutant, only those of them that call the mutated function, in a fresh
# pytest session: what a mutant costs is the fixtures of those tests. The trust modules
# have direct tests on tiny ledgers (tests/test_pins_trust.py), a fraction of a second a
# mutant; the end-to-end tests (a model run, the CLI: seconds a mutant) stay out of them.
TRUST="tests/test_pins_trust.py tests/test_trust_pins.py"
DATA="tests/test_pins_data.py tests/test_trust_pins.py"
declare -A TESTS=(
  [audit]="$TRUST"
  [accept]="$TRUST"
  [outofset]="$TRUST"
  [learn]="$DATA"
  [reviews]="$TRUST"
  [zeroshot]="$DATA"
  [claims]="$DATA"
  [export]="$DATA"
  [pull]="tests/test_pins_pull.py"
  [risk]="tests/test_risk.py tests/test_pins_trust.py")
# A mutant's fresh pytest session spent about a second on two plugins that nothing here
# uses: unraisableexception (gc.collect twice at the end, over a heap that holds torch)
# and faker (an autouse fixture). Every module runs without them (0.1 s for a one-test
# session instead of 1.2 s). A change of pytest's arguments makes mutmut test every
# mutant of an existing copy again.
LEAN="audit accept outofset reviews pull learn zeroshot claims export risk"
LEAN_ARGS='"-p", "no:unraisableexception", "-p", "no:faker"'

modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(audit reviews outofset claims pull export zeroshot accept learn risk)
for module in "${modules[@]}"; do
  [ -n "${SOURCE[$module]:-}" ] || { echo "unknown module $module: use ${!SOURCE[*]}" >&2; exit 2; }
done

. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
work="${MUTATE_DIR:-/tmp/labelassist-mutate}"
for module in "${modules[@]}"; do
  copy="$work/$module"
  mkdir -p "$copy"
  # The files as they are now: edits and new files not yet committed included
  git ls-files -z --cached --others --exclude-standard | rsync -a --from0 --ignore-missing-args --files-from=- . "$copy/"
  lean=""
  case " $LEAN " in *" $module "*) lean="$LEAN_ARGS";; esac
  MUTATE_LEAN_ARGS="$lean" python - "$copy/pyproject.toml" "${SOURCE[$module]}" \
      ${MUTATE_TESTS:-${TESTS[$module]}} <<'EOF'
import json, os, re, sys
path, source, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path).read()
if os.environ["MUTATE_LEAN_ARGS"]:
    text = re.sub(r"(?m)^(pytest_add_cli_args = \[.*)\]$",
                  lambda m: f"{m[1]}, {os.environ['MUTATE_LEAN_ARGS']}]", text)
text = re.sub(r"(?ms)^only_mutate = \[.*?\]$", f"only_mutate = {json.dumps([source])}", text)
text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = .*$",
              f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", text)
open(path, "w").write(text)
EOF
  echo "== $module: ${SOURCE[$module]} against ${MUTATE_TESTS:-${TESTS[$module]}}" >&2
  # MUTATE_FUNCTIONS="class_threshold coverage": only those functions' mutants
  names=()
  stem="$(echo "${SOURCE[$module]%.py}" | tr / .)"
  for f in ${MUTATE_FUNCTIONS:-}; do names+=("$stem.x_${f}__mutmut_*"); done
  started=$SECONDS
  if ! (cd "$copy" && mutmut run --max-children "${MUTATE_CHILDREN:-2}" "${names[@]}" \
          >mutmut.log 2>&1 \
        && mutmut export-cicd-stats >>mutmut.log 2>&1); then
    tail -40 "$copy/mutmut.log" >&2
    exit 1
  fi
  python - "$copy/mutants/mutmut-cicd-stats.json" "$module" $((SECONDS - started)) <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
tested = s["total"] - s.get("skipped", 0)
killed = s["killed"] + s.get("timeout", 0)
print(f"{sys.argv[2]}: {killed} of {tested} mutants killed ({killed / max(tested, 1):.1%}); "
      f"survived {s['survived']}, no tests {s.get('no_tests', 0)}, "
      f"suspicious {s.get('suspicious', 0)}; {sys.argv[3]} s")
EOF
done
