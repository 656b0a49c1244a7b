"""Pins for the second-order rules that decide how far a user can trust the numbers.

Each test here was written against a hand-made mutant that the rest of the suite let live
(issue 34): the rule broken on purpose, this test red, the rule restored. None needs
Label Studio: pull runs against the suite's own small HTTP server (tests/hostile_server.py).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import insert, select

from labelassist.db import open_database
from labelassist.db.claims import _upsert_claims, pending_images_query
from labelassist.db.models import (Annotation, Claim, Image, LSProject, LSTask, ModelVersion,
                                   Worker, as_utc, utcnow)
from labelassist.trust import audit as A
from labelassist.trust import learn as L
from labelassist.trust import outofset as O
from labelassist.trust.reviews import HumanLabel, Reviews

from .bigledger import add_images
from .hostile_server import JSON, HostileServer


# ---- audit: the threshold search -------------------------------------------------------

def test_a_threshold_never_sits_inside_a_run_of_tied_confidences():
    """Four reviews tied at 0.9, one of them wrong: at >= 0.9 the precision is 5/6, never
    the 1.0 of the first five rows. The result is the same whatever the rows' order."""
    conf = np.array([0.97, 0.96, 0.9, 0.9, 0.9, 0.9])
    ok = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    results = set()
    for order in itertools.permutations(range(6)):
        order = list(order)
        t = A.class_threshold(conf[order], ok[order], conf, target=0.99, min_support=2)
        results.add((t["threshold"], t["precision"], t["reviews"]))
    assert results == {(0.96, 1.0, 2)}
    loose = A.class_threshold(conf, ok, conf, target=0.8, min_support=2)
    assert (loose["threshold"], loose["reviews"]) == (0.9, 6)
    assert loose["precision"] == pytest.approx(5 / 6)


def test_target_precision_1_finds_a_threshold_when_every_review_agrees():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    ok = np.array([1, 1, 1, 0], dtype=bool)
    t = A.class_threshold(conf, ok, conf, target=1.0, min_support=3)
    assert (t["threshold"], t["precision"], t["reviews"]) == (0.7, 1.0, 3)
    assert t["coverage"] == 0.75


def _effort(times):
    labels = {i: HumanLabel(i, "cat", ("a",), 1, 1, t) for i, t in enumerate(times)}
    return A.review_effort(Reviews(labels, {99}, []), 3, 1)


def test_lead_time_mean_and_median():
    odd = _effort([4.0, None, 1.0, 10.0])
    assert odd == {"accepted": 3, "corrected": 1, "skipped": 1, "lead_time_mean": 5.0,
                   "lead_time_median": 4.0}
    even = _effort([10.0, 1.0, 5.0, 2.0])  # the median of an even count: the middle two's mean
    assert even["lead_time_mean"] == 4.5 and even["lead_time_median"] == 3.5
    assert _effort([None])["lead_time_mean"] is None
    assert _effort([])["lead_time_median"] is None


# ---- out of set: the bar ----------------------------------------------------------------

# 21 similarities 0.20, 0.21, ... 0.40: median 0.30, 5th percentile 0.21 (numpy's linear
# interpolation lands on the second value), so the bar is 0.21 - (0.30 - 0.21) = 0.12.
REFERENCE = np.round(np.linspace(0.2, 0.4, 21), 10)


def test_the_bar_from_the_reference_alone():
    bar = O._bar(REFERENCE, "reviews", [])
    assert (bar.median, bar.low) == pytest.approx((0.30, 0.21))
    assert bar.threshold == pytest.approx(0.12) and bar.n_reference == 21


def test_a_bar_from_reviews_never_flags_a_picture_as_close_as_one_a_reviewer_saw():
    # 21 real pictures a reviewer labelled, the lowest well below the rest: the 5th
    # percentile is the second lowest (0.615), the median 0.63, so p5 - (median - p5) =
    # 0.60 lies above the lowest real picture itself (the toy world's pairs at 500
    # reviews: a class with an eighth of its pictures flagged). A picture as close to
    # its class as a real one seen is not junk.
    few = np.r_[0.58, 0.615, np.linspace(0.62, 0.64, 19)]
    bar = O._bar(few, "reviews", [])
    assert 2 * bar.low - bar.median > few.min()  # the old bar: above a real picture
    assert bar.threshold == pytest.approx(few.min()) and bar.threshold <= few.min()
    # the same similarities as predictions (no review yet: junk may be among them) keep
    # p5 - (median - p5): the lowest of them proves nothing
    assert O._bar(few, "predictions", []).threshold == pytest.approx(2 * bar.low - bar.median)
    # a reviewer's word is the truth: a picture named the class far below the rest
    # lowers the bar to it (tests/test_risk.py: junk that reviewers named a class)
    many = np.r_[0.05, 0.58, np.linspace(0.62, 0.64, 60)]
    bar = O._bar(many, "reviews", [])
    assert 2 * bar.low - bar.median > 0.59 and bar.threshold == pytest.approx(0.05)
    # a reviewer's "other" still lifts it, up to the 5th percentile
    assert O._bar(few, "reviews", [0.605]).threshold == pytest.approx(
        math.nextafter(0.605, 1))


@pytest.mark.parametrize("other, expected", [
    (0.05, 0.12),                          # below the bar already: no change
    (0.15, math.nextafter(0.15, 1)),       # just above the highest "other"
    (0.35, 0.21),                          # capped at the 5th percentile, never above
])
def test_an_other_review_lifts_the_bar_but_never_above_the_5th_percentile(other, expected):
    bar = O._bar(REFERENCE, "reviews", [0.01, other])
    assert bar.threshold == pytest.approx(expected, abs=1e-12) and bar.other_reviews == 2
    assert bar.threshold <= bar.low + 1e-12


def _groups(low: int, high: int) -> np.ndarray:
    return np.concatenate([0.10 + 0.001 * np.arange(low), 0.90 + 0.001 * np.arange(high)])


def test_otsu_sets_aside_only_a_smaller_lower_group():
    np.testing.assert_array_equal(O.upper_group(_groups(4, 10)), _groups(0, 10))
    assert len(O.upper_group(_groups(10, 4))) == 14  # most pictures low: keep them all
    assert len(O.upper_group(_groups(7, 7))) == 14   # half and half: keep them all
    assert len(O.upper_group(_groups(6, 7))) == 7
    close = np.linspace(0.2, 0.4, 14)  # one spread, no two groups: keep them all
    assert len(O.upper_group(close)) == 14


# ---- learn: the guard, the temperature, the folds, the issues ----------------------------

def _reviews(n_wrong: int, n: int = 20):
    """n reviews of two classes whose embeddings tell the classes apart; zero-shot says
    0.6 for the right class, except for `n_wrong` reviews where it says 0.4."""
    rng = np.random.default_rng(0)
    y = np.array([0] * (n // 2) + [1] * (n // 2))
    x = np.zeros((n, 4), np.float32)
    x[np.arange(n), y] = 1.0
    x += rng.normal(0, 0.05, x.shape).astype(np.float32)
    p = np.where(y == 0, 0.6, 0.4)
    wrong = np.arange(n_wrong) * 2
    p[wrong] = 1 - p[wrong]
    offset = np.log(np.stack([p, 1 - p], 1))
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    return x, offset, y, keys


def test_a_probe_must_beat_zero_shot_by_two_reviews():
    x, offset, y, keys = _reviews(n_wrong=1)
    fold = L.folds_of(keys, L.FOLDS)
    probe = L.out_of_fold(x, offset, y, fold, 0.1, 2)
    assert (probe.argmax(1) == y).mean() == 1.0  # the probe wins, by one review of 20
    lam, acc, logits = L.choose_lambda(x, offset, y, keys, 2)
    assert lam is None and acc == 0.95
    np.testing.assert_array_equal(logits, offset)
    x, offset, y, keys = _reviews(n_wrong=2)  # by two reviews: the probe is taken
    lam, acc, logits = L.choose_lambda(x, offset, y, keys, 2)
    assert lam is not None and acc == 1.0 and (logits.argmax(1) == y).all()
    # (which strength: every one up to 0.1 is right on all 20; the held-out log-loss
    # picks, as tests/test_pins_data.py pins)
    np.testing.assert_allclose(logits, L.out_of_fold(x, offset, y, L.folds_of(keys, L.FOLDS),
                                                     lam, 2))


def test_too_few_reviews_keep_zero_shot():
    x, offset, y, keys = _reviews(n_wrong=4, n=18)  # under MIN_REVIEWS, the probe never runs
    lam, acc, logits = L.choose_lambda(x, offset, y, keys, 2)
    assert lam is None and acc == pytest.approx(14 / 18)
    np.testing.assert_array_equal(logits, offset)


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z); the logits given are z * true_t, so dividing them by
    true_t calibrates them again."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (4000, 3))
    p = L.softmax(z)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = L.fit_temperature(z * true_t, y)
    assert t == pytest.approx(true_t, rel=0.08)


def test_out_of_fold_logits_never_see_their_own_label():
    """Flipping one review's label changes every fold's probe but its own."""
    x, offset, y, keys = _reviews(n_wrong=2)
    fold = L.folds_of(keys, L.FOLDS)
    before = L.out_of_fold(x, offset, y, fold, 0.01, 2)
    for i in (0, 7, 13):
        flipped = y.copy()
        flipped[i] = 1 - flipped[i]
        after = L.out_of_fold(x, offset, flipped, fold, 0.01, 2)
        np.testing.assert_allclose(after[i], before[i], rtol=1e-5, atol=1e-5)
        others = fold != fold[i]
        assert np.abs(after[others] - before[others]).max() > 1e-3
    assert not np.allclose(before, offset)  # the probe did learn something


def test_label_issues_worked_by_hand():
    """Class 0's reviews give it 0.5625 on average (0.875, 0.75, 0.25, 0.375), class 1's
    give it 0.625 (0.75, 1.0, 0.5, 0.25). Flagged: 2 (labelled 0, class 1 at 0.75), 6
    (labelled 1, class 0 at 0.75) and 7 (labelled 0, class 1 at 0.625: its average, and
    reaching it is enough). Not 5: a tie goes to class 0, at 0.5, under its 0.5625."""
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p1 = np.array([0.125, 0.25, 0.75, 0.75, 1.0, 0.5, 0.25, 0.625])
    probs = np.stack([1 - p1, p1], 1)
    assert L.confident_learning_issues(probs, y).tolist() == [2, 6, 7]
    # Without 7, class 0 averages 0.625 and 6 (0.75) is still above it.
    assert L.confident_learning_issues(probs[:7], y[:7]).tolist() == [2, 6]
    # A class nobody reviewed has a bar of 1: nothing is flagged for it.
    three = np.array([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    assert L.confident_learning_issues(three, np.array([0, 0, 1])).tolist() == []


# ---- claims: each safeguard against taking a live claim, on its own ----------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def claims_db(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'claims.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    open_database(url).dispose()
    add_images(url, 3)
    db = open_database(url)
    with db.write() as s:
        version = s.scalar(insert(ModelVersion).values(
            name="v@1", model_id="m", model_key="k", label_set={"classes": ["a", "b"]},
            created_at=utcnow()).returning(ModelVersion.id))
        workers = [Worker(hostname="elsewhere", pid=1, model_version_id=version)
                   for _ in range(2)]
        s.add_all(workers)
        s.flush()
        now = utcnow()
        s.add(Claim(model_version_id=version, image_id=1, worker_id=workers[0].id,
                    expires_at=now + timedelta(minutes=5)))   # live
        s.add(Claim(model_version_id=version, image_id=2, worker_id=workers[0].id,
                    expires_at=now - timedelta(minutes=5)))   # expired
    yield db, version, [w.id for w in workers]
    db.dispose()


def test_the_pending_query_leaves_out_live_claims_only(claims_db):
    db, version, _ = claims_db
    with db.read() as s:
        pending = s.scalars(pending_images_query(version, "k", stored=False,
                                                 now=utcnow())).all()
    assert pending == [2, 3]


def test_the_upsert_never_takes_over_a_live_claim(claims_db):
    """As under READ COMMITTED with a stale candidate list: the upsert alone must refuse
    the live claim, take over the expired one, and make the new one."""
    db, version, (first, second) = claims_db
    now = utcnow()
    with db.write() as s:
        won = _upsert_claims(s, second, version, [1, 2, 3], now + timedelta(minutes=10), now)
    assert won == {2, 3}
    with db.read() as s:
        owners = dict(s.execute(select(Claim.image_id, Claim.worker_id)).all())
    assert owners == {1: first, 2: second, 3: second}


# ---- pull, against a server of our own --------------------------------------------------

def _choice(label):
    return [{"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [label]}}]


class ReviewServer(HostileServer):
    """Label Studio's task list of project 1 (three tasks, whose annotations a test
    changes), and its users; every listing's query is kept."""

    def __init__(self, shas):
        from labelassist.labelstudio.project import label_config

        super().__init__({"/api/tasks": self.tasks, "/api/users": lambda q: (200, JSON, [
            {"id": 1, "email": "a@b.c"}, {"id": 2, "email": "", "username": "bea"}]),
            "/api/projects/1": lambda q: (200, JSON, {
                "id": 1, "title": "p", "label_config": label_config(["cat", "dog"])})})
        self.notes = {}
        self.shas = dict(shas)
        self.queries = []

    def tasks(self, query):
        self.queries.append(query)
        if query.get("project") != ["1"] or query.get("page", ["1"])[0] != "1":
            return 200, JSON, {"total": len(self.shas), "tasks": []}
        return 200, JSON, {"total": len(self.shas), "tasks": [
            {"id": task_id, "data": {"sha256": sha},
             "predictions": [{"id": 100 + task_id, "model_version": "v@1",
                              "result": _choice("cat")}],
             "annotations": self.notes.get(task_id, [])}
            for task_id, sha in self.shas.items()]}


def _note(n, label, when, parent=None):
    return {"id": n, "result": _choice(label), "completed_by": 1, "lead_time": 3.5,
            "parent_prediction": parent, "was_cancelled": False,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": when}


@pytest.fixture
def pulled_ledger(tmp_path):
    url = f"sqlite:///{tmp_path / 'pull.db'}"
    open_database(url).dispose()
    add_images(url, 3)
    db = open_database(url)
    with db.read() as s:
        shas = dict(s.execute(select(Image.id, Image.sha256)).all())
    with ReviewServer(shas) as server:
        with db.write() as s:
            s.execute(insert(ModelVersion).values(
                name="v@1", model_id="m", model_key="k", label_set={"classes": ["cat", "dog"]},
                created_at=utcnow()))
            project = s.scalar(insert(LSProject).values(
                url=server.url, ls_project_id=1, title="p", classes=["cat", "dog"],
                image_mode="local", created_at=utcnow()).returning(LSProject.id))
            s.execute(insert(LSTask), [{"project_id": project, "image_id": i, "ls_task_id": i,
                                        "image_key": f"sha256:{sha}", "created_at": utcnow()}
                                       for i, sha in shas.items()])
        yield db, server
    db.dispose()


def _pull(db, server, on_progress=None, url=None):
    from labelassist.labelstudio.client import Connection, LabelStudioClient
    from labelassist.labelstudio.pull import pull

    client = LabelStudioClient(Connection(url or server.url, "t"), retries=0)
    try:
        return pull(db, client, on_progress=on_progress)
    finally:
        client.close()


def _stored(db):
    with db.read() as s:
        return {a.ls_annotation_id: (a.label, a.accepted_prediction, a.annotator, a.lead_time)
                for a in s.scalars(select(Annotation).where(Annotation.deleted_at.is_(None)))}


def test_pull_marks_what_accepted_the_prediction_and_updates_a_changed_review(pulled_ledger):
    db, server = pulled_ledger
    server.notes = {1: [_note(11, "cat", "2026-01-01T00:00:00Z", parent=101)],
                    2: [_note(21, "dog", "2026-01-01T00:00:00Z", parent=102)],
                    3: [_note(31, "dog", "2026-01-01T00:00:00Z")]}  # made without one
    first = _pull(db, server)
    assert (first.new, first.updated, first.unchanged) == (3, 0, 0)
    assert _stored(db) == {11: ("cat", True, "a@b.c", 3.5), 21: ("dog", False, "a@b.c", 3.5),
                           31: ("dog", None, "a@b.c", 3.5)}

    server.notes[1] = [_note(11, "dog", "2026-01-02T00:00:00Z", parent=101)]  # changed mind
    server.notes[2] = [_note(21, "cat", "2026-01-01T00:00:00Z", parent=102)]  # same stamp
    second = _pull(db, server)
    assert (second.new, second.updated, second.unchanged) == (0, 1, 2)
    assert _stored(db) == {11: ("dog", False, "a@b.c", 3.5), 21: ("dog", False, "a@b.c", 3.5),
                           31: ("dog", None, "a@b.c", 3.5)}


def test_pull_marks_deleted_reviews_and_tasks_skips_unknown_ones_and_keeps_a_watermark(
        pulled_ledger):
    import json
    from datetime import datetime, timezone

    from labelassist.errors import LabelStudioError

    db, server = pulled_ledger
    server.notes = {1: [_note(11, "cat", "2026-01-01T00:00:00Z", parent=101)],
                    2: [{**_note(21, "dog", "2026-01-01T00:00:00Z"), "completed_by": 2},
                        {**_note(22, None, "2026-01-01T00:00:00Z"), "was_cancelled": True,
                         "result": [], "completed_by": {"id": 2}}],
                    3: [_note(31, "dog", "2026-01-01T00:00:00Z")]}
    server.shas[99] = "f" * 64  # made in Label Studio by hand: not ours
    seen = []
    before = datetime.now(timezone.utc).replace(microsecond=0)
    first = _pull(db, server, on_progress=lambda done, total: seen.append((done, total)))
    assert (first.tasks_seen, first.new, first.cancelled, first.unknown_tasks) == (4, 4, 1, 1)
    assert seen == [(4, 4)] and first.projects == ["p"]
    assert server.queries[0]["page_size"] == ["500"] and "query" not in server.queries[0]
    with db.read() as s:
        stored = {a.ls_annotation_id: (a.annotator, a.cancelled, a.label)
                  for a in s.scalars(select(Annotation))}
        watermark = as_utc(s.scalar(select(LSProject.last_pull_at)))
    assert stored[21] == ("bea", False, "dog") and stored[22] == ("bea", True, None)
    # the server's clock when the pull began, less 2 s (the Date header: whole seconds)
    assert before - timedelta(seconds=3) <= watermark <= utcnow() - timedelta(seconds=1)

    del server.notes[1]  # a review deleted in Label Studio
    del server.shas[3]   # a task deleted there: its review stops counting
    server.queries.clear()
    second = _pull(db, server)
    assert (second.deleted, second.tasks_gone, second.new, second.updated) == (2, 1, 0, 0)
    (items,) = [json.loads(q["query"][0])["filters"]["items"] for q in server.queries
                if "query" in q]
    assert items[0]["value"] == watermark.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert set(_stored(db)) == {21, 22}

    with pytest.raises(LabelStudioError, match="nothing was pushed to .* run labelassist push"):
        _pull(db, server, url=server.url + "/")


# ---- serve: who may come in -------------------------------------------------------------

SECRET = "s" * 15 + "t"  # 16 characters: the shortest secret serve takes


def _request(header: bytes | None):
    from starlette.requests import Request

    headers = [] if header is None else [(b"authorization", header)]
    return Request({"type": "http", "headers": headers})


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_authorised_takes_the_secret_as_bearer_or_basic_auth_and_nothing_else():
    from labelassist.serve import MIN_SECRET
    from labelassist.serve.app import authorised

    assert len(SECRET) == MIN_SECRET
    for header in (f"Bearer {SECRET}".encode(), f"bearer  {SECRET} ".encode(),
                   _basic("labelassist", SECRET)):
        assert authorised(_request(header), SECRET), header
    for header in (None, b"", f"Token {SECRET}".encode(), f"Bearer {SECRET}x".encode(),
                   f"Bearer {SECRET[:-1]}".encode(), _basic("admin", SECRET),
                   _basic("labelassist", SECRET + "x"), b"Basic !!not-base64!!",
                   b"Basic " + base64.b64encode(b"\xff\xfe:" + SECRET.encode())):
        assert not authorised(_request(header), SECRET), header
    short = SECRET[:-1]  # 15 characters: refused even when the request carries exactly it
    assert not authorised(_request(f"Bearer {short}".encode()), short)
    assert not authorised(_request(_basic("labelassist", short)), short)
