"""Learning from reviews, on the toy-world CLIP (real zero-shot behaviour)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.trust.audit import TrustOptions
from labelassist.trust import learn as L
from labelassist.toy import world as toyworld
from labelassist.cli import app
from labelassist.labels import LabelSet, load_label_file
from labelassist.db.models import AutoAccept, ModelVersion, Prediction
from labelassist.ingest import ingest
from labelassist.model.load import load_model
from labelassist.model.zeroshot import build_text_classifier
from labelassist.predict.run import predict
from labelassist.db.queries import resolve_version

from .conftest import add_annotation

EXAMPLES = Path(__file__).parent.parent / "examples" / "toyworld"


def truth_of(path):
    return "warm" if Path(path).name.split("_")[0] in toyworld.WARM else "cool"


@pytest.fixture
def toy_workspace(db, toy_model_dir, tmp_path):
    """150 toy pictures predicted with the *vague* prompt set (zero-shot is weak)."""
    toyworld.write_images(tmp_path / "photos", 150, seed=21)
    ingest(db, [tmp_path / "photos"])
    model = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    predict(db, model, load_label_file(EXAMPLES / "labels-vague.toml"))
    return db, model, tmp_path / "photos"


def review(db, count, wrong=(), start=0):
    """Reviewers give the true colour temperature of `count` images, a shuffled sample
    (files are ingested in name order, i.e. sorted by colour)."""
    from labelassist.db.queries import first_paths

    with db.read() as s:
        ids = s.scalars(select(Prediction.image_id).order_by(Prediction.image_id)).all()
        paths = first_paths(s, ids)
    ids = list(ids)
    random.Random(0).shuffle(ids)
    for n, image_id in enumerate(ids[:count]):
        if n < start:
            continue  # reviewed by an earlier call
        label = truth_of(paths[image_id])
        if n in wrong:
            label = "cool" if label == "warm" else "warm"
        add_annotation(db, image_id, label, n=n)
    return ids, paths


def test_probe_beats_weak_zero_shot_and_stores_a_new_version(toy_workspace, capsys):
    db, model, _ = toy_workspace
    ids, paths = review(db, 100)
    summary = L.learn(db, model, resolve_version(db))
    with capsys.disabled():
        print(f"\nvague prompts, 100 reviews: zero-shot {summary.zero_shot_accuracy:.1%}, "
              f"probe {summary.probe_accuracy:.1%} (cross-validated), ECE "
              f"{summary.ece_before:.3f} -> {summary.ece_after:.3f}")
    assert summary.zero_shot_accuracy < 0.8
    assert summary.probe_accuracy >= summary.zero_shot_accuracy + 0.15
    assert summary.stored_version.startswith("probe@") and summary.stored_predictions == 50
    with db.read() as s:
        probe = s.scalars(select(ModelVersion).where(ModelVersion.kind == "probe")).one()
        stored = s.scalars(select(Prediction).where(
            Prediction.model_version_id == probe.id)).all()
    assert {p.image_id for p in stored} == set(ids)
    # The reviewed images' stored predictions are out-of-fold: each from a probe that never
    # saw its label (the values, not just the ids), not the full fit's, which saw them all.
    review_ids, keys, x, y, classes = L.load_training_set(db, resolve_version(db, None),
                                                          "majority")
    offset = L.zero_shot_log_probs(build_text_classifier(model, LabelSet.from_json(
        resolve_version(db, None).label_set)), x)
    held_out = L.softmax(L.out_of_fold(x, offset, y, L.folds_of(keys, L.FOLDS),
                                       summary.chosen_lambda, 2) / summary.temperature)
    w, b = L.fit_probe(x, offset, y, summary.chosen_lambda, 2)
    full_fit = L.softmax((offset + x @ w + b) / summary.temperature)
    by_id = {p.image_id: p for p in stored}
    got = np.array([[by_id[i].scores[c] for c in classes] for i in review_ids])
    log = lambda p: np.log(np.maximum(p, 1e-300))  # noqa: E731 - most are near 0 or 1
    np.testing.assert_allclose(log(got), log(held_out), atol=1e-3)
    assert [by_id[i].label for i in review_ids] == [classes[k] for k in held_out.argmax(1)]
    assert np.abs(log(got) - log(full_fit)).max() > 1
    unreviewed = [p for p in stored if p.image_id in set(ids[100:])]
    right = sum(p.label == truth_of(paths[p.image_id]) for p in unreviewed) / len(unreviewed)
    assert len(unreviewed) == 50 and right >= 0.9
    assert summary.learning_curve and summary.learning_curve[-1]["probe"] >= \
        summary.learning_curve[-1]["zero_shot"]


COLOURS = ('templates = ["a photo of a {} thing."]\n[classes]\n'
           + "".join(f'{c} = ["{c}"]\n' for c in toyworld.COLOURS))


@pytest.mark.parametrize("labels", ["labels.toml", "labels-vague.toml", "colours"])
def test_with_0_to_5_reviews_per_class_the_probe_is_never_worse(db, toy_model_dir, tmp_path,
                                                                labels):
    toyworld.write_images(tmp_path / "photos", 180, seed=33)
    ingest(db, [tmp_path / "photos"])
    model = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    if labels == "colours":  # 6 classes: 5 reviews each is enough for the probe to be tried
        from labelassist.labels import parse_label_text

        predict(db, model, parse_label_text(COLOURS))
        truth = lambda path: Path(path).name.split("_")[0]  # noqa: E731
    else:
        predict(db, model, load_label_file(EXAMPLES / labels))
        truth = truth_of
    version = resolve_version(db)
    for n, p in enumerate(_all_predictions(db)):
        add_annotation(db, p.image_id, truth(_path(db, p.image_id)), n=n)
    ids, keys, x, y, classes = L.load_training_set(db, version, "majority")
    from labelassist.labels import LabelSet
    from labelassist.model.zeroshot import build_text_classifier

    offset = L.zero_shot_log_probs(build_text_classifier(
        model, LabelSet.from_json(version.label_set)), x)
    rng = random.Random(5)
    for per_class in range(0, 6):
        for _ in range(4):
            train = [i for c in range(len(classes))
                     for i in rng.sample(list(np.flatnonzero(y == c)), per_class)]
            test = np.array(sorted(set(range(len(y))) - set(train)), dtype=int)
            train = np.array(train, dtype=int)
            lam, _, _ = L.choose_lambda(x[train], offset[train], y[train],
                                        [keys[i] for i in train], len(classes))
            w, b = L.fit_probe(x[train], offset[train], y[train], lam, len(classes))
            probe = ((offset[test] + x[test] @ w + b).argmax(1) == y[test]).mean()
            zero = (offset[test].argmax(1) == y[test]).mean()
            assert probe >= zero, (labels, per_class, probe, zero)


def _all_predictions(db):
    with db.read() as s:
        return s.scalars(select(Prediction).order_by(Prediction.image_id)).all()


def _path(db, image_id):
    from labelassist.db.queries import first_paths

    with db.read() as s:
        return first_paths(s, [image_id])[image_id]


def test_label_issues_come_from_out_of_fold_probabilities(toy_workspace):
    db, model, _ = toy_workspace
    wrong = {3, 17, 42}
    ids, _ = review(db, 100, wrong=wrong)
    summary = L.learn(db, model, resolve_version(db), store=False)
    flagged = {issue["image_id"] for issue in summary.label_issues}
    caught = {ids[n] for n in wrong} & flagged
    assert len(caught) >= 2  # planted mistakes are found ...
    assert len(flagged - caught) <= 1  # ... without burying them in false alarms (0 here)


def test_temperature_scaling_improves_calibration(toy_workspace):
    """The out-of-fold probe is under-confident here: a temperature below 1 sharpens it,
    and the calibration error falls (ece_after <= ece_before would hold with T = 1)."""
    db, model, _ = toy_workspace
    review(db, 100)
    summary = L.learn(db, model, resolve_version(db), store=False)
    print(f"\nT {summary.temperature:.3f}, ECE {summary.ece_before:.4f} -> "
          f"{summary.ece_after:.4f}")
    assert summary.temperature < 0.9
    assert summary.ece_after < summary.ece_before - 0.005


def test_cli_learn_accept_report_and_export_close_the_loop(toy_workspace, db_url, tmp_path,
                                                           toy_model_dir):
    db, _, _ = toy_workspace
    review(db, 100)
    runner = CliRunner()
    learned = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir)])
    assert learned.exit_code == 0, learned.output
    assert " holds 150 predictions (100 reviewed images" in learned.output
    accepted = runner.invoke(app, ["accept", "--db", db_url, "--target-precision", "0.5",
                                   "--min-support", "5",
        "--rule", "class"])
    assert accepted.exit_code == 0, accepted.output
    with db.read() as s:
        n_auto = s.scalar(select(func.count()).select_from(AutoAccept))
    assert n_auto > 0 and f"{n_auto} predictions auto-accepted" in accepted.output
    again = runner.invoke(app, ["accept", "--db", db_url, "--target-precision", "0.5",
                                "--min-support", "5",
        "--rule", "class"])
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AutoAccept)) == n_auto  # idempotent
    assert again.exit_code == 0
    js = tmp_path / "r.json"
    report = runner.invoke(app, ["report", "--db", db_url, "--rule", "class", "--json", str(js),
                                 "--html",
                                 str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    learning = json.loads(js.read_text())["learning"]
    assert learning and learning[0]["learning_curve"]
    assert 'class="chart learning-curve"' in (tmp_path / "r.html").read_text()
    (session,) = json.loads(js.read_text())["session"]
    assert [p["reviews"] for p in session["points"]] == [0, 100]
    assert 'class="chart session-curve"' in (tmp_path / "r.html").read_text()
    assert "session from " in report.output and "accept --rule class would" in report.output
    exported = runner.invoke(app, ["export", str(tmp_path / "out"), "--db", db_url,
                                   "--include-auto", "--target-precision", "0.5",
                                   "--min-support", "5",
        "--rule", "class"])
    assert exported.exit_code == 0, exported.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().split("\n")
            if x]
    assert sum(r["source"] == "auto" for r in rows) >= n_auto


def test_learn_and_accept_flags_and_refusals(toy_workspace, db_url, toy_model_dir, tmp_path):
    db, _, _ = toy_workspace
    runner = CliRunner()
    base = resolve_version(db).name
    review(db, 1)
    few = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir)])
    assert few.exit_code == 1 and "learn needs reviews of at least two classes" in few.output

    review(db, 100, start=1)
    dry = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir),
                              "--version", base, "--resolve", "latest", "--no-store"])
    assert dry.exit_code == 0, dry.output
    assert "--no-store: nothing stored" in dry.output
    assert "lambda None" not in dry.output and ("(lambda " in dry.output
                                                or "(zero-shot kept" in dry.output)
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)
                        .where(ModelVersion.kind == "probe")) == 0

    stored = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir),
                                 "--store"])
    assert stored.exit_code == 0 and " holds 150 predictions" in stored.output
    probe = resolve_version(db).name
    assert probe.startswith("probe@")
    refused = runner.invoke(app, ["learn", "--db", db_url, "--version", probe])
    assert refused.exit_code == 1 and "is a probe; pass --version with a zero-shot" \
        in refused.output

    # The loop's second turn, with no --version: learn and suggest work on the zero-shot
    # version the newest probe was learned from (not "is a probe; pass --version")
    again = runner.invoke(app, ["learn", "--db", db_url, "--model", str(toy_model_dir),
                                "--no-store"])
    assert again.exit_code == 0, again.output
    assert again.output.startswith(f"{base}: ")
    suggested = runner.invoke(app, ["suggest", "--db", db_url, "--model", str(toy_model_dir),
                                    "--out", str(tmp_path / "proposed.toml")])
    assert suggested.exit_code == 0, suggested.output
    assert suggested.output.startswith(f"{base}: ")

    # accept judges the version it is given, not the newest
    accepted = runner.invoke(app, ["accept", "--db", db_url, "--version", base, "--resolve",
                                   "latest", "--target-precision", "0.5", "--min-support", "5",
        "--rule", "class"])
    assert accepted.exit_code == 0, accepted.output
    assert accepted.output.startswith(f"{base}: ")
    with db.read() as s:
        versions = set(s.scalars(select(AutoAccept.model_version_id)))
        assert versions == {s.scalar(select(ModelVersion.id).where(ModelVersion.name == base))}
    bad = runner.invoke(app, ["accept", "--db", db_url, "--resolve", "loudest"])
    assert bad.exit_code == 1 and "--resolve 'loudest'" in bad.output


def images_of_the_base_version(db, order_by):
    """The zero-shot version, its images in the given order, and their paths."""
    from labelassist.db.queries import first_paths

    base = resolve_version(db, None)
    with db.read() as s:
        order = list(s.scalars(select(Prediction.image_id).where(
            Prediction.model_version_id == base.id).order_by(order_by, Prediction.image_id)))
        paths = first_paths(s, order)
    return base, order, paths


@pytest.mark.parametrize("rule", ["class", "risk"])
def test_the_session_replay_scores_each_version_on_what_was_reviewed_after_it(toy_workspace,
                                                                             rule):
    """A session in random order (push's, for the risk rule: its fair sample), learning
    every 20 reviews: each version's accuracy on the images reviewed later equals the toy
    world's own truth, and its auto-accept share, by the rule asked for, uses only earlier
    reviews (wrong later labels change accuracy, never the share)."""
    from labelassist.db.models import Annotation
    from labelassist.trust.replay import session_sections
    from labelassist.trust.risk import shuffle_rank

    db, model, _ = toy_workspace
    base, order, paths = images_of_the_base_version(db, Prediction.image_id)
    random.Random(1).shuffle(order)  # reviewers take tasks in random order
    if rule == "risk":  # in push's order
        order = [int(i) for i in np.array(order)[np.lexsort((order, shuffle_rank(order)))]]
    trust = TrustOptions(target_precision=0.95, min_support=5, rule=rule)
    for n, image_id in enumerate(order[:60]):
        add_annotation(db, image_id, truth_of(paths[image_id]), n=n + 1)
        if (n + 1) % 20 == 0:
            L.learn(db, model, base)
    for n, image_id in enumerate(order[60:], start=61):  # the rest, reviewed later
        add_annotation(db, image_id, truth_of(paths[image_id]), n=n)

    (section,) = session_sections(db, trust=trust)
    points = section["points"]
    assert section["base"] == base.name and section["reviews"] == 150
    assert section["rule"] == rule
    assert [p["reviews"] for p in points][0] == 0 and len(points) >= 2
    assert [p["reviews"] for p in points] == sorted(p["reviews"] for p in points)
    for p in points:
        with db.read() as s:
            shown = dict(s.execute(select(Prediction.image_id, Prediction.label).join(
                ModelVersion).where(ModelVersion.name == p["model_version"])).all())
        later = order[p["reviews"]:]
        right = [shown[i] == truth_of(paths[i]) for i in later]
        assert p["later_reviewed"] == len(later)
        assert p["accuracy_later_reviewed"] == pytest.approx(sum(right) / len(right))
    zero_shot, newest = points[0], points[-1]
    assert zero_shot["accept_share"] == 0.0  # no reviews: no threshold
    assert newest["accuracy_later_reviewed"] > zero_shot["accuracy_later_reviewed"] + 0.15
    assert newest["accept_share"] > 0.5 and newest["accept_precision"] >= 0.95
    if rule == "risk":  # one threshold for both classes
        assert len(set(newest["thresholds"].values())) == 1

    with db.write() as s:  # later reviewers disagree with everything: no version saw them
        for a in s.scalars(select(Annotation).where(Annotation.ls_annotation_id > 60)):
            a.label = "cool" if a.label == "warm" else "warm"
    (flipped,) = session_sections(db, trust=trust)
    for before, after in zip(points, flipped["points"]):
        assert after["accept_share"] == before["accept_share"]
        assert after["thresholds"] == before["thresholds"]
        assert after["accuracy_later_reviewed"] < before["accuracy_later_reviewed"] or \
            before["accuracy_later_reviewed"] == 0


def test_sample_bias_agrees_with_scipy_and_scikit_learn():
    """The accept guard's statistic: AUC as scikit-learn's roc_auc_score, p-value as
    scipy's Mann-Whitney U (normal approximation, tie-corrected, no continuity correction)."""
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    from labelassist.trust import accept as A
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.1, 0.6):
        reviewed = np.round(rng.random(40) * (1 - shift), 2)  # margins: in [0, 1], ties
        others = np.round(rng.random(300), 2)
        stats = A.rank_test(reviewed, others)
        expected_auc = roc_auc_score([1] * 40 + [0] * 300, np.concatenate([reviewed, others]))
        expected_p = mannwhitneyu(reviewed, others, method="asymptotic",
                                  use_continuity=False).pvalue
        assert stats["auc"] == pytest.approx(expected_auc)
        assert stats["p_value"] == pytest.approx(expected_p, rel=1e-6)


def test_accept_refuses_thresholds_from_reviews_chosen_by_uncertainty(toy_workspace, db_url,
                                                                      tmp_path):
    """Reviews in uncertainty order, then learn: the audit's thresholds look fine on them
    and fail on the rest. accept says so, and writes nothing, unless told to go on."""
    db, model, _ = toy_workspace
    base, order, paths = images_of_the_base_version(db, Prediction.margin)  # least sure first
    for n, image_id in enumerate(order[:60]):
        add_annotation(db, image_id, truth_of(paths[image_id]), n=n)
    L.learn(db, model, base)
    runner = CliRunner()
    args = ["accept", "--db", db_url, "--target-precision", "0.9", "--min-support", "5",
        "--rule", "class"]

    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    assert "not a fair sample" in refused.output and "--allow-biased-sample" in refused.output
    assert "Traceback" not in refused.output
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AutoAccept)) == 0

    allowed = runner.invoke(app, ["accept", "--db", db_url, "--target-precision", "0.9",
                                  "--min-support", "5", "--allow-biased-sample",
        "--rule", "class"])
    assert allowed.exit_code == 0, allowed.output
    with db.read() as s:
        taken = s.execute(select(AutoAccept.image_id, AutoAccept.label)).all()
    wrong = sum(label != truth_of(paths[i]) for i, label in taken)
    print(f"\naccepted anyway: {len(taken)}, of which {wrong} wrong")
    # The refusal was right: far more than the 10% that 0.9 allows are wrong (32 of 89)
    assert taken and wrong > 0.2 * len(taken)

    refused = runner.invoke(app, ["export", str(tmp_path / "refused"), "--db", db_url,
                                  "--include-auto", "--min-support", "5",
        "--rule", "class"])
    assert refused.exit_code == 1 and "not a fair sample" in refused.output
    assert not (tmp_path / "refused").exists()
    assert runner.invoke(app, ["export", str(tmp_path / "out"), "--db", db_url,
                               "--include-auto", "--min-support", "5",
                               "--allow-biased-sample", "--rule", "class"]).exit_code == 0


def test_the_probe_can_overrule_a_zero_shot_that_is_sure_and_wrong():
    """CLIP's embeddings share a large common part and differ between classes in a small
    one, so a correction that overrules a sure zero-shot needs large weights: the
    regularisation grid must reach weak enough values. Here zero-shot is sure (log-odds 8)
    that every picture of class 0 is class 1; the classes differ in a 60th of each
    vector. With 0.001 the weakest on offer (the grid before), the probe stayed at
    zero-shot's 88% (benchmarks/clean_cost.py's 24 pairs: 98.6%, now 99%)."""
    rng = np.random.default_rng(3)
    k, d = 8, 512
    centers, common = rng.normal(size=(k, d)), rng.normal(size=d)

    def draw(m):
        y = rng.integers(0, k, m)
        x = 60 * common + centers[y] + 0.5 * rng.normal(size=(m, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        offset = np.full((m, k), -8.0)
        offset[np.arange(m), np.where(y == 0, 1, y)] = 0.0
        return x.astype(np.float32), offset, y

    x, offset, y = draw(400)
    test_x, test_offset, test_y = draw(2000)
    keys = [f"{i * 2654435761 % 2 ** 32:08x}" for i in range(len(y))]
    lam, cv, _ = L.choose_lambda(x, offset, y, keys, k)
    w, b = L.fit_probe(x, offset, y, lam, k)
    assert (test_offset.argmax(1) == test_y).mean() < 0.9  # zero-shot
    assert lam is not None and lam < 0.001 and cv > 0.99
    assert ((test_offset + test_x @ w + b).argmax(1) == test_y).mean() > 0.99
