import os
import time

from sqlalchemy import func, select

from labelassist.db.models import File, Image
from labelassist.ingest import ingest

from .imagegen import png_bomb, shape_image, truncated_copy, write_shape_images


def count(db, model, *where):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_nested_tree_duplicates_and_odd_names(db, tmp_path):
    root = tmp_path / "tree"
    paths = write_shape_images(root, 9)
    deep = root / "x" / "y" / "z"
    deep.mkdir(parents=True)
    shape_image(100, size=(123, 45)).save(deep / "Zürich café 北京 (1).png")
    (deep / "copy of img 0.jpg").write_bytes(paths[0].read_bytes())  # same content
    (root / "notes.txt").write_text("not an image extension: ignored")

    summary = ingest(db, [root])

    assert summary.seen == 11
    assert (summary.added, summary.duplicates, summary.error_count) == (10, 1, 0)
    assert count(db, Image) == 10
    assert count(db, File) == 11
    with db.read() as s:
        unicode_file = s.scalars(select(File).where(File.path.like("%Zürich café 北京 (1).png"))).one()
        image = s.get(Image, unicode_file.image_id)
        copy = s.scalars(select(File).where(File.path.like("%copy of img 0.jpg"))).one()
        original = s.scalars(select(File).where(File.path == str(paths[0]))).one()
    assert (image.width, image.height) == (123, 45)
    assert copy.image_id == original.image_id and copy.sha256 == original.sha256


def test_each_bad_file_kind_is_recorded_with_its_reason(db, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = write_shape_images(tmp_path / "good", 2)  # img_0000.jpg, img_0001.png
    (root / "empty.jpg").write_bytes(b"")
    truncated_copy(good[0], root / "truncated.jpg")
    truncated_copy(good[1], root / "truncated.png")
    (root / "page.jpg").write_text("<html><body>saved web page</body></html>")
    png_bomb(root / "bomb.png")

    summary = ingest(db, [root, tmp_path / "good"])

    assert summary.added == 2
    assert dict(summary.errors) == {"empty": 1, "truncated": 2, "not_an_image": 1,
                                    "decompression_bomb": 1}
    with db.read() as s:
        reasons = {os.path.basename(f.path): (f.error, f.image_id)
                   for f in s.scalars(select(File).where(File.error.is_not(None)))}
    assert reasons == {"empty.jpg": ("empty", None), "truncated.jpg": ("truncated", None),
                       "truncated.png": ("truncated", None), "page.jpg": ("not_an_image", None),
                       "bomb.png": ("decompression_bomb", None)}
    assert "--max-pixels" in summary.error_examples["decompression_bomb"]


def test_reingest_is_idempotent_and_detects_changes(db, tmp_path):
    root = tmp_path / "photos"
    paths = write_shape_images(root, 6)
    first = ingest(db, [root])
    assert first.added == 6

    again = ingest(db, [root])
    assert (again.added, again.unchanged, again.changed, again.duplicates) == (0, 6, 0, 0)
    assert count(db, File) == 6 and count(db, Image) == 6

    with db.read() as s:
        old_sha = s.scalars(select(File.sha256).where(File.path == str(paths[1]))).one()
    shape_image(999).save(paths[1])  # new content, same path
    stamp = time.time() + 5
    os.utime(paths[1], (stamp, stamp))
    os.utime(paths[2], (stamp, stamp))  # touched only: same bytes

    changed = ingest(db, [root])

    assert (changed.changed, changed.unchanged, changed.added) == (1, 5, 0)
    with db.read() as s:
        row = s.scalars(select(File).where(File.path == str(paths[1]))).one()
        assert row.sha256 != old_sha
        assert s.get(Image, row.image_id).sha256 == row.sha256
    assert count(db, Image) == 7  # the old content stays: its predictions remain valid


def test_progress_reports_every_file(db, photo_dir):
    calls = []
    ingest(db, [photo_dir], on_progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (24, 24)


def test_a_huge_file_that_is_no_image_is_refused_from_its_header(db, tmp_path):
    import resource

    root = tmp_path / "big"
    root.mkdir()
    with open(root / "video-renamed.jpg", "wb") as fh:  # 2 GiB, sparse: no disk used
        fh.truncate(2 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark

    summary = ingest(db, [root])

    assert dict(summary.errors) == {"not_an_image": 1}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"ingest read the whole file ({grown_mib:.0f} MiB more memory)"


def test_many_files_are_checked_in_worker_processes_with_the_same_result(db, tmp_path):
    from labelassist.db import open_database

    root = tmp_path / "many"
    write_shape_images(root, 40)
    truncated_copy(next(root.rglob("img_0004.jpg")), root / "cut.jpg", keep=0.5)
    (root / "text.png").write_text("not an image")
    threads = ingest(db, [root], processes=False)
    other = open_database(f"sqlite:///{tmp_path / 'processes.db'}")
    in_processes = ingest(other, [root], processes=True, workers=2)
    for summary in (threads, in_processes):
        assert (summary.added, summary.error_count) == (40, 2)
        assert dict(summary.errors) == {"truncated": 1, "not_an_image": 1}
    with db.read() as s, other.read() as t:
        mine = s.execute(select(File.path, File.sha256, File.error).order_by(File.path)).all()
        theirs = t.execute(select(File.path, File.sha256, File.error).order_by(File.path)).all()
    assert mine == theirs and len(mine) == 42
