import json
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist.trust.audit import TrustOptions
from labelassist.trust import audit as A
from labelassist.cli import app
from labelassist.db.models import Annotation
from labelassist.errors import ConfigError

LABELS = ["cat", "dog", "wild", "bird"]


def random_case(seed, n=200, labels=LABELS, never_predicted=None):
    rng = random.Random(seed)
    human = [rng.choice(labels) for _ in range(n)]
    model = [h if rng.random() < 0.7 else rng.choice(labels) for h in human]
    if never_predicted:
        model = [m if m != never_predicted else labels[0] for m in model]
    return human, model


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_scikit_learn(seed):
    human, model = random_case(seed, never_predicted="bird" if seed % 2 else None)
    matrix = A.confusion_matrix(human, model, LABELS)
    np.testing.assert_array_equal(matrix, sk_confusion(human, model, labels=LABELS))
    p, r, f, support = precision_recall_fscore_support(human, model, labels=LABELS,
                                                       zero_division=0)
    ours = A.per_class_scores(matrix, LABELS)
    for i, label in enumerate(LABELS):
        assert ours[label]["precision"] == pytest.approx(p[i])
        assert ours[label]["recall"] == pytest.approx(r[i])
        assert ours[label]["f1"] == pytest.approx(f[i])
        assert ours[label]["support"] == support[i]
    assert A.cohen_kappa(matrix) == pytest.approx(cohen_kappa_score(human, model))


@pytest.mark.parametrize("seed", range(3))
def test_calibration_bins_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.25, 1, 300)
    confidence[:5] = [0.3, 0.5, 0.7, 1.0, 0.9]  # values on bin edges
    correct = rng.uniform(size=300) < confidence
    cal = A.calibration(confidence, correct)
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=10)
    filled = [b for b in cal["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in filled], prob_true)
    np.testing.assert_allclose([b["confidence"] for b in filled], prob_pred)
    expected_ece = sum(b["count"] / 300 * abs(b["accuracy"] - b["confidence"]) for b in filled)
    assert cal["ece"] == pytest.approx(expected_ece)


def test_edge_cases_one_class_and_a_class_never_predicted():
    matrix = A.confusion_matrix(["cat"] * 5, ["cat"] * 5, ["cat"])
    assert A.per_class_scores(matrix, ["cat"])["cat"] == {"precision": 1.0, "recall": 1.0,
                                                          "f1": 1.0, "support": 5}
    assert A.cohen_kappa(matrix) == 1.0  # scikit-learn says nan: agreement is trivial here
    human, model = ["cat", "dog", "dog"], ["cat", "cat", "cat"]
    scores = A.per_class_scores(A.confusion_matrix(human, model, ["cat", "dog"]), ["cat", "dog"])
    assert scores["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_threshold_needs_target_precision_and_minimum_support():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.9, 0.8, 0.7])
    ok = np.array([1, 1, 1, 1, 1, 0, 1], dtype=bool)
    everything = np.concatenate([conf, [0.95, 0.5, 0.4]])
    t = A.class_threshold(conf, ok, everything, target=0.99, min_support=3)
    assert t["threshold"] == 0.9 and t["precision"] == 1.0 and t["reviews"] == 5
    assert t["coverage"] == pytest.approx(6 / 10)
    lo, hi = t["interval"]
    assert 0.4 < lo < 0.6 and hi == 1.0  # five reviews prove little: the interval says so
    strict = A.class_threshold(conf, ok, everything, target=0.99, min_support=6)
    assert strict["threshold"] is None and "6+ reviews" in strict["reason"]
    loose = A.class_threshold(conf, ok, everything, target=0.8, min_support=3)
    assert loose["threshold"] == 0.7 and loose["precision"] == pytest.approx(6 / 7)


from .conftest import EVIL  # noqa: E402,F401


def test_audit_of_a_reviewed_workspace(reviewed_db):
    (result,) = A.audit(reviewed_db, trust=TrustOptions(target_precision=0.9, min_support=2))
    assert result.reviewed == 24 and result.skipped == 1
    matrix = np.array(result.confusion["matrix"])
    assert matrix.sum() == 24 and result.confusion["labels"] == ["cat", "dog", "<b>wild</b>"]
    assert result.accuracy == pytest.approx(np.trace(matrix) / 24)
    assert len(result.disagreements) == 24 - np.trace(matrix)
    confidences = [d["confidence"] for d in result.disagreements]
    assert confidences == sorted(confidences, reverse=True)
    # preds[0]'s image was labelled by two annotators; the second said "dog"
    with reviewed_db.read() as s:
        first = s.scalars(select(Annotation.label).where(Annotation.ls_annotation_id == 0)).one()
    assert result.annotators == {"images": 1, "pairs": 1,
                                 "agreement": 1.0 if first == "dog" else 0.0}
    assert result.effort["skipped"] == 1


def test_no_reviews_is_a_clear_message(db):
    with pytest.raises(ConfigError, match="no reviewed images yet.*labelassist pull"):
        A.audit(db)


def test_report_json_and_html_from_the_cli(reviewed_db, db_url, tmp_path):
    html, js = tmp_path / "audit.html", tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["report", "--db", db_url, "--html", str(html), "--json",
                                      str(js), "--target-precision", "0.9", "--min-support",
                                      "2"])
    assert result.exit_code == 0, result.output
    assert "24 reviewed" in result.output
    data = json.loads(js.read_text())
    # The values, not just the keys: the report says exactly what the audit found.
    (expected,) = A.audit(reviewed_db, trust=TrustOptions(target_precision=0.9, min_support=2))
    want = json.loads(json.dumps(expected.to_json()))
    for key in ("model_version", "reviewed", "agreement", "accuracy", "per_class",
                "confusion", "thresholds", "annotators", "effort", "skipped"):
        assert data[key] == pytest.approx(want[key]) if isinstance(want[key], float) \
            else data[key] == want[key], key
    assert data["reviewed"] == 24 and data["skipped"] == 1
    assert data["cohen_kappa"] == pytest.approx(expected.cohen_kappa)
    assert data["calibration"]["ece"] == pytest.approx(expected.calibration["ece"])
    assert sum(b["count"] for b in data["calibration"]["bins"]) == 24
    assert [(d["path"], d["predicted"], d["human"]) for d in data["disagreements"]] == \
        [(d["path"], d["predicted"], d["human"]) for d in expected.disagreements]
    assert data["versions"][0]["model_version"] == data["model_version"]
    page = html.read_text()
    assert "<img src=x onerror" not in page and "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert "<b>wild</b>" not in page and "&lt;b&gt;wild&lt;/b&gt;" in page
    assert "<script>" not in page
    assert page.count("data:image/jpeg;base64,") >= 1
    assert not re.search(r"""(src|href|url)\(?=?["']?https?:""", page)  # opens offline


def test_html_report_renders_in_headless_chromium(reviewed_db, db_url, tmp_path):
    if not shutil.which("chromium"):
        if os.environ.get("CI"):  # scripts/test.sh installs it; CI must not skip this
            pytest.fail("Debian's chromium is not installed (CI=true: scripts/test.sh "
                        "installs it with apt-get when run as root)")
        pytest.skip("Debian's chromium is not installed")
    html = tmp_path / "audit.html"
    report = CliRunner().invoke(app, ["report", "--db", db_url, "--html", str(html),
                                      "--target-precision", "0.9", "--min-support", "2"])
    assert report.exit_code == 0, report.output
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(flags + ["--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=300)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in ("confusion", "reliability", "threshold"):
        assert re.search(rf'<svg class="chart {chart}"', dom.stdout), chart
    assert "<rect" in dom.stdout and "<polyline" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    shot = tmp_path / "audit.png"  # look at it with LABELASSIST_KEEP_SCREENSHOT=path
    taken = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1600",
                                    html.as_uri()], capture_output=True, text=True, timeout=300)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    if os.environ.get("LABELASSIST_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["LABELASSIST_KEEP_SCREENSHOT"])
