"""`labelassist serve` against a real Label Studio, on the toy world: how fast is the loop?

    python benchmarks/serve_latency.py              # 1,000 tasks: about 5 min on 2 cores
    python benchmarks/serve_latency.py --images 300 # quicker

It starts a Label Studio (labelassist.labelstudio.studio), pre-labels toy-world pictures with the
vague descriptions, pushes them, and starts `labelassist serve --learn-every 20`. Then:
1. predict for known tasks: single-task requests, as Label Studio sends them when a
   reviewer opens a task; p50 and p95 over --requests of them;
2. the loop: reviews are submitted through Label Studio's API in uncertainty order
   (lowest score first), 20 at a time, until a learn stores the probe; the clock runs
   from the review that triggered that learn until Label Studio's project shows the
   probe's model_version and an unreviewed task carries its prediction.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECRET = "bench-secret-0123456789"  # serve refuses a secret under 16 characters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    import httpx
    from typer.testing import CliRunner

    from labelassist.cli import app
    from labelassist.labelstudio.studio import free_port, start_studio
    from labelassist.toy.world import WARM, cached_model, write_images

    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    model = cached_model(Path.home() / ".cache" / "labelassist", log=print)
    (work / "root").mkdir()
    studio = start_studio(free_port(), work / "root", work / "ls-data")
    serve = None
    try:
        photos = work / "root" / "photos"
        write_images(photos, args.images, seed=11)
        db_url = f"sqlite:///{work / 'ledger.db'}"
        env = {**os.environ, "LABEL_STUDIO_URL": studio.url,
               "LABEL_STUDIO_API_KEY": studio.token,
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(studio.root),
               "LABELASSIST_SERVE_SECRET": SECRET, "LABELASSIST_DB": db_url}
        runner = CliRunner()
        for command in (["run", str(photos), "--labels",
                         str(ROOT / "examples" / "toyworld" / "labels-vague.toml"),
                         "--model", str(model)],
                        ["push", "--project", "latency", "--order", "uncertain"]):
            result = runner.invoke(app, command, env=env)
            assert result.exit_code == 0, result.output
        port = free_port()
        serve = subprocess.Popen(
            [sys.executable, "-m", "labelassist.cli", "serve", "--project", "latency",
             "--port", str(port), "--learn-every", "20"], env=env, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        for line in serve.stderr:
            if line.startswith("serving "):
                break
        ls = httpx.Client(base_url=studio.url, timeout=120,
                          headers={"Authorization": f"Token {studio.token}"})
        project = next(p["id"] for p in ls.get("/api/projects").json()["results"]
                       if p["title"] == "latency")
        tasks = ls.get("/api/tasks", params={"project": project, "page_size": 5000,
                                             "fields": "all"}).json()["tasks"]
        auth = {"Authorization": "Basic " + base64.b64encode(f"labelassist:{SECRET}".encode()).decode()}
        url = f"http://127.0.0.1:{port}"

        timings = []
        with httpx.Client(timeout=30) as http:
            for task in (tasks * (args.requests // len(tasks) + 1))[:args.requests]:
                started = time.perf_counter()
                http.post(url + "/predict", headers=auth, json={
                    "tasks": [{"id": task["id"], "data": task["data"],
                               "project": project}], "project": f"{project}.1"}
                          ).raise_for_status()
                timings.append(time.perf_counter() - started)
        timings.sort()
        print(f"predict, known tasks: p50 {1000 * timings[len(timings) // 2]:.1f} ms, "
              f"p95 {1000 * timings[int(len(timings) * 0.95)]:.1f} ms "
              f"({len(timings)} single-task requests)")

        scores = {t["id"]: min(p["score"] for p in t["predictions"]) for t in tasks}
        first = ls.get(f"/api/projects/{project}").json().get("model_version")
        order = sorted(tasks, key=lambda t: scores[t["id"]])  # least sure first
        last = order[-1]["id"]
        for done in range(20, 201, 20):  # review in rounds of 20 until the probe wins
            for task in order[done - 20:done]:
                name = task["data"]["image"].rsplit("%2F", 1)[-1].rsplit("/", 1)[-1]
                label = "warm" if name.split("_")[0] in WARM else "cool"
                ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": [
                    {"from_name": "label", "to_name": "image", "type": "choices",
                     "value": {"choices": [label]}}]}).raise_for_status()
            submitted = time.perf_counter()
            while time.perf_counter() - submitted < 120:
                shown = ls.get(f"/api/projects/{project}").json().get("model_version")
                if shown and shown != first and shown.startswith("probe@") and shown in {
                        p["model_version"] for p in
                        ls.get(f"/api/tasks/{last}").json()["predictions"]}:
                    break
                status = httpx.get(url + "/", headers=auth).json()
                learned = status["last_learn"] or {}
                if learned.get("reviews", 0) >= done and not learned.get("stored_version"):
                    break  # this round's learn kept zero-shot: review more
                time.sleep(0.1)
            else:
                print(f"no answer within 120 s: {httpx.get(url + '/', headers=auth).json()}")
                return
            if shown.startswith("probe@"):
                break
        else:
            print("the probe never beat zero-shot within 200 reviews")
            return
        print(f"loop, {len(tasks)} tasks: from the review that triggered learn (the {done}th) "
              f"to the probe's predictions shown in Label Studio: "
              f"{time.perf_counter() - submitted:.1f} s ({shown})")
        status = httpx.get(url + "/", headers=auth).json()
        learned = status["last_learn"]
        print(f"learn on {learned['reviews']} reviews: zero-shot "
              f"{learned['zero_shot_accuracy']:.1%}, probe {learned['probe_accuracy']:.1%}; "
              f"accept would take {status['auto_accept_share']:.0%} of the rest")
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
        studio.stop()


if __name__ == "__main__":
    main()
