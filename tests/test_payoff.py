"""predict --dtype auto measures the CPU runtimes only when the trial pays on the images
pending: from this machine's memory of an earlier trial, else only when it costs at most
5% of the run. The figures below are worked by hand from the rule in predict/payoff.py."""

import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.db.models import RuntimeChoice
from labelassist.model.load import cpu_identity, load_model
from labelassist.predict import payoff
from labelassist.predict.choice import default_runtime, software

runner = CliRunner()

# What an earlier trial on a 2-core Intel Xeon (AMX) found, rounded: images/s of each
# tower, and seconds to build and run each on 256 images.
MEMORY = {"speeds": {"fp32": 20.0, "bf16": 55.0, "int8": 40.0, "ov-bf16": 50.0,
                     "ov-int8": 80.0},
          "costs": {"fp32": 12.5, "bf16": 5.0, "int8": 9.0, "ov-bf16": 10.0, "ov-int8": 14.0},
          "qualified": ["bf16", "fp32", "int8", "ov-bf16", "ov-int8"],
          "sample": 256, "measured_at": "2026-12-01"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELASSIST_CACHE", str(tmp_path / "cache"))


def test_with_a_memory_it_measures_when_the_time_saved_beats_the_trial():
    # saved per image: 1/55 - 1/80 = 0.005682 s; the trial: fp32 12.5 + ov-int8 14
    # (the only runtime faster than bf16 that qualified) = 26.5 s
    small = payoff.from_memory(1000, "bf16", MEMORY, 256)
    assert not small.measure
    assert "about 26 s here) would save about 6 s on 1,000 images" in small.reason
    large = payoff.from_memory(20000, "bf16", MEMORY, 256)
    assert large.measure and large.candidates == ["ov-int8", "bf16"]
    assert "about 114 s saved on 20,000 images for about 26 s" in large.reason
    # break-even: 26.5 / 0.005682 = 4,664 images
    assert not payoff.from_memory(4664, "bf16", MEMORY, 256).measure
    assert payoff.from_memory(4665, "bf16", MEMORY, 256).measure
    # a smaller sample costs less: 128 images, half the trial, break-even at 2,332
    assert payoff.from_memory(2340, "bf16", MEMORY, 128).measure


def test_with_a_memory_a_runtime_disqualified_last_time_is_not_tried_again():
    memory = {**MEMORY, "qualified": ["bf16", "fp32", "int8", "ov-bf16"]}
    plan = payoff.from_memory(1_000_000, "bf16", memory, 256)
    assert not plan.measure  # int8 (40) and ov-bf16 (50) are slower than bf16 (55)
    assert "no runtime ran faster than bf16" in plan.reason
    # on a CPU whose default is fp32, all three are faster, fastest first, and fp32
    # itself (always measured) is the fallback, not tried twice
    fp32 = payoff.from_memory(1_000_000, "fp32", memory, 256)
    assert fp32.measure and fp32.candidates == ["bf16", "ov-bf16", "int8"]
    # its cost: fp32 and the fastest (12.5 + 5), where the trial stops when it qualifies
    assert "for about 18 s" in fp32.reason


def test_without_a_memory_the_trial_runs_only_at_5_percent_of_the_run_or_less():
    # encodes: 256 x (0.05 s fp32 + 4 candidates x 0.02 s) = 33.28 s; doubled for the
    # conversions and calibration: 66.56 s. The run: pending x 0.02 s; 5% of it.
    assert payoff.from_probe(66_560, "bf16", 256, 4, 0.05, 0.02).measure
    refused = payoff.from_probe(66_559, "bf16", 256, 4, 0.05, 0.02)
    assert not refused.measure
    assert "the trial (about 67 s here) would be more than 5% of 66,559 images" in refused.reason
    # whatever the speeds, fewer than 20 x the sample never pays (fp32 is the slowest)
    assert payoff.never_pays(5119, 256) and not payoff.never_pays(5120, 256)


def test_the_memory_keeps_speeds_by_kind_and_survives_a_partial_trial(tmp_path):
    key = payoff.machine_key("avx512 AuthenticAMD", "torch 2", "toy@abc")
    assert payoff.remembered(key) is None
    trials = [{"runtime": "fp32", "images_per_second": 20.0, "disqualified": None,
               "seconds": 12.0},
              {"runtime": "ov-int8.0123456789", "images_per_second": 80.0,
               "disqualified": None, "seconds": 14.0}]
    payoff.remember(key, {"sample": 256, "trials": trials})
    assert payoff.remembered(key)["speeds"] == {"fp32": 20.0, "ov-int8": 80.0}
    # a later trial that tried only int8 (disqualified there) keeps what it did not try
    payoff.remember(key, {"sample": 256, "trials": [
        {"runtime": "int8", "images_per_second": 40.0, "disqualified": "agreement below",
         "seconds": 9.0}]})
    entry = payoff.remembered(key)
    assert entry["speeds"] == {"fp32": 20.0, "ov-int8": 80.0, "int8": 40.0}
    assert entry["qualified"] == ["fp32", "ov-int8"] and entry["costs"]["int8"] == 9.0
    assert not list(payoff.memory_path().parent.glob("*.partial"))
    payoff.memory_path().write_text("{not json")
    assert payoff.remembered(key) is None  # the memory only saves time: unreadable is none


def test_predict_without_a_memory_on_a_small_folder_runs_the_default_and_says_why(
        toy_workspace, db_url, db):
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert (f"runtime: torch {default_runtime()}, not measured: on 120 images to encode, "
            "measuring would cost more than it can save") in result.output
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(RuntimeChoice)) == 0
    assert payoff.remembered(_key(toy_workspace)) is None


def test_predict_with_a_memory_tries_only_the_faster_runtimes_and_updates_the_memory(
        toy_workspace, toy_model_dir, db_url, db):
    # this machine "saw" torch int8 run 100,000 times faster than the default: it pays at once
    key = _key(toy_workspace)
    default = default_runtime()
    memory = {"speeds": {"fp32": 10.0, default: 10.0, "int8": 1_000_000.0},
              "costs": {"fp32": 0.1, default: 0.1, "int8": 0.1},
              "qualified": sorted({"fp32", default, "int8"}), "sample": 256,
              "measured_at": "2026-12-01"}
    payoff.memory_path().parent.mkdir(parents=True)
    payoff.memory_path().write_text(json.dumps({key: memory}))
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "measuring the runtimes that ran faster here: about 12 s saved on 120 images" \
        in result.output
    with db.read() as s:
        stored = s.scalars(select(RuntimeChoice.measurement)).one()
    tried = [t["runtime"] for t in stored["trials"]]
    # fp32 (the reference), then int8; the default only if int8 failed the agreement
    assert tried[:2] == ["fp32", "int8"] and set(tried) <= {"fp32", "int8", default}
    assert not any(t.startswith("ov-") for t in tried)
    after = payoff.remembered(key)
    assert after["speeds"]["int8"] != 1_000_000.0  # measured now, not remembered
    assert after["costs"]["int8"] > 0 and after["measured_at"] != "2026-12-01"


def _key(labels) -> str:
    from labelassist.labels import load_label_file
    from labelassist.cli import resolve_model_id

    model = load_model(resolve_model_id(None, load_label_file(labels)), device="cpu",
                       dtype="fp32")
    return payoff.machine_key(cpu_identity(), software(), model.model_key)


def test_a_trial_first_tries_the_int8_tower_another_workspace_calibrated(
        toy_workspace, toy_model_dir, db_url, db, tmp_path):
    """Another workspace on this machine calibrated int8 for this model: this workspace's
    trial tries that tower first instead of calibrating (NNCF is most of int8's trial),
    checked against fp32 on this workspace's sample like any candidate; its own
    calibration follows only if the borrowed tower does not agree."""
    from labelassist.model import openvino as ov_runtime
    from labelassist.toy import world as toyworld

    toyworld.write_images(tmp_path / "other", 80, seed=9)
    other = f"sqlite:///{tmp_path}/other.db"
    assert runner.invoke(app, ["ingest", str(tmp_path / "other"), "--db", other]).exit_code == 0
    there = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", other,
                                "--dtype", "ov-int8"])
    assert there.exit_code == 0, there.output
    model_key = load_model(str(toy_model_dir), device="cpu", dtype="fp32").model_key
    (theirs,) = ov_runtime.calibrated_tags(model_key)
    default = default_runtime()
    payoff.memory_path().write_text(json.dumps({_key(toy_workspace): {
        "speeds": {"fp32": 10.0, default: 10.0, "ov-int8": 1_000_000.0},
        "costs": {"fp32": 0.1, default: 0.1, "ov-int8": 0.1},
        "qualified": sorted({"fp32", default, "ov-int8"}), "sample": 256,
        "measured_at": "2026-12-01"}}))
    result = runner.invoke(app, ["predict", "--labels", str(toy_workspace), "--db", db_url])
    assert result.exit_code == 0, result.output
    with db.read() as s:
        trials = s.scalars(select(RuntimeChoice.measurement)).one()["trials"]
    assert [t["runtime"] for t in trials[:2]] == ["fp32", f"ov-int8.{theirs}"]
    if trials[1]["disqualified"] is None:  # it agreed here: nothing was calibrated
        assert ov_runtime.calibrated_tags(model_key) == [theirs]
        assert len(trials) == 2
    else:  # this workspace's own calibration was tried next
        assert trials[2]["runtime"].startswith("ov-int8.") and len(
            ov_runtime.calibrated_tags(model_key)) == 2
