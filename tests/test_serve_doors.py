"""Who may do what at `labelassist serve`'s door (issue #30): the serve secret and the
webhook's own credential, the secret files, the bounds on what a webhook can make serve
do, and what a Label Studio with default settings says when it refuses to call serve.
Real parts throughout: real `labelassist serve` processes, the session's Label Studio,
and a second Label Studio started with its default (blocking) settings."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from labelassist.labelstudio.studio import free_port, read_or_make_secret

from .test_serve import SECRET, auth, start_serve, stop, wait_for

SLOW_MAKE = """
import sys, time, secrets
from pathlib import Path
from labelassist.labelstudio.studio import read_or_make_secret

def make():
    print("making", file=sys.stderr, flush=True)
    time.sleep(float(sys.argv[2]))  # slow entropy, a full disk, a kill: all land here
    return secrets.token_urlsafe(24)

print(read_or_make_secret(Path(sys.argv[1]), make), flush=True)
"""


def make_secret_in_process(path: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_MAKE, str(path), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- the secret files ------------------------------------------------------------------

def test_a_kill_while_a_secret_is_made_leaves_no_empty_secret_behind(tmp_path):
    path = tmp_path / "serve-secret"
    proc = make_secret_in_process(path, 30)
    assert proc.stderr.readline() == "making\n"  # inside make()
    proc.kill()
    proc.wait()

    assert not path.exists() or len(path.read_text().strip()) >= 16
    again = read_or_make_secret(path, lambda: secrets.token_urlsafe(24))
    assert len(again) >= 16 and path.read_text().strip() == again


def test_racing_first_starts_agree_on_one_secret(tmp_path):
    path = tmp_path / "sub" / "serve-secret"
    procs = [make_secret_in_process(path, 0.5) for _ in range(6)]
    said = {proc.communicate(timeout=60)[0].strip() for proc in procs}

    assert len(said) == 1, said
    (secret,) = said
    assert len(secret) >= 16 and path.read_text().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["serve-secret"]  # no temp files left


@pytest.mark.parametrize("torn", ["", "\n", "abc"])
def test_an_empty_or_short_secret_file_is_made_again_and_said(tmp_path, torn):
    path = tmp_path / "serve-secret"
    path.write_text(torn)
    path.chmod(0o600)
    said = []

    secret = read_or_make_secret(path, lambda: secrets.token_urlsafe(24), log=said.append)

    assert len(secret) >= 16 and path.read_text().strip() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(said) == 1 and str(path) in said[0], said
    assert read_or_make_secret(path, lambda: "never used, the file is good") == secret


def test_a_good_secret_file_is_kept(tmp_path):
    path = tmp_path / "serve-secret"
    path.write_text("kept-secret-of-twenty-chars\n")
    assert read_or_make_secret(path, lambda: "x" * 40) == "kept-secret-of-twenty-chars"


@pytest.mark.parametrize("how", [["--secret", ""], ["--secret", "short-secret"],
                                 ["ENV", "0123456789abcde"]])
def test_a_short_or_empty_secret_is_refused_naming_the_flag(tmp_path, how):
    env = {**os.environ, "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",
           "LABEL_STUDIO_API_KEY": "x" * 40, "HOME": str(tmp_path)}
    env.pop("LABELASSIST_SERVE_SECRET", None)
    args = []
    if how[0] == "ENV":
        env["LABELASSIST_SERVE_SECRET"] = how[1]
    else:
        args = how
    (tmp_path / "ledger.db").touch()
    result = subprocess.run(
        [sys.executable, "-m", "labelassist.cli", "serve", "--db",
         f"sqlite:///{tmp_path / 'ledger.db'}", "--port", str(free_port()), *args],
        env=env, capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--secret" in lines[0] and "LABELASSIST_SERVE_SECRET" in lines[0]
    assert "16" in lines[0]


def test_authorised_never_accepts_an_empty_secret():
    from starlette.requests import Request

    from labelassist.serve.app import authorised

    for header in (b"Bearer ", b"Bearer", b"Basic " + base64.b64encode(b"labelassist:")):
        request = Request({"type": "http", "headers": [(b"authorization", header)]})
        assert not authorised(request, ""), header
        assert not authorised(request, "   "), header


# ---- a real serve: credentials ---------------------------------------------------------

@pytest.fixture(scope="module")
def doors(tmp_path_factory, label_studio, tiny_clip_dir):
    """One connected server for the door tests; the rate test runs last (it empties the
    webhook's bucket)."""
    from .imagegen import write_shape_images

    tmp = tmp_path_factory.mktemp("doors")
    photos = label_studio.root / "serve_doors"
    write_shape_images(photos, 6)
    labels = tmp / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red"]\ncool = ["blue"]\n')
    s = start_serve(tmp, label_studio, photos, labels, tiny_clip_dir)
    s.tmp = tmp
    yield s
    stop(s)


def hook_credential(served) -> dict:
    """The webhook's headers, as any project member reads them (GET /api/webhooks)."""
    hooks = served.http.get("/api/webhooks", params={"project": served.project_id}).json()
    (hook,) = [h for h in hooks if h["url"] == served.url + "/webhook"]
    return hook["headers"]


NOTHING_TO_DO = {"action": "PROJECT_UPDATED"}  # a real event kind that names no review


@pytest.mark.labelstudio
@pytest.mark.slow
def test_the_credential_in_the_webhook_opens_the_webhook_only(doors):
    member_sees = hook_credential(doors)
    assert SECRET not in str(member_sees)
    assert SECRET not in base64.b64decode(member_sees["Authorization"].split()[1]).decode()

    for method, path, body in (("GET", "/", None), ("GET", "/versions", None),
                               ("POST", "/train", {}), ("POST", "/setup", {}),
                               ("POST", "/predict", {"tasks": []})):
        response = httpx.request(method, doors.url + path, json=body, headers=member_sees,
                                 timeout=30)
        assert response.status_code == 401, (path, response.text)
    response = httpx.post(doors.url + "/webhook", json=NOTHING_TO_DO, headers=member_sees,
                          timeout=30)
    assert response.status_code == 200, response.text

    # the serve secret still opens everything, and Label Studio still holds it
    assert httpx.get(doors.url + "/", headers=auth(), timeout=30).status_code == 200
    assert httpx.get(doors.url + "/versions", headers=auth(), timeout=30).status_code == 200
    backends = doors.http.get("/api/ml", params={"project": doors.project_id}).json()
    (mine,) = [b for b in backends if b["url"] == doors.url]
    assert mine["state"] == "CO"  # Label Studio called /health and /setup with it
    assert SECRET not in str(mine)  # and hides it


@pytest.mark.labelstudio
@pytest.mark.slow
def test_label_studio_s_start_training_runs_learn(doors):
    """Label Studio 1.23's "Start training" posts START_TRAINING to /webhook with the
    ML backend's credential (not /train): it runs learn. From the webhook's credential it
    does nothing."""
    first, second = doors.tasks()[:2]
    doors.annotate(first["id"], "warm")
    doors.annotate(second["id"], "cool")
    wait_for(lambda: doors.status()["reviews_recorded"] >= 2, what="two reviews recorded")
    assert doors.status()["last_learn"] is None  # --learn-every 0

    start = {"action": "START_TRAINING", "project": {"id": doors.project_id}}
    httpx.post(doors.url + "/webhook", json=start, headers=hook_credential(doors),
               timeout=30).raise_for_status()
    assert doors.status()["last_learn"] is None

    backends = doors.http.get("/api/ml", params={"project": doors.project_id}).json()
    (mine,) = [b for b in backends if b["url"] == doors.url]
    doors.http.post(f"/api/ml/{mine['id']}/train", timeout=120).raise_for_status()

    learned = doors.status()["last_learn"]
    assert learned and learned["reviews"] == 2, doors.status()
    assert doors.http.get(f"/api/ml/{mine['id']}").json()["state"] != "ER"


# ---- a real serve: what the webhook's credential can make it do ---------------------

DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 kB of nesting: json.loads recurses


@pytest.mark.labelstudio
@pytest.mark.slow
@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/train"])
def test_deeply_nested_json_is_a_bad_request_not_a_crash(doors, path):
    for body in (DEEP, b'{"tasks": ' + DEEP + b"}"):
        response = httpx.post(doors.url + path, content=body, timeout=30,
                              headers={**auth(), "Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.status_code, response.text)
        assert "JSON" in response.json()["error"]


@pytest.mark.labelstudio
@pytest.mark.slow
def test_a_webhook_is_small_and_names_few_ids(doors):
    member_sees = {**hook_credential(doors), "Content-Type": "application/json"}
    big = b'{"action": "PROJECT_UPDATED", "pad": "' + b"x" * (1 << 20) + b'"}'
    response = httpx.post(doors.url + "/webhook", content=big, headers=member_sees,
                          timeout=30)
    assert response.status_code == 413, response.text

    for key, action in (("annotations", "ANNOTATIONS_DELETED"), ("tasks", "TASKS_DELETED")):
        many = {"action": action, key: [{"id": n} for n in range(1, 5002)]}
        response = httpx.post(doors.url + "/webhook", json=many, headers=member_sees,
                              timeout=30)
        assert response.status_code == 400, (key, response.text)
        assert "5000" in response.json()["error"]
    split = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}] * 2501,
             "tasks": [{"id": 1}] * 2500}
    response = httpx.post(doors.url + "/webhook", json=split, headers=member_sees,
                          timeout=30)
    assert response.status_code == 400, response.text

    # Label Studio's own batch (WEBHOOK_BATCH_SIZE, 5000) passes: ids it does not know
    # are journaled as orphans and come to nothing
    response = httpx.post(doors.url + "/webhook", headers=member_sees, timeout=30,
                          json={"action": "PROJECT_UPDATED",
                                "annotations": [{"id": n} for n in range(1, 5001)]})
    assert response.status_code == 200, response.text


@pytest.mark.labelstudio
@pytest.mark.slow
def test_webhooks_beyond_the_rate_get_429_and_the_serve_secret_is_not_limited(doors):
    member_sees = hook_credential(doors)
    answers = []
    began = time.monotonic()
    with httpx.Client(base_url=doors.url, headers=member_sees, timeout=30) as client:
        for _ in range(400):
            answers.append(client.post("/webhook", json=NOTHING_TO_DO))
    elapsed = time.monotonic() - began
    codes = [a.status_code for a in answers]

    assert set(codes) == {200, 429}, set(codes)
    assert codes.count(200) <= 100 + 20 * elapsed + 2, (codes.count(200), elapsed)
    refused = next(a for a in answers if a.status_code == 429)
    wait = float(refused.headers["Retry-After"])
    assert 0 < wait <= 5 and refused.json()["error"]

    # Label Studio's own calls (the serve secret) are never throttled by it
    assert httpx.post(doors.url + "/webhook", json=NOTHING_TO_DO, headers=auth(),
                      timeout=30).status_code == 200
    assert httpx.get(doors.url + "/", headers=auth(), timeout=30).status_code == 200
    time.sleep(wait + 0.2)
    assert httpx.post(doors.url + "/webhook", json=NOTHING_TO_DO, headers=member_sees,
                      timeout=30).status_code == 200


# ---- a real serve: the secret file it makes ----------------------------------------

@pytest.mark.labelstudio
@pytest.mark.slow
def test_an_empty_secret_file_is_made_again_and_an_empty_password_opens_nothing(
        doors, label_studio, tmp_path):
    secret_file = tmp_path / ".local" / "share" / "labelassist" / "serve-secret"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text("")  # what a full disk or a kill left behind
    secret_file.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token, "LABELASSIST_DB": doors.db_url}
    env.pop("LABELASSIST_SERVE_SECRET", None)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelassist.cli", "serve", "--project", doors.title,
         "--port", str(port), "--learn-every", "0", "--no-connect"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if line.startswith("serving "):
                break
        else:
            raise AssertionError(f"serve died: {proc.wait()}: {''.join(said)}")
        url = f"http://127.0.0.1:{port}"
        for header in ("Bearer", "Basic " + base64.b64encode(b"labelassist:").decode()):
            empty = {"Authorization": header}
            assert httpx.get(url + "/", headers=empty, timeout=30).status_code == 401
            assert httpx.post(url + "/train", json={}, headers=empty,
                              timeout=30).status_code == 401
            assert httpx.post(url + "/webhook", json=NOTHING_TO_DO, headers=empty,
                              timeout=30).status_code == 401
        made = secret_file.read_text().strip()
        assert len(made) >= 16
        assert httpx.get(url + "/", headers=auth(made), timeout=30).status_code == 200
        assert sum(str(secret_file) in line for line in said) == 1, said
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# ---- a Label Studio with its default settings ---------------------------------------

@pytest.fixture(scope="module")
def default_studio(tmp_path_factory):
    """A second real Label Studio, started as start_studio starts one but without
    ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false: it refuses to call
    local addresses, as a Label Studio installed with its defaults does."""
    import shutil

    from labelassist.labelstudio.studio import LEAKY_ENV, Studio, wait_until_healthy

    root, data = tmp_path_factory.mktemp("default-ls-root"), tmp_path_factory.mktemp(
        "default-ls-data")
    token, password, port = secrets.token_hex(20), secrets.token_urlsafe(12), free_port()
    blocking = ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED")
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV + blocking}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data), "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": "admin@localhost", "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"})
    log = open(data / "label-studio.log", "ab")
    process = subprocess.Popen(
        [shutil.which("label-studio"), "start", "--no-browser", "--internal-host",
         "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    studio = Studio(f"http://127.0.0.1:{port}", token, "admin@localhost", password, root,
                    data, process)
    try:
        wait_until_healthy(studio, 240)
        yield studio
    finally:
        studio.stop()
        log.close()


@pytest.mark.labelstudio
@pytest.mark.slow
def test_serve_says_which_label_studio_setting_blocks_it(default_studio, tmp_path,
                                                          tiny_clip_dir):
    from typer.testing import CliRunner

    from labelassist.cli import app

    from .imagegen import write_shape_images

    photos = default_studio.root / "blocked"
    write_shape_images(photos, 4)
    labels = tmp_path / "labels.toml"
    labels.write_text('[classes]\nwarm = ["red"]\ncool = ["blue"]\n')
    env = {**os.environ, "LABEL_STUDIO_URL": default_studio.url,
           "LABEL_STUDIO_API_KEY": default_studio.token,
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(default_studio.root),
           "LABELASSIST_SERVE_SECRET": SECRET,
           "LABELASSIST_DB": f"sqlite:///{tmp_path / 'ledger.db'}"}
    for args in (["run", photos, "--labels", labels, "--model", tiny_clip_dir],
                 ["push", "--project", "blocked"]):
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
        assert result.exit_code == 0, result.output

    result = subprocess.run(
        [sys.executable, "-m", "labelassist.cli", "serve", "--project", "blocked",
         "--port", str(free_port()), "--learn-every", "0"],
        env=env, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "refused the token" not in last, last
    assert "reserved network address" in last and "ML_BLOCK_LOCAL_IP=false" in last, last
    assert "--url" in last, last


@pytest.mark.labelstudio
@pytest.mark.slow
def test_the_webhook_says_which_label_studio_setting_blocks_it(default_studio):
    from labelassist.errors import LabelStudioError
    from labelassist.labelstudio import Connection, LabelStudioClient
    from labelassist.serve.connect import sign_webhook

    client = LabelStudioClient(Connection(default_studio.url, default_studio.token),
                               retries=0)
    project = client.http.post("/api/projects", json={"title": "hooked"})
    project.raise_for_status()

    with pytest.raises(LabelStudioError) as refused:
        sign_webhook(client, project.json()["id"], f"http://127.0.0.1:{free_port()}/webhook",
                     SECRET)

    message = str(refused.value)
    assert "refused the token" not in message, message
    assert "SSRF_PROTECTION_ENABLED=false" in message and "--url" in message, message
