"""A corpus of hostile inputs: each is recorded with a reason or handled, never fatal."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.db.models import File, Prediction
from labelassist.db.models import Image as ImageRow
from labelassist.images import decode, open_image, read_bytes
from labelassist.ingest import ingest
from labelassist.predict.run import predict

from .imagegen import png_bomb, shape_image, truncated_copy

LABELS = parse_label_text('[classes]\nwarm = ["red"]\ncool = ["blue"]\n')


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = root / "good.jpg"
    shape_image(1, size=(120, 90)).save(good)
    (root / "zero.jpg").write_bytes(b"")
    truncated_copy(good, root / "truncated.jpg")
    shape_image(2).save(root / "full.png")
    truncated_copy(root / "full.png", root / "truncated.png")
    (root / "full.png").unlink()
    (root / "page.jpg").write_text("<!DOCTYPE html><html><body>not a photo</body></html>")
    png_bomb(root / "bomb.png")
    Image.new("L", (20000, 20000), 127).save(root / "huge.jpg", quality=30)
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    ramp = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "sixteen.png")
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    Image.new("RGB", (80, 40), (200, 30, 30)).save(root / "rotated.jpg", exif=exif)
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    os.symlink(root, root / "dir_loop")  # a directory that contains itself
    shape_image(3).save(os.path.join(os.fsencode(root), b"caf\xe9-latin1.png"))
    return root


def by_name(db):
    with db.read() as s:
        return {os.path.basename(f.path): f for f in s.scalars(select(File))}


def test_every_hostile_file_is_recorded_and_the_run_finishes(db, corpus, tiny_model):
    summary = ingest(db, [corpus])
    files = by_name(db)
    expected_errors = {"zero.jpg": "empty", "truncated.jpg": "truncated",
                       "truncated.png": "truncated", "page.jpg": "not_an_image",
                       "bomb.png": "decompression_bomb", "huge.jpg": "decompression_bomb",
                       "loop_a.jpg": "unreadable", "loop_b.jpg": "unreadable"}
    for name, reason in expected_errors.items():
        assert files[name].error == reason, (name, files[name].error_detail)
        assert files[name].error_detail
    readable = {"good.jpg", "cmyk.jpg", "sixteen.png", "animated.gif", "rotated.jpg",
                "caf\\xe9-latin1.png"}
    assert {n for n, f in files.items() if f.error is None} == readable
    assert "20000x20000" in files["huge.jpg"].error_detail
    assert summary.added == len(readable)

    result = predict(db, tiny_model, LABELS)
    assert result.encoded == len(readable) and not result.failed
    with db.read() as s:
        assert len(s.scalars(select(Prediction)).all()) == len(readable)


def test_the_odd_but_valid_images_decode_correctly(db, corpus):
    ingest(db, [corpus])
    files = by_name(db)
    with db.read() as s:
        rotated = s.get(ImageRow, files["rotated.jpg"].image_id)
    assert (rotated.width, rotated.height) == (40, 80)  # EXIF orientation applied
    upright = decode(open_image(read_bytes(str(corpus / "rotated.jpg"))))
    assert upright.size == (40, 80)
    cmyk = decode(open_image(read_bytes(str(corpus / "cmyk.jpg"))))
    r, g, b = cmyk.getpixel((10, 10))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    ramp = np.asarray(decode(open_image(read_bytes(str(corpus / "sixteen.png")))))
    assert ramp[0, 0, 0] == 0 and ramp[-1, -1, 0] == 255  # scaled, not clipped to white
    assert 100 < ramp[16, 0, 0] < 156
    gif = decode(open_image(read_bytes(str(corpus / "animated.gif"))))
    assert gif.getpixel((5, 5)) == (255, 0, 0)  # the first frame


def test_non_utf8_file_name_round_trips(db, corpus, tiny_model):
    ingest(db, [corpus])
    row = by_name(db)["caf\\xe9-latin1.png"]
    assert row.raw_path == os.path.join(os.fsencode(corpus), b"caf\xe9-latin1.png")
    assert predict(db, tiny_model, LABELS).failed == {}


def test_unreadable_permissions(tmp_path):
    """Root reads everything, so the check runs in a child that drops to nobody."""
    import shutil
    import tempfile
    import traceback

    # pytest's own temp folders are private to root: nobody needs a world-writable one.
    root = Path(tempfile.mkdtemp(prefix="labelassist-perm-", dir="/tmp"))
    os.chmod(root, 0o777)
    request_cleanup = lambda: shutil.rmtree(root, ignore_errors=True)  # noqa: E731
    shape_image(4).save(root / "secret.jpg")
    shape_image(5).save(root / "open.jpg")
    os.chmod(root / "secret.jpg", 0o000)
    url = f"sqlite:///{root / 'perm.db'}"
    open_database(url).dispose()  # schema and sqlite3 in place before privileges drop
    for created in root.glob("perm.db*"):
        os.chmod(created, 0o666)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            ingest(open_database(url), [root], workers=1)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    files = by_name(open_database(url))
    request_cleanup()
    assert files["secret.jpg"].error == "unreadable"
    assert "ermission" in files["secret.jpg"].error_detail
    assert files["open.jpg"].error is None


INGEST_IN_A_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a runaway read fails, not the box
from labelassist.db import open_database
from labelassist.ingest import ingest
ingest(open_database(sys.argv[1]), [sys.argv[2]], processes=sys.argv[3] == "processes", workers=2)
"""


@pytest.mark.parametrize("checker", ["threads", "processes"])
def test_a_fifo_and_a_link_to_a_device_are_recorded_not_read(tmp_path, checker):
    """A FIFO would block its reader for ever and /dev/zero never ends: only regular files
    are read. Ingest runs in a child with a deadline so that a hang fails this test."""
    import subprocess
    import sys

    root = tmp_path / "special"
    root.mkdir()
    shape_image(6).save(root / "good.png")
    os.mkfifo(root / "x.png")
    os.symlink("/dev/zero", root / "z.png")
    url = f"sqlite:///{tmp_path / 'special.db'}"
    child = subprocess.Popen([sys.executable, "-c", INGEST_IN_A_CHILD, url, str(root), checker],
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)  # its pool workers too, which would hang on after it
        child.communicate()
        pytest.fail("ingest hung on a FIFO or a device")
    assert child.returncode == 0, stderr[-2000:]
    files = by_name(open_database(url))
    assert files["good.png"].error is None
    assert files["x.png"].error == "not_a_file" and "FIFO" in files["x.png"].error_detail
    assert files["z.png"].error == "not_a_file"
    assert "character device" in files["z.png"].error_detail


def test_a_file_is_read_only_as_far_as_stat_said(tmp_path):
    """A file that grows between stat and read is not read past its stated size."""
    from labelassist.ingest import _check, _stat

    path = tmp_path / "growing.png"
    shape_image(7).save(path)
    seen = _stat(os.fsencode(path))
    with open(path, "ab") as fh:
        fh.write(b"\0" * 1000)
    checked = _check(seen, max_pixels=10**8)
    assert checked.error[0] == "changed" and "grew past" in checked.error[1]


def test_a_non_utf8_name_and_its_escape_spelled_out_are_two_files(db, tmp_path):
    """b"caf\\xe9.png" and a file literally named "caf\\\\xe9.png" read alike; so do two
    non-UTF-8 names that differ only in where the backslash is. Each is its own file."""
    root = tmp_path / "names"
    root.mkdir()
    raw = [os.path.join(os.fsencode(root), name)
           for name in (b"caf\xe9.png", b"a\xe9\\xe9.png", b"a\\xe9\xe9.png")]
    for n, path in enumerate(raw):
        shape_image(10 + n).save(path)
    shape_image(20).save(root / "caf\\xe9.png")

    first = ingest(db, [root])
    again = ingest(db, [root])

    assert (first.added, first.error_count) == (4, 0)
    assert (again.unchanged, again.added, again.changed) == (4, 0, 0)
    with db.read() as s:
        rows = s.scalars(select(File)).all()
    assert sorted(r.raw_path for r in rows if r.raw_path) == sorted(raw)
    assert len({r.path for r in rows}) == 4 and len({r.sha256 for r in rows}) == 4
    shown = sorted(os.path.basename(r.path) for r in rows)
    assert shown.count("caf\\xe9.png") == 2  # people still read the name as before


def test_a_ledger_from_before_marked_names_still_ingests(db, tmp_path):
    """Rows written when a non-UTF-8 name was stored as its plain escape do not block the
    file that is literally named so."""
    from sqlalchemy import update

    root = tmp_path / "legacy"
    root.mkdir()
    raw = os.path.join(os.fsencode(root), b"caf\xe9.png")
    shape_image(30).save(raw)
    ingest(db, [root])
    escaped = raw.decode("utf-8", "backslashreplace")
    with db.write() as s:  # as older versions recorded it
        s.execute(update(File).values(path=escaped))
    shape_image(31).save(root / "caf\\xe9.png")

    summary = ingest(db, [root])

    assert (summary.added, summary.unchanged, summary.error_count) == (1, 1, 0)
    with db.read() as s:
        paths = {r.raw_path: r.path for r in s.scalars(select(File))}
    assert paths[None] == escaped and paths[raw] != escaped
