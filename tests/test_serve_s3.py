"""`labelassist serve` for a project whose images live in an S3 bucket, through Label
Studio's own S3 storage (issue 33, item 2): a real S3-compatible server (moto_server, its
own process), Label Studio's storage pointed at it (s3_endpoint) with presigned links, a
sync, and a serve process added to the project by hand, as Label Studio's Model settings
add one. Label Studio answers each image's link with a redirect to a presigned URL on the
storage host; serve follows it without the Label Studio token, which the storage
server's own record of every request it got (headers included) shows."""

from __future__ import annotations

import io
import json
import uuid

import pytest

from .imagegen import shape_image
from .s3server import ACCESS_KEY, REGION, recorded_requests, s3_client, s3_server
from .s3server import SECRET as S3_SECRET
from .served_project import SECRET, StudioProject

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image"><Choice value="warm"/><Choice value="cool"/></Choices>
</View>"""


def put_images(endpoint: str) -> None:
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket="pictures")
    for i, kind in enumerate(["PNG", "JPEG", "PNG", "JPEG"]):
        buffer = io.BytesIO()
        shape_image(i).save(buffer, kind)
        s3.put_object(Bucket="pictures", Key=f"shapes/{i}.{kind.lower()}",
                      Body=buffer.getvalue())
    s3.put_object(Bucket="pictures", Key="shapes/notes.png", Body=b"not a picture\n")


def test_an_s3_project_is_served_through_presigned_links_without_the_token(
        tmp_path, label_studio, tiny_clip_dir):
    with s3_server() as endpoint:
        put_images(endpoint)
        project = StudioProject(label_studio, tmp_path, f"bucket {uuid.uuid4().hex[:8]}",
                                CONFIG)
        try:
            project.add_storage("s3", {
                "bucket": "pictures", "prefix": "shapes", "s3_endpoint": endpoint,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": S3_SECRET,
                "region_name": REGION, "use_blob_urls": True, "presign": True,
                "title": "bucket"}, expect=5)
            project.serve("--project", str(project.id), "--model", str(tiny_clip_dir),
                          "--no-connect")
            # what Settings > Model > Connect Model sends: the URL and basic auth
            project.http.post("/api/ml", json={
                "project": project.id, "url": project.url, "title": "added by hand",
                "auth_method": "BASIC_AUTH", "basic_auth_user": "labelassist",
                "basic_auth_pass": SECRET, "is_interactive": False}).raise_for_status()
            project.retrieve_predictions()
            tasks, status = project.tasks(), project.status()
        finally:
            project.stop()
        requests = recorded_requests(endpoint)

    pictures = [t for t in tasks if "notes" not in t["storage_filename"]]
    assert len(pictures) == 4
    for task in pictures:
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("tiny-clip@") and prediction["score"]
        assert prediction["result"][0]["value"]["choices"][0] in ("warm", "cool")
    assert status["images_fetched"] == 4
    assert status["images_refused"] == 1  # notes.png: not an image, not kept
    assert sorted(p.suffix for p in (tmp_path / "labelassist-fetched").rglob("*.*")) == \
        [".jpg", ".jpg", ".png", ".png"]

    fetched = [r for r in requests if r["method"] == "GET" and "/pictures/shapes/" in r["url"]]
    assert len(fetched) == 5  # each object once, by serve, through its presigned URL
    assert all("X-Amz-Signature=" in r["url"] for r in fetched)
    assert not any({"authorization", "cookie"} & {h.lower() for h in r["headers"]}
                   for r in fetched)  # the presigned URL is the only credential sent
    assert label_studio.token not in json.dumps(requests)  # in no request to the storage
