"""Images in a bucket against the same images on disk, at a few thousand objects.

    python benchmarks/object_storage.py                   # 500 and 4,000 objects, with --ray
    python benchmarks/object_storage.py --sizes 200 --no-ray   # a smoke test

A real S3-compatible server (moto_server, its own process: tests/s3server.py) holds small
real images (96x80 to 174x148 shapes, PNG and JPEG). For each size:
1. `ingest s3://bench/nN` in a child process: its time, the list requests it made, and its
   peak RSS above its RSS after imports (VmHWM, as benchmarks/memory.py): flat in N when
   the listing goes a page at a time.
2. At the largest size: `labelassist predict` (a tiny random CLIP, fp32) on the bucket's
   ledger and on a ledger of the same files on disk, `labelassist export` of both (every
   prediction reviewed as predicted), and with --ray `labelassist predict --ray` on a
   two-node local cluster (tests/raycluster.py) whose nodes have the AWS variables and
   whose driver has none. Predictions must match image by image, and the exports file by
   file; the script fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.imagegen import write_shape_images
from tests.s3server import aws_env, recorded_requests, s3_client, s3_server

BIN = Path(sys.executable).parent
BUCKET = "bench"
LABELS = '[classes]\nwarm = ["red", "orange"]\ncool = ["blue"]\nplain = ["grey"]\n'

# Runs in the child: one ingest, prints {"base": MiB, "peak": MiB, ...}.
CHILD = r"""
import json, sys, time
url, target = sys.argv[1:3]
from labelassist.db import open_database
from labelassist.ingest import ingest

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(key)) / 1024

db = open_database(url)
import fsspec, s3fs  # imported before the baseline, as ingest's first listing would
base = status("VmRSS")
started = time.perf_counter()
summary = ingest(db, [target])
print(json.dumps({"base": base, "peak": status("VmHWM"), "added": summary.added,
                  "seconds": time.perf_counter() - started}))
"""


def upload(endpoint: str, root: Path, prefix: str) -> None:
    client = s3_client(endpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(
            Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(root).as_posix()}",
            Body=p.read_bytes()), files))


def run(*args, env=None) -> str:
    out = subprocess.run([str(BIN / "labelassist"), *map(str, args)], capture_output=True,
                         text=True, env=env or os.environ, check=False)
    if out.returncode != 0:
        raise SystemExit(f"labelassist {args[0]} failed:\n{out.stderr[-3000:]}")
    return out.stderr


def ingest_child(url: str, target: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, url, target], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"ingest failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predictions(url: str) -> dict:
    from sqlalchemy import select

    from labelassist.db import open_database
    from labelassist.db.models import Image, Prediction

    db = open_database(url)
    with db.read() as s:
        rows = s.execute(select(Image.sha256, Prediction.label, Prediction.scores)
                         .join(Prediction)).all()
    db.dispose()
    return {sha: (label, scores) for sha, label, scores in rows}


def same_predictions(a: dict, b: dict, what: str) -> None:
    if a.keys() != b.keys():
        raise SystemExit(f"{what}: {len(a)} against {len(b)} images predicted")
    worst = max(abs(a[k][1][c] - b[k][1][c]) for k in a for c in a[k][1])
    labels = sum(a[k][0] != b[k][0] for k in a)
    if labels or worst > 1e-5:
        raise SystemExit(f"{what}: {labels} labels differ, scores by up to {worst:.2g}")
    print(f"  {what}: the same {len(a):,} predictions (scores within {worst:.1g})")


def review_as_predicted(url: str) -> None:
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import select

    from labelassist.db import open_database
    from labelassist.db.models import Prediction
    from tests.conftest import add_annotation

    db = open_database(url)
    with db.read() as s:
        rows = s.execute(select(Prediction.image_id, Prediction.label)).all()
    for n, (image_id, label) in enumerate(rows):
        add_annotation(db, image_id, label, n=n)
    db.dispose()


def manifest(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return sorted((r["file"], r["sha256"], r["label"], r["split"]) for r in rows)


def compare(work: Path, endpoint: str, n: int, model: Path, ray: bool) -> None:
    urls = {side: f"sqlite:///{work / f'{side}{n}.db'}" for side in ("disk", "ray")}
    urls["bucket"] = f"sqlite:///{work / f'bucket{n}.db'}"
    labels = work / "labels.toml"
    labels.write_text(LABELS)
    args = ("--labels", labels, "--model", model, "--dtype", "fp32")
    run("ingest", work / f"disk{n}", "--db", urls["disk"])
    for side in ("disk", "bucket"):
        started = time.perf_counter()
        line = run("predict", "--db", urls[side], *args).strip().splitlines()[-1]
        print(f"  predict ({side}): {time.perf_counter() - started:.0f} s; {line}")
    same_predictions(predictions(urls["disk"]), predictions(urls["bucket"]),
                     "bucket against disk")
    for side in ("disk", "bucket"):
        review_as_predicted(urls[side])
        started = time.perf_counter()
        run("export", work / f"out-{side}", "--db", urls[side], "--format", "imagefolder")
        print(f"  export ({side}): {time.perf_counter() - started:.0f} s")
    if manifest(work / "out-disk") != manifest(work / "out-bucket"):
        raise SystemExit("the exports differ")
    print(f"  export: the same {len(manifest(work / 'out-bucket')):,} files, labels, splits")
    if ray:
        predict_on_ray(work, endpoint, n, urls, args)


def predict_on_ray(work: Path, endpoint: str, n: int, urls: dict, args: tuple) -> None:
    from tests.raycluster import LocalCluster

    run("ingest", f"s3://{BUCKET}/n{n}", "--db", urls["ray"])
    cluster = LocalCluster(Path(f"/tmp/la-s3b-{os.getpid()}"))  # nodes: the AWS variables
    try:
        driver = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                  **cluster.auth}
        started = time.perf_counter()
        line = run("predict", "--ray", cluster.address, "--db", urls["ray"], *args,
                   env=driver).strip().splitlines()[-1]
        print(f"  predict --ray (2 nodes): {time.perf_counter() - started:.0f} s; {line}")
    finally:
        cluster.stop()
    same_predictions(predictions(urls["disk"]), predictions(urls["ray"]),
                     "--ray on the bucket against disk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,4000")
    parser.add_argument("--no-ray", action="store_true")
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    from labelassist.toy.tiny import save_random_clip, tiny_clip_config

    with tempfile.TemporaryDirectory(prefix="la-s3bench-") as tmp, s3_server() as endpoint:
        work = Path(tmp)
        os.environ.update(aws_env(endpoint))
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        model = save_random_clip(work / "tiny-clip", tiny_clip_config())
        for n in sizes:
            write_shape_images(work / f"disk{n}", n)
            started = time.perf_counter()
            upload(endpoint, work / f"disk{n}", f"n{n}")
            print(f"{n:,} objects uploaded in {time.perf_counter() - started:.0f} s")
            before = len(recorded_requests(endpoint))
            got = ingest_child(f"sqlite:///{work / f'bucket{n}.db'}", f"s3://{BUCKET}/n{n}")
            lists = sum("list-type=2" in r["url"] for r in recorded_requests(endpoint)[before:])
            print(f"  ingest s3://{BUCKET}/n{n}: {got['added']:,} added in "
                  f"{got['seconds']:.1f} s ({got['added'] / got['seconds']:.0f} objects/s), "
                  f"{lists} list requests, peak RSS {got['peak'] - got['base']:.0f} MiB above "
                  f"the {got['base']:.0f} MiB after imports")
        compare(work, endpoint, sizes[-1], model, not opts.no_ray)


if __name__ == "__main__":
    main()
