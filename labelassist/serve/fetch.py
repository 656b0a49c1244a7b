"""Images of tasks that labelassist did not push, fetched through Label Studio only: from
its file routes (never its API, which the operator's token would open), and kept only
when the bytes decode as an image, in a folder only this user can read."""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx

from ..errors import LabelAssistError, LabelStudioError
from ..labelstudio import LabelStudioClient

MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Pillow's names of the formats kept, and the suffix each is kept with.
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
            "TIFF": ".tif"}
# Label Studio's file routes (1.23: data_import/urls.py, io_storages/urls.py), below its
# own address, each with the one query parameter it takes (None: no query at all).
FILE_ROUTES = (
    (re.compile(r"/data/upload/[^/].*"), None),  # uploaded files
    (re.compile(r"/data/local-files/"), "d"),  # local-files storages
    (re.compile(r"/(tasks|projects)/\d+/(resolve|presign)/"), "fileuri"),  # cloud storages
)


class RefusedImage(LabelAssistError):
    """A task's image that this server will not fetch or keep (not one of Label Studio's
    file routes, a redirect anywhere but a cloud storage's host, or not an image)."""


def fetch_image(client: LabelStudioClient, task: dict, fetch_dir: Path,
                key: str = "image") -> Path:
    """The task's image (its data's `key`), from Label Studio's file routes only, kept
    under fetch_dir by content hash (0600 files in 0700 folders) once its bytes decode as
    an image."""
    url = image_url(task, client.conn.url, key)
    try:
        data = _download(client, url)
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"cannot fetch the image at {url}: {exc}") from None
    return _keep(data, image_suffix(data, url), fetch_dir)


def _download(client: LabelStudioClient, url: str) -> bytes:
    """The bytes at one of Label Studio's file routes, asked for with the token. A cloud
    storage's route may answer with a redirect to a presigned URL on the storage host:
    that one is followed once, by a request of its own that carries no token, no cookie
    and no header of Label Studio's (the presigned URL is its own credential)."""
    with httpx.Client(timeout=30, follow_redirects=False, headers={
            "Authorization": f"Token {client.conn.token}"}) as http:
        data, location = _read(http, url)
    if location is None:
        return data
    target = presigned_target(url, location, client.conn.url)
    with httpx.Client(timeout=30, follow_redirects=False, trust_env=False) as bare:
        data, again = _read(bare, target)
    if again is not None:
        raise RefusedImage(f"the storage host answered the image at {url} with another "
                           "redirect: serve follows one only")
    return data


def _read(http: httpx.Client, url: str) -> tuple[bytes, str | None]:
    """(the body, None), or (b"", the redirect's location): a body only from a 200,
    and never over MAX_IMAGE_BYTES."""
    with http.stream("GET", url) as response:
        if response.is_redirect:
            return b"", response.headers.get("location", "")
        if response.status_code != 200:
            raise LabelStudioError(f"{urlsplit(url).netloc} answered "
                                   f"{response.status_code} for the image at {_short(url)}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
            raise RefusedImage(f"the image at {_short(url)} is over "
                               f"{MAX_IMAGE_BYTES >> 20} MiB")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise RefusedImage(f"the image at {_short(url)} is over "
                                   f"{MAX_IMAGE_BYTES >> 20} MiB")
            chunks.append(chunk)
    return b"".join(chunks), None


def presigned_target(url: str, location: str, ls_url: str) -> str:
    """Where a redirect from Label Studio may lead: only from a cloud storage's route
    (resolve/presign), only to an http(s) URL on another host than Label Studio's (its
    storage host); anything else is refused."""
    route = FILE_ROUTES[-1][0]
    base = urlsplit(ls_url.rstrip("/"))
    path = unquote(urlsplit(url).path)[len(base.path):]
    target = urlsplit(urljoin(url, location))
    if not route.fullmatch(path) or target.scheme not in ("http", "https") \
            or not target.hostname or (target.scheme, target.netloc) == (base.scheme,
                                                                         base.netloc) \
            or target.username or target.password:
        raise RefusedImage(_redirect_refusal(url, location))
    return target.geturl()


def _short(url: str) -> str:
    """An address for a message: a presigned URL's query (its signature) left out."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


def _redirect_refusal(url: str, location: str) -> str:
    target = urlsplit(location).netloc or "Label Studio itself"
    return (f"Label Studio answered the image at {_short(url)} with a redirect to {target}: "
            "serve follows a redirect only from a cloud storage's link to its storage "
            "host, so the token never leaves Label Studio")


def image_suffix(data: bytes, url: str) -> str:
    """The suffix of an image in one of SUFFIXES' formats; anything else is refused."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=list(SUFFIXES)) as image:
            image.verify()
            kind = image.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RefusedImage(f"the file at {url} is not an image ({type(exc).__name__}): "
                           "not kept") from None
    return SUFFIXES[kind]


def _keep(data: bytes, suffix: str, fetch_dir: Path) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    folder = _private_folder(_private_folder(fetch_dir) / sha[:2])
    path = folder / f"{sha}{suffix}"  # ImageSource.came_from_label_studio knows this name
    if not path.exists():
        partial = folder / f".{sha}.{os.getpid()}.{threading.get_ident()}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        partial.replace(path)
    return path


def _private_folder(folder: Path) -> Path:
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def image_url(task: dict, ls_url: str, key: str = "image") -> str:
    """The address of a task's image, only if it is one of Label Studio's file routes
    (FILE_ROUTES) below Label Studio's own address, path included."""
    value = _image_value(task, key)
    base = urlsplit(ls_url.rstrip("/"))
    if value.startswith("/") and not value.startswith("//"):
        path = value if _below(value, base.path) else base.path + value
        url = f"{base.scheme}://{base.netloc}{path}"
    else:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or \
                (parsed.scheme, parsed.netloc) != (base.scheme, base.netloc):
            raise RefusedImage(f"{value[:100]!r} is not on Label Studio ({ls_url}): this "
                               "server fetches images only from Label Studio itself")
        url = value
    _check_file_route(url, base.path, value)
    return url


def _image_value(task: dict, key: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise RefusedImage("the task has no data")
    value = data.get(key)
    if value is None:
        value = next((v for v in data.values() if isinstance(v, str)), None)
    if not isinstance(value, str) or not value:
        raise RefusedImage("the task names no image")
    return value


def _below(path: str, base_path: str) -> bool:
    return not base_path or urlsplit(path).path.startswith(base_path + "/")


def _check_file_route(url: str, base_path: str, value: str) -> None:
    parts = urlsplit(url)
    path = unquote(parts.path)  # what Label Studio's router sees
    route = path[len(base_path):] if path.startswith(base_path + "/") else ""
    clean = route and not parts.fragment and "\\" not in route and \
        not {".", ".."} & set(route.split("/"))
    query = parse_qs(parts.query, keep_blank_values=True)
    for pattern, key in FILE_ROUTES if clean else ():
        if pattern.fullmatch(route) and (
                (key is None and not parts.query)
                or (key is not None and list(query) == [key] and len(query[key]) == 1
                    and query[key][0])):
            return
    raise RefusedImage(f"{value[:100]!r} is not one of Label Studio's file routes below "
                       f"{base_path or '/'} (uploads, local files, storage links): this "
                       "server fetches nothing else with the token")
