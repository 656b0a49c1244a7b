"""Walk folders and register images in the ledger.

Policy: an image is its content. The same bytes under two paths become one
`images` row and two `files` rows, so duplicates are predicted, pushed and
reviewed once. A file whose size and mtime are unchanged is not read again, nor is an
object in storage (s3://bucket/prefix, objectstore.py) whose ETag and size are unchanged.

Speed: each file's header is read first, so a file that is no image is refused without
being read whole; only then is it hashed and checked. Checks run in worker processes when
there are many files and cores (threads stall on the GIL near a thousand files/s), and the
next chunk is checked while the current one is written.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from sqlalchemy import select, update

from .labels import IMAGE_EXTENSIONS
from .db import Database
from .db.models import File, Image, utcnow
from .errors import ConfigError
from .objectstore import (
    READERS,
    ObjectInfo,
    check_url,
    is_object_url,
    list_objects,
    read_object,
)
from .images import (
    DEFAULT_MAX_PIXELS,
    TRANSIENT,
    BadImage,
    ImageInfo,
    file_kind,
    inspect_image,
    open_image,
    open_regular,
    read_stated,
)

Progress = Callable[[int, int], None]
CHUNK = 512
PROCESSES_FROM = 2_000  # fewer files than this: threads (no worker start-up to pay)


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
    etag: str | None = None  # an object's: it, not mtime, says whether it changed


@dataclass(frozen=True)
class _Checked:
    seen: _Seen
    sha256: str | None
    info: ImageInfo | None
    error: tuple[str, str] | None


def ingest(db: Database, roots: Iterable[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS,
           workers: int | None = None, processes: bool | None = None,
           on_progress: Progress | None = None) -> IngestSummary:
    """Register every image under `roots` (folders, image files, or object storage URLs
    such as s3://bucket/prefix); return what was added, unchanged and refused.
    workers: parallel checks (default: the cores); processes: None picks by the count."""
    roots = [_checked_root(r) for r in roots]
    # Counted first (names only, no stat; an object listing page by page), then walked
    # again in chunks: a million paths never sit in memory, and the progress bar still
    # knows its total.
    total = sum(1 for root in roots for _ in _names(root))
    found = (seen for root in roots for seen in _found(root))
    summary = IngestSummary()
    done = 0
    mark_non_utf8_paths(db)
    if any(isinstance(root, str) for root in roots):
        processes = False  # objects: reads wait on the network, and fsspec's loop hates fork
        workers = workers or READERS
    with _checker(total, workers, processes) as pool:
        check = partial(_check, max_pixels=max_pixels)
        inflight: deque = deque()
        while chunk := list(islice(found, CHUNK)):
            summary.seen += len(chunk)
            inflight.append((len(chunk), pool.map(check, _needs_check(db, chunk, summary),
                                                  chunksize=16)))
            if len(inflight) > 1:  # the next chunk is checked while this one is written
                done += _record_chunk(db, *inflight.popleft(), summary)
                if on_progress:
                    on_progress(done, max(total, done))
        while inflight:
            done += _record_chunk(db, *inflight.popleft(), summary)
            if on_progress:
                on_progress(done, max(total, done))
    retry_transient_failures(db)
    return summary


def _checked_root(root: str | Path) -> str | Path:
    """An object storage URL stays text (a Path would fold its "//"); a local root must
    exist and be a folder or an image."""
    if is_object_url(str(root)):
        check_url(str(root))
        return str(root)
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root} does not exist")
    if not root.is_dir() and root.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ConfigError(f"{root} is not an image: give folders, or image files "
                          f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return root


def _names(root: str | Path) -> Iterator:
    return list_objects(root, IMAGE_EXTENSIONS) if isinstance(root, str) else \
        _image_paths(root)


def _found(root: str | Path) -> Iterator[_Seen]:
    if isinstance(root, str):
        return (_seen_object(info) for info in list_objects(root, IMAGE_EXTENSIONS))
    return (_stat(path) for path in _image_paths(root))


def _seen_object(info: ObjectInfo) -> _Seen:
    return _Seen(info.url, None, info.url, info.size, info.mtime_ns, etag=info.etag)


def retry_transient_failures(db: Database) -> None:
    """Images that an older predict marked gone or unreadable become pending again: only
    content reasons (corrupt, truncated, not_an_image, a bomb) are final."""
    with db.write() as session:
        session.execute(update(Image).where(Image.error.in_(TRANSIENT))
                        .values(error=None, error_detail=None))


def mark_non_utf8_paths(db: Database) -> None:
    """Older versions stored a non-UTF-8 path as its plain escape, which a real file name
    can spell: give those rows their marked text before a real file claims the plain one.
    Only rows with a raw_path are read, and only the unmarked ones are written."""
    with db.write() as session:
        for file in session.scalars(select(File).where(File.raw_path.is_not(None))):
            text = text_path(file.raw_path)
            if file.path != text:
                file.path = text


def text_path(path_b: bytes) -> str:
    """The text stored (and shown) for a path whose bytes are not UTF-8. Its bad bytes read
    as \\xNN and its own backslashes are doubled, so two raw paths never read alike; and
    its name follows a doubled slash, which no absolute path from the walk has (os.walk
    and abspath leave none, apart from a leading "//"), so it cannot be a real UTF-8
    path either: the bytes b"/p/caf\\xe9.png" read "/p//caf\\xe9.png", while a file
    literally named "caf\\xe9.png" is "/p/caf\\xe9.png". Path() and basename() read both
    as people expect; the filesystem is reached through raw_path."""
    head, name = os.path.split(path_b)
    return f"{_escape(head)}//{_escape(name)}"


def _escape(part: bytes) -> str:
    return part.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _checker(count: int, workers: int | None, processes: bool | None) -> Executor:
    cores = os.cpu_count() or 1
    if processes is None:
        processes = cores > 1 and count >= PROCESSES_FROM
    if processes:
        # On Linux, fork, as torch's DataLoader does: it starts at once and needs no
        # __main__ guard. Spawn re-imports the caller's main module in every worker (the
        # whole CLI, or a user's script), which cost more than the checks saved.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        return ProcessPoolExecutor(workers or cores,
                                   mp_context=multiprocessing.get_context(method))
    return ThreadPoolExecutor(workers or min(8, cores * 2), thread_name_prefix="ingest")


def _record_chunk(db: Database, size: int, results: Iterable[_Checked],
                  summary: IngestSummary) -> int:
    checked = list(results)
    if checked:
        with db.write() as session:
            _record(session, checked, summary)
    return size


def _image_paths(root: Path) -> Iterator[bytes]:
    """Paths (bytes) with an image extension under root, in a stable order. A root that is
    a symlink to a folder is walked (the user named it); symlinks to folders met inside
    the walk are not followed, so a symlink loop cannot trap it."""
    root_b = os.fsencode(os.path.abspath(root))
    if not os.path.isdir(root_b):
        yield root_b
        return
    for dirpath, dirnames, filenames in os.walk(root_b, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower().decode("ascii", "replace") in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, name)


def _stat(path_b: bytes) -> _Seen:
    try:
        text = path_b.decode("utf-8")
        raw = None
    except UnicodeDecodeError:
        text = text_path(path_b)
        raw = path_b
    fs_path = text if raw is None else path_b
    try:
        st = os.stat(path_b)
    except OSError as exc:
        return _Seen(text, raw, fs_path, 0, 0, ("unreadable", exc.strerror or str(exc)))
    kind = file_kind(st.st_mode)
    if kind is not None:  # never opened: a FIFO would block, /dev/zero never ends
        return _Seen(text, raw, fs_path, 0, st.st_mtime_ns,
                     ("not_a_file", f"{kind}, not a regular file"))
    return _Seen(text, raw, fs_path, st.st_size, st.st_mtime_ns)


def _check(seen: _Seen, max_pixels: int) -> _Checked:
    """Header first (a file that is no image is never read whole), then hash and decode.
    Reads stop at the size that the walk's stat gave."""
    if seen.error:
        return _Checked(seen, None, None, seen.error)
    if seen.etag is not None:
        return _check_object(seen, max_pixels)
    sha = None
    try:
        fh, _ = open_regular(seen.fs_path)
        with fh:
            if seen.size:
                try:
                    open_image(fh, max_pixels)  # reads only as far as the header
                except BadImage as bad:
                    if bad.reason in ("not_an_image", "decompression_bomb"):
                        raise
                fh.seek(0)  # other header trouble is judged on the bytes, below
            data = read_stated(fh, seen.size)
        sha = hashlib.sha256(data).hexdigest()
        return _Checked(seen, sha, inspect_image(data, max_pixels), None)
    except BadImage as bad:
        return _Checked(seen, sha, None, (bad.reason, bad.detail))
    except FileNotFoundError:
        return _Checked(seen, None, None, ("missing", seen.path))
    except OSError as exc:
        return _Checked(seen, None, None, ("unreadable", exc.strerror or str(exc)))


def _check_object(seen: _Seen, max_pixels: int) -> _Checked:
    """An object is read whole in one request (only while it has the listed ETag), then
    judged as a file is: header first (no hash for what is no image), then the rest."""
    sha = None
    try:
        data = read_object(seen.fs_path, seen.size, seen.etag)
        try:
            open_image(data, max_pixels)
        except BadImage as bad:
            if bad.reason in ("not_an_image", "decompression_bomb"):
                raise
        sha = hashlib.sha256(data).hexdigest()
        return _Checked(seen, sha, inspect_image(data, max_pixels), None)
    except BadImage as bad:
        return _Checked(seen, sha, None, (bad.reason, bad.detail))


def _unchanged(old: File, seen: _Seen) -> bool:
    """Files by size and mtime; objects by size and ETag (a copy has a new mtime)."""
    stamp_same = old.etag == seen.etag if seen.etag is not None else \
        (old.etag is None and old.mtime_ns == seen.mtime_ns)
    return seen.error is None and old.size_bytes == seen.size and stamp_same \
        and old.error not in TRANSIENT


def _needs_check(db: Database, chunk: list[_Seen], summary: IngestSummary) -> list[_Seen]:
    """The files of a chunk that are new or changed; the rest are counted as unchanged."""
    with db.read() as session:
        known = {f.path: f for f in session.scalars(
            select(File).where(File.path.in_([s.path for s in chunk])))}
    to_check = []
    for seen in chunk:
        old = known.get(seen.path)
        if old is not None and _unchanged(old, seen):
            summary.unchanged += 1
            if old.error:
                summary.errors[old.error] += 1
        else:
            to_check.append(seen)
    return to_check


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
        old.etag = c.seen.etag
        old.error, old.error_detail = c.error if c.error else (None, None)
        old.updated_at = now
