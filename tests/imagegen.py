"""Deterministic real image files for tests: shapes on noisy backgrounds."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "orange": (240, 140, 20), "blue": (30, 60, 220),
           "grey": (128, 128, 128), "green": (30, 170, 60)}


def shape_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    colour = list(COLOURS.values())[seed % len(COLOURS)]
    w, h = size
    x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
    box = (x0, y0, x0 + rng.randrange(10, w // 2), y0 + rng.randrange(10, h // 2))
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=colour)
    return img


def write_shape_images(root: Path, count: int, start: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        sub = root / ("a" if i % 3 else "b/nested")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 2 else ".jpg"
        path = sub / f"img_{i:04d}{ext}"
        shape_image(i, size=(96 + i % 7 * 13, 80 + i % 5 * 17)).save(path)
        paths.append(path)
    return paths


def png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny valid PNG whose header claims width x height pixels (CRC fixed up)."""
    import struct
    import zlib

    raw = b"".join(b"\x00" + b"\x00" * width for _ in range(1))  # one row is plenty
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def truncated_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
