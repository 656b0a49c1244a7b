"""What `labelassist serve` reports: its counters, the last learn and its recent errors
(`GET /` and `labelassist status`, which reads the copy kept beside the ledger)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class LearnRecord:
    at: str
    reviews: int
    zero_shot_accuracy: float
    probe_accuracy: float
    stored_version: str | None
    pushed_tasks: int = 0


@dataclass
class ServeStatus:
    project: str
    model_version: str | None
    reviews_recorded: int = 0
    reviews_since_learn: int = 0
    events_waiting: int = 0  # journaled, not yet stored (Label Studio unreachable?)
    events_set_aside: int = 0  # failed journal.MAX_ATTEMPTS times while Label Studio answered
    learn_every: int = 0
    predictions_served: int = 0
    images_fetched: int = 0
    images_refused: int = 0
    last_learn: LearnRecord | None = None
    auto_accept_share: float | None = None
    accept_refused: str | None = None  # why accept would refuse, when it would
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def add_error(self, message: str) -> None:
        """The last 20 problems, with the time they happened."""
        self.errors = (self.errors + [f"{time.strftime('%H:%M:%S')} {message}"])[-20:]



class StatusFile:
    """The status as JSON beside the ledger, written whole (temp file, rename), for
    `labelassist status` in another process."""

    def __init__(self, path: Path | None, log):
        self.path, self.log = path, log
        self._saved_at = float("-inf")

    def save(self, status: ServeStatus, running: bool = True,
             at_most_every: float = 0.0) -> None:
        if self.path is None or time.monotonic() - self._saved_at < at_most_every:
            return
        self._saved_at = time.monotonic()
        data = {**status.to_json(), "running": running, "pid": os.getpid(),
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        partial = self.path.with_name(self.path.name + f".{os.getpid()}")
        try:
            partial.write_text(json.dumps(data, indent=1))
            partial.replace(self.path)
        except OSError as exc:
            self.log(f"cannot write {self.path}: {exc}")
