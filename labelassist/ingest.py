"""Walk folders and register images in the ledger.

Policy: an image is its content. The same bytes under two paths become one
`images` row and two `files` rows, so duplicates are predicted, pushed and
reviewed once. A file whose size and mtime are unchanged is not read again.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from .config import IMAGE_EXTENSIONS
from .db import Database
from .db.models import File, Image, utcnow
from .errors import ConfigError
from .images import DEFAULT_MAX_PIXELS, BadImage, ImageInfo, inspect_image, read_bytes

Progress = Callable[[int, int], None]
CHUNK = 256


@dataclass
class IngestSummary:
    seen: int = 0
    added: int = 0
    duplicates: int = 0
    unchanged: int = 0
    changed: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True)
class _Seen:
    path: str
    raw_path: bytes | None
    fs_path: str | bytes
    size: int
    mtime_ns: int
    error: tuple[str, str] | None = None


@dataclass(frozen=True)
class _Checked:
    seen: _Seen
    sha256: str | None
    info: ImageInfo | None
    error: tuple[str, str] | None


def ingest(db: Database, roots: Iterable[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS,
           threads: int = 4, on_progress: Progress | None = None) -> IngestSummary:
    """Register every image under `roots`; return what was added, unchanged and refused."""
    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.exists():
            raise ConfigError(f"{root} does not exist")
    found = [s for root in roots for s in walk_images(root)]
    summary = IngestSummary(seen=len(found))
    done = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(found), CHUNK):
            chunk = found[start:start + CHUNK]
            _ingest_chunk(db, chunk, pool, max_pixels, summary)
            done += len(chunk)
            if on_progress:
                on_progress(done, len(found))
    return summary


def walk_images(root: Path) -> Iterator[_Seen]:
    """Files with an image extension under root (or root itself), never following
    directory symlinks, so a symlink loop cannot trap the walk."""
    root_b = os.fsencode(os.path.abspath(root))
    if os.path.isfile(root_b) or os.path.islink(root_b):
        yield _stat(root_b)
        return
    for dirpath, dirnames, filenames in os.walk(root_b, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower().decode("ascii", "replace") in IMAGE_EXTENSIONS:
                yield _stat(os.path.join(dirpath, name))


def _stat(path_b: bytes) -> _Seen:
    try:
        text = path_b.decode("utf-8")
        raw = None
    except UnicodeDecodeError:
        text = path_b.decode("utf-8", "backslashreplace")
        raw = path_b
    fs_path = text if raw is None else path_b
    try:
        st = os.stat(path_b)
    except OSError as exc:
        return _Seen(text, raw, fs_path, 0, 0, ("unreadable", exc.strerror or str(exc)))
    return _Seen(text, raw, fs_path, st.st_size, st.st_mtime_ns)


def _check(seen: _Seen, max_pixels: int) -> _Checked:
    if seen.error:
        return _Checked(seen, None, None, seen.error)
    try:
        data = read_bytes(seen.fs_path)
    except BadImage as bad:
        return _Checked(seen, None, None, (bad.reason, bad.detail))
    sha = hashlib.sha256(data).hexdigest()
    try:
        return _Checked(seen, sha, inspect_image(data, max_pixels), None)
    except BadImage as bad:
        return _Checked(seen, sha, None, (bad.reason, bad.detail))


def _ingest_chunk(db: Database, chunk: list[_Seen], pool: ThreadPoolExecutor, max_pixels: int,
                  summary: IngestSummary) -> None:
    with db.read() as session:
        known = {f.path: f for f in session.scalars(
            select(File).where(File.path.in_([s.path for s in chunk])))}
    to_check = []
    for seen in chunk:
        old = known.get(seen.path)
        if (old is not None and seen.error is None and old.size_bytes == seen.size
                and old.mtime_ns == seen.mtime_ns):
            summary.unchanged += 1
            if old.error:
                summary.errors[old.error] += 1
        else:
            to_check.append(seen)
    if not to_check:
        return
    checked = list(pool.map(lambda s: _check(s, max_pixels), to_check))
    with db.write() as session:
        _record(session, checked, summary)


def _record(session, checked: list[_Checked], summary: IngestSummary) -> None:
    shas = {c.sha256 for c in checked if c.sha256 and c.info}
    images = {i.sha256: i for i in session.scalars(select(Image).where(Image.sha256.in_(shas)))}
    files = {f.path: f for f in session.scalars(
        select(File).where(File.path.in_([c.seen.path for c in checked])))}
    now = utcnow()
    for c in checked:
        image = None
        if c.info is not None:
            image = images.get(c.sha256)
            is_new_content = image is None
            if image is None:
                image = Image(sha256=c.sha256, size_bytes=c.seen.size, width=c.info.width,
                              height=c.info.height, format=c.info.format, created_at=now)
                session.add(image)
                session.flush()
                images[c.sha256] = image
        old = files.get(c.seen.path)
        if c.error:
            summary.errors[c.error[0]] += 1
            summary.error_examples.setdefault(c.error[0], f"{c.seen.path}: {c.error[1]}")
        elif old is None:
            if is_new_content:
                summary.added += 1
            else:
                summary.duplicates += 1
        elif old.sha256 == c.sha256 and old.error is None:
            summary.unchanged += 1  # touched, same bytes
        else:
            summary.changed += 1
        if old is None:
            old = File(path=c.seen.path, raw_path=c.seen.raw_path, first_seen=now)
            session.add(old)
        old.image_id = image.id if image is not None else None
        old.sha256 = c.sha256
        old.size_bytes = c.seen.size
        old.mtime_ns = c.seen.mtime_ns
        old.error, old.error_detail = c.error if c.error else (None, None)
        old.updated_at = now
