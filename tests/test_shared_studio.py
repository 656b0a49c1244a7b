"""One Label Studio shared by many workspaces (issue #30): serve fetches only Label Studio's
file routes and keeps only images, privately; each workspace's images resolve to its own
files whatever workspace started Label Studio; a token goes only to the Label Studio it
belongs to. Label Studio is real; "the other host" is a small server that records what
reaches it."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from labelassist.cli import app
from labelassist.db import open_database
from labelassist.errors import ConfigError
from labelassist.labelstudio import Connection, ImageSource, LabelStudioClient, push
from labelassist.serve.fetch import RefusedImage, fetch_image, image_url
from labelassist.labelstudio.studio import free_port, start_studio

from .imagegen import shape_image

runner = CliRunner()
NO_LS_ENV = {"LABEL_STUDIO_URL": None, "LABEL_STUDIO_API_KEY": None, "LABELASSIST_DB": None,
             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": None, "LABELASSIST_MODEL": None}
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\nplain = ["grey"]\n'


class Recorder:
    """A server on 127.0.0.1 that records each request (path and Authorization header) and
    answers with answer(path) -> (status, headers, body)."""

    def __init__(self, answer=lambda path: (404, {}, b"")):
        self.requests: list[tuple[str, str | None]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.requests.append((self.path, self.headers.get("Authorization")))
                status, headers, body = answer(self.path)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def png_bytes(colour=(250, 20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, "PNG")
    return buffer.getvalue()


# -- item 6: serve fetches only Label Studio's file routes, and keeps only images ---------

LS = "http://127.0.0.1:8080"


@pytest.mark.parametrize("value, ls_url, expected", [
    ("/data/upload/3/ab12-x.png", LS, f"{LS}/data/upload/3/ab12-x.png"),
    ("/data/local-files/?d=photos/a%20b.jpg", LS, f"{LS}/data/local-files/?d=photos/a%20b.jpg"),
    (f"{LS}/tasks/7/resolve/?fileuri=czM6Ly9iL2EuanBn", LS,
     f"{LS}/tasks/7/resolve/?fileuri=czM6Ly9iL2EuanBn"),
    ("/projects/2/presign/?fileuri=czM6Ly9iL2EuanBn", LS,
     f"{LS}/projects/2/presign/?fileuri=czM6Ly9iL2EuanBn"),
    ("/data/upload/1/x.png", "http://h/ls", "http://h/ls/data/upload/1/x.png"),
    ("/ls/data/upload/1/x.png", "http://h/ls", "http://h/ls/data/upload/1/x.png"),
    ("http://h/ls/data/upload/1/x.png", "http://h/ls", "http://h/ls/data/upload/1/x.png"),
])
def test_label_studio_file_routes_are_fetched(value, ls_url, expected):
    assert image_url({"data": {"image": value}}, ls_url) == expected


@pytest.mark.parametrize("value, ls_url", [
    (f"{LS}/api/current-user/token", LS), ("/api/users", LS), (f"{LS}/api/projects/", LS),
    ("/data/upload/%2e%2e/%2e%2e/api/users", LS), (f"{LS}/tasks/7/resolve/../../api/users", LS),
    ("/data/avatars/a.png", LS), ("/data/local-files/?d=a.jpg&next=/api/users", LS),
    ("/tasks/7/resolve/", LS), ("/tasks/x/resolve/?fileuri=a", LS),
    ("http://h/data/upload/1/x.png", "http://h/ls"), ("http://h/lsx/data/upload/1.png", "http://h/ls"),
    (f"http://user@{LS[7:]}/data/upload/1/x.png", LS),
])
def test_anything_but_a_file_route_is_refused_before_a_request(value, ls_url):
    with pytest.raises(RefusedImage):
        image_url({"data": {"image": value}}, ls_url)


@pytest.fixture
def ls_project(label_studio):
    http = httpx.Client(base_url=label_studio.url, timeout=30,
                        headers={"Authorization": f"Token {label_studio.token}"})
    project = http.post("/api/projects", json={"title": "shared studio fetch"}).json()["id"]

    def upload(name: str, data: bytes) -> dict:
        http.post(f"/api/projects/{project}/import", files={"file": (name, data)}
                  ).raise_for_status()
        return max(http.get("/api/tasks", params={"project": project}).json()["tasks"],
                   key=lambda t: t["id"])

    yield upload
    http.delete(f"/api/projects/{project}")


@pytest.mark.labelstudio
def test_a_fetched_image_is_decoded_first_and_kept_private(label_studio, ls_project, tmp_path):
    client = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=0)
    fetch_dir = tmp_path / "labelassist-fetched"
    picture = png_bytes()

    path = fetch_image(client, ls_project("red.png", picture), fetch_dir)

    assert path.read_bytes() == picture and path.suffix == ".png"
    assert path.stat().st_mode & 0o777 == 0o600
    assert {p.stat().st_mode & 0o777 for p in (path.parent, fetch_dir)} == {0o700}
    with pytest.raises(RefusedImage, match="not an image"):
        fetch_image(client, ls_project("notes.png", b"operator notes, not a picture\n"),
                    fetch_dir)
    assert [p for p in fetch_dir.rglob("*") if p.is_file()] == [path]


@pytest.mark.labelstudio
@pytest.mark.slow
def test_serve_never_fetches_label_studio_api_addresses(tmp_path, label_studio, ls_photos,
                                                       labels_file, tiny_clip_dir):
    from .test_serve import auth, start_serve, stop

    served = start_serve(tmp_path, label_studio, ls_photos, labels_file, tiny_clip_dir)
    try:
        refused = served.status()["images_refused"]
        made = served.http.post(f"/api/projects/{served.project_id}/import", json=[
            {"image": f"{label_studio.url}{path}"}
            for path in ("/api/current-user/token", "/api/users")]).json()
        tasks = [t for t in served.tasks() if "/api/" in t["data"]["image"]]
        assert made["task_count"] == len(tasks) == 2, made

        response = httpx.post(served.url + "/predict", headers=auth(), timeout=30,
                              json={"tasks": tasks, "project": f"{served.project_id}.1"})

        assert response.status_code == 200
        kept = [p for p in (tmp_path / "labelassist-fetched").rglob("*") if p.is_file()]
        assert [p.read_text()[:60] for p in kept] == []  # the token's answer, before
        assert served.status()["images_refused"] == refused + 2
    finally:
        stop(served)


def test_a_presigned_redirect_is_followed_without_the_token_and_no_other_is(tmp_path):
    """A cloud storage's link may redirect to a presigned URL on the storage host: that
    is followed by a request carrying nothing of Label Studio's. A redirect from any
    other file route (an upload) is refused before a byte leaves for that host."""
    with Recorder(lambda path: (200, {"Content-Type": "image/png"}, png_bytes())) as store:
        moved = {"Location": f"{store.url}/bucket/a.png?X-Amz-Signature=abc"}
        with Recorder(lambda path: (302, moved, b"")) as studio:
            client = LabelStudioClient(Connection(studio.url, "operator-token"), retries=0)
            storage = {"id": 1, "data": {"image": "/tasks/1/resolve/?fileuri=czM6Ly9iL2EucG5n"}}
            upload = {"id": 2, "data": {"image": "/data/upload/1/a.png"}}

            kept = fetch_image(client, storage, tmp_path / "fetched")
            with pytest.raises(RefusedImage, match=r"redirect to 127\.0\.0\.1:\d+"):
                fetch_image(client, upload, tmp_path / "fetched")

    assert kept.read_bytes() == png_bytes()
    assert studio.requests == [("/tasks/1/resolve/?fileuri=czM6Ly9iL2EucG5n",
                                "Token operator-token"),
                               ("/data/upload/1/a.png", "Token operator-token")]
    assert store.requests == [("/bucket/a.png?X-Amz-Signature=abc", None)]


@pytest.mark.labelstudio
def test_push_local_uploads_the_images_that_serve_fetched(db, tiny_model, label_studio,
                                                          ls_project, ls_photos, tmp_path,
                                                          request):
    from labelassist.labels import parse_label_text
    from labelassist.ingest import ingest
    from labelassist.predict.run import predict
    from labelassist.db.queries import resolve_version

    client = LabelStudioClient(Connection(label_studio.url, label_studio.token), retries=1)
    picture = png_bytes((20, 20, 250))
    fetched = fetch_image(client, ls_project("blue.png", picture),
                          tmp_path / "labelassist-fetched")
    ingest(db, [ls_photos, fetched])
    predict(db, tiny_model, parse_label_text(LABELS))

    summary = push(db, client, resolve_version(db), ImageSource("local", label_studio.root),
                   title=request.node.name[:50])

    assert summary.tasks_created == 13
    tasks = client.get_json("/api/tasks", "test", project=summary.project_id,
                            page_size=100)["tasks"]
    by_path = {t["data"]["path"]: t["data"]["image"] for t in tasks}
    assert by_path.pop(str(fetched)).startswith("/data/upload/")
    assert all(url.startswith("/data/local-files/?d=") for url in by_path.values())
    uploaded = next(t["data"]["image"] for t in tasks if t["data"]["path"] == str(fetched))
    assert client.http.get(uploaded).content == picture


# -- item 10: one Label Studio, many workspaces --------------------------------------------

def write_pictures(folder: Path, seed: int) -> None:
    """Six pictures named a_0.png ... : two workspaces given other seeds share the names."""
    folder.mkdir(parents=True)
    for i in range(6):
        shape_image(seed + i).save(folder / f"a_{i}.png")


def make_workspace(folder: Path, seed: int, labels: Path, model: Path, monkeypatch) -> None:
    write_pictures(folder / "photos", seed)
    monkeypatch.chdir(folder)
    for args in (["init", ".", "--labels", labels, "--model", model], ["run", "photos"]):
        result = runner.invoke(app, [str(a) for a in args], env=NO_LS_ENV)
        assert result.exit_code == 0, result.output


def record_and_push(folder: Path, studio, title: str, monkeypatch) -> None:
    """What `labelassist studio` records in its workspace, then a push there with no flags
    and no exported variables."""
    from labelassist import cli
    from labelassist.cli.labelstudio import record_studio_in_workspace
    from labelassist.workspace import load_workspace

    monkeypatch.chdir(folder)
    monkeypatch.setattr(cli, "workspace", load_workspace(folder / "labelassist.toml"))
    record_studio_in_workspace(studio)
    result = runner.invoke(app, ["push", "--project", title], env=NO_LS_ENV)
    assert result.exit_code == 0, result.output
    assert "6 tasks created" in result.output


def images_seen_by_reviewers(studio, title: str) -> dict[str, bytes]:
    """Each task's local path -> the bytes Label Studio serves for its image."""
    http = httpx.Client(base_url=studio.url, timeout=30,
                        headers={"Authorization": f"Token {studio.token}"})
    project = next(p["id"] for p in http.get("/api/projects", params={"page_size": 100})
                   .json()["results"] if p["title"] == title)
    tasks = http.get("/api/tasks", params={"project": project, "page_size": 100}).json()
    seen = {}
    for task in tasks["tasks"]:
        response = http.get(task["data"]["image"])
        seen[task["data"]["path"]] = response.content if response.status_code == 200 \
            else f"{response.status_code} for {task['data']['image']}".encode()
    return seen


@pytest.mark.labelstudio
@pytest.mark.slow
def test_each_workspace_sees_its_own_pictures_whichever_started_label_studio(
        tmp_path, monkeypatch, labels_file, tiny_clip_dir):
    a, b, data, port = tmp_path / "A", tmp_path / "B", tmp_path / "ls-data", free_port()
    make_workspace(a, 0, labels_file, tiny_clip_dir, monkeypatch)
    make_workspace(b, 100, labels_file, tiny_clip_dir, monkeypatch)  # photos/a_0.png too

    first = start_studio(port, a, data)
    try:
        record_and_push(a, first, "workspace A", monkeypatch)
    finally:
        first.stop()
    second = start_studio(port, b, data)  # the same Label Studio, started from B
    try:
        record_and_push(b, second, "workspace B", monkeypatch)
        seen_a = images_seen_by_reviewers(second, "workspace A")
        seen_b = images_seen_by_reviewers(second, "workspace B")
    finally:
        second.stop()

    assert sorted(seen_a) == sorted(str(p) for p in (a / "photos").iterdir())
    assert sorted(seen_b) == sorted(str(p) for p in (b / "photos").iterdir())
    for path, served in {**seen_a, **seen_b}.items():
        assert served == Path(path).read_bytes(), path
    assert first.root == second.root  # Label Studio's document root never moves


def refused_start(root: Path, data: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        start_studio(free_port(), root, data).stop()  # never leave one running
    return str(caught.value)


def test_label_studio_never_serves_the_whole_disk_or_its_own_data(tmp_path):
    data = tmp_path / "ls-data"
    assert "--root /" in refused_start(Path("/"), data)
    assert "holds Label Studio's own data" in refused_start(tmp_path, data)


def test_a_data_folder_used_before_says_its_old_tasks_need_their_old_root(tmp_path):
    from labelassist.labelstudio.studio import earlier_root_note

    data = tmp_path / "ls-data"
    data.mkdir()
    assert earlier_root_note(data) is None  # a new Label Studio has no old tasks
    (data / "label_studio.sqlite3").write_bytes(b"")
    assert "--image-mode upload" in earlier_root_note(data)


# -- item 11: a token goes only to the Label Studio it belongs to --------------------------

def ledger(folder: Path) -> str:
    url = f"sqlite:///{folder / 'labelassist.db'}"
    open_database(url).dispose()
    return url


def pull(cwd: Path, monkeypatch, *args, env=None):
    monkeypatch.chdir(cwd)
    return runner.invoke(app, ["pull", *map(str, args)], env={**NO_LS_ENV, **(env or {})})


def test_a_workspace_above_cannot_send_the_environment_token_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "child").mkdir()
    with Recorder() as evil:
        (tmp_path / "labelassist.toml").write_text(f'ls_url = "{evil.url}"\n')

        result = pull(tmp_path / "child", monkeypatch, "--db", ledger(tmp_path),
                      env={"LABEL_STUDIO_API_KEY": "my-own-token"})

    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "LABEL_STUDIO_URL" in result.output and evil.url in result.output
    assert evil.requests == []


def test_the_environment_token_goes_only_to_LABEL_STUDIO_URL(tmp_path, monkeypatch):
    with Recorder() as home, Recorder() as evil:
        env = {"LABEL_STUDIO_URL": home.url, "LABEL_STUDIO_API_KEY": "my-own-token"}

        refused = pull(tmp_path, monkeypatch, "--db", ledger(tmp_path), "--ls-url", evil.url,
                       env=env)
        pull(tmp_path, monkeypatch, "--db", ledger(tmp_path), "--ls-url", evil.url,
             "--ls-token", "a-token-for-evil", env=env)

    assert refused.exit_code == 1 and "--ls-token" in refused.output, refused.output
    assert evil.requests and {auth for _, auth in evil.requests} == {"Token a-token-for-evil"}
    assert home.requests == []


def test_a_workspace_token_file_goes_only_to_its_own_label_studio(tmp_path, monkeypatch):
    """The token file `labelassist studio` keeps records which Label Studio it is for: a
    labelassist.toml that names it beside another ls_url gets nothing sent."""
    data = tmp_path / "ls-data"
    data.mkdir()
    (data / "labelassist-token").write_text("studio-token\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    db = ledger(ws)
    with Recorder() as home, Recorder() as evil:
        (data / "labelassist-url").write_text(home.url + "\n")  # as start_studio writes it
        for url in (evil.url, home.url):
            (ws / "labelassist.toml").write_text(
                f'ls_url = "{url}"\nls_token_file = "{data / "labelassist-token"}"\n')
            result = pull(ws, monkeypatch, "--db", db)
            assert result.exit_code == 1
            if url == evil.url:
                assert len(result.output.strip().splitlines()) == 1, result.output
                assert home.url in result.output, result.output
        env_url = pull(ws, monkeypatch, "--db", db, env={"LABEL_STUDIO_URL": evil.url})

    assert env_url.exit_code == 1 and "--ls-token" in env_url.output, env_url.output
    assert evil.requests == []
    assert home.requests and {auth for _, auth in home.requests} == {"Token studio-token"}



def test_label_studios_data_folder_is_this_users_alone(tmp_path):
    """Its database holds every token and the serve secret: 0700, whatever the umask or
    an earlier run left (start_studio prepares it this way before Label Studio starts)."""
    from labelassist.labelstudio.studio import make_private_dir

    earlier = tmp_path / "ls-data"
    earlier.mkdir(mode=0o755)
    earlier.chmod(0o755)
    make_private_dir(earlier)
    make_private_dir(tmp_path / "new" / "ls-data")
    assert earlier.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "ls-data").stat().st_mode & 0o777 == 0o700
