"""Who works on what: a worker registry and leased batch claims.

A worker claims a batch of pending images for one model_version in a single
transaction (FOR UPDATE SKIP LOCKED on PostgreSQL, BEGIN IMMEDIATE on SQLite),
writes their predictions and drops the claims in another. A claim that outlives
its lease (the worker died) is claimable again; a worker on the same host whose
pid is gone has its claims released at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, func, select, update

from . import Database
from .models import Claim, Embedding, File, Image, Prediction, Worker, utcnow

DEFAULT_LEASE = timedelta(minutes=10)


def register_worker(db: Database, model_version_id: int | None) -> int:
    host = socket.gethostname()
    with db.write() as session:
        _release_dead_local_workers(session, host)
        worker = Worker(hostname=host, pid=os.getpid(), model_version_id=model_version_id)
        session.add(worker)
        session.flush()
        return worker.id


def stop_worker(db: Database, worker_id: int) -> None:
    with db.write() as session:
        session.execute(delete(Claim).where(Claim.worker_id == worker_id))
        session.execute(update(Worker).where(Worker.id == worker_id)
                        .values(stopped_at=utcnow()))


def heartbeat(session, worker_id: int, lease: timedelta = DEFAULT_LEASE) -> None:
    now = utcnow()
    session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
    session.execute(update(Claim).where(Claim.worker_id == worker_id)
                    .values(expires_at=now + lease))


def _release_dead_local_workers(session, host: str) -> None:
    alive = session.execute(select(Worker.id, Worker.pid).where(
        Worker.hostname == host, Worker.stopped_at.is_(None))).all()
    dead = [wid for wid, pid in alive if not pid_alive(pid)]
    if dead:
        session.execute(delete(Claim).where(Claim.worker_id.in_(dead)))
        session.execute(update(Worker).where(Worker.id.in_(dead)).values(stopped_at=utcnow()))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending_images_query(model_version_id: int, model_key: str, *, stored: bool,
                         now: datetime, only: Collection[int] | None = None,
                         after: int | None = None):
    """Images without a prediction for this version, not claimed by a live worker.
    stored=True: those with a stored embedding (re-scoring, no decode); False: the rest.
    only: just these images (the ML backend predicts the tasks Label Studio asks for).
    after: only ids above it. A worker's next claim starts where its last one ended, so
    it does not step over every image predicted so far (a claim on a ledger of 20,000
    predictions would otherwise test each of them: the run grows quadratic)."""
    has_embedding = exists().where(Embedding.image_id == Image.id,
                                   Embedding.model_key == model_key)
    return (select(Image.id)
            .where(Image.error.is_(None),
                   exists().where(File.image_id == Image.id, File.error.is_(None)),
                   ~exists().where(Prediction.image_id == Image.id,
                                   Prediction.model_version_id == model_version_id),
                   ~exists().where(Claim.image_id == Image.id,
                                   Claim.model_version_id == model_version_id,
                                   Claim.expires_at > now),
                   has_embedding if stored else ~has_embedding,
                   *([Image.id.in_(list(only))] if only is not None else []),
                   *([Image.id > after] if after is not None else []))
            .order_by(Image.id))


def claim_pending_images(db: Database, worker_id: int, model_version_id: int, model_key: str,
                         limit: int, *, stored: bool,
                         lease: timedelta = DEFAULT_LEASE,
                         only: Collection[int] | None = None,
                         after: int | None = None) -> list[int]:
    """Atomically claim up to `limit` pending images (with ids above `after`, if given);
    [] when nothing is left.

    The candidate query may be stale under PostgreSQL's READ COMMITTED (another worker's
    claim can commit after our snapshot), so the claims table's primary key decides: an
    upsert that only takes over *expired* claims returns the images we really won, and a
    fresh look drops any whose prediction was committed meanwhile."""
    for _ in range(20):  # lost every candidate to other workers: look again
        now = utcnow()
        with db.write() as session:
            query = pending_images_query(model_version_id, model_key, stored=stored,
                                         now=now, only=only, after=after).limit(limit)
            if session.bind.dialect.name == "postgresql":
                query = query.with_for_update(of=Image, skip_locked=True)
            candidates = list(session.scalars(query))
            if not candidates:
                return []
            won = _upsert_claims(session, worker_id, model_version_id, candidates,
                                 now + lease, now)
            finished = set(session.scalars(select(Prediction.image_id).where(
                Prediction.model_version_id == model_version_id,
                Prediction.image_id.in_(won)))) if won else set()
            if finished:
                release_claims(session, worker_id, model_version_id, sorted(finished))
            heartbeat(session, worker_id, lease)
            claimed = sorted(won - finished)
        if claimed:
            return claimed
    return []


def _upsert_claims(session, worker_id: int, model_version_id: int, image_ids: list[int],
                   expires_at: datetime, now: datetime) -> set[int]:
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(Claim).values([{"model_version_id": model_version_id, "image_id": i,
                                  "worker_id": worker_id, "expires_at": expires_at}
                                 for i in image_ids])
    stmt = stmt.on_conflict_do_update(
        index_elements=[Claim.model_version_id, Claim.image_id],
        set_={"worker_id": stmt.excluded.worker_id, "expires_at": stmt.excluded.expires_at},
        where=Claim.expires_at <= now).returning(Claim.image_id)
    return set(session.scalars(stmt))


def release_claims(session, worker_id: int, model_version_id: int, image_ids: list[int]) -> None:
    session.execute(delete(Claim).where(Claim.worker_id == worker_id,
                                        Claim.model_version_id == model_version_id,
                                        Claim.image_id.in_(image_ids)))


def active_workers(db: Database, lease: timedelta = DEFAULT_LEASE) -> list[dict]:
    """Workers whose heartbeat is younger than the lease, with their claim counts."""
    cutoff = utcnow() - lease
    with db.read() as session:
        workers = session.scalars(select(Worker).where(
            Worker.stopped_at.is_(None), Worker.heartbeat_at > cutoff)).all()
        counts = dict(session.execute(
            select(Claim.worker_id, func.count()).group_by(Claim.worker_id)).all())
    return [{"id": w.id, "host": w.hostname, "pid": w.pid, "started_at": w.started_at,
             "heartbeat_at": w.heartbeat_at, "claims": counts.get(w.id, 0)} for w in workers]
