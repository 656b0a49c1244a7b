"""The worker: claim batches of pending images, decode, encode, write predictions.

Two phases per run:
1. re-score: images whose embedding for this model is stored get predictions from
   a matrix product, with no decoding and no image encoder call;
2. encode: the rest are decoded in a thread pool one batch ahead of inference.
Each batch's embeddings, predictions and decode failures land in one transaction,
so a crash loses at most the batches in flight and a rerun duplicates nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy import func, select, update

from .claims import (
    claim_pending_images,
    pending_images_query,
    register_worker,
    release_claims,
    stop_worker,
)
from .config import LabelSet
from .db import Database, insert_ignoring_duplicates, retrying
from .db.models import Embedding, File, Image, ModelVersion, Prediction, utcnow
from .images import DEFAULT_MAX_PIXELS, BadImage, Preprocess, decode, open_image
from .model import LoadedModel
from .zeroshot import build_text_classifier, to_predictions

Progress = Callable[[int, int], None]
RESCORE_CHUNK = 4096


@dataclass
class PredictSummary:
    model_version: str
    rescored: int = 0
    encoded: int = 0
    failed: Counter = field(default_factory=Counter)
    failed_examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    image_encoder_calls: int = 0

    @property
    def predicted(self) -> int:
        return self.rescored + self.encoded

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class PredictOptions:
    batch_size: int = 32
    decode_threads: int | None = None
    exact: bool = False  # full decode, no JPEG draft scaling: the reference path
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = 2


def version_name(model: LoadedModel, label_set: LabelSet) -> str:
    return f"{model.name}@{label_set.fingerprint(model.model_id, model.revision)[:8]}"


def ensure_model_version(db: Database, model: LoadedModel, label_set: LabelSet) -> ModelVersion:
    name = version_name(model, label_set)
    with db.write() as session:
        insert_ignoring_duplicates(session, ModelVersion, [{
            "name": name, "kind": "zeroshot", "model_id": model.model_id,
            "model_key": model.model_key, "label_set": label_set.to_json(),
            "created_at": utcnow()}])
        return session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()


def count_pending(db: Database, version: ModelVersion) -> int:
    with db.read() as session:
        total = 0
        for stored in (True, False):
            query = pending_images_query(version.id, version.model_key, stored=stored,
                                         now=utcnow())
            total += session.scalar(select(func.count()).select_from(query.subquery()))
        return total


def predict(db: Database, model: LoadedModel, label_set: LabelSet,
            options: PredictOptions = PredictOptions(), *, on_progress: Progress | None = None,
            stop: threading.Event | None = None) -> PredictSummary:
    """Predict every ingested image that has no prediction for this model_version."""
    version = ensure_model_version(db, model, label_set)
    return predict_version(db, model, version, options, on_progress=on_progress, stop=stop)


def predict_version(db: Database, model: LoadedModel, version: ModelVersion,
                    options: PredictOptions = PredictOptions(), *,
                    on_progress: Progress | None = None,
                    stop: threading.Event | None = None) -> PredictSummary:
    """Predict the pending images of an existing model_version (its own prompt set)."""
    started = time.perf_counter()
    classifier = build_text_classifier(model, LabelSet.from_json(version.label_set))
    summary = PredictSummary(model_version=version.name)
    total = count_pending(db, version)
    worker_id = register_worker(db, version.id)
    run = _Run(db, model, classifier, version, worker_id, options, summary,
               lambda: on_progress(summary.predicted + sum(summary.failed.values()), total)
               if on_progress else None, stop or threading.Event())
    try:
        run.rescore_stored()
        run.encode_pending()
    finally:
        stop_worker(db, worker_id)
        summary.seconds = time.perf_counter() - started
    return summary


class _Run:
    def __init__(self, db, model, classifier, version, worker_id, options, summary, progress,
                 stop):
        self.db, self.model, self.classifier = db, model, classifier
        self.version, self.worker_id, self.options = version, worker_id, options
        self.summary, self.progress, self.stop = summary, progress, stop

    def claim(self, limit: int, stored: bool) -> list[int]:
        if self.stop.is_set():
            return []
        return retrying(self.db, claim_pending_images, self.db, self.worker_id,
                        self.version.id, self.version.model_key, limit, stored=stored)

    def rescore_stored(self) -> None:
        while ids := self.claim(RESCORE_CHUNK, stored=True):
            with self.db.read() as session:
                rows = session.execute(select(Embedding.image_id, Embedding.vector).where(
                    Embedding.model_key == self.version.model_key,
                    Embedding.image_id.in_(ids))).all()
            vectors = torch.from_numpy(np.stack([np.frombuffer(v, dtype=np.float32)
                                                 for _, v in rows]))
            self.write_batch([i for i, _ in rows], vectors, [], store_embeddings=False)
            self.summary.rescored += len(rows)
            self.progress()

    def encode_pending(self) -> None:
        threads = self.options.decode_threads or max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            inflight: deque = deque()
            for _ in range(self.options.prefetch_batches):
                if batch := self.start_batch(pool):
                    inflight.append(batch)
            while inflight:
                ids, futures = inflight.popleft()
                if batch := self.start_batch(pool):
                    inflight.append(batch)
                self.finish_batch(ids, [f.result() for f in futures])

    def start_batch(self, pool) -> tuple[list[int], list[Future]] | None:
        ids = self.claim(self.options.batch_size, stored=False)
        if not ids:
            return None
        paths = self.paths_for(ids)
        preprocess = self.model.preprocess
        draft = not self.options.exact
        futures = [pool.submit(load_pixels, paths.get(i, []), preprocess, draft,
                               self.options.max_pixels) for i in ids]
        return ids, futures

    def paths_for(self, ids: list[int]) -> dict[int, list[tuple]]:
        return retrying(self.db, self._paths_for_once, ids)

    def _paths_for_once(self, ids: list[int]) -> dict[int, list[tuple]]:
        with self.db.read() as session:
            rows = session.execute(
                select(File.image_id, File.path, File.raw_path, File.size_bytes, File.mtime_ns)
                .where(File.image_id.in_(ids), File.error.is_(None)).order_by(File.id)).all()
        paths: dict[int, list[tuple]] = {}
        for image_id, path, raw, size, mtime in rows:
            paths.setdefault(image_id, []).append((raw or path, size, mtime))
        return paths

    def finish_batch(self, ids: list[int], results: list) -> None:
        good = [(i, r) for i, r in zip(ids, results) if not isinstance(r, BadImage)]
        bad = [(i, r) for i, r in zip(ids, results) if isinstance(r, BadImage)]
        vectors = None
        if good:
            pixels = torch.from_numpy(np.stack([r for _, r in good]))
            vectors = self.model.encode_images(pixels)
            self.summary.image_encoder_calls += 1
        self.write_batch([i for i, _ in good], vectors, bad, store_embeddings=True)
        self.summary.encoded += len(good)
        for _, error in bad:
            self.summary.failed[error.reason] += 1
            self.summary.failed_examples.setdefault(error.reason, error.detail)
        self.progress()

    def write_batch(self, ids: list[int], vectors: torch.Tensor | None, bad: list,
                    *, store_embeddings: bool) -> None:
        retrying(self.db, self._write_batch_once, ids, vectors, bad,
                 store_embeddings=store_embeddings)

    def _write_batch_once(self, ids: list[int], vectors: torch.Tensor | None, bad: list,
                          *, store_embeddings: bool) -> None:
        """One transaction: embeddings, predictions, failures, and the claims released."""
        version = self.version
        now = utcnow()
        with self.db.write() as session:
            if ids:
                preds = to_predictions(self.classifier.probabilities(vectors),
                                       self.classifier.class_names)
                if store_embeddings:
                    array = vectors.numpy().astype(np.float32)
                    insert_ignoring_duplicates(session, Embedding, [
                        {"image_id": i, "model_key": version.model_key, "dim": array.shape[1],
                         "vector": row.tobytes()} for i, row in zip(ids, array)])
                insert_ignoring_duplicates(session, Prediction, [
                    {"image_id": i, "model_version_id": version.id, "label": p.label,
                     "confidence": p.confidence, "margin": p.margin, "scores": p.scores,
                     "created_at": now} for i, p in zip(ids, preds)])
            for image_id, error in bad:
                session.execute(update(Image).where(Image.id == image_id)
                                .values(error=error.reason, error_detail=error.detail[:1000]))
            release_claims(session, self.worker_id, version.id,
                           ids + [i for i, _ in bad])


def load_pixels(paths: list[tuple], preprocess: Preprocess, draft: bool,
                max_pixels: int) -> np.ndarray | BadImage:
    """Decode the first path of an image that still holds the ingested bytes."""
    first_error = BadImage("missing", "no readable path is left for this image")
    for fs_path, size, mtime_ns in paths:
        try:
            st = os.stat(fs_path)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise BadImage("changed", f"{os.fsdecode(fs_path)} changed since ingest; "
                                          "run labelassist ingest again")
            with open(fs_path, "rb") as fh:
                img = open_image(fh.read(), max_pixels)
            rgb = decode(img, draft_size=preprocess.draft_size if draft else None)
            return preprocess(rgb)
        except BadImage as error:
            first_error = error if first_error.reason == "missing" else first_error
        except FileNotFoundError:
            continue
        except OSError as exc:
            first_error = BadImage("unreadable", f"{os.fsdecode(fs_path)}: {exc.strerror}")
    return first_error
