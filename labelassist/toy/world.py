"""Toy world: a CLIP that really does zero-shot classification, trained on a CPU in
about three minutes, for tests and the demo (no pretrained weights exist offline). Its
trained weights ship in labelassist/data/toyworld (fp16, 7 MB), so nobody waits for the
training; a test checks that training again reproduces them.

Pictures are coloured shapes on textured grey backgrounds. Captions name the colour,
the shape or both ("a photo of a red circle."). Six colour-shape pairs never appear
in training, so classifying them is true zero-shot composition. The tokenizer is the
real CLIP BPE, so prompts are tokenised exactly as for a real CLIP.

    python -m labelassist.toy.world train ~/.cache/labelassist  # the model dir (seconds)
    python -m labelassist.toy.world train models/t --retrain     # train it (~3 min, 2 cores)
    python -m labelassist.toy.world ship                         # retrain, store as shipped
    python -m labelassist.toy.world images photos/ --count 300   # a labelled folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (235, 215, 35),
           "green": (40, 165, 55), "blue": (40, 75, 215), "purple": (135, 45, 175)}
SHAPES = ("circle", "square", "triangle", "cross")
WARM, COOL = ("red", "orange", "yellow"), ("green", "blue", "purple")
HELD_OUT = {("red", "triangle"), ("orange", "cross"), ("yellow", "circle"),
            ("green", "square"), ("blue", "cross"), ("purple", "circle")}
SIZE = 32  # small pictures with 4-pixel patches: a tiny ViT learns shapes fast
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
POOL = 8192  # pre-rendered training pictures
TRAIN_THREADS = 2  # torch threads while training: fixed, so the weights are reproducible
# Pictures of no class, as any real folder has: a real CLIP has seen noise and pages of
# text with captions that say so, and keeps them away from "a photo of a red thing".
JUNK = ("noise", "text")
JUNK_POOL = 512  # pre-rendered junk pictures, half of each kind
JUNK_SHARE = 0.08  # of each training batch
RECIPE_VERSION = 6  # bump when anything below changes what training produces
# The trained weights, shipped so that nobody waits for training: python -m
# labelassist.toy.world ship (re)writes them, and a test checks that training reproduces them.
SHIPPED = Path(__file__).parents[1] / "data" / "toyworld"
# Training records a digest of the weights after this many steps (past the warm-up), and
# the manifest keeps the shipped run's: a test trains this far, in seconds, not minutes,
# and checks the weights bit for bit on the kind of CPU the shipped ones were trained on.
PREFIX_STEPS = 200


def render(colour: str, shape: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One picture: a jittered shape of `colour` on a noisy low-saturation background."""
    grey = rng.randrange(70, 200)
    tint = [max(0, min(255, grey + rng.randrange(-18, 19))) for _ in range(3)]
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-22, 23, (size, size, 1))
    img = Image.fromarray(np.clip(np.array(tint) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(0, 4)):  # texture: faint lines
        g = rng.randrange(60, 210)
        draw.line([(rng.randrange(size), rng.randrange(size)) for _ in range(2)], fill=(g, g, g),
                  width=rng.randrange(1, 3))
    fill = tuple(max(0, min(255, c + rng.randrange(-25, 26))) for c in COLOURS[colour])
    r = rng.uniform(0.28, 0.4) * size
    cx, cy = (size / 2 + rng.uniform(-0.08, 0.08) * size for _ in range(2))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * .85, cy - r * .85, cx + r * .85, cy + r * .85), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * .8), (cx + r, cy + r * .8)], fill=fill)
    else:
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img


def render_junk(kind: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """A picture of no colour-shape class: pixel noise, or a page of letter-like strokes."""
    if kind == "noise":
        pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size, size, 3))
        return Image.fromarray(pixels.astype(np.uint8))
    page, ink = rng.randrange(185, 256), rng.randrange(0, 80)
    img = Image.new("RGB", (size, size), (page, page, page))
    draw = ImageDraw.Draw(img)
    y = rng.randrange(1, 4)
    while y < size - 4:  # lines of letters: one or two strokes in a small cell each
        x = rng.randrange(1, 4)
        while x < size - 3:
            w = rng.randrange(2, 4)
            for _ in range(rng.randrange(1, 3)):
                draw.line([(x + rng.randrange(w), y + rng.randrange(4)),
                           (x + rng.randrange(w), y + rng.randrange(4))], fill=(ink, ink, ink))
            x += w + rng.randrange(1, 3)
        y += rng.randrange(5, 8)
    return img


def combos(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def write_images(root: str | Path, count: int, seed: int = 0, held_out_only: bool = False,
                 size: int = 128) -> list[tuple[Path, str, str]]:
    """A folder of labelled pictures <colour>_<shape>_<n>.png; returns (path, colour, shape)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = combos(True) if held_out_only else combos(True) + combos(False)
    out = []
    for n in range(count):
        colour, shape = pool[n % len(pool)]
        path = root / f"{colour}_{shape}_{seed}_{n:05d}.png"
        # Drawn at the model's size, saved larger (crisp for reviewers in Label Studio).
        render(colour, shape, rng).resize((size, size), Image.Resampling.NEAREST).save(path)
        out.append((path, colour, shape))
    return out


def write_junk(root: str | Path, count: int, seed: int = 0, size: int = 128) -> list[Path]:
    """A folder of pictures of no class: noise_<n>.png and text_<n>.png, alternately."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"junk-{seed}")
    out = []
    for n in range(count):
        kind = JUNK[n % len(JUNK)]
        path = root / f"{kind}_{seed}_{n:05d}.png"
        render_junk(kind, rng).resize((size, size), Image.Resampling.NEAREST).save(path)
        out.append(path)
    return out


@dataclass(frozen=True)
class Caption:
    text: str
    colour: str | None
    shape: str | None

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour in (None, colour) and self.shape in (None, shape)


def training_captions() -> list[Caption]:
    caps = [Caption(f"a photo of a {c} {s}.", c, s) for c, s in combos(False)]
    caps += [Caption(f"a {c} {s}", c, s) for c, s in combos(False)]
    caps += [Caption(f"a photo of a {c} thing.", c, None) for c in COLOURS]
    caps += [Caption(f"a photo of a {s}.", None, s) for s in SHAPES]
    caps += [Caption("a photo of noise.", "noise", "junk"), Caption("a page of text.", "text",
                                                                     "junk")]
    return caps


def model_config():
    from transformers import CLIPConfig

    tower = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    return CLIPConfig(text_config=dict(tower, num_hidden_layers=2, vocab_size=49408,
                                       max_position_embeddings=24),
                      vision_config=dict(tower, num_hidden_layers=3, image_size=SIZE,
                                         patch_size=4),
                      projection_dim=64)


RECIPE_PARTS = {
    "labelassist.toy.world": ("render", "render_junk", "combos", "Caption", "training_captions",
                             "model_config", "_to_tensor", "_pick_caption", "train", "_train",
                             "_soft_ce"),
    "labelassist.toy.tiny": ("save_clip_tokenizer", "_bpe_lines", "_bytes_to_unicode"),
}


def recipe_code() -> str:
    """What training does, in code: the functions and constants that change the weights,
    not the rest of this module (so shipping or evaluating code can change freely). The
    code is read from the files, so a function replaced at run time changes nothing."""
    import ast
    import importlib

    from . import tiny as tinymodels

    code = []
    for module, names in RECIPE_PARTS.items():
        text = Path(importlib.import_module(module).__file__).read_text()
        defs = {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
                if isinstance(node, ast.FunctionDef | ast.ClassDef)}
        code += [defs[name] for name in names]
    text = json.dumps([RECIPE_VERSION, code,
                       [COLOURS, SHAPES, sorted(HELD_OUT), SIZE, MEAN, STD, POOL,
                        TRAIN_THREADS, JUNK, JUNK_POOL, JUNK_SHARE, tinymodels.N_MERGES]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_hash(steps: int, seed: int) -> str:
    """Everything that changes the trained weights: the recipe's code and the torch and
    transformers versions."""
    import torch
    import transformers

    text = json.dumps([recipe_code(), steps, seed, torch.__version__, transformers.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _to_tensor(images: list[Image.Image]):
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    arr = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def _pick_caption(caps: list[Caption], colour: str, shape: str, rng: random.Random) -> int:
    """Shape-only captions are drawn most: colour is easy to learn and would dominate.
    A junk picture has one caption, its kind's."""
    if shape == "junk":
        return next(i for i, cap in enumerate(caps) if (cap.colour, cap.shape) == (colour, shape))
    kind = rng.choices(("shape", "colour", "both"), weights=(0.4, 0.15, 0.45))[0]
    want = {"shape": (None, shape), "colour": (colour, None)}.get(kind)
    options = [i for i, cap in enumerate(caps) if cap.matches(colour, shape)
               and (want is None and cap.colour and cap.shape
                    or want == (cap.colour, cap.shape))]
    return rng.choice(options)


def train(out_dir: str | Path, steps: int = 1600, batch: int = 64, seed: int = 0,
          log=print, stop_after: int | None = None) -> Path:
    """Train contrastively with multi-positive targets, then save_pretrained to out_dir,
    with training.json beside the weights: the steps done and the digest of the weights
    after PREFIX_STEPS. stop_after ends the run early (the learning rate still follows the
    schedule of all `steps`), so its weights are those of the full run at that step."""
    import torch

    if problem := stop_after_problem(stop_after, steps):
        raise ValueError(problem)
    threads = torch.get_num_threads()
    # Sums split across threads add in another order: the same seed on another thread
    # count gives other weights (0.003 apart after 60 steps). Pinned, training reproduces.
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train(Path(out_dir), steps, batch, seed, log, stop_after or steps)
    finally:
        torch.set_num_threads(threads)


def stop_after_problem(stop_after: int | None, steps: int) -> str | None:
    """What is wrong with stopping a run of `steps` after `stop_after` steps, if anything."""
    if stop_after is not None and not 0 < stop_after <= steps:
        return f"--stop-after must be between 1 and --steps ({steps}), not {stop_after}"
    return None


def _train(out: Path, steps: int, batch: int, seed: int, log, stop_after: int) -> Path:
    import torch
    from transformers import CLIPModel

    from .tiny import save_clip_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = save_clip_tokenizer(out)
    tokenizer.model_max_length = 24
    model = CLIPModel(model_config())
    caps = training_captions()
    tokens = tokenizer([c.text for c in caps], padding=True, return_tensors="pt")
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warmup = steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    train_pairs = combos(False)
    started = time.time()
    pool_pairs = [train_pairs[n % len(train_pairs)] for n in range(POOL)]
    pool_pairs += [(JUNK[n % len(JUNK)], "junk") for n in range(JUNK_POOL)]
    pool = _to_tensor([render(c, s, rng) if s != "junk" else render_junk(c, rng)
                       for c, s in pool_pairs])
    model.train()
    prefix = None
    for step in range(stop_after):
        picks = [rng.randrange(POOL) if rng.random() >= JUNK_SHARE
                 else POOL + rng.randrange(JUNK_POOL) for _ in range(batch)]
        pairs = [pool_pairs[i] for i in picks]
        pixels = pool[picks]
        if rng.random() < 0.5:
            pixels = pixels.flip(3)
        cap_idx = [_pick_caption(caps, c, s, rng) for c, s in pairs]
        ids = torch.tensor(cap_idx)
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=tokens.input_ids[ids],
                                      attention_mask=tokens.attention_mask[ids]).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        match = torch.tensor([[caps[j].matches(c, s) for j in cap_idx] for c, s in pairs],
                             dtype=torch.float32)
        loss = (_soft_ce(logits, match) + _soft_ce(logits.T, match.T)) / 2
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        if step + 1 == PREFIX_STEPS:
            prefix = weights_digest(model)
        if step % 200 == 0 or step == stop_after - 1:
            spent = time.time() - started
            # the first step pays for warming up: a time left from it would be far off
            left = "time left after step 200" if step == 0 else \
                f"about {spent / (step + 1) * (stop_after - step - 1):3.0f} s left"
            log(f"step {step + 1:5d}/{steps} ({(step + 1) / steps:4.0%})  loss "
                f"{loss.item():.3f}  {spent:5.1f} s, {left}")
    _save(model.eval(), tokenizer, out)
    record = {"steps": steps, "seed": seed, "steps_done": stop_after,
              "prefix": prefix and {"steps": PREFIX_STEPS, "digest": prefix}}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def weights_digest(model) -> str:
    """sha256 of every weight's name, dtype and bytes: equal only when bit for bit equal."""
    import torch

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _save(model, tokenizer, out: Path) -> Path:
    from transformers import CLIPImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar is noise in a log
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                          crop_size={"height": SIZE, "width": SIZE}).save_pretrained(out)
    return out


def _soft_ce(logits, match):
    target = match / match.sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def cached_model(cache_root: str | Path, steps: int = 1600, seed: int = 0, log=print) -> Path:
    """The trained model in cache_root: the weights shipped with labelassist when they come
    from this very recipe (seconds), else trained once per recipe (minutes) and reused.
    Safe for several processes at once: one writes under a lock while the others wait,
    into a temp folder of its own that is renamed into place when complete."""
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    shipped = shipped_manifest(steps, seed)
    target = root / (f"toyworld-shipped-{shipped['sha256'][:12]}" if shipped
                     else f"toyworld-{recipe_hash(steps, seed)}")
    if (target / "model.safetensors").is_file():
        return target
    with _exclusive(root / f"{target.name}.lock"):
        if (target / "model.safetensors").is_file():
            return target  # another process wrote it while this one waited
        for stale in root.glob(f"{target.name}.partial*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's: we hold the lock
        partial = root / f"{target.name}.partial-{os.getpid()}"
        if shipped:
            unpack_shipped(partial)
        else:
            train(partial, steps=steps, seed=seed, log=log)
        shutil.rmtree(target, ignore_errors=True)  # a folder without weights is no model
        partial.rename(target)  # atomic: a killed run never leaves a half model
    return target


def shipped_manifest(steps: int | None = None, seed: int | None = None) -> dict | None:
    """What the shipped weights are (recipe, versions, metrics), or None when there are none
    or they come from another recipe, steps or seed than asked for."""
    path = SHIPPED / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if steps is not None and (manifest["steps"], manifest["seed"]) != (steps, seed):
        return None
    return manifest if manifest["recipe_code"] == recipe_code() else None


def unpack_shipped(out: str | Path) -> Path:
    """The shipped weights (fp16 on disk) as a full fp32 model directory in out."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from .tiny import save_clip_tokenizer

    out = Path(out)
    tokenizer = save_clip_tokenizer(out)
    tokenizer.model_max_length = 24
    model = CLIPModel(model_config())
    state = {name: value.float() if value.is_floating_point() else value
             for name, value in load_file(SHIPPED / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return _save(model.eval(), tokenizer, out)


def ship(model_dir: str | Path, steps: int, seed: int) -> dict:
    """Store a trained model's weights in fp16 as the shipped ones, with a manifest of the
    recipe and versions they come from, the digest of the same run's weights after
    PREFIX_STEPS, and their metrics (measured after the rounding)."""
    import tempfile

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    from ..model.load import cpu_identity

    record_path = Path(model_dir) / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    run = (record.get("steps"), record.get("seed"), record.get("steps_done"))
    if run != (steps, seed, steps) or not record.get("prefix"):
        raise SystemExit(f"{model_dir} is not a whole training run of {steps} steps with seed "
                         f"{seed} by this labelassist (its training.json: {record or 'none'}): "
                         "train it with python -m labelassist.toy.world train DIR --retrain")
    hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in a log
    model = CLIPModel.from_pretrained(model_dir)
    state = {name: (value.half() if value.is_floating_point() else value).contiguous()
             for name, value in model.state_dict().items()}
    SHIPPED.mkdir(parents=True, exist_ok=True)
    save_file(state, SHIPPED / "model.safetensors")
    manifest = {"steps": steps, "seed": seed, "recipe_code": recipe_code(),
                "sha256": hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "cpu": cpu_identity(), "prefix": record["prefix"]}
    with tempfile.TemporaryDirectory() as tmp:
        manifest["metrics"] = evaluate(unpack_shipped(tmp))
    (SHIPPED / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextmanager
def _exclusive(lock_path: Path):
    """An advisory lock on a file (released by the OS if the holder dies)."""
    with open(lock_path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the rename still keeps the cache whole
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m labelassist.toy.world")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the toy CLIP in a cache directory: the shipped weights "
                       "when they fit the recipe, else trained (about 3 min on 2 cores)")
    t.add_argument("out")
    t.add_argument("--steps", type=int, default=1600)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--retrain", action="store_true",
                   help="train into OUT even when shipped weights fit (OUT is the model)")
    t.add_argument("--stop-after", type=int, metavar="N",
                   help="with --retrain: stop after N steps of the full run's schedule "
                   f"(training.json then holds the digest a test checks after {PREFIX_STEPS})")
    s = sub.add_parser("ship", help="train (or take --model) and store the weights as the "
                       "shipped ones, with their manifest (for developers)")
    s.add_argument("--model", help="a model directory trained by this recipe")
    s.add_argument("--steps", type=int, default=1600)
    s.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("images", help="write labelled toy-world pictures")
    i.add_argument("out")
    i.add_argument("--count", type=int, default=300)
    i.add_argument("--seed", type=int, default=1)
    i.add_argument("--held-out-only", action="store_true")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if args.cmd == "train" and args.stop_after is not None:
        if not args.retrain:
            parser.error("--stop-after needs --retrain: the cached model is always a whole run")
        if problem := stop_after_problem(args.stop_after, args.steps):
            parser.error(problem)
    if args.cmd == "train" and args.retrain:
        print(train(args.out, steps=args.steps, seed=args.seed, log=log,
                    stop_after=args.stop_after))
    elif args.cmd == "train":
        print(cached_model(args.out, steps=args.steps, seed=args.seed, log=log))
    elif args.cmd == "ship":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or train(tmp, steps=args.steps, seed=args.seed, log=log)
            print(json.dumps(ship(model, args.steps, args.seed), indent=2))
    else:
        written = write_images(args.out, args.count, seed=args.seed,
                               held_out_only=args.held_out_only)
        print(f"wrote {len(written)} pictures to {args.out}")



def evaluate(model_dir: str | Path, count: int = 240, seed: int = 99) -> dict[str, float]:
    """Zero-shot top-1 accuracy on held-out colour-shape pairs, through labelassist's own
    classifier: the 24-way pair task, the colour task, and warm/cool by members vs vague."""
    from ..labels import LabelSet
    from ..model.load import load_model
    from ..model.zeroshot import ZeroShotClassifier

    model = load_model(str(model_dir), device="cpu", dtype="fp32")
    rng = random.Random(seed)
    pairs = [combos(True)[n % len(HELD_OUT)] for n in range(count)]
    images = [render(c, s, rng) for c, s in pairs]

    def accuracy(classes: dict, truth: list[str], template: str) -> float:
        labels = LabelSet(classes={k: tuple(v) for k, v in classes.items()}, templates=(template,))
        preds = ZeroShotClassifier(model, labels).classify(images)
        return sum(p.label == t for p, t in zip(preds, truth)) / len(truth)

    pair_classes = {f"{c} {s}": [f"{c} {s}"] for c in COLOURS for s in SHAPES}
    return {
        "pair": accuracy(pair_classes, [f"{c} {s}" for c, s in pairs], "a photo of a {}."),
        "colour": accuracy({c: [c] for c in COLOURS}, [c for c, _ in pairs],
                           "a photo of a {} thing."),
        "shape": accuracy({s: [s] for s in SHAPES}, [s for _, s in pairs], "a photo of a {}."),
        "warm_cool_members": accuracy({"warm": WARM, "cool": COOL}, [_temp(c) for c, _ in pairs],
                                      "a photo of a {} thing."),
        "warm_cool_vague": accuracy({"warm": ["warm colour"], "cool": ["cool colour"]},
                                    [_temp(c) for c, _ in pairs], "a photo of a {} thing."),
    }


def _temp(colour: str) -> str:
    return "warm" if colour in WARM else "cool"


if __name__ == "__main__":
    main()
