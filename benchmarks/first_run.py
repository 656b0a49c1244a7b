"""A first `labelassist run` by image count: does `--dtype auto`'s runtime trial pay for
itself? One run on this machine: ViT-B/32 with random weights (the real model's compute),
512x512 JPEGs, `labelassist run FOLDER` end to end (start-up, ingest, predict) in a child
process, with the blog's per-image loop measured in the same run.

For each count, three first runs, each in a fresh workspace:
- default: `--dtype bf16` where the CPU is fast at it, else fp32 (what auto runs unmeasured);
- auto, new machine: `--dtype auto` with an empty cache (nothing measured here before);
- auto, measured before: `--dtype auto` with the cache of an earlier `labelassist runtimes`
  in another workspace on this machine (its speed memory and converted towers).

    python benchmarks/first_run.py --workdir /tmp/first-run           # 1,000; 5,000; 20,000
    python benchmarks/first_run.py --counts 200,400 --blog 20 --quick  # a smoke run

Prints a row per count and the decision line each auto run gave, the time split of
predict (tower, waiting for decode, waiting for writes), and predict's rate against the
chosen runtime's tower ceiling. Needs the openvino extra for the OpenVINO candidates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from cpu_runtimes import runtime_model, tower_ceiling  # noqa: E402
from throughput import LABELS, blog_loop, synthetic_jpegs  # noqa: E402

from labelassist.model.load import cpu_identity  # noqa: E402
from labelassist.predict.choice import default_runtime  # noqa: E402


def first_run(work: Path, name: str, folder: Path, labels: Path, cache: Path,
              dtype: str) -> dict:
    """`labelassist run` in a fresh workspace: seconds end to end and what it said."""
    home = work / "runs" / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "LABELASSIST_DB": f"sqlite:///{home}/ledger.db",
           "LABELASSIST_CACHE": str(cache)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labelassist.cli", "run", str(folder),
                           "--labels", str(labels), "--dtype", dtype], env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    log = done.stderr
    decision = next((line.strip() for line in log.splitlines()
                     if re.match(r"\s*(runtime: |measuring )", line)), "")
    summary = re.search(r"(\S+): ([\d,]+) predicted .*?([\d.,]+) images/s", log)
    split = re.search(r"^\s*time: (.*)$", log, re.M)
    version = summary.group(1)
    runtime = version.split("+", 1)[1] if "+" in version else ""
    chosen = re.search(r"runtime: (\S+),", log)
    return {"seconds": seconds, "decision": decision, "predict_rate":
            float(summary.group(3).replace(",", "")), "split": split.group(1) if split else "",
            "runtime": chosen.group(1) if chosen else (
                runtime or (default_runtime() if dtype == "auto" else dtype))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1000,5000,20000")
    parser.add_argument("--blog", type=int, default=200, help="images for the blog loop")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="short tower ceilings")
    parser.add_argument("--new-machine-up-to", type=int, default=None, help="run the 'auto, "
                        "new machine' variant only up to this count (it decides from "
                        "the count alone below 5,120 images and from a probe above)")
    parser.add_argument("--variants", default="auto, measured before;default;auto, new "
                        "machine", help="which first runs, separated by ';'")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    from labelassist.toy.tiny import save_random_clip

    work = Path(args.workdir or tempfile.mkdtemp(prefix="labelassist-first-run-"))
    model_dir = work / "vit-b-32"
    if not (model_dir / "model.safetensors").exists():
        save_random_clip(model_dir)
    labels = work / "labels.toml"
    labels.write_text(f'model = "{model_dir}"\n' + LABELS)
    print(f"CPU {cpu_identity()}, {os.cpu_count()} cores; ViT-B/32 random weights; "
          f"counts {counts}; default runtime {default_runtime()}", flush=True)
    started = time.perf_counter()
    jpegs = jpegs_in(work / "jpegs", max(counts), seed=21)
    earlier = jpegs_in(work / "earlier", 300, seed=22)
    print(f"{len(jpegs):,} + {len(earlier)} JPEGs 512x512 in {time.perf_counter() - started:.0f} s",
          flush=True)
    blog = blog_loop(model_dir, jpegs[:args.blog])
    print(f"blog loop (per image: processor + model), {args.blog} images: {blog:.2f} images/s",
          flush=True)

    # "measured before": `labelassist runtimes` in another workspace on this machine
    remembered = work / "cache-measured"
    shutil.rmtree(remembered, ignore_errors=True)
    env = {**os.environ, "LABELASSIST_DB": f"sqlite:///{work}/earlier.db",
           "LABELASSIST_CACHE": str(remembered)}
    Path(f"{work}/earlier.db").unlink(missing_ok=True)
    cli = [sys.executable, "-m", "labelassist.cli"]
    subprocess.run(cli + ["ingest", str(earlier[0].parent)], env=env, check=True,
                   capture_output=True)
    measured = subprocess.run(cli + ["runtimes", "--labels", str(labels)], env=env,
                              check=True, capture_output=True, text=True).stderr
    print("earlier workspace, labelassist runtimes:\n  " + "\n  ".join(
        line.strip() for line in measured.splitlines() if "images/s" in line), flush=True)

    rows, ceilings = [], {}
    for count in counts:
        folder = work / f"first-{count}"
        if not folder.exists():
            folder.mkdir()
            for path in jpegs[:count]:
                os.link(path, folder / path.name)
        results = {}
        variants = [("auto, measured before", "auto", remembered),
                    ("default", default_runtime(), None), ("auto, new machine", "auto", None)]
        if args.new_machine_up_to is not None and count > args.new_machine_up_to:
            variants.pop()
        variants = [v for v in variants if v[0] in args.variants.split(";")]
        for variant, dtype, cache_from in variants:
            cache = work / "cache-run"
            shutil.rmtree(cache, ignore_errors=True)
            if cache_from:
                shutil.copytree(cache_from, cache)
            else:
                cache.mkdir()
            results[variant] = result = first_run(work, f"{count}-{variant}", folder, labels,
                                                  cache, dtype)
            print(f"{count:>6,} {variant:22s} {result['seconds']:7.1f} s "
                  f"({count / result['seconds']:5.1f} images/s end to end, "
                  f"{count / result['seconds'] / blog:4.1f}x the blog loop); runtime "
                  f"{result['runtime']}; predict {result['predict_rate']:.1f} images/s; "
                  f"{result['split']}\n         {result['decision']}", flush=True)
        rows.append((count, results))
        for result in results.values():
            kind = result["runtime"].split(".")[0]
            if kind not in ceilings:
                ceilings[kind] = tower_ceiling(
                    runtime_model(model_dir, kind, _calibration(model_dir, jpegs)),
                    3 if args.quick else 15)
    print("\nimage tower ceilings (images/s): " + ", ".join(
        f"{k} {v:.1f}" for k, v in ceilings.items()))
    print(f"\n| images | blog loop | default ({default_runtime()}) | auto, new machine | "
          "auto, measured before | best x blog loop | predict / its tower ceiling |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, results in rows:
        base = results["default"]["seconds"] if "default" in results else None
        cells = [f"{base:.0f} s" if base else "not run"]
        for variant in ("auto, new machine", "auto, measured before"):
            if variant not in results:
                cells.append("not run")
                continue
            r = results[variant]
            change = f"{r['seconds'] / base - 1:+.1%}, " if base else ""
            cells.append(f"{r['seconds']:.0f} s ({change}{r['runtime'].split('.')[0]})")
        best = min(results.values(), key=lambda r: r["seconds"])
        kind = best["runtime"].split(".")[0]
        print(f"| {count:,} | {blog:.2f}/s | {' | '.join(cells)} | "
              f"{count / best['seconds'] / blog:.1f}x | "
              f"{best['predict_rate'] / ceilings[kind]:.0%} of {kind} |")


def jpegs_in(root: Path, count: int, seed: int) -> list[Path]:
    """The JPEGs of an earlier run of this benchmark in the same --workdir, or new ones."""
    have = sorted(root.glob("img_*.jpg"))
    return have[:count] if len(have) >= count else synthetic_jpegs(root, count, seed=seed)


def _calibration(model_dir: Path, jpegs: list[Path]):
    from cpu_runtimes import crops_of
    from labelassist.model.load import load_model
    from PIL import Image

    reference = load_model(str(model_dir), device="cpu", dtype="fp32")
    return crops_of(reference, [Image.open(p) for p in jpegs[:64]])


if __name__ == "__main__":
    main()
