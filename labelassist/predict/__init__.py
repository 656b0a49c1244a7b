"""Predict: claim pending images, decode them (feed.py), encode and score them, write the
predictions (run.py); the same in several processes and the long-running worker
(workers.py), on a Ray cluster (distributed/), and the measured choice of a CPU runtime
(choice.py, `predict --dtype auto`).

What is here reads the stored runtime choices: nothing heavy is imported, so `status` and
the report use it without torch."""

from __future__ import annotations

from sqlalchemy import select

from ..db import Database
from ..db.models import RuntimeChoice


def version_choice(db: Database, version_name: str) -> dict | None:
    """The newest measurement that chose the runtime of this model_version, if any."""
    with db.read() as session:
        row = session.scalars(select(RuntimeChoice)
                              .where(RuntimeChoice.model_version == version_name)
                              .order_by(RuntimeChoice.id.desc()).limit(1)).first()
        return None if row is None else row.measurement


def describe_choice(choice: dict) -> str:
    best = next(t for t in choice["trials"] if t["runtime"] == choice["runtime"])
    exact = next(t for t in choice["trials"] if t["runtime"] == "fp32")
    return (f"{choice['runtime']}, {best['images_per_second'] / exact['images_per_second']:.1f}x "
            f"torch fp32 with {best['agreement']:.1%} top-1 agreement on "
            f"{choice['sample']:,} of this workspace's images")


def runtime_sections(db: Database, versions: list[str]) -> list[dict]:
    """The report's `runtimes`: per audited model_version whose runtime `--dtype auto`
    chose, the measurement (every candidate's images/s, agreement and drift)."""
    return [{"model_version": name, **choice} for name in versions
            if (choice := version_choice(db, name))]
