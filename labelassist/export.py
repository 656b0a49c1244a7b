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
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from .claims import pid_alive
from .db import Database
from .db.models import AutoAccept, File, Image, ModelVersion, Prediction
from .errors import ConfigError, ExportError
from .queries import first_files, rows_in_chunks
from .reviews import load_reviews

FORMATS = ("imagefolder", "csv", "jsonl", "hf")
LINKS = ("copy", "hardlink", "symlink")
SPLIT_NAMES = {1: ("train",), 2: ("train", "test"), 3: ("train", "validation", "test")}
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
            *(f"lpt{i}" for i in range(10))}
Progress = Callable[[int, int], None]


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
    split: str = ""
    file: str = ""


@dataclass(frozen=True, slots=True)
class _Pred:
    label: str
    confidence: float


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
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
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


def safe_name(name: str, fallback: str = "_") -> str:
    """A file or folder name that cannot escape OUT or trouble any filesystem."""
    name = unicodedata.normalize("NFC", name)
    name = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]", "_", name).strip().strip(".")
    if not name or name.lower().split(".")[0] in RESERVED:
        name = f"{name or fallback}_"
    return name.encode("utf-8")[:120].decode("utf-8", "ignore") or fallback


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


def collect_rows(db: Database, *, include_auto: bool, version: str | None, policy: str,
                 target_precision: float, min_support: int,
                 summary: ExportSummary) -> list[Row]:
    from .queries import resolve_version

    reviews = load_reviews(db, policy)
    chosen = resolve_version(db, version)
    with db.read() as s:
        errors = set(s.scalars(select(Image.id).where(Image.error.is_not(None))))
        # Only the columns export needs, not ORM rows that carry every class score.
        preds = {i: _Pred(label, confidence) for i, label, confidence in s.execute(
            select(Prediction.image_id, Prediction.label, Prediction.confidence).where(
                Prediction.model_version_id == chosen.id))}
        accepted = {a.image_id: a for a in s.scalars(select(AutoAccept))}
        # Paths and hashes only for what can be exported, not for the whole workspace.
        wanted = set(reviews.labels) | (set(preds) | set(accepted) if include_auto else set())
        shas = dict(rows_in_chunks(s, lambda chunk: select(Image.id, Image.sha256).where(
            Image.id.in_(chunk)), wanted))
        files = first_files(s, wanted)
        names = dict(s.execute(select(ModelVersion.id, ModelVersion.name)).all())
    rows = []
    for image_id, human in reviews.labels.items():
        if image_id in errors or image_id not in files:
            summary.excluded["decode error or file gone"] += 1
            continue
        pred = preds.get(image_id)
        path, fs_path = files[image_id]
        rows.append(Row(image_id, shas[image_id], path, human.label, "human",
                        human.annotators, chosen.name if pred else None,
                        pred.confidence if pred else None, fs_path))
    summary.excluded["skipped by reviewers"] += len(reviews.skipped - set(reviews.labels))
    if include_auto:
        trusted = auto_rows(db, chosen, preds, accepted, names, target_precision, min_support)
        for image_id, (label, confidence, version_name) in trusted.items():
            if image_id in reviews.labels or image_id in reviews.skipped:
                continue
            if image_id in errors or image_id not in files:
                summary.excluded["decode error or file gone"] += 1
                continue
            path, fs_path = files[image_id]
            rows.append(Row(image_id, shas[image_id], path, label, "auto", (),
                            version_name, confidence, fs_path))
    reviewed = set(reviews.labels) | reviews.skipped
    left_out = sum(1 for i in preds if i not in reviewed) - sum(r.source == "auto" for r in rows)
    reason = "unreviewed, below the trust threshold" if include_auto \
        else "unreviewed (add trusted ones with --include-auto)"
    if left_out:
        summary.excluded[reason] += left_out
    return rows


def auto_rows(db, version, preds, accepted, names, target_precision, min_support) -> dict:
    """Unreviewed predictions above their class's audited threshold, and `accept`ed ones."""
    from .audit import audit

    trusted = {i: (a.label, a.confidence, names[a.model_version_id])
               for i, a in accepted.items()}
    try:
        (result,) = audit(db, version.name, target_precision=target_precision,
                          min_support=min_support)
    except ConfigError:
        return trusted  # nothing reviewed yet: no threshold can be trusted
    thresholds = {c: t["threshold"] for c, t in result.thresholds["per_class"].items()
                  if t["threshold"] is not None}
    for image_id, p in preds.items():
        if p.label in thresholds and p.confidence >= thresholds[p.label]:
            trusted.setdefault(image_id, (p.label, p.confidence, version.name))
    return trusted


def export(db: Database, out: str | Path, fmt: str, *, include_auto: bool = False,
           split: str = "0.8,0.1,0.1", seed: int = 0, link: str = "copy",
           policy: str = "majority", version: str | None = None,
           target_precision: float = 0.99, min_support: int = 30, overwrite: bool = False,
           on_progress: Progress | None = None) -> ExportSummary:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use {', '.join(FORMATS)}")
    if link not in LINKS:
        raise ConfigError(f"--link {link!r}: use {', '.join(LINKS)}")
    out = Path(out).absolute()
    refuse_unsafe_target(db, out, overwrite)
    fractions = parse_split(split)
    summary = ExportSummary(out, fmt)
    rows = collect_rows(db, include_auto=include_auto, version=version, policy=policy,
                        target_precision=target_precision, min_support=min_support,
                        summary=summary)
    if not rows:
        raise ExportError("nothing to export: no reviewed images yet (push, review, pull), "
                          "or --include-auto with trusted predictions")
    rows = place(rows, fractions, seed)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        rows = write_dataset(tmp, rows, fmt, link, summary, on_progress)
        write_manifests(tmp, rows, fmt)
        _swap_into_place(tmp, out)
    except OSError as exc:
        raise ExportError(f"export failed, {out} was left untouched: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        summary.per_class_split.setdefault(r.label, Counter())[r.split] += 1
        summary.per_source[r.source] += 1
    summary.rows = len(rows)
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


def place(rows: list[Row], fractions: tuple[float, ...], seed: int) -> list[Row]:
    """Give each row its split and a collision-free relative file path."""
    from dataclasses import replace

    folders = class_folders(sorted({r.label for r in rows}))
    placed, taken = [], set()
    for r in sorted(rows, key=lambda r: (r.label, r.sha256)):
        split = split_of(r.sha256, fractions, seed)
        name = safe_name(Path(r.source_path).name, "image")
        rel = f"{split}/{folders[r.label]}/{name}"
        if rel.lower() in taken:
            stem, ext = os.path.splitext(name)
            rel = f"{split}/{folders[r.label]}/{stem}-{r.sha256[:10]}{ext}"
        taken.add(rel.lower())
        placed.append(replace(r, split=split, file=rel))
    return placed


def write_dataset(root: Path, rows: list[Row], fmt: str, link: str, summary: ExportSummary,
                  on_progress: Progress | None) -> list[Row]:
    """Copy (or link) every image, checking its bytes against the ingested hash."""
    if fmt in ("csv", "jsonl"):
        return rows
    kept = []
    for n, r in enumerate(rows, start=1):
        target = (root / r.file).resolve()
        if root.resolve() not in target.parents:  # never, but never is the point
            raise ExportError(f"refusing to write {target} outside the export folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        problem = _transfer(r.fs_path or r.source_path, target, r.sha256, link)
        if problem:
            summary.excluded[problem] += 1
            summary.excluded_examples.setdefault(problem, r.source_path)
        else:
            kept.append(r)
        if on_progress:
            on_progress(n, len(rows))
    return kept


def _transfer(source: str | bytes, target: Path, sha256: str, link: str) -> str | None:
    """Copy or link one image; returns why it was left out, or None. A source that cannot
    be read skips that image; a target that cannot be written (a full disk) stops all."""
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except OSError:
        return "source file gone or unreadable"
    if hashlib.sha256(data).hexdigest() != sha256:
        return "file changed since ingest"
    if link == "copy":
        target.write_bytes(data)
    elif link == "hardlink":
        os.link(source, target)
    else:
        os.symlink(os.path.realpath(source), target)
    return None


def write_manifests(root: Path, rows: list[Row], fmt: str) -> None:
    records = [{"file": r.file if fmt not in ("csv", "jsonl") else None,
                "path": r.source_path, "sha256": r.sha256, "label": r.label, "split": r.split,
                "source": r.source, "annotators": list(r.annotators),
                "model_version": r.model_version, "confidence": r.confidence} for r in rows]
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    if fmt == "csv":
        with open(root / "labels.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(spreadsheet_safe({**r, "annotators": ";".join(r["annotators"])})
                             for r in records)
    elif fmt == "jsonl":
        shutil.copyfile(root / "manifest.jsonl", root / "labels.jsonl")
    else:  # verify with: cd OUT && sha256sum -c SHA256SUMS
        with open(root / "SHA256SUMS", "w", encoding="utf-8") as fh:
            fh.writelines(f"{r.sha256}  {r.file}\n" for r in rows)


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

