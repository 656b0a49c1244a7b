"""Named, leased locks in the database: what processes on any machine share.

`hold(db, name)` waits for the lock, keeps its lease fresh while the caller works
(`lock.refresh()`), and lets it go at the end. A holder that died is replaced at once
when it ran on this host (its pid is gone), elsewhere when its lease runs out.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import delete, select, update

from .claims import pid_alive
from . import Database, insert_ignoring_duplicates
from .models import Lock, as_utc, utcnow
from ..errors import LabelAssistError

LEASE = timedelta(minutes=2)


class LockTimeout(LabelAssistError):
    pass


class Held:
    def __init__(self, db: Database, name: str, holder: str):
        self.db, self.name, self.holder = db, name, holder

    def refresh(self) -> None:
        with self.db.write() as s:
            s.execute(update(Lock).where(Lock.name == self.name, Lock.holder == self.holder)
                      .values(expires_at=utcnow() + LEASE))


@contextmanager
def hold(db: Database, name: str, *, wait: float = 3600,
         on_wait: Callable[[str], None] | None = None) -> Iterator[Held]:
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    told = False
    while not _try_take(db, name, holder):
        if time.monotonic() > deadline:
            raise LockTimeout(f"gave up after {wait:.0f} s waiting for {name}")
        if on_wait and not told:
            on_wait(f"waiting for another process that holds {name} ...")
            told = True
        time.sleep(0.5)
    try:
        yield Held(db, name, holder)
    finally:
        with db.write() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.holder == holder))


def _try_take(db: Database, name: str, holder: str) -> bool:
    host, now = socket.gethostname(), utcnow()
    with db.write() as s:
        current = s.get(Lock, name)
        if current is not None:
            dead_here = current.hostname == host and not pid_alive(current.pid)
            if as_utc(current.expires_at) > now and not dead_here:
                return False
            s.execute(delete(Lock).where(Lock.name == name, Lock.holder == current.holder))
        insert_ignoring_duplicates(s, Lock, [{"name": name, "holder": holder, "hostname": host,
                                              "pid": os.getpid(), "expires_at": now + LEASE}])
        return s.scalar(select(Lock.holder).where(Lock.name == name)) == holder
