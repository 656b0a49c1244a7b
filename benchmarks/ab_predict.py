"""A/B of `predict` itself: this checkout against another one (a git worktree of an older
commit), alternating in child processes on the same images, model and precision.

    git worktree add /tmp/old <commit>
    python benchmarks/ab_predict.py --other /tmp/old --workdir /tmp/bench --rounds 2

Prints images/s of each round and the ratio of the medians (this / other). The model is
ViT-B/32 with random weights; ingest is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from labelassist.labels import parse_label_text
from labelassist.db import open_database
from labelassist.ingest import ingest
from labelassist.model.load import load_model
from labelassist.predict.run import PredictOptions, predict
model_dir, photos, db_path, dtype, batch = sys.argv[1:6]
db = open_database(f"sqlite:///{db_path}")
ingest(db, [photos])
model = load_model(model_dir, device="cpu", dtype=dtype)
labels = parse_label_text('[classes]\ncat = ["cat"]\ndog = ["dog"]\nwild = ["lion", "fox"]\n')
s = predict(db, model, labels, PredictOptions(batch_size=int(batch), exact=dtype == "fp32"))
print(json.dumps({"rate": s.images_per_second, "n": s.predicted}))
"""


def run(tree: Path, args, tag: str) -> float:
    db = Path(args.workdir) / f"ab-{tag}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(Path(args.workdir) / "vit-b-32"),
                          str(Path(args.workdir) / "ab-photos"), str(db), args.dtype,
                          str(args.batch)], env=env, capture_output=True, text=True,
                         cwd=tree, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == args.images, result
    return result["rate"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", required=True, help="the checkout to compare against")
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import synthetic_jpegs

    from labelassist.toy.tiny import save_random_clip

    work = Path(args.workdir)
    if not (work / "vit-b-32" / "model.safetensors").exists():
        from transformers import CLIPConfig

        save_random_clip(work / "vit-b-32", CLIPConfig())
    photos = work / "ab-photos"
    if len(list(photos.glob("*.jpg"))) != args.images:
        synthetic_jpegs(photos, args.images)
    this, other = Path(__file__).resolve().parent.parent, Path(args.other).resolve()
    rates: dict[str, list[float]] = {"this": [], "other": []}
    for n in range(args.rounds):
        for tag, tree in (("other", other), ("this", this)):
            rates[tag].append(run(tree, args, tag))
            print(f"round {n + 1}, {tag:5s}: {rates[tag][-1]:6.2f} images/s", flush=True)
    ratio = statistics.median(rates["this"]) / statistics.median(rates["other"])
    print(f"this / other (medians), {args.dtype}, batch {args.batch}: {ratio:.3f}")


if __name__ == "__main__":
    main()
