"""The toy world's pictures and captions: coloured shapes on textured grey backgrounds,
and pictures of no class (pixel noise, pages of text), as any real folder has.

Captions name the colour, the shape or both ("a photo of a red circle."). The pairs in
HELD_OUT never appear in training, so classifying them is true zero-shot composition.
What is here changes the trained weights: world.RECIPE_PARTS hashes these functions.
"""

from __future__ import annotations

import random
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
# Pictures of no class, as any real folder has: a real CLIP has seen noise and pages of
# text with captions that say so, and keeps them away from "a photo of a red thing".
JUNK = ("noise", "text")


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
