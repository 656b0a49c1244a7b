"""predict --ray against the local predict, and what limits a bigger cluster.

    python benchmarks/ray_predict.py            # about 8 min on 2 cores
    python benchmarks/ray_predict.py --images 200 --rows 5000   # a smoke test
    python benchmarks/ray_predict.py --driver-only   # the driver's ceiling, about 2 min

1. Overhead: the same JPEGs (512x512) through `labelassist predict` and through
   `labelassist predict --ray` on a local two-node cluster (a head and a worker node, one
   CPU each, as two small machines on this one), full ViT-B/32 with random weights, fp32.
   Each command runs as a user runs it; images/s is what its summary prints (predict time:
   on --ray it includes placing the actors and loading the model in them), and the
   driver's CPU seconds per image are measured from the child's resource usage.
2. The ledger: prediction batches (256 rows, 512-d embeddings) written through the write
   path that both predicts use (predict.Run.write_batch), into SQLite and PostgreSQL.
3. The driver's ceiling: a tiny CLIP on small images in batches of 256, so encoding costs
   nearly nothing and the driver's CPU per image is what is measured.
4. Scaling on paper, from those numbers: a cluster of N nodes encodes N times what one
   node does, until the one driver (its CPU per image) or the database (rows per second)
   is the limit.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput import LABELS, synthetic_jpegs  # noqa: E402

from labelassist.labels import parse_label_text  # noqa: E402
from labelassist.db import open_database  # noqa: E402
from labelassist.predict.feed import Batch  # noqa: E402
from labelassist.model.load import load_model  # noqa: E402
from labelassist.toy.tiny import save_random_clip  # noqa: E402
from labelassist.model.zeroshot import build_text_classifier  # noqa: E402
from tests.raycluster import LocalCluster  # noqa: E402

BIN = Path(sys.executable).parent
PG = os.environ.get("LABELASSIST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def timed_predict(args: list, env: dict) -> dict:
    """One `labelassist predict` as a user runs it: its printed images/s, wall time and
    CPU seconds (the driver's own, on --ray)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "labelassist"), "predict", *map(str, args)], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(out.stderr)
    summary = re.search(r"([\d,]+) predicted .* ([\d.,]+) images/s", out.stderr)
    images, rate = int(summary[1].replace(",", "")), float(summary[2].replace(",", ""))
    ready = re.search(r"actors ready in (\d+) s; driver ([\d.]+) ms CPU", out.stderr)
    startup = float(ready[1]) if ready else 0.0
    return {"images": images, "rate": rate, "wall": wall,
            "steady": images / (images / rate - startup), "startup": startup,
            "driver_ms": float(ready[2]) if ready else None,
            "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def overhead(work: Path, model_dir: Path, labels: Path, images: int) -> dict:
    synthetic_jpegs(work / "jpegs", images)
    urls = {}
    for side in ("local", "ray"):
        urls[side] = f"sqlite:///{work / side}.db"
        subprocess.run([str(BIN / "labelassist"), "ingest", work / "jpegs", "--db",
                        urls[side]], check=True, capture_output=True)
    common = ["--labels", labels, "--model", model_dir, "--dtype", "fp32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    local = timed_predict(["--db", urls["local"], *common], env)
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="la-ray-", dir="/tmp")))
    try:
        on_ray = timed_predict(["--db", urls["ray"], "--ray", cluster.address, *common],
                               {**env, **cluster.auth})
    finally:
        cluster.stop()
    return {"local": local, "ray": on_ray}


def driver_ceiling(work: Path, labels: Path, images: int) -> dict:
    """The driver's own cost per image when the cluster is fast: a tiny CLIP (encoding
    is nearly free) on small images, in GPU-sized batches (256), so the driver (claims,
    Ray calls, probabilities, writes) and decoding are what is left."""
    from tests.imagegen import write_shape_images

    from labelassist.toy.tiny import tiny_clip_config

    model_dir = save_random_clip(work / "tiny", tiny_clip_config())
    write_shape_images(work / "small", images)
    url = f"sqlite:///{work / 'driver.db'}"
    subprocess.run([str(BIN / "labelassist"), "ingest", work / "small", "--db", url],
                   check=True, capture_output=True)
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="la-ray-", dir="/tmp")))
    try:
        return timed_predict(["--db", url, "--ray", cluster.address, "--labels", labels,
                              "--model", model_dir, "--dtype", "fp32", "--batch-size", 256],
                             {**os.environ, "HF_HUB_OFFLINE": "1", **cluster.auth})
    finally:
        cluster.stop()


def write_rate(url: str, classifier, rows: int, batch: int = 256) -> float:
    """Rows per second through predict.Run.write_batch (embeddings, predictions, claims),
    with the probabilities computed as predict.Writer computes them."""
    from tests.bigledger import add_images

    from labelassist.db.claims import register_worker
    from labelassist.db.models import ModelVersion, utcnow
    from labelassist.predict.run import PredictOptions, PredictSummary, Run

    db = open_database(url)
    add_images(url, rows)
    with db.write() as s:
        version = ModelVersion(name="bench@1", kind="zeroshot", model_id="bench",
                               model_key="bench", created_at=utcnow(),
                               label_set=parse_label_text(LABELS).to_json())
        s.add(version)
        s.flush()
        s.expunge(version)
    run = Run(db, None, classifier, version, register_worker(db, version.id),
              PredictOptions(batch_size=batch), PredictSummary("bench"), lambda: None,
              threading.Event())
    rng = np.random.default_rng(0)
    dim = classifier.weights.shape[0]  # (D, descriptions)
    started = time.perf_counter()
    for first in range(1, rows + 1, batch):
        ids = list(range(first, min(first + batch, rows + 1)))
        vectors = torch.nn.functional.normalize(
            torch.from_numpy(rng.standard_normal((len(ids), dim), np.float32)), dim=1)
        run.write_batch(Batch(ids), vectors, classifier.scores(vectors),
                        store_embeddings=True)
    seconds = time.perf_counter() - started
    db.dispose()
    return rows / seconds


def fresh_pg() -> str | None:
    import uuid

    import sqlalchemy as sa

    try:
        admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
        name = f"la_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return PG.rsplit("/", 1)[0] + f"/{name}"
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL not reachable ({exc.orig}): its row skipped")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per write measurement")
    parser.add_argument("--gpu-node-rate", type=float, default=3000.0,
                        help="images/s of one GPU node, for the scaling table (an input: "
                        "no GPU is measured here)")
    parser.add_argument("--driver-only", action="store_true",
                        help="only the driver's ceiling (about 2 min)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="la-bench-ray-"))
    labels = work / "labels.toml"
    labels.write_text(LABELS)
    fast = driver_ceiling(work, labels, 4000)
    driver = 1000 / fast["driver_ms"]
    print(f"\nthe driver, with a tiny CLIP on 4,000 small images in batches of 256: "
          f"{fast['rate']:,.0f} images/s through the cluster, {fast['driver_ms']:.2f} ms of "
          f"driver CPU per image: one driver core keeps up with {driver:,.0f} images/s")
    if args.driver_only:
        return
    model_dir = save_random_clip(work / "vit-b32")  # CLIPConfig() defaults: ViT-B/32

    runs = overhead(work, model_dir, labels, args.images)
    local, ray = runs["local"], runs["ray"]
    print(f"\n{args.images} JPEGs 512x512, ViT-B/32 fp32, 2 cores")
    print(f"{'path':<32}{'images/s':>10}{'after start-up':>16}{'wall s':>8}")
    for name, r in (("labelassist predict", local), ("predict --ray (head + 1 node)", ray)):
        print(f"{name:<32}{r['rate']:>10.1f}{r['steady']:>16.1f}{r['wall']:>8.1f}")
    print(f"--ray reaches {ray['rate'] / local['rate']:.0%} of the local predict (goal: 80%), "
          f"{ray['steady'] / local['steady']:.0%} once its actors are up ({ray['startup']:.0f} s "
          f"to place them and load the model); wall time {ray['wall'] / local['wall']:.2f}x")

    classifier = build_text_classifier(load_model(str(model_dir), device="cpu", dtype="fp32"),
                                       parse_label_text(LABELS))
    rates = {"SQLite (file)": write_rate(f"sqlite:///{work / 'writes.db'}", classifier,
                                         args.rows)}
    if (pg := fresh_pg()) is not None:
        rates["PostgreSQL 15 (local)"] = write_rate(pg, classifier, args.rows)
    print("\nledger writes: prediction batches of 256 (512-d embeddings), one transaction each")
    for name, rate in rates.items():
        print(f"  {name:<24}{rate:>10,.0f} rows/s")

    node = ray["steady"] / 2  # two one-CPU nodes
    print(f"\nscaling on paper: N nodes encode N times one node, up to what one driver "
          f"core ({driver:,.0f} images/s) or the database takes")
    for kind, per_node in (("CPU node (this machine's core)", node),
                           ("GPU node (assumed)", args.gpu_node_rate)):
        print(f"  {kind}: {per_node:,.0f} images/s each")
        for name, write in rates.items():
            limit = min(driver, write)
            print(f"    {name}: the limit is {limit:,.0f} images/s "
                  f"({'the driver' if driver < write else 'the database'}), reached at "
                  f"{max(1.0, limit / per_node):,.1f} nodes")


if __name__ == "__main__":
    main()
