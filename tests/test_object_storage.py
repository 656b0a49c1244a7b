"""Images in a bucket: ingest s3://..., predict, export, push and predict --ray against a
real S3-compatible server process (moto_server, tests/s3server.py), compared with the same
images on disk. Credentials come from the standard AWS variables only, and none is
written anywhere."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from labelassist import objectstore
from labelassist.cli import app
from labelassist.db import Database, open_database, schema_revision, upgrade_schema
from labelassist.db.models import File, Image, Prediction
from labelassist.ingest import ingest
from labelassist.labels import parse_label_text
from labelassist.outputs.export import export
from labelassist.predict.run import predict

from .conftest import add_annotation
from .imagegen import png_bomb, truncated_copy, write_shape_images
from .s3server import ACCESS_KEY, SECRET, aws_env, recorded_requests, s3_client, s3_server

if not os.environ.get("CI"):  # under CI (the test extra has s3fs) a missing s3fs fails
    pytest.importorskip("s3fs")
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\nplain = ["grey"]\n'
BUCKET = "pictures"
runner = CliRunner()


@pytest.fixture(scope="module")
def s3():
    """moto_server for this module, with the AWS variables pointing at it."""
    with s3_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for key, value in aws_env(endpoint).items():
            env.setenv(key, value)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


def upload_tree(endpoint: str, root: Path, prefix: str) -> None:
    """Every file under root as an object under prefix/, keyed by its relative path."""
    client = s3_client(endpoint)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(root).as_posix()}",
                          Body=path.read_bytes())


def pictures(root: Path, count: int) -> Path:
    """count shapes, plus one file of each bad kind that ingest refuses."""
    good = write_shape_images(root, count)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    truncated_copy(good[0], bad / "truncated.jpg")
    (bad / "page.png").write_text("<html>a saved web page</html>")
    png_bomb(bad / "bomb.png")
    (root / "notes.txt").write_text("not an image name: never listed")
    return root


def ledger(db: Database, prefix: str = "/") -> dict:
    """name below the root -> (sha256, error), per file; and sha256 -> (label, scores)."""
    with db.read() as s:
        files = {f.path.split(prefix, 1)[-1]: (f.sha256, f.error)
                 for f in s.scalars(select(File))}
        preds = {sha: (label, scores) for sha, label, scores in s.execute(
            select(Image.sha256, Prediction.label, Prediction.scores).join(Prediction))}
        errors = {sha: error for sha, error in s.execute(select(Image.sha256, Image.error))}
    return {"files": files, "predictions": preds, "image_errors": errors}


def exported(out: Path) -> tuple[list, str]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return sorted((r["file"], r["sha256"], r["label"], r["split"]) for r in rows), \
        "".join(sorted((out / "SHA256SUMS").read_text().splitlines(keepends=True)))


def review_as_predicted(db: Database) -> None:
    with db.read() as s:
        preds = s.execute(select(Prediction.image_id, Prediction.label)).all()
    for n, (image_id, label) in enumerate(preds):
        add_annotation(db, image_id, label, n=n)


def test_a_bucket_gives_what_the_same_files_on_disk_give(s3, tmp_path, tiny_model,
                                                         tiny_clip_dir, monkeypatch):
    """ingest (listed in pages), predict and export from a bucket: the same files, bad
    reasons, predictions and exported dataset as the same images on disk; no secret in
    the ledger, the export or the output."""
    disk = pictures(tmp_path / "disk", 60)
    upload_tree(s3, disk, "run1")
    monkeypatch.setattr(objectstore, "PAGE", 25)  # 65 image names: three list requests
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    url = f"sqlite:///{tmp_path / 'bucket.db'}"

    result = runner.invoke(app, ["ingest", f"s3://{BUCKET}/run1", "--db", url])
    assert result.exit_code == 0, result.output
    assert "60 added" in result.output and "4 errors" in result.output
    local_db, bucket_db = open_database(f"sqlite:///{tmp_path / 'disk.db'}"), open_database(url)
    ingest(local_db, [disk])
    lists = [r for r in recorded_requests(s3) if r["method"] == "GET"
             and "list-type=2" in r["url"] and "prefix=run1%2F" in r["url"]]
    assert len(lists) == 2 * 3  # counted, then walked: three pages of 25 each time
    assert sum("continuation-token" in r["url"] for r in lists) == 2 * 2

    # After ingest, one image changes and one goes, on disk and in the bucket alike.
    changed, gone = "a/img_0001.png", "a/img_0002.jpg"
    client = s3_client(s3)
    client.put_object(Bucket=BUCKET, Key=f"run1/{changed}",
                      Body=(disk / changed).read_bytes() + b"\0")
    (disk / changed).write_bytes((disk / changed).read_bytes() + b"\0")
    client.delete_object(Bucket=BUCKET, Key=f"run1/{gone}")
    (disk / gone).unlink()
    result = runner.invoke(app, ["predict", "--db", url, "--labels", str(labels), "--model",
                                 str(tiny_clip_dir), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    local = predict(local_db, tiny_model, parse_label_text(LABELS))
    assert dict(local.failed) == {"changed": 1, "missing": 1}
    for reason, n in local.failed.items():  # the same reasons, from the bucket
        assert f"skipped {n} ({reason})" in result.output, result.output

    on_disk, in_bucket = ledger(local_db, str(disk)), ledger(bucket_db, f"s3://{BUCKET}/run1")
    assert in_bucket["files"] == on_disk["files"] and len(on_disk["files"]) == 64
    assert {error for _, error in on_disk["files"].values()} == \
        {None, "empty", "truncated", "not_an_image", "decompression_bomb"}
    assert in_bucket["image_errors"] == on_disk["image_errors"]
    assert len(in_bucket["predictions"]) == 58
    for sha, (label, scores) in in_bucket["predictions"].items():
        assert label == on_disk["predictions"][sha][0]
        assert scores == pytest.approx(on_disk["predictions"][sha][1], abs=1e-6)

    for db in (local_db, bucket_db):
        review_as_predicted(db)
    export(local_db, tmp_path / "out-disk", "imagefolder")
    result = runner.invoke(app, ["export", str(tmp_path / "out-bucket"), "--db", url,
                                 "--format", "imagefolder"])
    assert result.exit_code == 0, result.output
    assert exported(tmp_path / "out-bucket") == exported(tmp_path / "out-disk")
    assert len(exported(tmp_path / "out-bucket")[0]) == 58

    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in path.read_bytes(), path
        assert ACCESS_KEY.encode() not in path.read_bytes(), path
    assert SECRET not in result.output


def test_changed_is_the_etag_and_size_not_the_time(s3, tmp_path, db):
    """A rerun reads nothing unchanged; an object copied onto itself (new time, same
    ETag) is unchanged; one rewritten is changed, and predict meets it as changed."""
    write_shape_images(tmp_path / "few", 4)
    upload_tree(s3, tmp_path / "few", "etag")
    first = ingest(db, [f"s3://{BUCKET}/etag"])
    assert first.added == 4
    client = s3_client(s3)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="etag/")
                  ["Contents"])
    with db.read() as s:
        before = {f.path: (f.etag, f.mtime_ns) for f in s.scalars(select(File))}
    time.sleep(1.1)  # S3 times are in seconds: the copy below must get a new one
    client.copy_object(Bucket=BUCKET, Key=keys[0], CopySource={"Bucket": BUCKET,
                                                                "Key": keys[0]},
                       MetadataDirective="REPLACE", Metadata={"touched": "yes"})
    client.put_object(Bucket=BUCKET, Key=keys[1], Body=(tmp_path / "few" / keys[2]
                                                        .split("/", 1)[1]).read_bytes())
    gets = sum(r["method"] == "GET" and "list-type" not in r["url"]
               for r in recorded_requests(s3))

    again = ingest(db, [f"s3://{BUCKET}/etag"])

    assert (again.unchanged, again.changed, again.duplicates) == (3, 1, 0)
    with db.read() as s:
        after = {f.path: (f.etag, f.mtime_ns) for f in s.scalars(select(File))}
    touched = f"s3://{BUCKET}/{keys[0]}"
    assert after[touched] == before[touched]  # not read again, not rewritten
    listed = {o.url: o for o in objectstore.list_objects(f"s3://{BUCKET}/etag", {".png",
                                                                                ".jpg"})}
    assert listed[touched].mtime_ns > before[touched][1]  # though its time is new
    reads = sum(r["method"] == "GET" and "list-type" not in r["url"]
                for r in recorded_requests(s3)) - gets
    assert reads == 1  # only the rewritten object was read

    # predict reads an object only while it has the ingested ETag
    changed = f"s3://{BUCKET}/{keys[3]}"
    etag, size = after[changed][0], client.head_object(Bucket=BUCKET, Key=keys[3])[
        "ContentLength"]
    assert objectstore.read_object(changed, size, etag)
    fs, path = objectstore.filesystem(changed)
    with fs.open(path, "rb") as opened:  # as read_object opens it: If-Match on its ETag
        client.put_object(Bucket=BUCKET, Key=keys[3], Body=b"x" * size)
        with pytest.raises(OSError) as expired:
            opened.read()
    assert objectstore._precondition_failed(expired.value)  # read as "changed"
    with pytest.raises(objectstore.BadImage) as refused:
        objectstore.read_object(changed, size, etag)
    assert refused.value.reason == "changed"


def test_errors_are_one_line_and_credentials_stay_out_of_urls(s3, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    cases = {f"s3://AKIA:{SECRET}@{BUCKET}/run1": "with a user or password in it",
             "s3://no-such-bucket-here/x": "s3://no-such-bucket-here/x does not exist"}
    for target, message in cases.items():
        result = runner.invoke(app, ["ingest", target, "--db", url])
        assert result.exit_code == 1 and message in result.output, result.output
        assert SECRET not in result.output
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    s3fs.S3FileSystem.clear_instance_cache()  # a new process would start with none
    try:
        result = runner.invoke(app, ["ingest", f"s3://{BUCKET}/nothing-here-{os.getpid()}",
                                     "--db", url])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # the next test's has credentials again
    assert result.exit_code == 1 and "AWS_ACCESS_KEY_ID" in result.output, result.output


def test_migration_adds_and_removes_the_etag_column(db_url):
    from alembic import command
    from sqlalchemy import inspect

    from labelassist.db import alembic_config

    db = Database(db_url)
    upgrade_schema(db, "0009")
    assert "etag" not in {c["name"] for c in inspect(db.engine).get_columns("files")}
    upgrade_schema(db)
    assert schema_revision(db) == "0010"
    assert "etag" in {c["name"] for c in inspect(db.engine).get_columns("files")}
    cfg = alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    db.engine.dispose()
    assert "etag" not in {c["name"] for c in inspect(db.engine).get_columns("files")}
    assert schema_revision(db) == "0009"


@pytest.mark.labelstudio
def test_push_uploads_objects_from_the_bucket(s3, db, tiny_model, tmp_path, label_studio,
                                              request):
    """Objects go to Label Studio as uploads (also when its local files are set up),
    and reviewers see the very bytes that were predicted."""
    import httpx

    from labelassist.db.queries import resolve_version
    from labelassist.labelstudio import ImageSource, list_remote_tasks, push
    from labelassist.labelstudio.client import Connection, LabelStudioClient

    write_shape_images(tmp_path / "three", 3)
    upload_tree(s3, tmp_path / "three", "push")
    ingest(db, [f"s3://{BUCKET}/push"])
    predict(db, tiny_model, parse_label_text(LABELS))
    client = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    try:
        summary = push(db, client, resolve_version(db), ImageSource("local", label_studio.root),
                       title=request.node.name)
        tasks = list_remote_tasks(client, summary.project_id)
    finally:
        client.close()
    assert summary.tasks_created == 3 and len(tasks) == 3
    bucket = s3_client(s3)
    for task in tasks:
        assert task["data"]["path"].startswith(f"s3://{BUCKET}/push/")
        assert task["data"]["image"].startswith("/data/upload/")
        shown = httpx.get(label_studio.url + task["data"]["image"],
                          headers={"Authorization": f"Token {label_studio.token}"})
        key = task["data"]["path"].split(f"s3://{BUCKET}/", 1)[1]
        assert shown.content == bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_predict_ray_nodes_read_the_objects_themselves(s3, tmp_path, tiny_clip_dir,
                                                       tiny_model):
    """A two-node local Ray cluster whose nodes have the AWS variables, and a driver that
    has none: the actors read the objects from the bucket, and the predictions are those
    of the same images on disk."""
    import subprocess
    import sys

    from .raycluster import LocalCluster

    if not os.environ.get("CI"):  # under CI a missing Ray fails, never skips
        pytest.importorskip("ray")
    disk = tmp_path / "disk"
    write_shape_images(disk, 12)
    upload_tree(s3, disk, "ray")
    urls = {side: f"sqlite:///{tmp_path / side}.db" for side in ("disk", "bucket")}
    ingest(open_database(urls["disk"]), [disk])
    ingest(open_database(urls["bucket"]), [f"s3://{BUCKET}/ray"])
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS)
    cluster = LocalCluster(Path(f"/tmp/la-s3ray-{os.getpid()}"))  # nodes get AWS_*
    try:
        driver_env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                      **cluster.auth, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "labelassist"), "predict", "--ray",
             cluster.address, "--db", urls["bucket"], "--labels", str(labels), "--model",
             str(tiny_clip_dir), "--dtype", "fp32"],
            check=False, env=driver_env, capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stderr
    assert "Ray: 2 encoder actors on cpu, 2 nodes" in done.stderr
    assert "12 predicted" in done.stderr, done.stderr
    local = predict(open_database(urls["disk"]), tiny_model, parse_label_text(LABELS))
    assert local.encoded == 12
    on_disk = ledger(open_database(urls["disk"]))["predictions"]
    on_ray = ledger(open_database(urls["bucket"]))["predictions"]
    assert on_ray.keys() == on_disk.keys()
    for sha, (label, scores) in on_ray.items():
        assert label == on_disk[sha][0]
        assert scores == pytest.approx(on_disk[sha][1], abs=1e-5)
