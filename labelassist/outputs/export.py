"""Write the finished dataset: imagefolder, csv, jsonl or a Hugging Face imagefolder.

Rules:
- Human-reviewed labels go in by default (reviews.py resolves several annotators).
  --include-auto adds unreviewed predictions whose confidence clears their class's trust
  threshold from the audit, plus those marked by `labelassist accept`.
- A split is a pure function of the content hash and the seed, so adding images later
  never moves an old image between train and test. Each class is split by the same
  uniform draw: stratified in expectation.
- The export is built in a sibling temp folder and renamed into place: a crash leaves
  OUT absent (or as it was), never half written.
- It streams: images are read a chunk at a time and each row is written as it comes, so
  memory stays flat from ten thousand images to millions (benchmarks/memory.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import func, select

from ..db.claims import pid_alive
from ..db import Database
from ..db.models import AutoAccept, File, Image, Prediction
from ..errors import ConfigError, ExportError
from ..images import BadImage
from ..objectstore import fetch_ahead, fetch_object, is_object_url
from ..db.queries import first_files
from ..trust.outofset import OTHER, flagged
from ..trust.audit import TrustOptions
from .plan import Plan, plan_export

FORMATS = ("imagefolder", "csv", "jsonl", "hf")
LINKS = ("copy", "hardlink", "symlink")
SPLIT_NAMES = {1: ("train",), 2: ("train", "test"), 3: ("train", "validation", "test")}
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
            *(f"lpt{i}" for i in range(10))}
Progress = Callable[[int, int], None]
CHUNK = 5000  # images read per query while exporting


@dataclass(frozen=True)
class Row:
    image_id: int
    sha256: str
    source_path: str
    label: str
    source: str  # human | auto
    annotators: tuple[str, ...]
    model_version: str | None
    confidence: float | None
    fs_path: str | bytes = ""  # what to open: raw bytes for a name that is not UTF-8


@dataclass
class ExportSummary:
    out: Path
    format: str
    rows: int = 0
    per_class_split: dict[str, Counter] = field(default_factory=dict)
    per_source: Counter = field(default_factory=Counter)
    excluded: Counter = field(default_factory=Counter)
    excluded_examples: dict[str, str] = field(default_factory=dict)


def parse_split(text: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--split {text!r}: give fractions such as 0.8,0.1,0.1") from None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts) \
            or abs(sum(parts) - 1) > 1e-6:
        raise ConfigError(f"--split {text!r}: one to three fractions that add up to 1")
    return parts


def split_of(sha256: str, fractions: tuple[float, ...], seed: int) -> str:
    """The same content and seed always give the same split."""
    draw = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:15], 16) / 16 ** 15
    names = SPLIT_NAMES[len(fractions)]
    edge = 0.0
    for name, fraction in zip(names, fractions):
        edge += fraction
        if draw < edge:
            return name
    return names[-1]


NAME_BYTES = 120  # well under every filesystem's 255, with room for a "-<sha>-2" tag


def safe_name(name: str, fallback: str = "_", tag: str = "") -> str:
    """A file or folder name that cannot escape OUT or trouble any filesystem, at most
    NAME_BYTES long. A long name is cut in its stem, before `tag` and the extension: an
    imagefolder loader goes by the extension, so a name cut inside it is an image lost."""
    name = unicodedata.normalize("NFC", name)
    name = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]", "_", name).strip().strip(".")
    stem, ext = os.path.splitext(name)
    if len(ext.encode()) > 16:  # no image extension: a dot in a class name, say
        stem, ext = name, ""
    head, dot, rest = stem.partition(".")  # Windows: "nul.tar" is the device "nul" too
    if not stem or head.lower() in RESERVED:
        stem = f"{head or fallback}_{dot}{rest}"
    room = NAME_BYTES - len(f"{tag}{ext}".encode())
    return (stem.encode()[:room].decode("utf-8", "ignore") or fallback) + tag + ext


def class_folders(labels: list[str]) -> dict[str, str]:
    """Safe, distinct folder names per class (two unsafe names may collapse to one)."""
    folders, used = {}, set()
    for label in sorted(labels):
        base = safe_name(label, "unnamed")
        name, n = base, 2
        while name.lower() in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name.lower())
        folders[label] = name
    return folders


def iter_rows(db: Database, plan: Plan, summary: ExportSummary,
              on_progress: Progress | None = None) -> Iterator[Row]:
    """Every image's row, in id order, a chunk of images at a time: memory stays flat
    whatever the size of the ledger. Each image lands in one place: a row, or one reason
    in summary.excluded."""
    reviews = plan.reviews
    summary.excluded["skipped by reviewers"] += len(reviews.skipped)
    with db.read() as s:
        total = s.scalar(select(func.count(Image.id))) or 0
    last, done = 0, 0
    while True:
        with db.read() as s:
            images = s.execute(select(Image.id, Image.sha256, Image.error).where(
                Image.id > last).order_by(Image.id).limit(CHUNK)).all()
            if not images:
                return
            ids = [i for i, _, _ in images]
            preds = {i: (label, confidence) for i, label, confidence in s.execute(
                select(Prediction.image_id, Prediction.label, Prediction.confidence).where(
                    Prediction.model_version_id == plan.version_id,
                    Prediction.image_id.in_(ids)))}
            accepted = {} if plan.thresholds is None else {
                i: (label, confidence, plan.version_names[v]) for i, label, confidence, v in
                s.execute(select(AutoAccept.image_id, AutoAccept.label, AutoAccept.confidence,
                                 AutoAccept.model_version_id).where(
                    AutoAccept.image_id.in_(ids)).order_by(AutoAccept.id))}
            odd = set() if plan.thresholds is None else {  # the version's label, as accept
                i for i, similarity in s.execute(
                    select(Prediction.image_id, Prediction.similarity).where(
                        Prediction.model_version_id == plan.base_id,
                        Prediction.image_id.in_(ids)))
                if i in preds and flagged(preds[i][0], similarity, plan.bars)}
            files = first_files(s, ids)
        for image_id, sha, error in images:
            row = _row_of(plan, image_id, sha, preds.get(image_id), accepted.get(image_id),
                          summary, image_id in odd)
            if row is None:
                continue
            if error is not None or image_id not in files:
                summary.excluded["decode error or file gone"] += 1
                continue
            path, fs_path = files[image_id]
            yield replace(row, source_path=path, fs_path=fs_path)
        last, done = ids[-1], done + len(ids)
        if on_progress:
            on_progress(done, max(total, done))


def _row_of(plan: Plan, image_id: int, sha: str, pred, accepted,
            summary: ExportSummary, out_of_set: bool = False) -> Row | None:
    """The image's row (without its file), or None with the reason counted."""
    human = plan.reviews.labels.get(image_id)
    if human is not None and human.label not in plan.labels:
        summary.excluded[f"reviewed as {OTHER!r} (none of the classes)"] += 1
        return None
    if human is not None:
        return Row(image_id, sha, "", human.label, "human", human.annotators,
                   plan.version_name if pred else None, pred[1] if pred else None)
    if image_id in plan.reviews.skipped:
        return None  # counted once, up front
    if plan.thresholds is not None and out_of_set:
        summary.excluded["unreviewed, matches none of the classes well (out of set)"] += 1
        return None
    if plan.thresholds is not None:
        if accepted is not None:
            label, confidence, version_name = accepted
            return Row(image_id, sha, "", label, "auto", (), version_name, confidence)
        if pred and pred[0] in plan.thresholds and pred[1] >= plan.thresholds[pred[0]]:
            return Row(image_id, sha, "", pred[0], "auto", (), plan.version_name, pred[1])
    if pred:
        summary.excluded["unreviewed, below the trust threshold" if plan.thresholds is not None
                         else "unreviewed (add trusted ones with --include-auto)"] += 1
    return None


def export(db: Database, out: str | Path, fmt: str, *, include_auto: bool = False,
           split: str = "0.8,0.1,0.1", seed: int = 0, link: str = "copy",
           trust: TrustOptions = TrustOptions(), version: str | None = None,
           overwrite: bool = False,
           on_progress: Progress | None = None,
           allow_biased_sample: bool = False) -> ExportSummary:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use {', '.join(FORMATS)}")
    if link not in LINKS:
        raise ConfigError(f"--link {link!r}: use {', '.join(LINKS)}")
    out = Path(out).absolute()
    refuse_unsafe_target(db, out, overwrite)
    fractions = parse_split(split)
    summary = ExportSummary(out, fmt)
    plan = plan_export(db, include_auto=include_auto, version=version, trust=trust,
                       allow_biased_sample=allow_biased_sample)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        with DatasetWriter(tmp, fmt, link, class_folders(sorted(plan.labels)), fractions, seed,
                           summary) as writer:
            rows = iter_rows(db, plan, summary, on_progress)
            # objects in a bucket are fetched ahead, in threads: one by one, each would
            # cost its round trips
            for row, fetched in fetch_ahead(rows, lambda r: r.fs_path or r.source_path) \
                    if writer.files else ((row, None) for row in rows):
                writer.add(row, fetched)
        if not summary.rows:
            left = "; ".join(f"{n:,} {why}" for why, n in summary.excluded.items() if n)
            raise ExportError("nothing to export: no reviewed images yet (push, review, "
                              "pull), or --include-auto with trusted predictions"
                              + (f". Left out: {left}" if left else ""))
        _swap_into_place(tmp, out)
    except OSError as exc:
        raise ExportError(f"export failed, {out} was left untouched: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def refuse_unsafe_target(db: Database, out: Path, overwrite: bool) -> None:
    """OUT never holds or sits among the images it is made from, and --overwrite replaces
    only a previous export (one with its manifest), never an arbitrary folder."""
    real = Path(os.path.realpath(out))
    with db.read() as s:
        for folder in {out, real}:
            if s.scalar(select(File.id).where(File.path.startswith(f"{folder}/",
                                                                   autoescape=True)).limit(1)):
                raise ExportError(f"{out} holds ingested images: export to a new folder "
                                  "outside your image folders")
        for folder in [real, *real.parents][:-1]:
            if _holds_files_directly(s, folder):
                raise ExportError(f"{out} is inside {folder}, which holds ingested images: "
                                  "export to a folder outside your image folders")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: pick a new folder or pass --overwrite")
    if out.exists() and not (out / "manifest.jsonl").is_file():
        raise ExportError(f"{out} is not a labelassist export (it has no manifest.jsonl): "
                          "--overwrite replaces only a previous export; pick a new folder")


def _holds_files_directly(session, folder: Path) -> bool:
    prefix = f"{folder}/" if str(folder) != "/" else "/"
    paths = session.scalars(select(File.path).where(
        File.path.startswith(prefix, autoescape=True)).limit(2000))
    return any("/" not in p[len(prefix):] for p in paths)


class DatasetWriter:
    """Writes rows as they come: each image file (checked against its ingested hash), and
    the manifest, labels.csv and SHA256SUMS lines. Nothing per row stays in memory: the
    names already used (compared case-blind, for case-insensitive filesystems) live in a
    small SQLite file inside the temp folder."""

    def __init__(self, root: Path, fmt: str, link: str, folders: dict[str, str],
                 fractions: tuple[float, ...], seed: int, summary: ExportSummary):
        self.root, self.fmt, self.link, self.folders = root, fmt, link, folders
        self.fractions, self.seed, self.summary = fractions, seed, summary
        self.files = fmt not in ("csv", "jsonl")
        self._open: list = []
        self._real_root = root.resolve()
        self._made: set[str] = set()  # folders created: a few per split and class

    def __enter__(self) -> "DatasetWriter":
        self.manifest = self._text("manifest.jsonl")
        self.csv = csv.writer(self._text("labels.csv")) if self.fmt == "csv" else None
        if self.csv:
            self.csv.writerow(MANIFEST_FIELDS)
        self.sums = self._text("SHA256SUMS") if self.files else None  # sha256sum -c SHA256SUMS
        self.names = sqlite3.connect(self.root / ".names.sqlite", isolation_level=None)
        self.names.execute("PRAGMA journal_mode=OFF")
        self.names.execute("CREATE TABLE taken (name TEXT PRIMARY KEY)")
        return self

    def _text(self, name: str):
        fh = open(self.root / name, "w", newline="" if name.endswith(".csv") else None,
                  encoding="utf-8")
        self._open.append(fh)
        return fh

    def add(self, row: Row, fetched: Future | None = None) -> None:
        split = split_of(row.sha256, self.fractions, self.seed)
        file = self.place(row, split) if self.files else ""
        if file:
            problem = _transfer(row.fs_path or row.source_path, self.root / file, row.sha256,
                                self.link, fetched)
            if problem:
                self.summary.excluded[problem] += 1
                self.summary.excluded_examples.setdefault(problem, row.source_path)
                return
            self.sums.write(f"{row.sha256}  {file}\n")
        record = {"file": file or None, "path": row.source_path, "sha256": row.sha256,
                  "label": row.label, "split": split, "source": row.source,
                  "annotators": list(row.annotators), "model_version": row.model_version,
                  "confidence": row.confidence}
        self.manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.csv:
            safe = spreadsheet_safe({**record, "annotators": ";".join(row.annotators)})
            self.csv.writerow([safe[k] for k in MANIFEST_FIELDS])
        self.summary.rows += 1
        self.summary.per_source[row.source] += 1
        self.summary.per_class_split.setdefault(row.label, Counter())[split] += 1

    def place(self, row: Row, split: str) -> str:
        """A relative path inside OUT that no other row has, even case-blind."""
        folder = f"{split}/{self.folders[row.label]}"
        source = Path(row.source_path).name
        rel = f"{folder}/{safe_name(source, 'image')}"
        if not self._claim(rel):
            rel = f"{folder}/{safe_name(source, 'image', f'-{row.sha256[:10]}')}"
            n = 2
            while not self._claim(rel):  # the same content under two names
                rel = f"{folder}/{safe_name(source, 'image', f'-{row.sha256[:10]}-{n}')}"
                n += 1
        target = (self.root / rel).resolve()
        if self._real_root not in target.parents:  # never, but never is the point
            raise ExportError(f"refusing to write {target} outside the export folder")
        if folder not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
        return rel

    def _claim(self, rel: str) -> bool:
        try:
            self.names.execute("INSERT INTO taken VALUES (?)", (rel.lower(),))
            return True
        except sqlite3.IntegrityError:
            return False

    def __exit__(self, *exc) -> None:
        self.names.close()
        (self.root / ".names.sqlite").unlink(missing_ok=True)
        for fh in self._open:
            fh.close()
        if self.fmt == "jsonl" and exc[0] is None:
            shutil.copyfile(self.root / "manifest.jsonl", self.root / "labels.jsonl")


def _transfer(source: str | bytes, target: Path, sha256: str, link: str,
              fetched: Future | None = None) -> str | None:
    """Copy or link one image; returns why it was left out, or None. A source that cannot
    be read skips that image; a target that cannot be written (a full disk) stops all.
    An object in storage (s3://...) is copied from the bucket whatever --link says."""
    try:
        if fetched is not None:
            data = fetched.result()
        elif is_object_url(source):
            data = fetch_object(source)
        else:
            with open(source, "rb") as fh:
                data = fh.read()
    except (OSError, BadImage):
        return "source file gone or unreadable"
    if hashlib.sha256(data).hexdigest() != sha256:
        return "file changed since ingest"
    if link == "copy" or is_object_url(source):
        target.write_bytes(data)
    elif link == "hardlink":
        os.link(source, target)
    else:
        os.symlink(os.path.realpath(source), target)
    return None


MANIFEST_FIELDS = ("file", "path", "sha256", "label", "split", "source", "annotators",
                   "model_version", "confidence")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(record: dict) -> dict:
    """OWASP's rule against CSV injection: a text cell that a spreadsheet would run as a
    formula gets a leading apostrophe. Labels and annotator names come from reviewers."""
    return {k: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_START) else v
            for k, v in record.items()}


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(out: Path) -> None:
    """Temp folders of exports that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)

