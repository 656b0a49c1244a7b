"""Throughput of labelassist predict against the blog loop, the transformers pipeline and
the image tower alone, on the full ViT-B/32 architecture (CLIPConfig() defaults, random
weights: the same compute as the real model), in one process on the same images.

    python benchmarks/throughput.py                # CPU: ~15 min on 2 cores
    python benchmarks/throughput.py --quick        # smaller, for a smoke test
    python benchmarks/throughput.py --device cuda  # GPU: B/32 and L/14, ~4 min on an H200

Prints images/s, ratios to the blog loop and to the ceiling, re-scoring time, and peak
RSS of `labelassist predict` at 1k and 10k images (each in its own child process). On a
GPU it also prints the decode ceilings (threads and processes), ingest files/s, and the
share of predict time spent in database writes.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from labelassist.model.load import load_model  # noqa: E402

LABELS = '[classes]\ncat = ["cat"]\ndog = ["dog"]\nwild = ["lion", "tiger", "wolf", "fox"]\n'
PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a lion.", "a photo of a tiger.",
           "a photo of a wolf.", "a photo of a fox."]


def synthetic_jpegs(root: Path, count: int, size: int = 512, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: blurred noise fields with shapes, so decoding costs what a
    photo costs (flat colours would decode unrealistically fast). Written by one process
    per core; the same files whatever the core count."""
    from concurrent.futures import ProcessPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    step = 500
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        parts = pool.map(_write_jpegs, [(root, n, min(n + step, count), size, seed)
                                        for n in range(0, count, step)])
        return [p for part in parts for p in part]


def _write_jpegs(job) -> list[Path]:
    root, first, last, size, seed = job
    rng = random.Random(seed * 1_000_003 + first)
    base = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (size // 4, size // 4, 3),
                                                              dtype=np.uint8))
            .resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            for i in range(8)]
    paths = []
    for n in range(first, last):
        img = base[n % len(base)].copy()
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(size), rng.randrange(size)
            r = rng.randrange(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        path = root / f"img_{n:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else float("nan")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def blog_loop(model_dir: Path, paths: list[Path], device: str = "cpu") -> float:
    """What a blog post does: per image, processor(text + image), model(...)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval().to(device)
    processor = CLIPProcessor.from_pretrained(model_dir)
    start = time.perf_counter()
    for path in paths:
        inputs = processor(text=PROMPTS, images=Image.open(path), return_tensors="pt",
                           padding=True).to(device)
        with torch.no_grad():
            model(**inputs).logits_per_image.softmax(dim=1).cpu()
    return rate(len(paths), time.perf_counter() - start)


def pipeline_rate(model_dir: Path, paths: list[Path], device: str = "cpu",
                  batch: int = 32) -> float:
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device=device)
    labels = ["cat", "dog", "lion", "tiger", "wolf", "fox"]
    start = time.perf_counter()
    pipe([str(p) for p in paths], candidate_labels=labels, batch_size=batch,
         hypothesis_template="a photo of a {}.")
    return rate(len(paths), time.perf_counter() - start)


def ceiling(model, dtype: torch.dtype, batch: int = 32, seconds: float = 20) -> float:
    """The image tower alone on ready tensors on the device: what it can do at this
    precision."""
    device = str(model.device)
    size = model.preprocess.output_size
    x = torch.randn(batch, 3, *size).to(model.device, dtype)
    tower = model.model
    with torch.inference_mode():
        tower.get_image_features(pixel_values=x)
        sync(device)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tower.get_image_features(pixel_values=x)
            n += batch
            if n % (batch * 8) == 0:
                sync(device)
        sync(device)
    return rate(n, time.perf_counter() - start)


def predict_rate(model, paths_dir: Path, workdir: Path, tag: str, exact: bool,
                 batch: int | None = 32, feed: str = "auto"):
    """End to end through the ledger: ingest (not timed), then predict. Returns the
    summary (images/s, seconds in writes, the feed used)."""
    from labelassist.labels import parse_label_text
    from labelassist.db import open_database
    from labelassist.ingest import ingest
    from labelassist.predict.run import PredictOptions, predict

    path = workdir / f"{tag}.db"
    path.unlink(missing_ok=True)
    db = open_database(f"sqlite:///{path}")
    ingest(db, [paths_dir])
    return predict(db, model, parse_label_text(LABELS),
                   PredictOptions(batch_size=batch, exact=exact, feed=feed))


def decode_rate(preprocess, paths: list[Path], kind: str, workers: int,
                batch: int = 256) -> float:
    """The feed alone (decode + preprocess to uint8 crops, JPEG draft), no model, no
    ledger: the ceiling that decoding puts on predict."""
    from labelassist.predict.feed import FeedPlan, decoded_batches

    jobs = [(i, [(str(p), p.stat().st_size, p.stat().st_mtime_ns)]) for i, p in
            enumerate(paths)]
    chunks = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    start, n = time.perf_counter(), 0
    for got in decoded_batches(chunks, preprocess, draft=True, max_pixels=1 << 30,
                               plan=FeedPlan(kind, workers)):
        n += len(got.ids)
    assert n == len(paths)
    return rate(n, time.perf_counter() - start)


def ingest_rate(folder: Path, workdir: Path, processes: bool | None = None) -> float:
    from labelassist.db import open_database
    from labelassist.ingest import ingest

    path = workdir / "ingest-rate.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = open_database(f"sqlite:///{path}")
    start = time.perf_counter()
    summary = ingest(db, [folder], processes=processes)
    assert summary.added + summary.duplicates == summary.seen
    return rate(summary.seen, time.perf_counter() - start)


def rescore_seconds(model, db_path: str) -> tuple[float, int]:
    from labelassist.labels import parse_label_text
    from labelassist.db import open_database
    from labelassist.predict.run import predict

    db = open_database(f"sqlite:///{db_path}")
    new = parse_label_text(LABELS.replace('"dog"]', '"dog", "puppy"]'))
    start = time.perf_counter()
    summary = predict(db, model, new)
    return time.perf_counter() - start, summary.rescored


def photo_crops(count: int = 200, seed: int = 0, folder: str | None = None) -> list[bytes]:
    """JPEG crops of real photos: scikit-learn's china.jpg and flower.jpg, from `folder`
    (where scikit-learn is not installed, as on a GPU machine) or from scikit-learn."""
    import io

    if folder:
        photos = [Image.open(p).convert("RGB") for p in sorted(Path(folder).glob("*.jpg"))]
    else:
        from sklearn.datasets import load_sample_images

        photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng, crops = random.Random(seed), []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        s = rng.uniform(0.3, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        buffer = io.BytesIO()
        photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((512, 512), Image.Resampling.BICUBIC) \
            .save(buffer, "JPEG", quality=90)
        crops.append(buffer.getvalue())
    return crops


def agreement_report(model_dir: Path, device: str = "cpu",
                     photos: str | None = None) -> list[str]:
    from labelassist.labels import parse_label_text
    from labelassist.images import decode, open_image
    from labelassist.model.zeroshot import build_text_classifier

    crops = photo_crops(folder=photos)
    labels = parse_label_text(LABELS + 'flower = ["flower"]\nbuilding = ["building"]\n')

    def probs(model, text, draft):
        pre = model.preprocess  # uint8 crops, normalised on the device, as predict does
        arr = np.stack([pre.crop_uint8(decode(open_image(b), draft_size=pre.draft_size
                                              if draft else None)) for b in crops])
        emb = torch.cat([model.encode_images(torch.from_numpy(arr[i:i + 32]))
                         for i in range(0, len(arr), 32)])
        return text.probabilities(emb)

    exact_model = load_model(str(model_dir), device=device, dtype="fp32")
    text = build_text_classifier(exact_model, labels)
    ref = probs(exact_model, text, draft=False)
    top2 = ref.sort(dim=1).values
    lines = [f"{len(crops)} crops, 5 classes; median top-1 margin of the exact path "
             f"{(top2[:, -1] - top2[:, -2]).median():.3f} (random weights)"]
    fast = (("fp32 + JPEG draft", "fp32"), ("bf16 + JPEG draft", "bf16"))
    if device == "cpu":
        fast += (("int8 + JPEG draft", "int8"),)
    for name, dtype in fast:
        got = probs(load_model(str(model_dir), device=device, dtype=dtype), text, draft=True)
        agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        lines.append(f"{name:20s} top-1 agreement {agree:7.2%}, largest probability "
                     f"difference {(got - ref).abs().max().item():.4f}")
    return lines


def child_predict(model_dir: Path, paths_dir: Path, db_path: Path, dtype: str) -> dict:
    """`labelassist ingest` + `predict` in a child process; its own peak RSS."""
    env = {**os.environ, "LABELASSIST_DB": f"sqlite:///{db_path}"}
    cli = [sys.executable, "-m", "labelassist.cli"]
    subprocess.run(cli + ["ingest", str(paths_dir)], env=env, check=True, capture_output=True)
    labels = db_path.with_suffix(".toml")
    labels.write_text(LABELS)
    start = time.perf_counter()
    proc = subprocess.Popen(cli + ["predict", "--labels", str(labels), "--model",
                                   str(model_dir), "--dtype", dtype], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # VmHWM is the child's own high-water mark. (ru_maxrss from wait4 is not: Linux folds
    # in the pre-exec copy of this parent, which is gigabytes here.)
    peak_kb = 0
    while proc.poll() is None:
        peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=None,
                        help="JPEGs for the predict rows (default: 400 on a CPU, 8000 on a GPU)")
    parser.add_argument("--blog-images", type=int, default=48)
    parser.add_argument("--scale", default="1000,10000")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--photos", default=None,
                        help="folder with china.jpg and flower.jpg (default: scikit-learn's)")
    parser.add_argument("--table", choices=("auto", "cpu", "gpu"), default="auto",
                        help="which table: auto is gpu for a cuda --device (gpu on a CPU is "
                        "a dry run of the GPU check)")
    parser.add_argument("--precisions", default="fp32,bf16,int8",
                        help="CPU rows to measure (bf16 is slow without AVX512-BF16 or AMX)")
    parser.add_argument("--only-ingest", action="store_true",
                        help="only ingest files/s, checks in threads against processes")
    parser.add_argument("--only-scale", action="store_true",
                        help="only the 1k/10k memory and re-scoring part")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda") if args.table == "auto" else args.table == "gpu"
    if args.images is None:
        args.images = 8000 if gpu else 400
    if args.quick:
        args.images, args.blog_images, args.scale = 64, 8, "200,400"

    from transformers import CLIPConfig

    from labelassist.model.load import cpu_has_fast_bf16
    from labelassist.toy.tiny import save_random_clip

    work = Path(args.workdir or tempfile.mkdtemp(prefix="labelassist-bench-"))
    model_dir = work / "vit-b-32"
    if not (model_dir / "model.safetensors").exists():
        save_random_clip(model_dir, CLIPConfig())
    photos = work / "photos"
    paths = sorted(photos.glob("*.jpg"))[:args.images] if photos.exists() else []
    if len(paths) < args.images:
        paths = synthetic_jpegs(photos, args.images)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
             f"{torch.get_num_threads()} threads, fast bf16 on this CPU: {cpu_has_fast_bf16()}")
    print(f"torch {torch.__version__}, {where}, {os.cpu_count()} cores; {len(paths)} JPEGs "
          f"512x512; ViT-B/32 random weights\n")

    if args.only_scale:
        return scale_section(args, work, model_dir)
    if args.only_ingest:
        for processes in (False, True):
            print(f"ingest, checks in {'processes' if processes else 'threads'}: "
                  f"{ingest_rate(photos, work, processes):,.0f} files/s")
        return None
    if gpu:
        return gpu_section(args, work, model_dir, photos, paths)
    results = {}
    results["blog loop"] = blog_loop(model_dir, paths[:args.blog_images])
    results["pipeline, batch 32"] = pipeline_rate(model_dir, paths)
    rows = []
    for precision in args.precisions.split(","):
        model = load_model(str(model_dir), device="cpu", dtype=precision)
        top = ceiling(model, model.dtype)
        e2e = predict_rate(model, photos, work, f"e2e-{precision}",
                           exact=precision == "fp32").images_per_second
        rows.append((f"labelassist predict, {precision}", e2e, top))
        results[f"image tower alone (ceiling), {precision}"] = top
        del model
    print_table(results, rows)
    print_agreement(model_dir, "cpu", args.photos)
    scale_section(args, work, model_dir)


def print_table(results: dict, rows: list[tuple]) -> None:
    first, *_ = results
    blog, pipe = results[first], list(results.values())[1]
    print(f"{'way':46s} {'images/s':>9s} {'x blog':>7s} {'x pipeline':>10s} {'of ceiling':>10s}")
    for name, value in results.items():
        print(f"{name:46s} {value:9.1f} {value / blog:7.2f} {value / pipe:10.2f}")
    for name, e2e, top in rows:
        print(f"{name:46s} {e2e:9.1f} {e2e / blog:7.2f} {e2e / pipe:10.2f} {e2e / top:10.1%}")
    print()


def print_agreement(model_dir: Path, device: str, photos: str | None = None) -> None:
    print("fast paths against the exact path (fp32, full decode) on crops of real photos:")
    for line in agreement_report(model_dir, device, photos):
        print("  " + line)


def gpu_section(args, work: Path, model_dir: Path, photos: Path, paths: list[Path]) -> None:
    """One run, one table: the ways people run CLIP on a GPU, our predict (B/32 and L/14),
    and the ceilings that bound it (tower alone, decoding alone, ingest). Each figure is
    also printed as soon as it is measured, so a run cut short still reports."""
    from labelassist.predict.feed import plan_feed
    from labelassist.toy.tiny import save_random_clip, vit_l14_config

    device = args.device
    cores = os.cpu_count() or 1
    big = 256 if device.startswith("cuda") else 16  # a dry run on a CPU stays short
    results, rows, notes = {}, [], []

    def measured(name: str, value: float) -> float:
        results[name] = value
        print(f"  measured: {name}: {value:,.1f}", flush=True)
        return value

    measured("blog loop (fp32, batch 1)", blog_loop(model_dir, paths[:args.blog_images], device))
    measured("pipeline, batch 64, fp32", pipeline_rate(model_dir, paths[:2000], device, 64))
    model = load_model(str(model_dir), device=device, dtype="auto")
    b32_top = measured(f"image tower alone, B/32 {model.dtype}, batch {big}",
                       ceiling(model, model.dtype, batch=big, seconds=10))
    decode = {kind: measured(f"decode + preprocess alone, {kind}", decode_rate(
        model.preprocess, paths, kind, plan_feed(kind, model.device).workers))
        for kind in ("threads", "processes")}
    for feed in ("processes", "threads"):
        got = predict_rate(model, photos, work, f"gpu-b32-{feed}", exact=False, batch=None,
                           feed=feed)
        print(f"  measured: predict B/32 via {feed}: {got.images_per_second:,.1f}", flush=True)
        rows.append((f"predict B/32 {model.dtype}, {got.feed}", got.images_per_second,
                     min(b32_top, decode[feed])))
        notes.append(f"B/32 via {feed}: {got.write_seconds / got.seconds:.1%} of predict "
                     f"time in database writes (overlapped), {got.seconds:.1f} s")
    del model
    large_dir = work / "vit-l-14"
    if not (large_dir / "model.safetensors").exists():
        save_random_clip(large_dir, vit_l14_config())
    large = load_model(str(large_dir), device=device, dtype="auto")
    l14_top = measured(f"image tower alone, L/14 {large.dtype}, batch {big}",
                       ceiling(large, large.dtype, batch=big, seconds=10))
    got = predict_rate(large, photos, work, "gpu-l14", exact=False, batch=None)
    rows.append((f"predict L/14 {large.dtype}, {got.feed}", got.images_per_second,
                 min(l14_top, decode["processes"])))
    del large
    measured(f"ingest (hash + header + check), {cores} cores, files/s", ingest_rate(photos, work))
    print()
    print_table(results, rows)
    for line in notes:
        print(line)
    print(f"targets: B/32 >= 80% of min(decode, tower) = "
          f"{0.8 * min(decode['processes'], b32_top):,.0f} images/s; "
          f"L/14 >= 80% of its tower = {0.8 * l14_top:,.0f}; >= 10x the pipeline = "
          f"{10 * results['pipeline, batch 64, fp32']:,.0f}\n")
    print_agreement(model_dir, device, args.photos)


def scale_section(args, work: Path, model_dir: Path) -> None:

    print("\nscale (labelassist predict --dtype auto, child processes):")
    for count in (int(c) for c in args.scale.split(",")):
        folder = work / f"scale-{count}"
        have = sorted(folder.glob("*.jpg")) if folder.exists() else []
        if len(have) < count:
            synthetic_jpegs(folder, count, seed=count)
        db_path = work / f"scale-{count}.db"
        db_path.unlink(missing_ok=True)
        got = child_predict(model_dir, folder, db_path, "auto")
        print(f"  {count:6d} images: {count / got['seconds']:6.1f} images/s (with model load), "
              f"peak RSS {got['peak_rss_mb']:7.1f} MB")
        last_db = db_path
    model = load_model(str(model_dir), device="cpu", dtype="auto")
    seconds, n = rescore_seconds(model, str(last_db))
    print(f"\nre-scoring {n} stored embeddings with a new prompt set: {seconds:.2f} s "
          "(model already loaded)")


if __name__ == "__main__":
    main()
