"""The training recipe: the toy CLIP's shape, and contrastive training with
multi-positive targets on pre-rendered pictures, reproducible bit for bit on one kind of
CPU (fixed seed, fixed thread count). What is here changes the trained weights:
world.RECIPE_PARTS hashes the recipe's functions and world.recipe_code its constants.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .pictures import JUNK, SIZE, Caption, combos, render, render_junk, training_captions

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
POOL = 8192  # pre-rendered training pictures
TRAIN_THREADS = 2  # torch threads while training: fixed, so the weights are reproducible
JUNK_POOL = 512  # pre-rendered junk pictures, half of each kind
JUNK_SHARE = 0.08  # of each training batch
# Training records a digest of the weights after this many steps (past the warm-up), and
# the shipped manifest keeps the shipped run's: a test trains this far, in seconds, not
# minutes, and checks the weights bit for bit on the kind of CPU the shipped ones were
# trained on.
PREFIX_STEPS = 200


def model_config():
    from transformers import CLIPConfig

    tower = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    return CLIPConfig(text_config=dict(tower, num_hidden_layers=2, vocab_size=49408,
                                       max_position_embeddings=24),
                      vision_config=dict(tower, num_hidden_layers=3, image_size=SIZE,
                                         patch_size=4),
                      projection_dim=64)


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
