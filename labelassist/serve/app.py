"""Label Studio's ML backend protocol over HTTP (Starlette), in front of a Backend.

Routes, as Label Studio 1.23 calls them (label_studio/ml/api_connector.py):
- GET  /health   {"status": "UP"}; open, and cheap (Label Studio waits 1 s for it);
- POST /setup    {"model_version": the newest}; Label Studio calls it on every predict;
- POST /predict  {"tasks": [...]} -> {"results": [one answer per task, in order]};
- POST /webhook  annotation events (the project webhook Label Studio makes for a backend);
- GET  /versions, POST /train (a manual "start training" runs learn now);
- GET  /         the status, as JSON.
Every route but /health needs the shared secret: HTTP basic auth (what Label Studio's
"basic auth" backend setting sends) or `Authorization: Bearer SECRET`.
"""

from __future__ import annotations

import base64
import hmac
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .backend import Backend

MAX_BODY = 16 * 1024 * 1024  # a predict request of 1,000 tasks is well under 1 MiB
MAX_TASKS = 1000
USER = "labelassist"


def authorised(request: Request, secret: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            user, _, given = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if user != USER:
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), secret.encode())


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest(413, f"the body is over {MAX_BODY >> 20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"the body is over {MAX_BODY >> 20} MiB")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest(400, "the body is not JSON") from None
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


def make_app(backend: Backend, secret: str) -> Starlette:
    from starlette.concurrency import run_in_threadpool

    def guarded(handler):
        async def endpoint(request: Request):
            if not authorised(request, secret):
                return JSONResponse({"error": "unauthorised: send the serve secret (basic "
                                     f"auth as user {USER!r}, or a Bearer token)"},
                                    status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="labelassist"'})
            try:
                return JSONResponse(await handler(request))
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return endpoint

    async def health(request: Request):
        return JSONResponse({"status": "UP", "model_class": "labelassist"})

    async def setup(request: Request):
        await read_json(request)
        return {"model_version": backend.status.model_version or ""}

    async def predict(request: Request):
        tasks = valid_tasks(await read_json(request), backend.project.ls_project_id)
        results = await run_in_threadpool(backend.predict, tasks)
        return {"results": results, "model_version": backend.status.model_version or ""}

    async def webhook(request: Request):
        # A ledger write: in the thread pool, so a busy database never stalls the event
        # loop (and with it /health, which Label Studio gives 1 s)
        queued = await run_in_threadpool(backend.event, await read_json(request))
        return {"status": "ok", "tasks_queued": queued}

    async def train(request: Request):
        await read_json(request)
        record = await run_in_threadpool(backend.learn)
        return {"status": "ok", "learned": record is not None}

    async def versions(request: Request):
        return {"versions": [v for v in [backend.status.model_version] if v]}

    async def status(request: Request):
        return backend.status.to_json()

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/", guarded(status), methods=["GET"]),
        Route("/setup", guarded(setup), methods=["POST"]),
        Route("/predict", guarded(predict), methods=["POST"]),
        Route("/webhook", guarded(webhook), methods=["POST"]),
        Route("/train", guarded(train), methods=["POST"]),
        Route("/versions", guarded(versions), methods=["GET"]),
    ])
