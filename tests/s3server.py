"""A real S3-compatible server for tests: `moto_server` (moto in server mode) as its own
process on 127.0.0.1, spoken to over HTTP like any bucket host. Not an in-process mock:
s3fs, boto3 and Label Studio reach it through the network, with real signatures.

    with s3_server() as endpoint:              # "http://127.0.0.1:PORT"
        env = aws_env(endpoint)                 # the standard AWS variables for it
        s3 = s3_client(endpoint)                # boto3, to make buckets and objects
        s3.create_bucket(Bucket="pics")
        ...
        recorded_requests(endpoint)             # every request it got, headers included

`moto` is in the `test` extra (`moto[server]`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
# Made-up keys: moto accepts any. A test that a secret never leaks greps for SECRET.
ACCESS_KEY = "AKIALABELASSISTTEST"
SECRET = "la-test-secret-Zq8vW3xK9pL2mN7r"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point botocore (so s3fs and boto3) at `endpoint`.
    AWS_ENDPOINT_URL is botocore's own setting for a service's endpoint."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
            # never the user's own profile or instance metadata
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


def s3_client(endpoint: str):
    """A boto3 S3 client for the test's own setup (buckets, objects)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)


@contextmanager
def s3_server(log: Path | None = None, timeout: float = 30) -> Iterator[str]:
    """Start `moto_server` on a free port of 127.0.0.1, wait until it answers, yield its
    endpoint URL, and stop it (the whole process group) on the way out. Its request log
    (one line per request, werkzeug's format) goes to `log` when given. Requests are also
    recorded with their headers: read them with recorded_requests(endpoint)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - outlives the with
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    # The recorder writes its file in the working folder unless told where.
    scratch = tempfile.mkdtemp(prefix="la-s3-")
    env.update(MOTO_ENABLE_RECORDING="true",
               MOTO_RECORDER_FILEPATH=os.path.join(scratch, "recording"))
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=out, stderr=out, cwd=scratch,
                            start_new_session=True)
    try:
        _wait_until_up(proc, endpoint, timeout)
        _moto_api(endpoint, "recorder/start-recording")
        yield endpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log:
            out.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_until_up(proc: subprocess.Popen, endpoint: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not answer on {endpoint} "
                                   f"within {timeout:.0f} s") from None
            time.sleep(0.1)


def _moto_api(endpoint: str, route: str, method: str = "POST") -> bytes:
    request = urllib.request.Request(f"{endpoint}/moto-api/{route}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def recorded_requests(endpoint: str) -> list[dict]:
    """Every request the server got since it started (its own moto-api calls aside), as
    moto's recorder keeps them: method, path, headers, body and so on."""
    lines = _moto_api(endpoint, "recorder/download-recording", "GET").decode().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if "/moto-api/" not in r.get("url", r.get("path", ""))]


def have_moto() -> bool:
    return shutil.which("moto_server", path=str(BIN)) is not None
