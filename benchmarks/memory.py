"""Peak memory of ingest, accept, export and pull at 10k and 100k images: it must stay flat.

    python benchmarks/memory.py                      # 10k and 100k: ~10 min on 2 cores
    python benchmarks/memory.py --sizes 2000,20000   # quicker

For each size it writes that many small real PNGs and ingests them for real; then it adds
predictions for every image and a fixed number of reviews straight into the ledger (running
the model on 100k images would take hours here, and memory is what is measured). Pull reads
a local server that serves the Label Studio task API for every image, a page at a time.

Each command runs in its own child process; the figure is the child's peak RSS minus its
RSS after imports, so the size of torch and Python does not hide a growth. Reviews stay
at --reviews whatever the size: what grows with the folder is images and predictions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.bigledger import TaskServer, add_predictions_and_reviews  # noqa: E402

# Runs in the child: measures one operation, prints {"base": MiB, "peak": MiB, ...}.
CHILD = r"""
import json, sys
op, url, root, server = sys.argv[1:5]
from labelassist.db import open_database
from labelassist.ingest import ingest
from labelassist.trust.accept import accept_trusted
from labelassist.trust.audit import TrustOptions
from labelassist.outputs.export import export
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.labelstudio.pull import pull
db = open_database(url)

def status(key):  # VmHWM, not ru_maxrss: that one keeps the parent's peak across exec
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(key)) / 1024

base = status("VmRSS")
if op == "ingest":
    result = ingest(db, [root]).added
elif op == "accept":
    result = sum(accept_trusted(db, trust=TrustOptions(0.9, 30)).accepted.values())
elif op.startswith("export"):
    fmt = op.split("-")[1]
    result = export(db, f"{root}.{fmt}", fmt, include_auto=True,
                    trust=TrustOptions(0.9, 30), overwrite=True).rows
else:
    result = pull(db, LabelStudioClient(Connection(server, "token")), full=True).tasks_seen
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "result": result}))
"""


def write_images(folder: Path, count: int) -> None:
    """Small distinct PNGs (distinct bytes, so distinct content hashes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        colour = (i % 256, (i // 256) % 256, (i // 65536) % 256)
        Image.new("RGB", (8, 8), colour).save(sub / f"img{i:06d}.png")


def measure(op: str, url: str, root: Path, server: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, op, url, str(root), server],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{op} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--reviews", type=int, default=1000)
    parser.add_argument("--ops", default="ingest,accept,export-jsonl,export-imagefolder,pull")
    args = parser.parse_args()
    ops = args.ops.split(",")
    table = {}
    with tempfile.TemporaryDirectory(prefix="la-memory-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            work = Path(tmp) / str(size)
            url = f"sqlite:///{work}/ledger.db"
            write_images(work / "images", size)
            table[size] = {"ingest": measure("ingest", url, work / "images", "")}
            add_predictions_and_reviews(url, args.reviews)
            with TaskServer(url) as live:
                for op in ops:
                    if op != "ingest":
                        table[size][op] = measure(op, url, work / "images", live.url)
            for op, r in table[size].items():
                print(f"{size:>7} images  {op:<19} peak {r['peak']:7.1f} MiB   "
                      f"growth {r['peak'] - r['base']:7.1f} MiB   ({r['result']} done, "
                      f"{r['seconds']:.0f} s)", flush=True)
    sizes = sorted(table)
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        print(f"\ngrowth over a {big // small}x bigger folder (MiB, peak minus after-imports):")
        for op in ops:
            a, b = table[small][op], table[big][op]
            print(f"  {op:<19} {a['peak'] - a['base']:7.1f} -> {b['peak'] - b['base']:7.1f}")


if __name__ == "__main__":
    main()
