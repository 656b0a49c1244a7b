"""Whether measuring the CPU runtimes pays on this run of `predict --dtype auto`.

The trial costs time (the sample encoded by torch fp32 and by each candidate, the
conversions, int8's calibration) and saves time only on the images still to encode. So
predict decides from the work pending and what it knows of this machine:

- What this machine measured before, for this model, in any workspace (the speed memory,
  `runtime-speeds.json` in the cache): each runtime's images/s and what the trial cost.
  Then it measures only when the images pending times the time saved per image (the
  fastest runtime that qualified there against the default) exceeds the trial's cost,
  and tries only the runtimes that were faster than the default here, fastest first.
- Nothing measured here yet: the candidates' speeds are unknown, so the trial must be
  cheap against the run whatever it finds. It runs only when its cost, estimated from
  two timed batches (torch fp32 and the default on a few of the sample's images), is at
  most TRIAL_SHARE of the default's run: a first run is then never more than 5% slower
  than the default without a trial, and what it measures is remembered.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..workspace import cache_root

TRIAL_SHARE = 0.05   # a trial on a machine that never measured costs at most this of the run
SETUP_SHARE = 1.0    # conversions and calibration, as a share of the encodes (estimate)
PROBE = 16           # images in each timed batch of the quick probe


@dataclass
class Plan:
    measure: bool
    reason: str                      # one line, said as predict starts
    candidates: list[str] | None = None  # the runtimes to try, fastest first (None: all)


def memory_path() -> Path:
    """Beside the converted towers and the toy model, in labelassist's cache."""
    return cache_root() / "runtime-speeds.json"


def machine_key(cpu: str, software: str, model_key: str) -> str:
    """Speeds belong to the kind of CPU, the threads torch runs, the software and the
    model, not to a workspace."""
    return f"{cpu} | {torch.get_num_threads()} threads | {software} | {model_key}"


def kind_of(runtime: str) -> str:
    """ov-int8.<calibration> -> ov-int8: the speed of int8 does not depend on the images
    it was calibrated on."""
    return runtime.split(".", 1)[0]


def remembered(key: str) -> dict | None:
    """The last trial this machine ran for this key, or None (also for a file that
    cannot be read: the memory only saves time, it never decides correctness)."""
    try:
        return json.loads(memory_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def remember(key: str, measurement: dict) -> None:
    """Store what a trial found (images/s of each runtime's tower, which qualified, what
    each cost to build and run), atomically: a temporary file renamed into place. A
    trial that tried only some runtimes keeps what was known of the others."""
    path = memory_path()
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known.get(key), dict) else {}
    for trial in measurement["trials"]:
        kind = kind_of(trial["runtime"])
        entry.setdefault("speeds", {})[kind] = round(trial["images_per_second"], 2)
        entry.setdefault("costs", {})[kind] = round(trial.get("seconds", 0.0), 2)
        qualified = set(entry.get("qualified", [])) - {kind}
        if trial["disqualified"] is None:
            qualified.add(kind)
        entry["qualified"] = sorted(qualified)
    entry.update(sample=measurement["sample"], measured_at=time.strftime("%Y-%m-%d"))
    known[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(partial, path)


def from_memory(pending: int, default: str, memory: dict, sample: int) -> Plan:
    """Measure when the time saved on the pending images exceeds the trial's cost, both
    from what this machine measured before; try only the runtimes that were faster than
    the default here and qualified the last time they were tried, fastest first, and
    stop at the first that qualifies on this workspace's sample."""
    speeds, costs = memory.get("speeds", {}), memory.get("costs", {})
    base = speeds.get(default)
    faster = sorted((r for r in memory.get("qualified", [])
                     if r in speeds and base and speeds[r] > base), key=lambda r: -speeds[r])
    when = memory.get("measured_at", "an earlier day")
    if not base or not faster:
        return Plan(False, f"runtime: torch {default}, not measured: no runtime ran faster "
                           f"than {default} when this machine measured on {when}")
    best = faster[0]
    saves = pending * (1 / base - 1 / speeds[best])
    scale = sample / max(int(memory.get("sample", sample)), 1)
    # the trial stops at the first that qualifies: fp32 and the fastest, as a rule
    cost = scale * (costs.get("fp32", 0.0) + costs.get(best, 0.0))
    rates = f"{best} ran {speeds[best]:.0f} images/s against {default}'s {base:.0f} on {when}"
    if saves <= cost:
        return Plan(False, f"runtime: torch {default}, not measured: measuring (about "
                           f"{cost:.0f} s here) would save about {saves:.0f} s on "
                           f"{pending:,} images ({rates})")
    # the default last: if none of the faster ones qualifies on this workspace's images
    tried = faster + ([default] if default != "fp32" else [])
    return Plan(True, f"measuring the runtimes that ran faster here: about {saves:.0f} s "
                      f"saved on {pending:,} images for about {cost:.0f} s ({rates})", tried)


def from_probe(pending: int, default: str, sample: int, candidates: int,
               fp32_seconds_per_image: float, default_seconds_per_image: float) -> Plan:
    """No measurement on this machine yet: measure when the trial, estimated from the
    probe, costs at most TRIAL_SHARE of the run with the default."""
    encodes = sample * (fp32_seconds_per_image + candidates * default_seconds_per_image)
    cost = encodes * (1 + SETUP_SHARE)
    run = pending * default_seconds_per_image
    if cost <= TRIAL_SHARE * run:
        return Plan(True, f"measuring the runtimes (never measured on this machine): about "
                          f"{cost:.0f} s, at most {TRIAL_SHARE:.0%} of {pending:,} images on "
                          f"{default}")
    return Plan(False, f"runtime: torch {default}, not measured: the trial (about {cost:.0f} s"
                       f" here) would be more than {TRIAL_SHARE:.0%} of {pending:,} images, "
                       "and this machine has measured nothing to say it pays "
                       "(`labelassist runtimes` measures now)")


def never_pays(pending: int, sample: int) -> bool:
    """Whatever the speeds, a trial that encodes the sample at fp32 (never faster than
    the default) costs more than TRIAL_SHARE of a run of fewer than sample / TRIAL_SHARE
    images: no probe needed to say no."""
    return pending * TRIAL_SHARE < sample
