"""A Label Studio client: the SDK, plus retries with backoff for transient failures and
one clear line for every failure a user can fix. The token lives only in memory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import urlparse

import httpx

from ..errors import LabelStudioError

T = TypeVar("T")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


class TransientError(LabelStudioError):
    """Label Studio did not answer usefully, even after retrying."""


class NotJSON(LabelStudioError):
    """A 2xx answer that is no JSON: a login page, a proxy, not Label Studio at all."""


@dataclass(frozen=True)
class Connection:
    url: str
    token: str = ""

    def __repr__(self) -> str:  # never print the token
        return f"Connection(url={self.url!r}, token=***)"


def resolve_connection(url: str | None, token: str | None) -> Connection:
    url = (url or os.environ.get("LABEL_STUDIO_URL") or "").rstrip("/")
    token = token or os.environ.get("LABEL_STUDIO_API_KEY") or ""
    if not url:
        raise LabelStudioError("no Label Studio URL: pass --ls-url or set LABEL_STUDIO_URL "
                               "(labelassist studio starts a local one)")
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise LabelStudioError(f"--ls-url {url!r} is not an http(s) URL")
    if not token:
        raise LabelStudioError("no Label Studio token: set LABEL_STUDIO_API_KEY or pass "
                               "--ls-token (Account & Settings > Access Token in Label Studio)")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in token):
        raise LabelStudioError("the Label Studio token (LABEL_STUDIO_API_KEY or --ls-token) "
                               "contains a line break or another control character: copy it "
                               "again without the end of line")
    return Connection(url, token)


class LabelStudioClient:
    def __init__(self, conn: Connection, *, retries: int | None = None, timeout: float = 60,
                 on_retry: Callable[[str], None] | None = None):
        from label_studio_sdk import LabelStudio

        self.conn = conn
        self.retries = int(os.environ.get("LABELASSIST_LS_RETRIES", 6)) if retries is None \
            else retries
        self.http = httpx.Client(base_url=conn.url, timeout=timeout,
                                 headers={"Authorization": f"Token {conn.token}"})
        self.sdk = LabelStudio(base_url=conn.url, api_key=conn.token, timeout=timeout,
                               httpx_client=httpx.Client(timeout=timeout))
        self.on_retry = on_retry  # told of each retry, before its wait (the CLI prints it)
        self._answered = False  # has the server ever answered this client?

    def close(self) -> None:
        self.http.close()

    def call(self, what: str, fn: Callable[..., T], *args, idempotent: bool = True,
             **kwargs) -> T:
        """Run one request, retrying transient failures with exponential backoff.

        A non-idempotent request (an import) is retried only when it never reached the
        server (connection refused); otherwise the caller must first find out what landed.
        """
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                result = fn(*args, **kwargs)
                self._answered = True
                return result
            except Exception as exc:  # noqa: BLE001 - classified below
                transient, message = self.classify(exc, what)
                if not transient:
                    raise LabelStudioError(message) from None
                if isinstance(exc, httpx.ConnectError) and not self._answered:
                    raise LabelStudioError(message) from None  # nothing listens: say so now
                if isinstance(exc, httpx.ProtocolError) and not self._answered:
                    # It answered, but not in HTTP (an SSH or database port), or hung up
                    # before answering at all: no Label Studio does either on first contact.
                    raise LabelStudioError(
                        f"{self.conn.url} does not speak HTTP ({exc or type(exc).__name__}) "
                        f"while {what}: is it Label Studio's address and port? Check "
                        "--ls-url / LABEL_STUDIO_URL") from None
                if not idempotent and not isinstance(exc, httpx.ConnectError):
                    raise TransientError(message + "; run the same command again: it resumes "
                                         "where it stopped") from None
                if attempt == self.retries:
                    raise TransientError(message + f" (gave up after {self.retries} retries)") \
                        from None
                if self.on_retry:
                    self.on_retry(f"{message}; retrying in {delay:.1f} s "
                                  f"({attempt + 1} of {self.retries})")
                time.sleep(delay)
                delay = min(delay * 2, 10)
        raise AssertionError("unreachable")

    def classify(self, exc: Exception, what: str) -> tuple[bool, str]:
        from label_studio_sdk.core.api_error import ApiError

        url = self.conn.url
        if isinstance(exc, httpx.TimeoutException):
            return True, f"Label Studio at {url} timed out while {what}"
        if isinstance(exc, httpx.TransportError):
            return True, (f"cannot reach Label Studio at {url} while {what} ({type(exc).__name__})."
                          " Is it running? Check --ls-url / LABEL_STUDIO_URL")
        status = getattr(exc, "status_code", None)
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
        if status in (401, 403):
            return False, (f"Label Studio refused the token ({status}) while {what}. "
                           "Set LABEL_STUDIO_API_KEY or pass --ls-token")
        if status in TRANSIENT_STATUS:
            return True, f"Label Studio at {url} answered {status} while {what}"
        if isinstance(exc, (ApiError, httpx.HTTPStatusError)):
            detail = _detail(exc)
            return False, f"Label Studio answered {status} while {what}: {detail}"
        raise exc

    def get_json(self, path: str, what: str, **params):
        def get():
            # The body is read into bytes of our own, never kept on the response: httpx's
            # response and its stream refer to each other, so a body kept there lives
            # until the cyclic collector runs, which in a process holding torch's objects
            # can be many pages later (pull's memory grew with the project).
            with self.http.stream("GET", path, params=params) as response:
                if not response.is_success:
                    response.read()  # an error's body goes into its message: keep it
                    response.raise_for_status()
                body = b"".join(response.iter_bytes())
            try:
                return json.loads(body)
            except ValueError:
                kind = response.headers.get("content-type", "no content type").split(";")[0]
                raise NotJSON(f"{self.conn.url}{path} answered {response.status_code} with "
                              f"{kind}, not JSON, while {what}: is --ls-url Label Studio's "
                              "address (not a login page or a proxy)?") from None

        return self.call(what, get)

    def server_time(self) -> datetime:
        """Label Studio's own clock (its Date header), so that watermarks never depend on
        this machine's clock."""
        def get():
            response = self.http.get("/api/version")
            response.raise_for_status()
            return response.headers.get("date")

        stamp = self.call("reading the server's clock", get)
        try:
            return parsedate_to_datetime(stamp).astimezone(timezone.utc)
        except (TypeError, ValueError):
            return datetime.now(timezone.utc)  # no Date header: our clock, our best guess

    def check_server(self) -> str:
        """The server's version; a clear error if it is not Label Studio or the token is bad."""
        try:
            info = self.get_json("/api/version", "checking the server")
        except NotJSON:
            info = None
        except LabelStudioError as exc:
            if "answered 404" in str(exc):
                info = None
            else:
                raise
        if not isinstance(info, dict) or "release" not in info:
            raise LabelStudioError(f"{self.conn.url} does not look like Label Studio "
                                   "(no /api/version): check --ls-url")
        self.get_json("/api/current-user/whoami", "checking the token")
        return str(info["release"])


def _detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text
    if isinstance(body, dict):
        body = body.get("validation_errors") or body.get("detail") or body
    return str(body)[:300]
