"""predict --ray on a real local Ray cluster: a head and a second worker node, started as
separate processes on 127.0.0.1 (each node offers one CPU), driven through the CLI.

What is checked against the local path: the same predictions and the same bad-file
reasons. What is checked under faults: a worker node killed mid-run (the job completes,
each image has one prediction and one embedding), the driver killed mid-run (a rerun
resumes), and the driver's memory with 10k against 100k pending images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.db.models import Embedding, Image, Prediction
from labelassist.ingest import ingest
from labelassist.predict.run import predict

from .imagegen import write_shape_images
from .raycluster import LocalCluster, free_port
from .test_hostile import corpus  # noqa: F401  (the hostile files, as a fixture)

if not os.environ.get("CI"):  # under CI a missing Ray fails, never skips
    pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

BIN = Path(sys.executable).parent
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\nplain = ["grey"]\n'


@pytest.fixture(scope="module")
def cluster():
    """The local cluster; every driver below (the CLI, in subprocesses) joins it with the
    cluster's token."""
    local = LocalCluster(Path(f"/tmp/la-ray-{os.getpid()}"))
    with pytest.MonkeyPatch.context() as env:
        for key, value in local.auth.items():
            env.setenv(key, value)
        yield local
    local.stop()


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.toml"
    path.write_text(LABELS)
    return path


def labelassist(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "labelassist"), *map(str, args)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def count(db_url: str, model, *where) -> int:
    db = open_database(db_url)
    with db.read() as s:
        n = s.scalar(select(func.count()).select_from(model).where(*where))
    db.dispose()
    return n


def wait_for_predictions(db_url: str, at_least: int, proc, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while (n := count(db_url, Prediction)) < at_least:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no predictions came"
        time.sleep(0.05)
    return n


def by_sha(db_url: str) -> tuple[dict, dict, dict]:
    """sha256 -> (label, scores), -> embedding, -> error reason."""
    db = open_database(db_url)
    with db.read() as s:
        preds = {sha: (label, scores) for sha, label, scores in s.execute(
            select(Image.sha256, Prediction.label, Prediction.scores).join(Prediction))}
        vectors = {sha: np.frombuffer(v, np.float32) for sha, v in s.execute(
            select(Image.sha256, Embedding.vector).join(Embedding))}
        errors = dict(s.execute(select(Image.sha256, Image.error)).all())
    db.dispose()
    return preds, vectors, errors


def test_ray_predicts_what_the_local_path_predicts_with_the_same_bad_file_reasons(
        cluster, corpus, photo_dir, labels, tiny_clip_dir, tiny_model, tmp_path):  # noqa: F811
    urls = {side: f"sqlite:///{tmp_path / side}.db" for side in ("local", "ray")}
    for url in urls.values():
        ingest(open_database(url), [photo_dir, corpus])
    # Broken after ingest, so that predict meets them: one file changed, one gone.
    changed, gone = sorted(photo_dir.rglob("*.png"))[:2]
    changed.write_bytes(changed.read_bytes() + b"\0")
    gone.unlink()
    local = predict(open_database(urls["local"]), tiny_model, parse_label_text(LABELS))
    err = finish(labelassist("predict", "--ray", cluster.address, "--db", urls["ray"],
                             "--labels", labels, "--model", tiny_clip_dir, "--dtype", "fp32"))
    assert "Ray: 2 encoder actors on cpu, 2 nodes" in err
    assert f"{local.encoded} predicted ({local.encoded} encoded" in err
    for reason, n in local.failed.items():
        assert f"skipped {n} ({reason})" in err

    (local_preds, local_vectors, local_errors), (ray_preds, ray_vectors, ray_errors) = \
        by_sha(urls["local"]), by_sha(urls["ray"])
    assert len(ray_preds) == local.encoded == 28  # 22 shapes and 6 hostile files that decode
    assert ray_errors == local_errors  # the same reasons recorded, image by image
    assert {sha: label for sha, (label, _) in ray_preds.items()} == \
        {sha: label for sha, (label, _) in local_preds.items()}
    for sha, (_, scores) in ray_preds.items():
        assert scores == pytest.approx(local_preds[sha][1], abs=1e-5)
        np.testing.assert_allclose(ray_vectors[sha], local_vectors[sha], atol=1e-5)


def many_images(tmp_path, labels, count_: int = 300) -> str:
    url = f"sqlite:///{tmp_path / 'many.db'}"
    write_shape_images(tmp_path / "many", count_)
    ingest(open_database(url), [tmp_path / "many"])
    return url


def assert_each_image_once(url: str) -> None:
    images = count(url, Image)
    assert count(url, Prediction) == images
    assert count(url, Embedding) == images
    db = open_database(url)
    with db.read() as s:
        assert s.scalar(select(func.count(func.distinct(Prediction.image_id)))) == images
    db.dispose()


def test_a_worker_node_killed_mid_run_the_job_completes_each_image_once(
        cluster, labels, tiny_clip_dir, tmp_path):
    cluster.ensure_two_nodes()
    url = many_images(tmp_path, labels)
    proc = labelassist("predict", "--ray", cluster.address, "--db", url, "--labels", labels,
                       "--model", tiny_clip_dir, "--batch-size", 2)
    done_before = wait_for_predictions(url, 10, proc)
    cluster.kill_worker_node()
    err = finish(proc)
    assert done_before < 300
    assert "failed on the cluster" in err and "sending it again" in err  # the kill hit work
    assert_each_image_once(url)


def test_the_driver_killed_mid_run_a_rerun_resumes_without_duplicates(
        cluster, labels, tiny_clip_dir, tmp_path):
    cluster.ensure_two_nodes()
    url = many_images(tmp_path, labels)
    args = ("predict", "--ray", cluster.address, "--db", url, "--labels", labels, "--model",
            tiny_clip_dir, "--batch-size", 2)
    first = labelassist(*args)
    wait_for_predictions(url, 10, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = count(url, Prediction)
    assert 0 < written < 300
    # The rerun may size the cluster's work differently: one actor, a whole node's CPU.
    err = finish(labelassist(*args, "--ray-actors", 1, "--ray-actor-cpus", 1))
    assert "Ray: 1 encoder actor on cpu, 2 nodes" in err
    assert f"{300 - written} predicted" in err
    assert_each_image_once(url)


DRIVER = """
import json, sys, threading, tracemalloc
from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.predict.distributed.driver import RayOptions, predict_on_ray
from labelassist.model.load import load_model
from labelassist.predict.run import PredictOptions

url, model_dir, address = sys.argv[1:]
model = load_model(model_dir, device="cpu", dtype="fp32")
stop = threading.Event()
tracemalloc.start()
summary = predict_on_ray(open_database(url), model, parse_label_text(LABELS),
                         PredictOptions(), RayOptions(address), dtype="fp32",
                         on_progress=lambda done, total: stop.set() if done >= 600 else None,
                         stop=stop)
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1],
                  "done": summary.predicted + sum(summary.failed.values())}))
"""


def test_driver_memory_is_flat_from_10k_to_100k_pending_images(cluster, tiny_clip_dir,
                                                                tmp_path):
    from .bigledger import add_images

    cluster.ensure_two_nodes()
    peaks = {}
    for n in (10_000, 100_000):
        url = f"sqlite:///{tmp_path / f'big{n}.db'}"
        open_database(url).dispose()
        add_images(url, n)  # rows only: the files do not exist, so each decodes as missing
        out = subprocess.run([sys.executable, "-c", f"LABELS = {LABELS!r}\n" + DRIVER, url,
                              str(tiny_clip_dir), cluster.address],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["done"] >= 600  # the same work at both sizes, through the cluster
        peaks[n] = result["peak"]
    # Listing 100k pending rows would hold about 25 MB more than 10k.
    assert peaks[100_000] - peaks[10_000] < 3 * 2**20, peaks


def test_ray_errors_are_one_line(labels, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from labelassist.cli import app

    url = f"sqlite:///{tmp_path / 'l.db'}"
    runner = CliRunner()
    port = free_port()  # nothing listens there
    cases = {
        (f"127.0.0.1:{port}",): f"error: --ray 127.0.0.1:{port}: no Ray cluster answers there",
        ("nowhere",): "error: --ray nowhere: give HOST:PORT of the cluster's head",
        ("auto", "--workers", "2"): "error: --workers and --ray: choose one",
        ("auto", "--feed", "processes"): "error: --feed and --decode-workers are for a local",
        ("auto", "--dtype", "ov-int8"): "error: --dtype ov-int8 is not available with --ray",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["predict", "--db", url, "--labels", str(labels),
                                     "--ray", *args])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(message), result.output
        assert "Traceback" not in result.output
    lf = str(labels)
    for result in (runner.invoke(app, ["predict", "--db", url, "--labels", lf,
                                       "--ray-actors", "2"]),
                   runner.invoke(app, ["predict", "--db", url, "--labels", lf,
                                       "--ray-actor-cpus", "2"])):
        assert result.exit_code == 1
        assert result.output.startswith("error: --ray-actors and --ray-actor-cpus go with --ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = runner.invoke(app, ["predict", "--db", url, "--labels", str(labels),
                                 "--ray", "auto"])
    assert result.exit_code == 1
    assert result.output.startswith("error: --ray needs Ray: pip install 'labelassist[ray]'")
    assert not Path(tmp_path / "l.db").exists()  # nothing was written


def test_a_local_run_never_imports_ray(photo_dir, labels, tiny_clip_dir, tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom labelassist.cli import app\n"
            f"r = CliRunner().invoke(app, ['run', {str(photo_dir)!r}, '--db', "
            f"'sqlite:///{tmp_path}/l.db', '--labels', {str(labels)!r}, '--model', "
            f"{str(tiny_clip_dir)!r}, '--dtype', 'fp32'])\n"
            "assert r.exit_code == 0, r.output\nprint(sorted(m for m in sys.modules "
            "if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
