"""The out-of-set flag ("none of these"): junk in a folder is flagged from the reviews of
real pictures, never auto-accepted, reviewed first, and counted in the report."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist.trust.audit import TrustOptions
from labelassist.toy import world as toyworld
from labelassist.trust.accept import accept_trusted
from labelassist.cli import app
from labelassist.labels import load_label_file
from labelassist.db.models import AutoAccept, Prediction
from labelassist.ingest import ingest
from labelassist.model.load import load_model
from labelassist.trust.outofset import OTHER, class_bars, flagged, flagged_first, out_of_set_summary
from labelassist.predict.run import predict
from labelassist.trust.reviews import load_reviews
from labelassist.db.queries import first_paths, resolve_version

from .conftest import add_annotation

EXAMPLES = Path(__file__).parent.parent / "examples" / "toyworld"


def kind_of(path: str) -> str:
    name = Path(path).name.split("_")[0]
    return "junk" if name in toyworld.JUNK else "warm" if name in toyworld.WARM else "cool"


@pytest.fixture
def junky_folder(db, toy_model_dir, tmp_path):
    """300 toy pictures and 40 pictures of no class (noise, pages of text), predicted with
    the member descriptions; 40 real pictures reviewed, a random sample."""
    toyworld.write_images(tmp_path / "photos", 300, seed=41)
    toyworld.write_junk(tmp_path / "photos" / "junk", 40, seed=42)
    ingest(db, [tmp_path / "photos"])
    model = load_model(str(toy_model_dir), device="cpu", dtype="fp32")
    predict(db, model, load_label_file(EXAMPLES / "labels.toml"))
    with db.read() as s:
        rows = s.execute(select(Prediction.image_id, Prediction.label,
                                Prediction.similarity)).all()
        paths = first_paths(s, [r[0] for r in rows])
    real = sorted(i for i, _, _ in rows if kind_of(paths[i]) != "junk")
    for n, image_id in enumerate(random.Random(0).sample(real, 40)):
        add_annotation(db, image_id, kind_of(paths[image_id]), n=n)
    return db, {i: (label, sim, kind_of(paths[i])) for i, label, sim in rows}


def _upper_by_hand(values: list[float]) -> list[float]:
    """Otsu's split by its definition (the split that maximises the between-group
    variance), kept only when the groups lie 8 pooled standard deviations apart and the
    lower one is the smaller: then the upper group."""
    v, n = sorted(values), len(values)
    if n < 4:
        return v
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    k = max(range(1, n), key=lambda k: k * (n - k) * (mean(v[k:]) - mean(v[:k])) ** 2)
    low, high = v[:k], v[k:]
    within = (sum((x - mean(low)) ** 2 for x in low)
              + sum((x - mean(high)) ** 2 for x in high)) / n
    apart = (mean(high) - mean(low)) / math.sqrt(max(within, 1e-12))
    return high if apart > 8 and k < n / 2 else v


def bars_by_hand(db, rows) -> dict[str, float]:
    """Per class, the similarity below which a prediction is flagged, from the ledger by
    the rule in docs/trust.md, not through class_bars: the reviewed pictures of the class
    (all its predictions, Otsu's upper group, under 10 reviews) set p5 - (median - p5),
    never above the lowest reviewed picture; a review of "other" lifts it to just above
    that image, never above p5."""
    truth = {i: h.label for i, h in load_reviews(db).labels.items()}
    bars = {}
    for c in {label for label, _, _ in rows.values()}:
        reference = [sim for i, (_, sim, _) in rows.items() if truth.get(i) == c]
        reviewed = len(reference) >= 10
        if not reviewed:
            reference = _upper_by_hand([sim for label, sim, _ in rows.values() if label == c])
        low, median = np.percentile(reference, 5), np.median(reference)
        bar = low - (median - low)
        if reviewed:  # never above the lowest real picture a reviewer saw
            bar = min(bar, min(reference))
        other = [sim for i, (label, sim, _) in rows.items()
                 if label == c and truth.get(i) == OTHER]
        if other:
            bar = max(bar, min(math.nextafter(max(other), math.inf), low))
        bars[c] = bar
    return bars


def flags_by_hand(db, rows) -> dict[int, bool]:
    bars = bars_by_hand(db, rows)
    return {i: sim < bars[label] for i, (label, sim, _) in rows.items()}


def caught(db, rows):
    """The share of junk and of real pictures flagged, by hand; class_bars must agree."""
    bars = class_bars(db, resolve_version(db))
    by_hand = flags_by_hand(db, rows)
    assert {i: flagged(label, sim, bars) for i, (label, sim, _) in rows.items()} == by_hand
    junk = [by_hand[i] for i, (_, _, kind) in rows.items() if kind == "junk"]
    real = [by_hand[i] for i, (_, _, kind) in rows.items() if kind != "junk"]
    return sum(junk) / len(junk), sum(real) / len(real), bars


def test_junk_is_flagged_and_real_pictures_are_not(junky_folder):
    db, rows = junky_folder
    junk, real, bars = caught(db, rows)
    print(f"junk flagged {junk:.1%}, real pictures flagged {real:.1%}")
    assert junk >= 0.90 and real <= 0.05
    assert {bar.reference for bar in bars.values()} == {"reviews"}  # 40 reviews: ~20 a class


def test_before_any_review_every_prediction_of_a_class_sets_its_bar(junky_folder):
    from labelassist.db.models import Annotation

    db, rows = junky_folder
    with db.write() as s:
        s.execute(Annotation.__table__.delete())
    junk, real, bars = caught(db, rows)
    print(f"before any review: junk flagged {junk:.1%}, real pictures flagged {real:.1%}")
    assert {bar.reference for bar in bars.values()} == {"predictions"}
    assert junk >= 0.90 and real <= 0.05


def test_an_other_review_raises_the_bar_of_its_class_to_cover_it(junky_folder):
    db, rows = junky_folder
    version = resolve_version(db)
    before = class_bars(db, version)
    # The least similar real picture above its class's bar: reviewers call it "other" (a
    # red circle may be out of scope for them). The bar rises to cover it, but never past
    # the reviewed pictures' 5th percentile.
    image_id, (label, sim, _) = min(
        ((i, r) for i, r in rows.items() if r[2] != "junk" and r[1] >= before[r[0]].threshold),
        key=lambda item: item[1][1])
    add_annotation(db, image_id, OTHER, n=1000)
    after = class_bars(db, version)
    assert after[label].other_reviews == 1
    assert before[label].threshold < after[label].threshold <= after[label].low
    assert after[label].threshold == pytest.approx(bars_by_hand(db, rows)[label], abs=1e-12)
    assert after[label].threshold == min(after[label].low, math.nextafter(sim, math.inf))


def test_flagged_images_are_never_auto_accepted_and_come_first(junky_folder):
    db, rows = junky_folder
    version = resolve_version(db)
    summary = accept_trusted(db, trust=TrustOptions(target_precision=0.9, min_support=5,
                                                    rule="class"))
    with db.read() as s:
        accepted = set(s.scalars(select(AutoAccept.image_id)).all())
        order = s.scalars(select(Prediction.image_id).where(
            Prediction.model_version_id == version.id).order_by(
            flagged_first(db, version, class_bars(db, version)), Prediction.image_id)).all()
    is_flagged = flags_by_hand(db, rows)
    assert accepted and not any(is_flagged[i] for i in accepted)
    assert summary.out_of_set == sum(is_flagged.values()) >= 36
    n = sum(is_flagged.values())
    assert all(is_flagged[i] for i in order[:n]) and not any(is_flagged[i] for i in order[n:])


def test_the_report_counts_them_and_what_reviewers_said(junky_folder, db_url, tmp_path):
    db, rows = junky_folder
    junk_ids = sorted(i for i, r in rows.items() if r[2] == "junk")
    for n, image_id in enumerate(junk_ids[:5]):
        add_annotation(db, image_id, OTHER, n=500 + n)
    accepted = CliRunner().invoke(app, ["accept", "--db", db_url, "--target-precision", "0.9",
                                        "--min-support", "5",
        "--rule", "class"])
    assert accepted.exit_code == 0, accepted.output
    assert "unreviewed images match none of the classes well" in accepted.output
    result = CliRunner().invoke(app, ["report", "--db", db_url, "--json", str(tmp_path / "r.json"),
                                      "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    (section,) = json.loads((tmp_path / "r.json").read_text())["out_of_set"]
    assert section["flagged"] == sum(flags_by_hand(db, rows).values()) >= 36
    assert (section["flagged_reviewed"], section["flagged_reviewed_other"]) == (5, 5)
    assert section["other_reviews"] == 5
    assert f"{section['flagged']} images match none of the classes well" in result.output
    assert "images flagged out of set" in (tmp_path / "r.html").read_text()


def test_export_leaves_out_junk_and_what_reviewers_called_other(junky_folder, tmp_path):
    import csv

    from labelassist.outputs.export import export

    db, rows = junky_folder
    junk_ids = sorted(i for i, r in rows.items() if r[2] == "junk")
    for n, image_id in enumerate(junk_ids[:3]):
        add_annotation(db, image_id, OTHER, n=700 + n)
    summary = export(db, tmp_path / "out", "csv", include_auto=True,
                     trust=TrustOptions(target_precision=0.9, min_support=5, rule="class"))
    with open(tmp_path / "out" / "labels.csv", newline="") as fh:
        exported = list(csv.DictReader(fh))
    assert exported and not any(Path(r["path"]).name.split("_")[0] in toyworld.JUNK
                                for r in exported)
    assert {r["label"] for r in exported} == {"warm", "cool"}
    assert summary.excluded["reviewed as 'other' (none of the classes)"] == 3
    reviewed = set(load_reviews(db).labels)
    out_of_set = [i for i, f in flags_by_hand(db, rows).items() if f and i not in reviewed]
    assert summary.excluded["unreviewed, matches none of the classes well (out of set)"] == \
        len(out_of_set) >= 33


def test_predict_again_measures_predictions_stored_before_similarity_was(junky_folder,
                                                                       toy_model_dir):
    """A ledger from before revision 0007 has predictions without similarity: never
    flagged. Running predict again with the same label file measures them from the
    stored embeddings (nothing is decoded), and the flags come back."""
    from sqlalchemy import update

    db, rows = junky_folder
    with db.write() as s:
        s.execute(update(Prediction).values(similarity=None))
    assert out_of_set_summary(db, resolve_version(db))["without_similarity"] == len(rows)

    url = str(db.engine.url)
    said = CliRunner().invoke(app, ["report", "--db", url])
    assert "run labelassist predict again with the same label file" in said.output

    again = CliRunner().invoke(app, ["predict", "--db", url, "--labels",
                                     str(EXAMPLES / "labels.toml"), "--model", str(toy_model_dir)])

    assert again.exit_code == 0, again.output
    assert "0 predicted (0 encoded, 0 re-scored" in again.output
    assert f"measured the similarity of {len(rows)} earlier predictions" in again.output
    with db.read() as s:
        again = dict(s.execute(select(Prediction.image_id, Prediction.similarity)).all())
    # the CLI loads the model in bf16 on this CPU: the text tower rounds a little
    assert again == pytest.approx({i: sim for i, (_, sim, _) in rows.items()}, abs=0.005)
    assert out_of_set_summary(db, resolve_version(db))["without_similarity"] == 0


@pytest.fixture
def corrected_by_a_probe(db):
    """Class b is the weak one (its real pictures lie 0.20 from its descriptions, a's
    0.30). Image 1 is a real b that zero-shot calls a (0.21: its closest description is
    a's) and the probe calls b; image 2 is junk (0.05) that both call b. 20 reviews of
    each class set the bars: a's near 0.27, b's near 0.17."""
    from labelassist.db.models import File, Image, ModelVersion
    from labelassist.db.models import utcnow

    rng = np.random.default_rng(3)
    n = 200
    truth = ["b", "b"] + ["a" if i % 2 else "b" for i in range(2, n)]
    sims = [0.21, 0.05] + [float(rng.normal(0.30 if t == "a" else 0.20, 0.01))
                           for t in truth[2:]]
    base_labels = ["a", "b"] + truth[2:]
    with db.write() as s:
        s.add_all(Image(sha256=f"{i:064x}", size_bytes=1, width=1, height=1) for i in range(n))
        s.add(ModelVersion(name="zs@1", model_id="m", model_key="k",
                           label_set={"classes": ["a", "b"]}))
        s.add(ModelVersion(name="probe@1", kind="probe", model_id="m", model_key="k",
                           label_set={"classes": ["a", "b"], "probe": {"base": "zs@1"}}))
    with db.write() as s:
        zs, probe = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        ids = s.scalars(select(Image.id).order_by(Image.id)).all()
        s.add_all(File(path=f"/data/p/{i}.png", image_id=i, sha256=f"{i:064x}",
                       size_bytes=1, mtime_ns=0) for i in ids)
        for version, labels, similarity in ((zs, base_labels, sims), (probe, truth, None)):
            s.add_all(Prediction(image_id=i, model_version_id=version.id, label=label,
                                 confidence=0.99, margin=0.98, scores={},
                                 similarity=similarity and similarity[k],
                                 created_at=utcnow())
                      for k, (i, label) in enumerate(zip(ids, labels)))
    reviewed = [k for k in range(2, n)][:40]
    for n_, k in enumerate(reviewed):
        add_annotation(db, ids[k], truth[k], n=n_)
    return db, ids


def test_the_flag_asks_the_class_the_version_predicts(corrected_by_a_probe, tmp_path):
    """A probe that corrects zero-shot: the image is compared with the real pictures of
    the class the probe predicts, not of zero-shot's mistaken class (in benchmarks/
    clean_cost.py zero-shot's labels flagged 8.9% of the real pictures of the 24 pairs
    once a probe was learned, the probe's 2.5%). Junk stays flagged; accept, export and
    the listing agree."""
    import csv

    from labelassist.outputs.export import export
    from labelassist.trust.outofset import flagged_images

    db, ids = corrected_by_a_probe
    trust = TrustOptions(target_precision=0.9, min_support=5, rule="class")
    summary = accept_trusted(db, "probe@1", trust, allow_biased_sample=True)
    with db.read() as s:
        accepted = set(s.scalars(select(AutoAccept.image_id)).all())
    assert ids[0] in accepted and ids[1] not in accepted
    assert summary.out_of_set == 1
    assert set(flagged_images(db, resolve_version(db, "probe@1"))) == {ids[1]}
    assert set(flagged_images(db, resolve_version(db, "zs@1"))) == {ids[0], ids[1]}
    export(db, tmp_path / "out", "csv", include_auto=True, version="probe@1", trust=trust,
           allow_biased_sample=True)
    with open(tmp_path / "out" / "labels.csv", newline="") as fh:
        exported = {Path(r["path"]).stem: r["label"] for r in csv.DictReader(fh)}
    assert exported[str(ids[0])] == "b" and str(ids[1]) not in exported


def test_push_sends_the_fair_shuffle_by_default_and_flagged_images_first_on_request(
        junky_folder):
    """benchmarks/clean_cost.py: sending the flagged images first cost 200 reviews on the
    24 pairs (they lie outside the fair sample that accept's rules rest on) and saved
    nothing elsewhere, so the default order is the shuffle alone, flagged images in their
    place; --order flagged still sends them first."""
    from labelassist.db.models import LSProject
    from labelassist.labelstudio.push import ORDERS, _Pusher, push

    db, rows = junky_folder
    version = resolve_version(db)
    with db.write() as s:
        project = LSProject(url="http://127.0.0.1:1", ls_project_id=1, title="t",
                            classes=["warm", "cool"], image_mode="local")
        s.add(project)
        s.flush()
        s.expunge(project)
    pusher = _Pusher(db, None, project, version, None, None)

    def sent(order):  # the first batch, all of them (nothing is sent: it would repeat)
        kind, batch = next(pusher.batches(order, len(rows)))
        assert kind == "tasks" and len(batch) == len(rows)
        return [p.image_id for p, _ in batch]

    is_flagged = flags_by_hand(db, rows)
    fair = sent("random")
    assert fair == sorted(rows, key=lambda i: (i * 2654435761 % 2 ** 32, i))
    assert push.__kwdefaults__["order"] == "random" and "flagged" in ORDERS
    n = sum(is_flagged.values())
    assert 36 <= n < len(rows) and sorted(fair[:n]) != sorted(i for i in rows if is_flagged[i])
    first = sent("flagged")
    assert all(is_flagged[i] for i in first[:n]) and not any(is_flagged[i] for i in first[n:])
    assert [i for i in first if not is_flagged[i]] == [i for i in fair if not is_flagged[i]]
