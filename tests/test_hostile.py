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
