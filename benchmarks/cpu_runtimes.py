"""CPU runtimes, in one process on this machine: the image tower's ceiling per runtime, the
blog loop, `labelassist runtimes` (the measured choice), `labelassist run` end to end with
that choice, and each runtime's agreement with torch fp32 on crops of real photos and on
the toy world (with its ground truth: accuracy and ECE), where margins are realistic.
ViT-B/32 with random weights: the compute of the real model.

    python benchmarks/cpu_runtimes.py            # about 6 minutes on 2 cores
    python benchmarks/cpu_runtimes.py --quick    # a smoke test

Needs the openvino extra (pip install -e '.[openvino,test]').
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput import LABELS, blog_loop, photo_crops, synthetic_jpegs  # noqa: E402

from labelassist.model.load import cpu_identity, load_model  # noqa: E402
from labelassist.predict.choice import apply_runtime, calibrated_int8, int8_name  # noqa: E402

RUNTIMES = ("fp32", "bf16", "int8", "ov-bf16", "ov-int8")


def tower_ceiling(model, seconds: float, batch: int = 32) -> float:
    """encode_images on ready uint8 crops: the tower and the normalisation, nothing else."""
    pixels = torch.randint(0, 256, (batch, 3, *model.preprocess.output_size), dtype=torch.uint8)
    model.encode_images(pixels)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model.encode_images(pixels)
        n += batch
    return n / (time.perf_counter() - start)


def runtime_model(model_dir: Path, name: str, calibration: torch.Tensor):
    reference = load_model(str(model_dir), device="cpu", dtype="fp32")
    if name == "ov-int8":  # calibrated as predict calibrates, on these crops
        tag = int8_name([f"crop {i}" for i in range(len(calibration))])
        return calibrated_int8(reference, tag, calibration)
    return apply_runtime(reference, name)


def crops_of(model, images) -> torch.Tensor:
    from labelassist.images import decode, open_image

    pre = model.preprocess
    arr = [pre.crop_uint8(decode(open_image(b), draft_size=pre.draft_size))
           if isinstance(b, bytes) else pre.crop_uint8(b.convert("RGB")) for b in images]
    return torch.from_numpy(np.stack(arr))


def probabilities(model, label_set, pixels: torch.Tensor) -> torch.Tensor:
    from labelassist.model.zeroshot import build_text_classifier

    text = build_text_classifier(model, label_set)
    emb = torch.cat([model.encode_images(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    return text.probabilities(emb)


def agreement_rows(models: dict, label_set, pixels, truth=None) -> list[str]:
    from labelassist.trust.learn import ece

    ref = probabilities(models["fp32"], label_set, pixels)
    rows = []
    for name, model in models.items():
        got = probabilities(model, label_set, pixels)
        agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        row = (f"  {name:8s} top-1 agreement {agree:7.2%}, largest probability difference "
               f"{(got - ref).abs().max().item():.4f}")
        if truth is not None:
            accuracy = (got.argmax(1).numpy() == truth).mean()
            shift = ece(got.numpy(), truth) - ece(ref.numpy(), truth)
            row += f", accuracy {accuracy:.1%}, ECE shift {shift:+.4f}"
        rows.append(row)
    return rows


def toy_world_rows(models_for, count: int) -> list[str]:
    """The 24-way colour-shape task on held-out pairs with the trained toy model."""
    import random

    from labelassist.toy import world as toyworld
    from labelassist.labels import LabelSet

    toy = toyworld.cached_model(Path(tempfile.gettempdir()) / "labelassist-toy",
                                log=lambda m: None)
    models = models_for(toy)
    rng = random.Random(7)
    pairs = [toyworld.combos(True)[n % len(toyworld.HELD_OUT)] for n in range(count)]
    classes = sorted({f"{c} {s}" for c in toyworld.COLOURS for s in toyworld.SHAPES})
    truth = np.array([classes.index(f"{c} {s}") for c, s in pairs])
    label_set = LabelSet(classes={k: (k,) for k in classes}, templates=("a photo of a {}.",))
    pixels = crops_of(models["fp32"], [toyworld.render(c, s, rng) for c, s in pairs])
    return agreement_rows(models, label_set, pixels, truth)


def cli_run(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labelassist.cli", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start, done.stderr


def end_to_end(work: Path, model_dir: Path, images: int, blog: float) -> tuple:
    """`labelassist runtimes` on a calibration folder, then `labelassist run` on a new
    folder of JPEGs in the same workspace: start-up, ingest and predict, as a user runs it."""
    env = {**os.environ, "LABELASSIST_DB": f"sqlite:///{work}/e2e.db",
           "LABELASSIST_CACHE": str(work / "cache")}
    labels = work / "labels.toml"
    labels.write_text(f'model = "{model_dir}"\n' + LABELS)
    first = synthetic_jpegs(work / "first", 300, seed=11)
    cli_run(["ingest", str(first[0].parent)], env)
    seconds, log = cli_run(["runtimes", "--labels", str(labels)], env)
    lines = [f"labelassist runtimes (256 images, calibration included): {seconds:.0f} s"]
    lines += ["  " + line for line in log.splitlines() if "images/s" in line]
    new = synthetic_jpegs(work / "new", images, seed=12)
    seconds, log = cli_run(["run", str(new[0].parent), "--labels", str(labels)], env)
    rate = images / seconds
    chosen = re.search(r"runtime: (\S+),", log).group(1)
    predict_rate = float(re.search(r"([\d.]+) images/s", log.split("runtime:")[-1]).group(1))
    lines.append(f"labelassist run, {images} JPEGs 512x512, end to end (start-up, ingest, "
                 f"predict) on {chosen}: {seconds:.1f} s, {rate:.1f} images/s = "
                 f"{rate / blog:.1f}x the blog loop")
    lines.append(f"  predict alone: {predict_rate:.1f} images/s")
    return lines, chosen, predict_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    seconds, images, blog_images, crops = (2, 64, 8, 40) if args.quick else (10, 1000, 60, 200)
    from labelassist.toy.tiny import save_random_clip

    work = Path(args.workdir or tempfile.mkdtemp(prefix="labelassist-cpu-"))
    os.environ["LABELASSIST_CACHE"] = str(work / "cache")
    model_dir = work / "vit-b-32"
    if not (model_dir / "model.safetensors").exists():
        save_random_clip(model_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_identity()}, "
          f"{os.cpu_count()} cores; ViT-B/32 random weights\n")
    blog_paths = synthetic_jpegs(work / "blog", blog_images, seed=3)
    blog = blog_loop(model_dir, blog_paths)
    print(f"blog loop (per image: processor + model): {blog:.1f} images/s")
    photo = photo_crops(crops)
    reference = load_model(str(model_dir), device="cpu", dtype="fp32")
    calibration = crops_of(reference, photo)
    ceilings = {}
    for name in RUNTIMES:
        ceilings[name] = tower_ceiling(runtime_model(model_dir, name, calibration), seconds)
        print(f"image tower ceiling, {name:8s}: {ceilings[name]:6.1f} images/s "
              f"({ceilings[name] / ceilings['fp32']:.2f}x fp32)")
    lines, chosen, predict_rate = end_to_end(work, model_dir, images, blog)
    print("\n".join(lines))
    kind = chosen.split(".")[0]
    print(f"  predict at {predict_rate / ceilings[kind]:.0%} of the {kind} tower's ceiling")
    models = {name: runtime_model(model_dir, name, calibration) for name in RUNTIMES}
    held_out = crops_of(reference, photo_crops(crops, seed=1))
    print(f"\nagreement with torch fp32 on {len(held_out)} other crops of real photos "
          "(random weights: small margins):")
    print("\n".join(agreement_rows(models, _photo_labels(), held_out)))
    del models
    print("\nthe toy world (trained toy CLIP), 24 colour-shape classes on held-out pairs:")
    print("\n".join(toy_world_rows(_toy_models, 120 if args.quick else 480)))


def _toy_models(toy: Path) -> dict:
    calibration = _toy_calibration(toy)
    return {name: runtime_model(toy, name, calibration) for name in RUNTIMES}


def _photo_labels():
    from labelassist.labels import parse_label_text

    return parse_label_text(LABELS + 'flower = ["flower"]\nbuilding = ["building"]\n')


def _toy_calibration(toy: Path) -> torch.Tensor:
    """Toy pictures other than the evaluated ones (another seed), as a workspace holds."""
    import random

    from labelassist.toy import world as toyworld
    model = load_model(str(toy), device="cpu", dtype="fp32")
    rng = random.Random(1)
    pairs = [toyworld.combos(False)[n % len(toyworld.combos(False))] for n in range(200)]
    return crops_of(model, [toyworld.render(c, s, rng) for c, s in pairs])


if __name__ == "__main__":
    main()
