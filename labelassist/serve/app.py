"""Label Studio's ML backend protocol over HTTP (Starlette), in front of a Backend.

Routes, as Label Studio 1.23 calls them (label_studio/ml/api_connector.py):
- GET  /health   {"status": "UP"}; open, and cheap (Label Studio waits 1 s for it);
- POST /setup    {"model_version": the newest}; Label Studio calls it on every predict;
- POST /predict  {"tasks": [...]} -> {"results": [one answer per task, in order]};
- POST /webhook  annotation events (the project webhook Label Studio makes for a backend),
                 and Label Studio's "Start training" (START_TRAINING), which runs learn;
- GET  /versions, POST /train (learn now);
- GET  /         the status, as JSON.
Two credentials, each as HTTP basic auth (user "labelassist") or `Authorization: Bearer`:
- the serve secret, which Label Studio keeps hidden (the ML backend's basic auth): every
  route but /health;
- the webhook credential, derived from it (webhook_secret), which Label Studio shows to
  every project member (GET /api/webhooks): /webhook only, and there bounded. An event
  is only a hint (serve re-reads its tasks from Label Studio), so its body is small, it
  names few ids, and events come at a bounded rate (429 beyond it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import ConfigError
from . import MIN_SECRET
from .backend import Backend

MAX_BODY = 16 * 1024 * 1024  # a predict request of 1,000 tasks is well under 1 MiB
MAX_TASKS = 1000
MAX_EVENT_BODY = 1024 * 1024  # an annotation event is a few kB
MAX_EVENT_IDS = 5000  # Label Studio's WEBHOOK_BATCH_SIZE: its bulk deletions come in these
WEBHOOK_RATE, WEBHOOK_BURST = 20.0, 100  # events a second, and at once
USER = "labelassist"
SERVE, HOOK = "the serve secret", "the webhook credential"


def webhook_secret(secret: str) -> str:
    """The credential the project webhook carries: every project member can read it, so
    it is not the serve secret, but derived from it (no second file to keep)."""
    return hmac.new(secret.encode(), b"labelassist webhook", hashlib.sha256).hexdigest()


def presented(request: Request) -> str | None:
    """The password a request carries (basic auth as USER, or Bearer), if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            user, _, given = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return given if user == USER else None
    return None


def authorised(request: Request, secret: str) -> bool:
    """Does the request carry `secret`? Never for an empty or short secret, whoever asks."""
    given = presented(request)
    if given is None or len(secret.strip()) < MIN_SECRET:
        return False
    return hmac.compare_digest(given.encode(), secret.encode())


class TokenBucket:
    """At most `rate` takes a second on average and `burst` at once. Only the event loop
    takes (one thread), so it needs no lock."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = float(burst), clock()

    def take(self) -> float:
        """0 when taken, else the seconds until one can be."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


async def read_json(request: Request, limit: int = MAX_BODY) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"the body is over {limit >> 20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body is over {limit >> 20} MiB")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest(400, "the body is not JSON") from None
    except RecursionError:
        raise BadRequest(400, "the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the body is not a JSON object")
    return data


def valid_tasks(data: dict, project_id: int) -> list[dict]:
    """The tasks of a predict request, refused whole unless all are this project's (Label
    Studio sends its project as "<id>.<created timestamp>", and each task's project)."""
    named = str(data.get("project") or "").split(".")[0]
    if named and named != str(project_id):
        raise BadRequest(400, f"this server serves Label Studio project {project_id}, "
                              f"not {named}")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or len(tasks) > MAX_TASKS:
        raise BadRequest(400, f"'tasks' must be a list of at most {MAX_TASKS} tasks")
    for task in tasks:
        if not isinstance(task, dict) or not isinstance(task.get("id"), int) \
                or isinstance(task.get("id"), bool) or not isinstance(task.get("data", {}), dict):
            raise BadRequest(400, "each task needs an integer 'id' and a 'data' object")
        if task.get("project") not in (None, project_id):
            raise BadRequest(400, f"task {task['id']} belongs to project {task['project']}, "
                                  f"not to {project_id}, which this server serves")
    return tasks


def bounded_event(data: dict) -> dict:
    """An event naming at most MAX_EVENT_IDS annotations and tasks in its lists (the ids'
    values are checked by Backend.event)."""
    lists = [data.get(key) for key in ("annotations", "tasks")]
    if any(named is not None and not isinstance(named, list) for named in lists) or \
            sum(len(named or []) for named in lists) > MAX_EVENT_IDS:
        raise BadRequest(400, f"'annotations' and 'tasks' must be lists of at most "
                              f"{MAX_EVENT_IDS} in all (Label Studio's WEBHOOK_BATCH_SIZE: "
                              "keep it at 5000 or less)")
    return data


def guard(handler, credentials):
    """An endpoint that calls handler(request, who) for a request carrying one of the
    (who, secret) credentials, and answers 401 to any other."""
    async def endpoint(request: Request):
        who = next((name for name, key in credentials if authorised(request, key)), None)
        if who is None:
            return JSONResponse({"error": "unauthorised: send the serve secret (basic auth "
                                 f"as user {USER!r}, or a Bearer token)"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="labelassist"'})
        try:
            return JSONResponse(await handler(request, who))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status,
                                headers=exc.headers)
    return endpoint


def make_app(backend: Backend, secret: str) -> Starlette:
    from starlette.concurrency import run_in_threadpool

    if len(secret.strip()) < MIN_SECRET:
        raise ConfigError(f"the serve secret must be at least {MIN_SECRET} characters")
    serve_only = ((SERVE, secret),)
    either = serve_only + ((HOOK, webhook_secret(secret)),)
    events = TokenBucket(WEBHOOK_RATE, WEBHOOK_BURST)

    async def health(request: Request):
        return JSONResponse({"status": "UP", "model_class": "labelassist"})

    async def setup(request: Request, who: str):
        await read_json(request)
        return {"model_version": backend.status.model_version or ""}

    async def predict(request: Request, who: str):
        tasks = valid_tasks(await read_json(request), backend.project.ls_project_id)
        results = await run_in_threadpool(backend.predict, tasks)
        return {"results": results, "model_version": backend.status.model_version or ""}

    async def webhook(request: Request, who: str):
        if who == HOOK and (wait := events.take()):
            raise BadRequest(429, f"over {WEBHOOK_RATE:g} webhook events a second",
                             headers={"Retry-After": str(math.ceil(wait))})
        data = await read_json(request, MAX_BODY if who == SERVE else MAX_EVENT_BODY)
        if data.get("action") == "START_TRAINING" and who == SERVE:  # Label Studio's button
            return await learn_now()
        # A ledger write: in the thread pool, so a busy database never stalls the event
        # loop (and with it /health, which Label Studio gives 1 s)
        queued = await run_in_threadpool(backend.event, bounded_event(data))
        return {"status": "ok", "tasks_queued": queued}

    async def learn_now():
        record = await run_in_threadpool(backend.learn)
        return {"status": "ok", "learned": record is not None}

    async def train(request: Request, who: str):
        await read_json(request)
        return await learn_now()

    async def versions(request: Request, who: str):
        return {"versions": [v for v in [backend.status.model_version] if v]}

    async def status(request: Request, who: str):
        return backend.status.to_json()

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/", guard(status, serve_only), methods=["GET"]),
        Route("/setup", guard(setup, serve_only), methods=["POST"]),
        Route("/predict", guard(predict, serve_only), methods=["POST"]),
        Route("/webhook", guard(webhook, either), methods=["POST"]),
        Route("/train", guard(train, serve_only), methods=["POST"]),
        Route("/versions", guard(versions, serve_only), methods=["GET"]),
    ])
