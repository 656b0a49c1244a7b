"""A Label Studio project as its users make one (through Label Studio's API: a labeling
config of their own, a storage, a sync), and a real `labelassist serve` process answering
it. For the tests of serving projects that labelassist never pushed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from sqlalchemy import func, select

from labelassist.db import open_database
from labelassist.labelstudio.studio import free_port

SECRET = "any-project-secret-for-tests"


def wait_for(check, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class StudioProject:
    def __init__(self, ls, tmp, title: str, config: str):
        self.ls, self.tmp, self.title = ls, tmp, title
        self.http = httpx.Client(base_url=ls.url, timeout=60,
                                 headers={"Authorization": f"Token {ls.token}"})
        self.db_url = f"sqlite:///{tmp / 'ledger.db'}"
        self.db = open_database(self.db_url)
        made = self.http.post("/api/projects", json={"title": title, "label_config": config})
        made.raise_for_status()
        self.id = made.json()["id"]
        self.proc = None

    def add_storage(self, kind: str, settings: dict, expect: int) -> None:
        """A storage of Label Studio's ("localfiles", "s3"), synced: `expect` tasks."""
        storage = self.http.post(f"/api/storages/{kind}", json={"project": self.id,
                                                                **settings})
        storage.raise_for_status()
        self.http.post(f"/api/storages/{kind}/{storage.json()['id']}/sync").raise_for_status()
        wait_for(lambda: len(self.tasks()) == expect, what=f"the {kind} storage's sync")

    def tasks(self) -> list[dict]:
        return self.http.get("/api/tasks", params={"project": self.id, "page_size": 100,
                                                   "fields": "all"}).json()["tasks"]

    def retrieve_predictions(self) -> None:
        """The Data Manager's "Retrieve predictions" on every task of the project."""
        self.http.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions",
                                                  "project": self.id},
                       json={"selectedItems": {"all": True, "excluded": []}},
                       timeout=300).raise_for_status()

    def count(self, model, *where) -> int:
        with self.db.read() as s:
            return s.scalar(select(func.count()).select_from(model).where(*where))

    def serve(self, *args: str) -> None:
        """`labelassist serve --host 127.0.0.1 --port PORT ARGS...`, until it serves."""
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "LABEL_STUDIO_URL": self.ls.url,
               "LABEL_STUDIO_API_KEY": self.ls.token, "LABELASSIST_SERVE_SECRET": SECRET,
               "LABELASSIST_DB": self.db_url}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labelassist.cli", "serve", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1], *args], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.said = []
        for line in self.proc.stderr:  # ends only if it dies
            self.said.append(line)
            if line.startswith("serving "):
                return
        raise AssertionError(f"serve died: {self.proc.wait()}: {''.join(self.said)}")

    def status(self) -> dict:
        return httpx.get(self.url + "/", auth=("labelassist", SECRET), timeout=10).json()

    def stop_serving(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        self.stop_serving()
        self.db.dispose()
