"""Defects from the hostile review (issue: Reliability), one test each; every one failed on
the code before its fix. The Label Studio ones are in test_reliability_ls.py."""

import csv
import io
import json
import os
import shutil

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import labelassist.outputs.export as E
from labelassist.cli import app
from labelassist.labels import load_label_file, parse_label_text
from labelassist.db.models import File, Image, Prediction
from labelassist.errors import ExportError
from labelassist.ingest import ingest
from labelassist.predict.run import predict

from .conftest import add_annotation
from .imagegen import shape_image, write_shape_images


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# 3. A temporary read failure must not remove images for good.
def test_a_folder_moved_away_and_back_is_predicted_after_the_next_ingest(
        db, tiny_model, photo_dir, labels_file, tmp_path):
    labels = load_label_file(labels_file)
    ingest(db, [photo_dir])
    away = tmp_path / "away"
    shutil.move(photo_dir, away)
    first = predict(db, tiny_model, labels)
    assert first.encoded == 0 and first.failed["missing"] == 24
    again = predict(db, tiny_model, labels)  # still away: tried again, nothing is final
    assert again.failed["missing"] == 24

    shutil.move(away, photo_dir)
    assert predict(db, tiny_model, labels).encoded == 24  # the files are back
    with db.read() as s:
        assert s.scalars(select(Image.error).where(Image.error.is_not(None))).all() == []


def test_an_image_marked_missing_by_an_older_version_is_retried_after_ingest(
        db, tiny_model, photo_dir, labels_file):
    from sqlalchemy import update

    ingest(db, [photo_dir])
    with db.write() as s:  # what the code before the fix stored
        s.execute(update(Image).values(error="missing", error_detail="gone"))
    summary = ingest(db, [photo_dir])
    assert summary.unchanged == 24
    assert predict(db, tiny_model, load_label_file(labels_file)).encoded == 24


def test_content_failures_stay_final(db, tiny_model, photo_dir, labels_file):
    ingest(db, [photo_dir])
    victim = next(photo_dir.rglob("img_0004.jpg"))
    data = victim.read_bytes()
    stat = victim.stat()
    victim.write_bytes(data[:len(data) // 3] + b"\0" * (len(data) - len(data) // 3))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: corrupt
    labels = load_label_file(labels_file)
    first = predict(db, tiny_model, labels)
    assert first.encoded == 23 and sum(first.failed.values()) == 1
    again = predict(db, tiny_model, labels)
    assert again.predicted == 0 and not again.failed  # not even tried: the bytes are bad
    with db.read() as s:
        (reason,) = s.scalars(select(Image.error).where(Image.error.is_not(None))).all()
    assert reason not in ("missing", "unreadable", "changed")


# 4. One bad source file must not abort an imagefolder or hf export.
def test_export_skips_a_source_file_deleted_after_ingest(reviewed_db, tmp_path):
    with reviewed_db.read() as s:
        reviewed = s.scalars(select(Prediction.image_id).order_by(Prediction.image_id)).all()
        path = s.scalars(select(File.path).where(File.image_id == reviewed[3])).one()
    os.unlink(path)
    summary = E.export(reviewed_db, tmp_path / "out", "imagefolder")
    assert summary.rows == 23
    assert summary.excluded["source file gone or unreadable"] == 1
    assert path not in {r["path"] for r in manifest(tmp_path / "out")}


def test_export_reads_files_whose_names_are_not_utf8(db, tiny_model, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    name = os.path.join(os.fsencode(root), b"caf\xe9.png")  # latin-1, not UTF-8
    with open(name, "wb") as fh:
        shape_image(1).save(fh, "PNG")
    ingest(db, [root])
    predict(db, tiny_model, parse_label_text('[classes]\na = ["red"]\nb = ["blue"]\n'))
    with db.read() as s:
        image_id = s.scalars(select(Prediction.image_id)).one()
    add_annotation(db, image_id, "a", n=1)
    for fmt in ("imagefolder", "hf"):
        out = tmp_path / fmt
        summary = E.export(db, out, fmt)
        assert summary.rows == 1
        (row,) = manifest(out)
        assert (out / row["file"]).read_bytes() == open(name, "rb").read()


# 7. CSV formula injection (OWASP): a cell that starts with = + - @ tab or CR is quoted.
def test_csv_cells_that_start_a_formula_are_neutralised(db, tiny_model, tmp_path):
    root = tmp_path / "photos"
    write_shape_images(root, 3)
    ingest(db, [root])
    predict(db, tiny_model, parse_label_text(
        '[classes]\n"=HYPERLINK(\\"http://x\\")" = ["red"]\n"+1" = ["blue"]\n'))
    with db.read() as s:
        ids = s.scalars(select(Prediction.image_id)).all()
    for n, image_id in enumerate(ids):
        add_annotation(db, image_id, "=HYPERLINK(\"http://x\")", n=n, annotator="@evil\tname")
    E.export(db, tmp_path / "c", "csv")
    with open(tmp_path / "c" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["label"] == "'=HYPERLINK(\"http://x\")" for r in rows)
    assert all(r["annotators"].startswith("'@") for r in rows)

    out = CliRunner().invoke(app, ["predictions", "--format", "csv",
                                   "--db", str(db.engine.url)]).stdout
    labels = {r["label"] for r in csv.DictReader(io.StringIO(out))}
    assert labels <= {"'=HYPERLINK(\"http://x\")", "'+1"} and labels
    # The JSON formats carry the values as they are.
    jsonl = CliRunner().invoke(app, ["predictions", "--db", str(db.engine.url)]).stdout
    assert {json.loads(x)["label"] for x in jsonl.splitlines()} <= {"=HYPERLINK(\"http://x\")",
                                                                    "+1"}


# 8. export --overwrite must never delete a folder that is not a previous export.
def test_overwrite_refuses_the_source_folder_and_unrelated_folders(reviewed_db, tmp_path):
    photos = tmp_path / "photos"
    before = sorted(p.name for p in photos.iterdir())
    with pytest.raises(ExportError, match="ingested"):
        E.export(reviewed_db, photos, "imagefolder", link="symlink", overwrite=True)
    with pytest.raises(ExportError, match="ingested"):
        E.export(reviewed_db, photos / "sub", "imagefolder", overwrite=True)
    with pytest.raises(ExportError, match="ingested"):
        E.export(reviewed_db, tmp_path, "csv", overwrite=True)  # contains the photos
    assert sorted(p.name for p in photos.iterdir()) == before

    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a labelassist export"):
        E.export(reviewed_db, unrelated, "csv", overwrite=True)
    assert (unrelated / "chapter1.tex").read_text() == "years of work"

    E.export(reviewed_db, tmp_path / "out", "csv")
    again = E.export(reviewed_db, tmp_path / "out", "jsonl", overwrite=True)  # a previous export
    assert again.rows == 24 and (tmp_path / "out" / "labels.jsonl").is_file()
    assert not (tmp_path / "out" / "labels.csv").exists()


# 12. A symlinked folder given to ingest is walked; symlinks met inside the walk are not.
def test_a_symlinked_folder_named_by_the_user_is_walked(db, tmp_path):
    real = tmp_path / "real"
    write_shape_images(real, 5)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(real, target_is_directory=True)  # met inside: not followed
    summary = ingest(db, [link])
    assert (summary.seen, summary.added, summary.error_count) == (5, 5, 0)


def test_ls_token_help_prefers_the_environment_variable():
    result = CliRunner().invoke(app, ["push", "--help"], terminal_width=200)
    assert "LABEL_STUDIO_API_KEY" in result.output and "visible in ps" in result.output


# 11. report --html into a folder that does not exist: one line, exit code 1.
def test_report_into_a_missing_folder_is_a_one_line_error(reviewed_db, tmp_path):
    result = CliRunner().invoke(app, ["report", "--db", str(reviewed_db.engine.url), "--html",
                                      str(tmp_path / "nowhere" / "x.html")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith("error: cannot write") and "nowhere" in line
