"""Connect a Label Studio project to a running `labelassist serve`, through Label Studio's
own API: the ML backend (POST /api/ml, basic auth with the serve secret, which Label Studio
keeps hidden) and the project webhook it makes for it (given the webhook credential, which
every project member can read and which opens /webhook only)."""

from __future__ import annotations

import base64

import httpx

from ..errors import LabelStudioError
from ..labelstudio import LabelStudioClient
from .app import USER, webhook_secret

TITLE = "labelassist"
BLOCKED = ("reserved network address", "The provided URL was not allowed")


def check_not_blocked(response: httpx.Response, url: str, setting: str) -> None:
    """Label Studio answers 403 when its SSRF guard will not call `url`: say so, and what
    lifts it (its client would call any 403 a refused token)."""
    if response.status_code != 403:
        return
    try:
        detail = str(response.json().get("detail") or "")
    except (ValueError, AttributeError):
        detail = response.text[:300]
    if any(reason in detail for reason in BLOCKED):
        raise LabelStudioError(
            f"Label Studio will not call {url}: {detail}. Set {setting}=false in Label "
            "Studio's environment and restart it (labelassist studio sets it), or serve "
            "on an address that Label Studio may call (--host, --url)")


def connect(client: LabelStudioClient, project_id: int, url: str, secret: str) -> int:
    """Add (or update) this backend on the project; returns its id in Label Studio.
    Label Studio calls /health and /setup before it saves: the server must be up."""
    auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": secret}
    backends = client.get_json("/api/ml", "listing ML backends", project=project_id)
    mine = next((b for b in backends if b.get("url", "").rstrip("/") == url.rstrip("/")), None)

    def save():
        if mine is None:
            response = client.http.post("/api/ml", json={
                "url": url, "project": project_id, "title": TITLE, "is_interactive": False,
                **auth})
        else:
            # Label Studio 1.23 fails (500) on a PATCH without the project
            response = client.http.patch(f"/api/ml/{mine['id']}", json={
                "url": url, "project": project_id, **auth})
        check_not_blocked(response, url, "ML_BLOCK_LOCAL_IP")
        if response.status_code == 400:
            raise LabelStudioError(
                f"Label Studio would not connect the ML backend at {url}: "
                f"{response.text[:300]}. A Label Studio that must reach a backend on this "
                "machine needs ML_BLOCK_LOCAL_IP=false (labelassist studio sets it)")
        response.raise_for_status()
        return response.json()

    backend = client.call("connecting the ML backend", save)
    sign_webhook(client, project_id, url.rstrip("/") + "/webhook", secret)
    return int(backend["id"])


def sign_webhook(client: LabelStudioClient, project_id: int, hook_url: str,
                 secret: str) -> None:
    """Label Studio makes a project webhook for a new ML backend, unsigned: give it the
    webhook credential (never the serve secret: any project member reads webhook
    headers), or make it when Label Studio did not (it refuses local URLs by default)."""
    token = base64.b64encode(f"{USER}:{webhook_secret(secret)}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"}
    hooks = client.get_json("/api/webhooks", "listing webhooks", project=project_id)
    hook = next((h for h in hooks if h.get("url") == hook_url), None)

    def save():
        if hook is None:
            response = client.http.post("/api/webhooks", json={
                "project": project_id, "url": hook_url, "send_payload": True,
                "send_for_all_actions": True, "headers": headers, "is_active": True})
        else:
            response = client.http.patch(f"/api/webhooks/{hook['id']}",
                                         json={"headers": headers, "is_active": True})
        check_not_blocked(response, hook_url, "SSRF_PROTECTION_ENABLED")
        if response.status_code == 400:
            raise LabelStudioError(
                f"Label Studio would not send events to {hook_url}: {response.text[:300]}. "
                "A Label Studio that must reach this machine needs "
                "SSRF_PROTECTION_ENABLED=false (labelassist studio sets it)")
        response.raise_for_status()

    client.call("signing the project webhook", save)
