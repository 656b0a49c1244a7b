"""Big ledgers, made quickly: images, predictions and reviews written straight into the
database, and a local server that serves their Label Studio tasks a page at a time.

For measuring memory at sizes where running the model (or a real Label Studio import)
would take hours. What is measured still runs the real code: export, accept, pull.
"""

from __future__ import annotations

import random

from sqlalchemy import insert, select

from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.db.models import (Annotation, File, Image, LSProject, LSTask, ModelVersion,
                                   Prediction, utcnow)

from .hostile_server import JSON, HostileServer

CLASSES = ("cat", "dog", "wild")


def add_images(url: str, count: int, folder: str = "/data/big") -> None:
    """`count` images with one file each, as ingest records them (the files need not
    exist for a csv or jsonl export)."""
    db, now = open_database(url), utcnow()
    with db.write() as s:
        start = s.scalar(select(Image.id).order_by(Image.id.desc()).limit(1)) or 0
        s.execute(insert(Image), [{"id": i, "sha256": f"{i:064x}", "size_bytes": 100,
                                   "width": 8, "height": 8, "format": "PNG", "created_at": now}
                                  for i in range(start + 1, start + count + 1)])
        s.execute(insert(File), [{"path": f"{folder}/img{i:07d}.png", "image_id": i,
                                  "sha256": f"{i:064x}", "size_bytes": 100, "mtime_ns": 0,
                                  "first_seen": now, "updated_at": now}
                                 for i in range(start + 1, start + count + 1)])
    db.dispose()


def add_predictions_and_reviews(url: str, reviews: int, seed: int = 0) -> None:
    """A prediction and a Label Studio task for every image; `reviews` of them reviewed,
    mostly agreeing with the model, so that every class gets a trust threshold and accept
    and --include-auto have work to do."""
    rng = random.Random(seed)
    labels = parse_label_text("[classes]\n" + "".join(f'{c} = ["{c}"]\n' for c in CLASSES))
    db, now = open_database(url), utcnow()
    with db.write() as s:
        ids = s.scalars(select(Image.id).order_by(Image.id)).all()
        version = s.scalar(insert(ModelVersion).values(
            name="big@1", kind="zeroshot", model_id="big", model_key="big",
            label_set=labels.to_json(), created_at=now).returning(ModelVersion.id))
        project = s.scalar(insert(LSProject).values(
            url="http://big", ls_project_id=1, title="big", classes=list(CLASSES),
            image_mode="local", created_at=now).returning(LSProject.id))
        rows = []
        for image_id in ids:
            label, confidence = rng.choice(CLASSES), rng.uniform(0.34, 1.0)
            rows.append({"image_id": image_id, "model_version_id": version, "label": label,
                         "confidence": confidence, "margin": confidence / 2,
                         "scores": {c: confidence if c == label else (1 - confidence) / 2
                                    for c in CLASSES}, "created_at": now})
        s.execute(insert(Prediction), rows)
        s.execute(insert(LSTask), [{"project_id": project, "image_id": i, "ls_task_id": i,
                                    "created_at": now} for i in ids])
        notes = []
        for row in rng.sample(rows, min(reviews, len(rows))):
            agree = row["confidence"] > 0.6 or rng.random() < 0.3
            notes.append({"project_id": project, "ls_annotation_id": row["image_id"],
                          "image_id": row["image_id"], "cancelled": False,
                          "label": row["label"] if agree else rng.choice(CLASSES),
                          "annotator": "big", "ls_updated_at": now, "pulled_at": now})
        s.execute(insert(Annotation), notes)
    db.dispose()


class TaskServer(HostileServer):
    """The Label Studio task API for every task in the ledger (task id = image id), each
    reviewed one with its annotation. The ledger's project is pointed at this server."""

    def __init__(self, url: str):
        from sqlalchemy import update

        db = open_database(url)
        with db.read() as s:
            self.ids = s.scalars(select(LSTask.ls_task_id).order_by(LSTask.ls_task_id)).all()
            self.labels = dict(s.execute(select(Annotation.image_id, Annotation.label)).all())
        super().__init__({"/api/tasks": self.tasks})
        with db.write() as s:
            s.execute(update(LSProject).values(url=self.url))
        db.dispose()

    def tasks(self, query: dict):
        size = int(query.get("page_size", ["100"])[0])
        page = int(query.get("page", ["1"])[0])
        chunk = self.ids[(page - 1) * size: page * size]
        return 200, JSON, {"total": len(self.ids), "tasks": [self.task(i) for i in chunk]}

    def task(self, task_id: int) -> dict:
        label = self.labels.get(task_id)
        notes = [] if label is None else [{
            "id": task_id, "result": [{"from_name": "label", "type": "choices",
                                        "value": {"choices": [label]}}],
            "completed_by": 1, "updated_at": "2026-01-01T00:00:00Z",
            "created_at": "2026-01-01T00:00:00Z"}]
        return {"id": task_id, "data": {"image": f"/data/{task_id}.png"},
                "annotations": notes, "predictions": []}
