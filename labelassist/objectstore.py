"""Images in object storage: s3://bucket/prefix, or any fsspec URL (gs://, az://, ...).

Policy:
- An object is stored in the ledger under its URL (`s3://bucket/key`), which never holds
  a credential: those come from where the storage's own library looks (for S3, botocore's
  chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and
  ~/.aws/config and credentials; AWS_ENDPOINT_URL for an S3-compatible server). A URL
  with a user or password in it is refused.
- "Changed" is the object's ETag and size, not its time: a rewritten object gets a new
  ETag, a copied one keeps its own. An object is read only while it still has the ETag
  and size that ingest recorded (S3: one GET with If-Match), so predict, export and push
  read the bytes that were hashed, or say "changed".
- Listing goes a page at a time (S3: ListObjectsV2, PAGE keys a request), so memory stays
  flat in the number of objects.

s3fs is the optional extra `labelassist[s3]`; fsspec and s3fs are imported only for a URL.
"""

from __future__ import annotations

import errno
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError
from .images import BadImage

PAGE = 1000  # keys per listing request: S3's own maximum
READERS = 16  # objects fetched at once: each waits on the network, not the CPU
T = TypeVar("T")
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
EXTRAS = {"s3": "s3", "s3a": "s3"}  # protocol -> the labelassist extra that brings it


@dataclass(frozen=True)
class ObjectInfo:
    url: str        # protocol://bucket/key, as the ledger stores it
    size: int
    etag: str       # what says the object changed (ETag, or the store's own checksum)
    mtime_ns: int   # shown only: "changed" is decided by etag and size


def is_object_url(path: str | bytes) -> bool:
    """True for protocol://... (never for a local path, which the ledger keeps absolute)."""
    return isinstance(path, str) and bool(_URL.match(path)) and \
        not path.lower().startswith("file://")


def check_url(url: str) -> None:
    """A URL fit to be stored and shown: no credential in it."""
    rest = _URL.sub("", url)
    if "@" in rest.split("/", 1)[0]:
        raise ConfigError(f"{_URL.match(url).group(0)}...: a URL with a user or password in "
                          "it would be stored in the ledger; give the bucket alone and put "
                          "credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                          "AWS_PROFILE or ~/.aws/credentials")


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`; ConfigError naming the extra when
    the protocol's package is missing."""
    check_url(url)
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigError(f"{url}: object storage needs fsspec: pip install "
                          "'labelassist[s3]'") from None
    protocol = _URL.match(url).group(1).lower()
    options = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["endpoint_url"] = endpoint  # botocore reads it too; here it keys s3fs's cache
    try:
        return url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'labelassist[{extra}]'" if extra else \
            f"install the fsspec package for {protocol}://"
        raise ConfigError(f"{url}: cannot open {protocol}:// ({exc}); {hint}") from None


def etag_of(info: dict) -> str:
    """The store's word for 'these bytes': S3's ETag, GCS's md5Hash, else its checksum."""
    for key in ("ETag", "etag", "md5Hash", "content_md5", "checksum"):
        if info.get(key):
            return str(info[key])
    return f"size {info.get('size')} mtime {info.get('mtime') or info.get('LastModified')}"


def _mtime_ns(info: dict) -> int:
    when = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(when, "timestamp"):
        return int(when.timestamp() * 1e9)
    try:
        return int(float(when) * 1e9)
    except (TypeError, ValueError):
        return 0


def list_objects(url: str, extensions: frozenset[str] | set[str],
                 page: int | None = None) -> Iterator[ObjectInfo]:
    """The objects under `url` (a prefix, taken as a folder, or one object) whose names
    end in one of `extensions`, in key order, `page` keys (default PAGE) at a time."""
    page = page or PAGE
    fs, path = filesystem(url)
    protocol = _URL.match(url).group(1).lower()
    path = path.rstrip("/")
    try:
        if os.path.splitext(path)[1].lower() in extensions and fs.isfile(path):
            yield _object(protocol, fs.info(path))
            return
        entries = _s3_pages(fs, path, page) if hasattr(fs, "call_s3") else _walk(fs, path)
        for info in entries:
            if os.path.splitext(info["name"])[1].lower() in extensions:
                yield _object(protocol, info)
    except FileNotFoundError:
        raise ConfigError(f"{url} does not exist (no such bucket)") from None
    except PermissionError as exc:
        raise ConfigError(f"{url}: access denied ({exc}); check the AWS credentials "
                          "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy") from None
    except OSError as exc:
        raise ConfigError(f"{url}: cannot list the objects ({exc})") from None
    except Exception as exc:  # botocore's NoCredentialsError is no OSError
        if "credentials" in type(exc).__name__.lower():
            raise ConfigError(f"{url}: no credentials found: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (~/.aws/credentials)"
                              ) from None
        raise


def _s3_pages(fs, path: str, page: int) -> Iterator[dict]:
    """ListObjectsV2 page by page (no delimiter: the whole tree under the prefix)."""
    bucket, _, prefix = path.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": page}
    while True:
        out = fs.call_s3("list_objects_v2", **kwargs)
        for item in out.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield {**item, "name": f"{bucket}/{item['Key']}", "size": item["Size"]}
        if not out.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = out["NextContinuationToken"]


def _walk(fs, path: str) -> Iterator[dict]:
    """Any other fsspec store: a folder's listing at a time, in name order."""
    for _, _, files in fs.walk(path, detail=True):
        for name in sorted(files):
            yield files[name]


def _object(protocol: str, info: dict) -> ObjectInfo:
    return ObjectInfo(f"{protocol}://{info['name']}", int(info["size"]), etag_of(info),
                      _mtime_ns(info))


def read_object(url: str, size: int, etag: str | None) -> bytes:
    """The object's bytes, only while it still has `etag` and `size` (what ingest
    recorded; etag None: any). BadImage("changed" | "missing" | "unreadable") otherwise."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)  # a listing may be cached: ask the store itself
        # s3fs reads with If-Match on the ETag that opening found: one consistent read.
        with fs.open(path, "rb", block_size=max(size, 1) + 1) as fh:
            details = getattr(fh, "details", None) or fs.info(path)
            if etag is not None and (etag_of(details), int(details["size"])) != (etag, size):
                raise BadImage("changed", f"{url} changed since ingest (its ETag or size); "
                                          "run labelassist ingest again")
            data = fh.read(size + 1)
    except FileNotFoundError:
        raise BadImage("missing", url) from None
    except OSError as exc:
        if _precondition_failed(exc):
            raise BadImage("changed", f"{url} changed while it was read") from None
        raise BadImage("unreadable", f"{url}: {exc}") from None
    except BadImage:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore's (no credential, no network)
        raise BadImage("unreadable", f"{url}: {type(exc).__name__}: {exc}") from None
    if len(data) != size:
        raise BadImage("changed", f"{url} is {len(data):,} bytes, not the {size:,} "
                                  "recorded; run labelassist ingest again")
    return data


def _precondition_failed(exc: OSError) -> bool:
    """S3 answered 412 to the If-Match read: the object was rewritten meanwhile (s3fs
    says FileExpired, an OSError)."""
    code = (getattr(exc.__cause__, "response", None) or {}).get("Error", {}).get("Code")
    return type(exc).__name__ == "FileExpired" or code in ("PreconditionFailed", "412") or (
        exc.errno == errno.EINVAL and "condition" in str(exc).lower())


def fetch_object(url: str) -> bytes:
    """The object's bytes as they are now (export checks them against the ingested
    sha256 itself); BadImage("missing" | "unreadable")."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise BadImage("missing", url) from None
    except Exception as exc:  # noqa: BLE001 - botocore's (no credential, no network)
        raise BadImage("unreadable", f"{url}: {type(exc).__name__}: {exc}") from None


def fetch_ahead(items: Iterator[T], source_of: Callable[[T], str | bytes],
                ahead: int = 2 * READERS) -> Iterator[tuple[T, Future | None]]:
    """Each item, in order, with its object's bytes being fetched (fetch_object) in
    threads, `ahead` items ahead; None for an item whose source is a file on disk."""
    with ThreadPoolExecutor(READERS, thread_name_prefix="fetch") as pool:
        window: deque = deque()
        for item in items:
            source = source_of(item)
            window.append((item, pool.submit(fetch_object, source)
                           if is_object_url(source) else None))
            if len(window) >= ahead:
                yield window.popleft()
        yield from window


def object_problem(url: str, size: int, etag: str | None) -> tuple[str, str] | None:
    """(reason, detail) when the object is gone or no longer what ingest recorded (one
    HEAD request), else None."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError:
        return "missing", url
    except Exception as exc:  # noqa: BLE001 - botocore's (no credential, no network)
        return "unreadable", f"{url}: {type(exc).__name__}: {exc}"
    if (etag_of(info), int(info["size"])) != (etag, size):
        return "changed", f"{url} changed since ingest; run labelassist ingest again"
    return None
