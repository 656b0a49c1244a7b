"""A simulated review session on the toy world: how fast does the model in the loop learn,
and how much can `accept` then take, depending on the order in which tasks are reviewed?

    python benchmarks/session.py                      # 1,000 images, to 20% reviewed: ~1 min
    python benchmarks/session.py --html session.html  # and the report of the last order

1,000 toy-world pictures are pre-labelled with the vague prompts (warm colour / cool
colour, about 62% right). A simulated reviewer, who is always right (the toy world's own
truth), then reviews 20 tasks at a time, and `learn` runs after each 20, as
`serve --learn-every 20` does. The next 20 are taken by the order under test, from the
version Label Studio would show at that moment (the newest stored probe):
- uncertain: lowest margin first (Label Studio's Data Manager sorted by score);
- random: any task;
- mixed: three in four by uncertainty, one in four at random.

After each round it measures, against the truth of every image not yet reviewed: the
accuracy of the version shown, and the share that `accept` would take (the audit's
per-class thresholds at 99% precision, at least 30 reviews a class, from the reviews so
far) with its true precision. Reviews are written to the ledger as `pull` writes them:
the Label Studio round trip is measured by benchmarks/serve_latency.py, not here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ORDERS = ("uncertain", "random", "mixed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--learn-every", type=int, default=20)
    parser.add_argument("--budget", type=float, default=0.2, help="share to review")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--html", help="write the HTML report of the last order here")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    from labelassist.toy.world import cached_model, write_images

    work = Path(tempfile.mkdtemp(prefix="session-"))
    model_dir = cached_model(Path.home() / ".cache" / "labelassist", log=print)
    write_images(work / "photos", args.images, seed=11)
    for order in args.orders.split(","):
        db_url = f"sqlite:///{work / f'{order}.db'}"
        rows = simulate(db_url, work / "photos", model_dir, order, args)
        print(f"\norder: {order} ({args.images} images, learn every {args.learn_every}, "
              f"accept at {args.target_precision:.0%})")
        print(f"{'reviews':>8} {'shown':<24} {'accuracy':>9} {'accept':>7} {'precision':>10}")
        for r in rows:
            precision = "-" if r["precision"] is None else f"{r['precision']:.1%}"
            print(f"{r['reviews']:>8} {r['shown']:<24} {r['accuracy']:>9.1%} "
                  f"{r['share']:>7.1%} {precision:>10}")
        if args.html and order == args.orders.split(",")[-1]:
            from typer.testing import CliRunner

            from labelassist.cli import app

            result = CliRunner().invoke(app, ["report", "--db", db_url, "--html", args.html])
            print(result.output.strip().splitlines()[-1])


def simulate(db_url: str, photos: Path, model_dir: Path, order: str, args) -> list[dict]:
    from sqlalchemy import select

    from labelassist.labels import load_label_file
    from labelassist.db import open_database
    from labelassist.db.models import Annotation, LSProject, ModelVersion, Prediction
    from labelassist.errors import LabelAssistError
    from labelassist.ingest import ingest
    from labelassist.trust.learn import learn
    from labelassist.model.load import load_model
    from labelassist.predict.run import predict
    from labelassist.db.queries import first_paths, resolve_version
    from labelassist.toy.world import WARM

    db = open_database(db_url)
    ingest(db, [photos])
    model = load_model(str(model_dir), device="cpu", dtype="fp32")
    predict(db, model, load_label_file(ROOT / "examples" / "toyworld" / "labels-vague.toml"))
    base = resolve_version(db, None)
    with db.read() as s:
        ids = s.scalars(select(Prediction.image_id).where(
            Prediction.model_version_id == base.id)).all()
        paths = first_paths(s, ids)
    truth = {i: "warm" if Path(paths[i]).name.split("_")[0] in WARM else "cool" for i in ids}
    with db.write() as s:
        project = LSProject(url="http://simulated", ls_project_id=1, title="session",
                            classes=["warm", "cool"], image_mode="local")
        s.add(project)
        s.flush()
        project_id = project.id
    rng = random.Random(0)
    reviewed: list[int] = []
    shown = base
    rows = []
    budget = int(args.images * args.budget)
    while True:
        rows.append(measure(db, shown, reviewed, truth, args.target_precision))
        if len(reviewed) >= budget:
            break
        with db.read() as s:
            margins = dict(s.execute(select(Prediction.image_id, Prediction.margin).where(
                Prediction.model_version_id == shown.id)).all())
        left = sorted(set(ids) - set(reviewed), key=lambda i: (margins[i], i))
        batch: list[int] = []
        for n in range(args.learn_every):
            pool = [i for i in left if i not in batch]
            at_random = order == "random" or (order == "mixed" and n % 4 == 3)
            batch.append(rng.choice(pool) if at_random else pool[0])
        with db.write() as s:
            for image_id in batch:
                n = len(reviewed) + 1
                s.add(Annotation(project_id=project_id, ls_annotation_id=n, image_id=image_id,
                                 label=truth[image_id], annotator="sim", cancelled=False,
                                 model_version_id=shown.id,
                                 accepted_prediction=None))
                reviewed.append(image_id)
        try:
            summary = learn(db, model, base)
        except LabelAssistError:  # one class only so far (serve tries again, too)
            continue
        if summary.stored_version:
            with db.read() as s:
                shown = s.scalars(select(ModelVersion).where(
                    ModelVersion.name == summary.stored_version)).one()
    db.dispose()
    return rows


def measure(db, version, reviewed, truth, target) -> dict:
    """Accuracy of `version` on every image not yet reviewed, and what `accept` would take
    of them (the audit's thresholds, from the reviews so far), with its true precision."""
    from sqlalchemy import select

    from labelassist.trust.audit import TrustOptions, audit
    from labelassist.db.models import Prediction
    from labelassist.errors import LabelAssistError

    done = set(reviewed)
    with db.read() as s:
        preds = {i: (label, conf) for i, label, conf in s.execute(
            select(Prediction.image_id, Prediction.label, Prediction.confidence).where(
                Prediction.model_version_id == version.id))}
    rest = [i for i in preds if i not in done]
    right = [preds[i][0] == truth[i] for i in rest]
    thresholds = {}
    if reviewed:
        try:
            (result,) = audit(db, version.name, trust=TrustOptions(target_precision=target))
            thresholds = {c: t["threshold"] for c, t in result.thresholds["per_class"].items()}
        except LabelAssistError:
            pass
    taken = [i for i in rest if thresholds.get(preds[i][0]) is not None
             and preds[i][1] >= thresholds[preds[i][0]]]
    return {"reviews": len(reviewed), "shown": version.name,
            "accuracy": sum(right) / len(right),
            "share": len(taken) / len(rest),
            "precision": (sum(preds[i][0] == truth[i] for i in taken) / len(taken)
                          if taken else None)}


if __name__ == "__main__":
    main()
