"""Scale-out: several predict processes on one machine, and the long-running worker.

Every worker, on any machine, points at the same database; claims (claims.py) make
sure no image is encoded twice and a dead worker's batch is taken over.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from ..labels import LabelSet
from ..db import Database, open_database
from ..db.models import ModelVersion
from ..errors import ConfigError
from ..model.load import LoadedModel, load_model
from .run import PredictOptions, PredictSummary, ensure_model_version, predict_version


def merge(summaries: list[PredictSummary], seconds: float) -> PredictSummary:
    feed = next((s.feed for s in summaries if s.feed), "")
    merged = PredictSummary(model_version=summaries[0].model_version, seconds=seconds,
                            feed=f"{len(summaries)} workers" + (f", each with {feed}"
                                                                 if feed else ""))
    for s in summaries:
        merged.write_seconds += s.write_seconds
        merged.rescored += s.rescored
        merged.encoded += s.encoded
        merged.image_encoder_calls += s.image_encoder_calls
        merged.failed.update(s.failed)
        for reason, example in s.failed_examples.items():
            merged.failed_examples.setdefault(reason, example)
    return merged


def _child(db_url: str, model_id: str, device: str, dtype: str, threads: int,
           label_json: dict, options: PredictOptions) -> PredictSummary:
    import torch

    torch.set_num_threads(threads)
    db = open_database(db_url)
    model = load_model(model_id, device=device, dtype=dtype)
    version = ensure_model_version(db, model, LabelSet.from_json(label_json))
    return predict_version(db, model, version, options)


def predict_in_processes(db_url: str, model_id: str, label_set: LabelSet, workers: int, *,
                         device: str = "auto", dtype: str = "auto",
                         options: PredictOptions = PredictOptions(),
                         on_tick: Callable[[], None] | None = None) -> PredictSummary:
    """`predict --workers N`: N processes share the cores and claim batches from one DB."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    if options.feed == "processes":
        raise ConfigError("--workers N runs N processes, each decoding in threads; it cannot "
                          "be combined with --feed processes (use one or the other)")
    # Pool workers are daemonic and may not start processes: each decodes in threads.
    options = dataclasses.replace(options, feed="threads",
                                  decode_workers=options.decode_workers or max(1, threads - 1))
    ctx = multiprocessing.get_context("spawn")  # torch and forked threads do not mix
    started = time.perf_counter()
    args = (db_url, model_id, device, dtype, threads, label_set.to_json(), options)
    with ctx.Pool(workers) as pool:
        pending = pool.starmap_async(_child, [args] * workers)
        while not pending.ready():
            if on_tick:
                on_tick()
            pending.wait(1.0)
        summaries = pending.get()
    return merge(summaries, time.perf_counter() - started)


@dataclass
class WorkerStats:
    rounds: int = 0
    predicted: int = 0
    per_version: dict[str, int] = field(default_factory=dict)
    pushed_tasks: int = 0


def versions_for(db: Database, model: LoadedModel) -> list[ModelVersion]:
    """Every zero-shot prompt set stored for this model's weights, newest last."""
    with db.read() as session:
        return list(session.scalars(select(ModelVersion).where(
            ModelVersion.model_key == model.model_key, ModelVersion.kind == "zeroshot")
            .order_by(ModelVersion.id)))


def run_worker(db: Database, model: LoadedModel, label_sets: list[LabelSet],
               stop: threading.Event, *, options: PredictOptions = PredictOptions(),
               poll_seconds: float = 5.0,
               after_round: Callable[[WorkerStats], None] | None = None) -> WorkerStats:
    """Keep predicting until `stop` is set: images ingested by anyone, and every prompt
    set stored for this model (label files given here are registered first). A stop
    request lets the batches in flight finish, then returns."""
    for label_set in label_sets:
        ensure_model_version(db, model, label_set)
    stats = WorkerStats()
    while not stop.is_set():
        done = 0
        for version in versions_for(db, model):
            if stop.is_set():
                break
            summary = predict_version(db, model, version, options, stop=stop)
            done += summary.predicted
            if summary.predicted:
                stats.per_version[version.name] = \
                    stats.per_version.get(version.name, 0) + summary.predicted
        stats.rounds += 1
        stats.predicted += done
        if after_round:
            after_round(stats)
        if not done:
            stop.wait(poll_seconds)
    return stats
