"""The command line as users type it: flags and behaviours that no other test reaches.

Each test drives real commands (typer's CliRunner, or a subprocess where signals matter)
on real files and a real SQLite ledger, and checks what the flag is for.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.db import open_database
from labelassist.db.models import Claim, File, Prediction

from .imagegen import shape_image, write_shape_images

runner = CliRunner()


def invoke(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result


def count(db, model=Prediction):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model))


# ---- ingest and status ---------------------------------------------------------------

def test_ingest_reads_every_format_and_refuses_what_is_too_big(tmp_path, db_url):
    photos = tmp_path / "photos"
    photos.mkdir()
    for n, name in enumerate(["a.webp", "b.bmp", "c.tif", "d.jpeg", "E.PNG", "f.JPG",
                              "g.Jpeg"]):
        shape_image(n).save(photos / name)
    Image.new("RGB", (400, 400), (1, 2, 3)).save(photos / "huge.png")  # 160,000 pixels
    (photos / "notes.txt").write_text("not an image, never read")

    result = invoke("ingest", photos, "--db", db_url, "--max-pixels", 100_000,
                    "--workers", 1)

    assert result.exit_code == 0, result.output
    db = open_database(db_url)
    with db.read() as s:
        files = dict(s.execute(select(File.path, File.error)).all())
    assert len(files) == 8  # the .txt is not walked at all
    assert files[str(photos / "huge.png")] == "decompression_bomb"
    assert sum(error is None for error in files.values()) == 7
    assert "--max-pixels" in result.output  # the refusal names the flag that lifts it

    zero = invoke("ingest", photos, "--db", db_url, "--max-pixels", 0)
    assert zero.exit_code == 2 and "--max-pixels" in zero.output  # refused, nothing read

    status = invoke("status", "--db", db_url)
    assert status.exit_code == 0, status.output
    assert "files: 8   images: 7" in status.output
    assert "file errors: decompression_bomb 1" in status.output


def test_transparent_pixels_are_put_on_white():
    from labelassist.images import decode, open_image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent
    rgba.putpixel((0, 0), (255, 0, 0, 128))          # half-transparent red
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    rgb = decode(open_image(buffer.getvalue(), 10_000), draft_size=None)
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)
    red, green, blue = rgb.getpixel((0, 0))
    assert red == 255 and 120 <= green <= 135 and green == blue


# ---- predict, run and worker -----------------------------------------------------------

def test_predict_flags_and_a_file_changed_after_ingest(tmp_path, db_url, tiny_clip_dir,
                                                       labels_file, photo_dir):
    assert invoke("ingest", photo_dir, "--db", db_url).exit_code == 0
    changed = sorted(p for p in photo_dir.rglob("*") if p.is_file())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # edited after ingest

    result = invoke("predict", "--db", db_url, "--labels", labels_file, "--model",
                    tiny_clip_dir, "--device", "auto", "--dtype", "auto", "--exact",
                    "--threads", 1)

    assert result.exit_code == 0, result.output
    assert "23 predicted" in result.output and "1 failed" in result.output
    assert "skipped 1 (changed)" in result.output and "ingest again" in result.output
    # --exact is fp32 on the CPU whatever --dtype says: the version records the model.
    assert invoke("ingest", photo_dir, "--db", db_url).exit_code == 0
    again = invoke("predict", "--db", db_url, "--labels", labels_file, "--model",
                   tiny_clip_dir, "--exact")
    assert again.exit_code == 0 and "1 predicted" in again.output, again.output


def test_run_with_an_explicit_feed_and_device(tmp_path, db_url, tiny_clip_dir, labels_file,
                                              photo_dir):
    result = invoke("run", photo_dir, "--db", db_url, "--labels", labels_file, "--model",
                    tiny_clip_dir, "--device", "cpu", "--dtype", "fp32", "--feed",
                    "processes", "--decode-workers", 1, "--batch-size", 5)
    assert result.exit_code == 0, result.output
    assert "24 predicted" in result.output
    bad = invoke("run", photo_dir, "--db", db_url, "--labels", labels_file, "--model",
                 tiny_clip_dir, "--feed", "telepathy")
    assert bad.exit_code == 1 and "--feed" in bad.output


@pytest.mark.slow
def test_worker_flags_and_a_second_sigterm_stops_at_once(tmp_path, tiny_clip_dir,
                                                         labels_file):
    """The first SIGTERM asks for a clean stop after the batch in flight; a second one
    (an impatient operator, or a supervisor's escalation) stops at once, without a
    traceback, and a rerun finishes the work with nothing done twice."""
    write_shape_images(tmp_path / "photos", 400)
    db_url = f"sqlite:///{tmp_path / 'w.db'}"
    env = {**os.environ, "LABELASSIST_DB": db_url, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "labelassist.cli"]
    subprocess.run(cli + ["ingest", str(tmp_path / "photos")], env=env, check=True,
                   capture_output=True)
    db = open_database(db_url)
    worker = subprocess.Popen(cli + ["worker", "--labels", str(labels_file), "--model",
                                     str(tiny_clip_dir), "--batch-size", "2", "--dtype",
                                     "fp32", "--feed", "threads", "--decode-workers", "1",
                                     "--poll", "0.2"],
                              env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # only against a hang
    while count(db) < 10 and worker.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, "the worker exited before it was stopped"
    worker.send_signal(signal.SIGSTOP)  # both signals land while it works
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGCONT)
    time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode != 0 and "Traceback" not in stderr, stderr
    assert "stopping after the batch in flight" in stderr
    assert count(db) < 400
    rerun = subprocess.run(cli + ["predict", "--labels", str(labels_file), "--model",
                                  str(tiny_clip_dir)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    with db.read() as s:
        per_image = s.execute(select(Prediction.image_id, func.count())
                              .group_by(Prediction.image_id)).all()
    assert len(per_image) == 400 and {n for _, n in per_image} == {1}
    assert count(db, Claim) == 0


# ---- report and export ------------------------------------------------------------------

def version_of(db):
    from labelassist.db.queries import resolve_version

    return resolve_version(db).name


def test_report_flags(reviewed_db, db_url):
    version = version_of(reviewed_db)
    result = invoke("report", "--db", db_url, "--json", "-", "--version", version,
                    "--resolve", "latest", "--target-precision", "0.9", "--min-support", 2)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["model_version"] == version and data["reviewed"] == 24
    # "latest": the image labelled twice takes its newest label, "dog"
    majority = invoke("report", "--db", db_url, "--json", "-", "--resolve", "majority")
    assert json.loads(majority.stdout[majority.stdout.index("{"):])["reviewed"] == 24
    strict = invoke("report", "--db", db_url, "--min-support", 1000)
    assert strict.exit_code == 0, strict.output
    for name in ("cat", "dog", "<b>wild</b>"):  # the terminal says why a threshold is "-"
        assert f"no threshold for {name}: no threshold reaches 99% precision on 1000+ " \
               "reviews (the model predicted this class for" in strict.output
    for bad in ("1.5", "0"):
        out = invoke("report", "--db", db_url, "--target-precision", bad)
        assert out.exit_code == 1 and "--target-precision must be in (0, 1]" in out.output
    unknown = invoke("report", "--db", db_url, "--version", "nope@1")
    assert unknown.exit_code == 1 and "no model_version 'nope@1'" in unknown.output
    policy = invoke("report", "--db", db_url, "--resolve", "loudest")
    assert policy.exit_code == 1 and "--resolve 'loudest'" in policy.output


def test_resolve_latest_and_majority_with_its_tie_break(reviewed_db, db_url, tmp_path):
    """Two unreviewed images get conflicting reviews: one 2 to 1 (the one newest review
    dissents), one tied 1 to 1, its newer review entered first. --resolve majority takes
    the two, and the newer of a tie; --resolve latest takes the newest. Report and export
    both follow the flag."""
    from datetime import datetime, timedelta, timezone

    from labelassist.db.models import Image

    from .conftest import add_annotation

    with reviewed_db.read() as s:
        preds = s.scalars(select(Prediction).order_by(Prediction.image_id)).all()
        shas = dict(s.execute(select(Image.id, Image.sha256)).all())
    two_to_one, tie = preds[26].image_id, preds[27].image_id  # never reviewed before
    day = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for n, (image_id, label, days) in enumerate([
            (two_to_one, "cat", 0), (two_to_one, "cat", 0), (two_to_one, "dog", 1),
            (tie, "dog", 3), (tie, "cat", 2)]):
        add_annotation(reviewed_db, image_id, label, n=200 + n, annotator=f"a{n}",
                       when=day + timedelta(days=days))

    def resolved(policy):
        out = tmp_path / policy
        done = invoke("export", out, "--db", db_url, "--format", "jsonl", "--resolve", policy)
        assert done.exit_code == 0, done.output
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        by_sha = {r["sha256"]: r["label"] for r in rows}
        report = invoke("report", "--db", db_url, "--json", "-", "--resolve", policy)
        per_class = json.loads(report.stdout[report.stdout.index("{"):])["per_class"]
        return (by_sha[shas[two_to_one]], by_sha[shas[tie]]), \
            {c: per_class[c]["support"] for c in ("cat", "dog")}

    (majority, supports), (latest, latest_supports) = resolved("majority"), resolved("latest")
    assert majority == ("cat", "dog") and latest == ("dog", "dog")
    assert latest_supports == {"cat": supports["cat"] - 1, "dog": supports["dog"] + 1}


def test_export_flags_links_overwrite_and_exclusions(reviewed_db, db_url, tmp_path):
    version = version_of(reviewed_db)
    out = tmp_path / "d"
    first = invoke("export", out, "--db", db_url, "--format", "imagefolder", "--seed", 3,
                   "--resolve", "latest", "--version", version, "--link", "hardlink")
    assert first.exit_code == 0, first.output
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["model_version"] for r in rows} == {version}
    for r in rows:  # a hard link: the same inode as the source
        assert os.stat(out / r["file"]).st_ino == os.stat(r["path"]).st_ino

    sources = sorted({r["path"] for r in rows})
    with open(sources[0], "ab") as fh:
        fh.write(b"\0")  # changed since ingest
    os.remove(sources[1])  # gone
    again = invoke("export", out, "--db", db_url, "--link", "symlink", "--overwrite")
    assert again.exit_code == 0, again.output
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 22
    assert all((out / r["file"]).is_symlink() and os.path.samefile(out / r["file"], r["path"])
               for r in rows)
    assert "1 file changed since ingest" in again.output
    assert "1 source file gone or unreadable" in again.output


def test_nothing_to_export_is_a_clear_error(db, db_url, tiny_model, photo_dir, tmp_path):
    from labelassist.labels import parse_label_text
    from labelassist.ingest import ingest
    from labelassist.predict.run import predict

    ingest(db, [photo_dir])
    predict(db, tiny_model, parse_label_text('[classes]\ncat = ["cat"]\ndog = ["dog"]\n'))
    result = invoke("export", tmp_path / "out", "--db", db_url)
    assert result.exit_code == 1 and "nothing to export" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("args, message", [
    (["--format", "parquet"], "--format 'parquet'"),
    (["--link", "teleport"], "--link 'teleport'"),
    (["--split", "0.5,0.6"], "add up to 1"),
    (["--split", "nan"], "add up to 1"),          # NaN compares false with everything
    (["--split", "nan,0.5,0.5"], "add up to 1"),
])
def test_export_refuses_bad_values(reviewed_db, db_url, tmp_path, args, message):
    result = invoke("export", tmp_path / "out", "--db", db_url, *args)
    assert result.exit_code == 1 and message in result.output


def test_db_migrate_to_another_sqlite_file_then_refuse_a_full_one(reviewed_db, db_url,
                                                                  tmp_path):
    from labelassist.db.models import Annotation, Embedding, Image, ModelVersion

    target = f"sqlite:///{tmp_path / 'copy.db'}"
    result = invoke("db", "migrate-to", target, "--db", db_url)
    assert result.exit_code == 0, result.output
    copy = open_database(target)
    for model in (Image, File, Prediction, Embedding, ModelVersion, Annotation):
        assert count(copy, model) == count(reviewed_db, model), model.__name__
    again = invoke("db", "migrate-to", target, "--db", db_url)
    assert again.exit_code == 1 and "empty" in again.output


# ---- a newcomer's mistakes: one line, exit 1, no traceback, nothing written ----------

def assert_one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.output


def test_a_db_file_that_is_not_a_database(tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_text("shopping list\n" * 100)
    before = notes.read_bytes()
    result = invoke("status", "--db", f"sqlite:///{notes}")
    assert_one_line_error(result, f"{notes} is not a labelassist database")
    assert notes.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal, no -shm


def test_run_checks_the_label_file_before_it_ingests(tmp_path, photo_dir):
    bad = tmp_path / "labels.toml"
    bad.write_text("[classes]\ncat = [\n")
    db = tmp_path / "w.db"
    result = invoke("run", photo_dir, "--labels", bad, "--db", f"sqlite:///{db}")
    assert_one_line_error(result, "not valid TOML")
    assert "files:" not in result.output and not db.exists()  # nothing ingested


def test_ingest_of_one_named_file_that_is_no_image_is_an_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = invoke("ingest", text, "--db", f"sqlite:///{tmp_path / 'w.db'}")
    assert_one_line_error(result, f"{text} is not an image")


def test_studio_refuses_a_root_that_is_no_folder_before_it_starts_anything(tmp_path):
    """A typo in --root started Label Studio serving nothing: every image of every pushed
    task was then broken in the browser, with no word about why."""
    data = tmp_path / "data"
    result = invoke("studio", "--root", tmp_path / "datsets", "--data-dir", data,
                    "--port", "9")
    assert_one_line_error(result, f"--root {tmp_path / 'datsets'} is not a folder")
    assert not data.exists()  # no Label Studio data made, nothing started


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_model_that_cannot_be_had_is_one_honest_line(tmp_path, offline):
    """No hub here: a hub id that is not cached fails at once and in one line, and the
    message never claims HF_HUB_OFFLINE is set when it is not."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                              "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "empty-cache")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    write_shape_images(tmp_path / "photos", 2)
    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\ncat = ["cat"]\ndog = ["dog"]\n')
    run = subprocess.run([sys.executable, "-m", "labelassist.cli", "run", str(tmp_path / "photos"),
                          "--labels", str(labels), "--model", "openai/clip-vit-base-patch32",
                          "--db", f"sqlite:///{tmp_path / 'w.db'}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model openai/clip-vit-base-patch32 is not in the local cache")
    assert ("HF_HUB_OFFLINE=1 forbids" in last) == offline
    assert ("cannot be reached from this machine" in last) == (not offline)
    assert "retry" not in run.stderr.lower()
