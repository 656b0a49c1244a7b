"""Toy world: a CLIP that really does zero-shot classification, trained on a CPU in
about three minutes, for tests and the demo (no pretrained weights exist offline). Its
trained weights ship in labelassist/data/toyworld (fp16, 7 MB), so nobody waits for the
training; a test checks that training again reproduces them.

Pictures are coloured shapes on textured grey backgrounds. Captions name the colour,
the shape or both ("a photo of a red circle."). Six colour-shape pairs never appear
in training, so classifying them is true zero-shot composition. The tokenizer is the
real CLIP BPE, so prompts are tokenised exactly as for a real CLIP.

This module is the front door: the recipe's identity (recipe_code), the model cache,
the shipped weights, the evaluation and the command line. The pictures and captions
are in pictures.py, the training recipe in training.py; their names are importable
from here too.

    python -m labelassist.toy.world train ~/.cache/labelassist  # the model dir (seconds)
    python -m labelassist.toy.world train models/t --retrain     # train it (~3 min, 2 cores)
    python -m labelassist.toy.world ship                         # retrain, store as shipped
    python -m labelassist.toy.world images photos/ --count 300   # a labelled folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, LabelAssistError
from .pictures import (
    COLOURS,
    COOL,
    HELD_OUT,
    JUNK,
    SHAPES,
    SIZE,
    WARM,
    Caption,
    combos,
    render,
    render_junk,
    training_captions,
    write_images,
    write_junk,
)
from .training import (
    JUNK_POOL,
    JUNK_SHARE,
    MEAN,
    POOL,
    PREFIX_STEPS,
    STD,
    TRAIN_THREADS,
    _save,
    model_config,
    stop_after_problem,
    train,
    weights_digest,
)

__all__ = [  # the toy world's public names, wherever they are defined
    "COLOURS", "COOL", "HELD_OUT", "JUNK", "JUNK_POOL", "JUNK_SHARE", "MEAN", "POOL",
    "PREFIX_STEPS", "RECIPE_PARTS", "RECIPE_VERSION", "SHAPES", "SHIPPED", "SIZE", "STD",
    "TRAIN_THREADS", "WARM", "Caption", "cached_model", "combos", "evaluate", "main",
    "model_config", "recipe_code", "recipe_hash", "render", "render_junk", "ship",
    "shipped_manifest", "stop_after_problem", "train", "training_captions", "unpack_shipped",
    "weights_digest", "write_images", "write_junk",
]

RECIPE_VERSION = 6  # bump when anything in pictures.py or training.py changes the weights
# The trained weights, shipped so that nobody waits for training: python -m
# labelassist.toy.world ship (re)writes them, and a test checks that training reproduces them.
SHIPPED = Path(__file__).parents[1] / "data" / "toyworld"

# The functions whose source text is the recipe, module by module. The hash reads them in
# this order, which must stay that of the shipped manifest's recipe_code: a function may
# move to another module (its key here moves with it), but its text and place may not.
RECIPE_PARTS = {
    "labelassist.toy.pictures": ("render", "render_junk", "combos", "Caption",
                                 "training_captions"),
    "labelassist.toy.training": ("model_config", "_to_tensor", "_pick_caption", "train",
                                 "_train", "_soft_ce"),
    "labelassist.toy.tiny": ("save_clip_tokenizer", "_bpe_lines", "_bytes_to_unicode"),
}


def recipe_code() -> str:
    """What training does, in code: the functions and constants that change the weights,
    not the rest of the toy world (so shipping or evaluating code can change freely). The
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
    PREFIX_STEPS, and their metrics (measured after the rounding). Raises ConfigError,
    before touching anything, for a model that is not a whole run of this recipe."""
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
        raise ConfigError(f"{model_dir} is not a whole training run of {steps} steps with seed "
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


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main() -> None:
    """The command line: a refused option exits 2 (argparse), a known error prints its one
    line on stderr and exits 1, as labelassist's own CLI does."""
    parser = _parser()
    args = parser.parse_args()
    if args.cmd == "train" and args.stop_after is not None:
        if not args.retrain:
            parser.error("--stop-after needs --retrain: the cached model is always a whole run")
        if problem := stop_after_problem(args.stop_after, args.steps):
            parser.error(problem)
    try:
        print(_run(args))
    except LabelAssistError as exc:
        parser.exit(1, f"{exc}\n")


def _run(args: argparse.Namespace) -> str:
    """One command's result, as the line(s) it prints."""
    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if args.cmd == "train" and args.retrain:
        return str(train(args.out, steps=args.steps, seed=args.seed, log=log,
                         stop_after=args.stop_after))
    if args.cmd == "train":
        return str(cached_model(args.out, steps=args.steps, seed=args.seed, log=log))
    if args.cmd == "ship":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or train(tmp, steps=args.steps, seed=args.seed, log=log)
            return json.dumps(ship(model, args.steps, args.seed), indent=2)
    written = write_images(args.out, args.count, seed=args.seed,
                           held_out_only=args.held_out_only)
    return f"wrote {len(written)} pictures to {args.out}"


if __name__ == "__main__":
    main()
