"""The worker: claim batches of pending images, decode, encode, write predictions.

Two phases per run:
1. re-score: images whose embedding for this model is stored get predictions from
   a matrix product, with no decoding and no image encoder call;
2. encode: the rest flow through the feed (feed.py: decoding in threads or processes,
   batches ahead of the tower) into the image tower.
Each batch's embeddings, predictions and decode failures land in one transaction, written
by a background thread while the next batch is encoded, so a crash loses at most the
batches in flight and a rerun duplicates nothing.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy import func, select, update

from ..db.claims import (
    claim_pending_images,
    pending_images_query,
    register_worker,
    release_claims,
    stop_worker,
)
from ..labels import LabelSet
from ..db import Database, insert_ignoring_duplicates, retrying
from ..db.models import Embedding, File, Image, ModelVersion, Prediction, utcnow
from ..db.queries import keyset_pages
from .feed import Batch, Job, decoded_batches, plan_feed, reads_objects
from ..images import DEFAULT_MAX_PIXELS
from ..model.load import LoadedModel
from ..model.zeroshot import build_text_classifier, to_predictions

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
    write_seconds: float = 0.0  # inside database writes (overlapped with encoding)
    tower_seconds: float = 0.0  # encoding: the image tower (and scoring the batch)
    decode_wait_seconds: float = 0.0  # the tower waiting for a decoded batch
    write_wait_seconds: float = 0.0  # the tower waiting for the writes behind it
    image_encoder_calls: int = 0
    feed: str = ""
    measured: int = 0  # earlier predictions whose similarity was measured (outofset.py)

    @property
    def predicted(self) -> int:
        return self.rescored + self.encoded

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class PredictOptions:
    batch_size: int | None = None  # None: sized to the device (default_batch_size)
    decode_workers: int | None = None  # None: sized to the cores (feed.plan_feed)
    feed: str = "auto"  # threads, processes, or auto (processes on CUDA)
    exact: bool = False  # full decode, no JPEG draft scaling: the reference path
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = 2  # decoded ahead (per worker with the process feed)


def default_batch_size(device) -> int:
    """Hundreds on a GPU keep the tower busy; tens on a CPU keep memory and latency low."""
    return {"cuda": 256, "mps": 64}.get(device.type, 32)


def version_name(model: LoadedModel, label_set: LabelSet) -> str:
    return f"{model.name}@{label_set.fingerprint(model.model_id, model.identity)[:8]}"


def ensure_model_version(db: Database, model: LoadedModel, label_set: LabelSet) -> ModelVersion:
    name = version_name(model, label_set)
    with db.write() as session:
        insert_ignoring_duplicates(session, ModelVersion, [{
            "name": name, "kind": "zeroshot", "model_id": model.model_id,
            "model_key": model.model_key, "label_set": label_set.to_json(),
            "created_at": utcnow()}])
        return session.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()


def count_pending(db: Database, version: ModelVersion,
                  only: Collection[int] | None = None) -> int:
    with db.read() as session:
        total = 0
        for stored in (True, False):
            query = pending_images_query(version.id, version.model_key, stored=stored,
                                         now=utcnow(), only=only)
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
                    stop: threading.Event | None = None,
                    only: Collection[int] | None = None,
                    encode: Callable[[Run], None] | None = None) -> PredictSummary:
    """Predict the pending images of an existing model_version (its own prompt set);
    `only` limits the run to those images. `encode` replaces the local encode phase
    (Run.encode_pending): predict --ray encodes on a cluster (distributed/)."""
    if model.model_key != version.model_key:
        from ..errors import ModelLoadError

        raise ModelLoadError(f"{version.name} holds embeddings of {version.model_key}, and "
                             f"this model makes those of {model.model_key}: load the same "
                             "model and runtime (--dtype) to predict for it")
    started = time.perf_counter()
    classifier = build_text_classifier(model, LabelSet.from_json(version.label_set))
    summary = PredictSummary(model_version=version.name)
    total = count_pending(db, version, only)
    worker_id = register_worker(db, version.id)
    run = Run(db, model, classifier, version, worker_id, options, summary,
               lambda: on_progress(summary.predicted + sum(summary.failed.values()), total)
               if on_progress else None, stop or threading.Event(), only)
    try:
        run.rescore_stored()
        (encode or Run.encode_pending)(run)
        if only is None:  # a whole run, not serve's few tasks: one scan of the version
            run.measure_similarities()
    finally:
        stop_worker(db, worker_id)
        summary.seconds = time.perf_counter() - started
    return summary


def image_paths(session, ids: list[int]) -> dict[int, list[tuple]]:
    """The readable files of each image, as the feed wants them: (path, size, stamp), the
    stamp being mtime_ns, or an object's ETag (feed.read_ingested)."""
    rows = session.execute(
        select(File.image_id, File.path, File.raw_path, File.size_bytes, File.mtime_ns,
               File.etag)
        .where(File.image_id.in_(ids), File.error.is_(None)).order_by(File.id)).all()
    paths: dict[int, list[tuple]] = {}
    for image_id, path, raw, size, mtime, etag in rows:
        paths.setdefault(image_id, []).append((raw or path, size, etag or mtime))
    return paths


class Run:
    def __init__(self, db, model, classifier, version, worker_id, options, summary, progress,
                 stop, only=None):
        self.db, self.model, self.classifier = db, model, classifier
        self.version, self.worker_id, self.options = version, worker_id, options
        self.summary, self.progress, self.stop, self.only = summary, progress, stop, only
        self.batch_size = options.batch_size or default_batch_size(model.device)
        self.cursor: dict[bool, int | None] = {True: None, False: None}

    def claim(self, limit: int, stored: bool) -> list[int]:
        """The next batch, from where this run's last claim ended; when nothing is left
        above it, one look from the start: images that another worker held, or that
        came back (a dead worker's claims), are below it."""
        if self.stop.is_set():
            return []
        ids = self._claim_after(limit, stored, self.cursor[stored])
        if not ids and self.cursor[stored] is not None:
            ids = self._claim_after(limit, stored, None)
        self.cursor[stored] = max(ids) if ids else None
        return ids

    def _claim_after(self, limit: int, stored: bool, after: int | None) -> list[int]:
        return retrying(self.db, claim_pending_images, self.db, self.worker_id,
                        self.version.id, self.version.model_key, limit, stored=stored,
                        only=self.only, after=after)

    def rescore_stored(self) -> None:
        with Writer(self) as writer:
            while ids := self.claim(RESCORE_CHUNK, stored=True):
                with self.db.read() as session:
                    rows = session.execute(select(Embedding.image_id, Embedding.vector).where(
                        Embedding.model_key == self.version.model_key,
                        Embedding.image_id.in_(ids))).all()
                vectors = torch.from_numpy(np.stack([np.frombuffer(v, dtype=np.float32)
                                                     for _, v in rows]))
                writer.submit(Batch([i for i, _ in rows]), vectors, store_embeddings=False)

    def measure_similarities(self) -> None:
        """Predictions stored before the ledger kept their similarity (revision 0007) are
        never flagged out of set: measure them from their stored embeddings (nothing is
        decoded), a chunk at a time."""
        query = (select(Prediction.id, Embedding.vector)
                 .join(Embedding, (Embedding.image_id == Prediction.image_id)
                       & (Embedding.model_key == self.version.model_key))
                 .where(Prediction.model_version_id == self.version.id,
                        Prediction.similarity.is_(None)))
        for rows in keyset_pages(self.db, query, Prediction.id, size=RESCORE_CHUNK,
                                 stop=self.stop):
            vectors = torch.from_numpy(np.stack([np.frombuffer(v, dtype=np.float32)
                                                 for _, v in rows]))
            similarities = self.classifier.similarities(vectors).tolist()
            with self.db.write() as session:
                session.execute(update(Prediction), [
                    {"id": prediction_id, "similarity": similarity}
                    for (prediction_id, _), similarity in zip(rows, similarities)])
            self.summary.measured += len(rows)

    def encode_pending(self) -> None:
        jobs = self.jobs()
        first = next(jobs, None)
        if first is None:
            return  # nothing to decode: start no decode workers (a worker polls often)
        plan = plan_feed(self.options.feed, self.model.device, self.options.decode_workers,
                         objects=reads_objects(first))
        self.summary.feed = f"{plan.workers} decode {plan.kind}"
        batches = decoded_batches(itertools.chain([first], jobs), self.model.preprocess,
                                  draft=not self.options.exact,
                                  max_pixels=self.options.max_pixels, plan=plan,
                                  pin_memory=self.model.device.type == "cuda",
                                  prefetch=self.options.prefetch_batches)
        summary, clock = self.summary, time.perf_counter
        with Writer(self) as writer:
            waited = clock()
            for batch in batches:
                started = clock()
                summary.decode_wait_seconds += started - waited
                vectors = None
                if batch.ids:
                    vectors = self.model.encode_images(batch.pixels)
                    summary.image_encoder_calls += 1
                writer.submit(batch, vectors, store_embeddings=True)
                waited = clock()
                summary.tower_seconds += waited - started - writer.last_wait

    def jobs(self) -> Iterator[list[Job]]:
        """Claimed images with their paths, one batch at a time, as the feed asks."""
        while ids := self.claim(self.batch_size, stored=False):
            paths = self.paths_for(ids)
            yield [(i, paths.get(i, [])) for i in ids]

    def paths_for(self, ids: list[int]) -> dict[int, list[tuple]]:
        return retrying(self.db, self._paths_for_once, ids)

    def _paths_for_once(self, ids: list[int]) -> dict[int, list[tuple]]:
        with self.db.read() as session:
            return image_paths(session, ids)

    def write_batch(self, batch: Batch, vectors: torch.Tensor | None, probs: tuple | None,
                    *, store_embeddings: bool) -> None:
        started = time.perf_counter()
        retrying(self.db, self._write_batch_once, batch, vectors, probs,
                 store_embeddings=store_embeddings)
        summary = self.summary
        summary.write_seconds += time.perf_counter() - started
        if store_embeddings:
            summary.encoded += len(batch.ids)
        else:
            summary.rescored += len(batch.ids)
        for _, error in batch.bad:
            summary.failed[error.reason] += 1
            summary.failed_examples.setdefault(error.reason, error.detail)
        self.progress()

    def _write_batch_once(self, batch: Batch, vectors: torch.Tensor | None,
                          probs: tuple | None, *, store_embeddings: bool) -> None:
        """One transaction: embeddings, predictions, failures, and the claims released.
        probs: (probabilities, similarities) of the batch's images."""
        version, ids = self.version, batch.ids
        now = utcnow()
        with self.db.write() as session:
            if ids:
                preds = to_predictions(probs[0], self.classifier.class_names, probs[1])
                if store_embeddings:
                    array = vectors.numpy().astype(np.float32, copy=False)
                    insert_ignoring_duplicates(session, Embedding, [
                        {"image_id": i, "model_key": version.model_key, "dim": array.shape[1],
                         "vector": row.tobytes()} for i, row in zip(ids, array)])
                insert_ignoring_duplicates(session, Prediction, [
                    {"image_id": i, "model_version_id": version.id, "label": p.label,
                     "confidence": p.confidence, "margin": p.margin, "scores": p.scores,
                     "similarity": p.similarity, "created_at": now} for i, p in zip(ids, preds)])
            final = [(i, e) for i, e in batch.bad if e.final]
            for image_id, error in final:
                session.execute(update(Image).where(Image.id == image_id)
                                .values(error=error.reason, error_detail=error.detail[:1000]))
            # A file that is gone or unreadable for now keeps its claim until this run ends,
            # so this run does not loop on it; the next predict (or ingest) tries again.
            release_claims(session, self.worker_id, version.id, ids + [i for i, _ in final])


class Writer:
    """Writes batches on one background thread, in order, while the caller encodes the
    next one. Probabilities are computed here, on the caller's thread (torch stays on one
    thread); at most `depth` writes wait, and a failed write raises in the caller."""

    def __init__(self, run: Run, depth: int = 2):
        self.run, self.depth = run, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self.pending: deque[Future] = deque()
        self.last_wait = 0.0  # seconds the last submit waited for earlier writes

    def submit(self, batch: Batch, vectors: torch.Tensor | None, *,
               store_embeddings: bool) -> None:
        probs = self.run.classifier.scores(vectors) if batch.ids else None
        self.pending.append(self.pool.submit(self.run.write_batch, batch, vectors, probs,
                                             store_embeddings=store_embeddings))
        started = time.perf_counter()
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()
        self.last_wait = time.perf_counter() - started
        self.run.summary.write_wait_seconds += self.last_wait

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self.pending:  # what was encoded is written, even when stopping on an error
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


