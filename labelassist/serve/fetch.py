"""Images of tasks that labelassist did not push, fetched through Label Studio only."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx

from ..errors import LabelAssistError, LabelStudioError
from ..labelstudio import LabelStudioClient

MAX_IMAGE_BYTES = 64 * 1024 * 1024
IMAGE_TYPES = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp",
               "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tif"}


class RefusedImage(LabelAssistError):
    """A task's image that this server will not fetch (not Label Studio's own address)."""


def fetch_image(client: LabelStudioClient, task: dict, fetch_dir: Path) -> Path:
    """The task's image bytes, from Label Studio's own address only, saved under
    fetch_dir by content hash. Never a local path, never another host."""
    url = image_url(task, client.conn.url)
    try:
        kind, digest, chunks = _download(client, url)
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"cannot fetch the image at {url}: {exc}") from None
    suffix = IMAGE_TYPES.get(kind) or Path(urlparse(url).path).suffix.lower() or ".img"
    sha = digest.hexdigest()
    path = fetch_dir / sha[:2] / f"{sha}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{threading.get_ident()}.partial")
        partial.write_bytes(b"".join(chunks))
        partial.replace(path)
    return path


def _download(client: LabelStudioClient, url: str):
    with httpx.Client(timeout=30, headers={
            "Authorization": f"Token {client.conn.token}"}) as http:
        with http.stream("GET", url) as response:
            if response.status_code != 200:
                raise LabelStudioError(f"Label Studio answered {response.status_code} "
                                       f"for the image at {url}")
            kind = response.headers.get("content-type", "").split(";")[0].strip()
            chunks, size, digest = [], 0, hashlib.sha256()
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise RefusedImage(f"the image at {url} is over "
                                       f"{MAX_IMAGE_BYTES >> 20} MiB")
                digest.update(chunk)
                chunks.append(chunk)
    return kind, digest, chunks


def image_url(task: dict, ls_url: str) -> str:
    """The address of a task's image, only if it is Label Studio's own: a /data/ path
    (uploads, local files, storage links) or a full URL on Label Studio's host."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise RefusedImage("the task has no data")
    value = data.get("image")
    if value is None:
        value = next((v for v in data.values() if isinstance(v, str)), None)
    if not isinstance(value, str) or not value:
        raise RefusedImage("the task names no image")
    base = urlparse(ls_url)
    if value.startswith("/") and not value.startswith("//"):
        if not value.startswith("/data/") or ".." in value.split("?")[0].split("/"):
            raise RefusedImage(f"{value[:100]!r} is not a Label Studio /data/ address")
        return urljoin(ls_url + "/", value.lstrip("/"))
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and (parsed.scheme, parsed.netloc) == \
            (base.scheme, base.netloc):
        return value
    raise RefusedImage(f"{value[:100]!r} is not on Label Studio ({ls_url}): this server "
                       "fetches images only from Label Studio itself")
