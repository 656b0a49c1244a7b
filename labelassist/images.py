"""Decode and preprocess images. Every failure becomes a BadImage with a short reason
code (stored in the database) and a detail for people."""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb check would raise inside open(); we apply ours (max_pixels) instead.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's error threshold: 2 x 89.5 megapixels

REASONS = {
    "empty": "zero-byte file",
    "truncated": "truncated image data",
    "not_an_image": "not a readable image",
    "decompression_bomb": "too many pixels (decompression bomb)",
    "unreadable": "cannot read the file",
    "corrupt": "corrupt image data",
    "missing": "file is gone",
    "changed": "file changed since ingest",
    "not_a_file": "not a regular file",
}


# Reasons about the file, not the bytes: the next ingest or predict tries again.
TRANSIENT = frozenset({"missing", "unreadable", "changed", "not_a_file"})


class BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{REASONS.get(reason, reason)}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def final(self) -> bool:
        """The bytes themselves are bad (corrupt, truncated, a bomb): no retry will help."""
        return self.reason not in TRANSIENT


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def open_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) and refuse decompression bombs before any pixel is decoded."""
    if isinstance(source, bytes) and not source:
        raise BadImage("empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise BadImage("missing", str(source)) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "Pillow does not recognise the format") from None
    except OSError as exc:
        if not isinstance(source, bytes):
            raise BadImage("unreadable", exc.strerror or str(exc)) from None
        # In memory, an OSError is Pillow's word for bad data, often a cut-off header.
        raise BadImage("truncated" if "truncated" in str(exc).lower() else "corrupt", str(exc)) from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise BadImage("corrupt", f"{type(exc).__name__}: {exc}") from None
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise BadImage("decompression_bomb",
                       f"{img.width}x{img.height} = {pixels:,} pixels, over the limit of "
                       f"{max_pixels:,} (--max-pixels)")
    return img


def decode(img: Image.Image, draft_size: int | None = None) -> Image.Image:
    """Decode pixels, apply EXIF orientation and return 8-bit RGB.

    draft_size lets JPEGs decode at a reduced DCT scale that still covers
    draft_size on the short side: 4 to 16 times less work for large photos.
    """
    try:
        if draft_size and img.format == "JPEG":
            scale = min(img.width, img.height) / draft_size
            if scale >= 2:
                img.draft("RGB", (int(img.width / scale) + 1, int(img.height / scale) + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC chatter is not the user's problem
            img.load()
            img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except BadImage:
        raise
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError) or "broken data stream" in text:
            raise BadImage("truncated", text) from None
        raise BadImage("corrupt", text) from None
    except Image.DecompressionBombError as exc:
        raise BadImage("decompression_bomb", str(exc)) from None
    except (ValueError, MemoryError) as exc:
        kind = "decompression_bomb" if "too large" in str(exc).lower() else "corrupt"
        raise BadImage(kind, f"{type(exc).__name__}: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit is scaled (not clipped), alpha is put on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Prove that `data` is a readable image (decoding it, cheaply for JPEGs)."""
    img = open_image(data, max_pixels)
    fmt = img.format or "unknown"
    rgb = decode(img, draft_size=64)
    width, height = _oriented_size(img)
    del rgb
    return ImageInfo(width=width, height=height, format=fmt)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """The size as displayed: EXIF orientations 5 to 8 swap width and height."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_bytes(path: str | bytes) -> bytes:
    """The whole of a regular file, and not a byte past the size that stat gives."""
    try:
        fh, size = open_regular(path)
        with fh:
            return read_stated(fh, size)
    except FileNotFoundError:
        raise BadImage("missing", os.fsdecode(path)) from None
    except OSError as exc:
        raise BadImage("unreadable", exc.strerror or str(exc)) from None


def file_kind(mode: int) -> str | None:
    """What a path that is no regular file is (None for a regular file): a FIFO blocks
    its reader for ever and a device such as /dev/zero never ends, so neither is read."""
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | bytes):
    """(file object, size from fstat) for a regular file; BadImage("not_a_file") for the
    rest. Opened non-blocking, so a path swapped for a FIFO after a stat cannot hang."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        kind = file_kind(st.st_mode)
        if kind is not None:
            raise BadImage("not_a_file", f"{kind}, not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_stated(fh, size: int) -> bytes:
    """Exactly `size` bytes (what stat gave): a file that grows or shrinks meanwhile is
    "changed", never read without end."""
    data = fh.read(size)
    if len(data) < size:
        raise BadImage("changed", f"shrank below the {size:,} bytes that stat gave while it was read")
    if fh.read(1):
        raise BadImage("changed", f"grew past the {size:,} bytes that stat gave while it was read")
    return data


@dataclass(frozen=True)
class Preprocess:
    """CLIP-style preprocessing: resize, center crop, scale and normalise, as the model's
    image processor does, but in one pass over PIL and numpy (no per-image torch ops)."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        return (self.shortest_edge, self.shortest_edge)

    @property
    def draft_size(self) -> int:
        return max(self.output_size)

    @classmethod
    def from_processor(cls, processor) -> "Preprocess":
        size = dict(processor.size or {})
        crop = dict(getattr(processor, "crop_size", None) or {})
        do_crop = bool(getattr(processor, "do_center_crop", False)) and crop
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if do_crop else None,
            mean=tuple(processor.image_mean), std=tuple(processor.image_std),
            resample=int(getattr(processor, "resample", Image.Resampling.BICUBIC)),
            rescale=float(getattr(processor, "rescale_factor", 1 / 255)),
        )

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> normalised float32 array (3, H, W), as the image processor gives."""
        return self.normalise(self.crop_uint8(img))

    def crop_uint8(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> resized and cropped uint8 array (3, H, W): what the feed ships."""
        if self.shortest_edge:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            new = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
            if new != img.size:
                img = img.resize(new, resample=self.resample)
        elif self.size and img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), resample=self.resample)
        if self.crop:
            img = _center_crop(img, self.crop)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    def scale_and_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (3, 1, 1): normalised = pixel * scale - shift."""
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        scale = np.float32(self.rescale) / std
        return scale, np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        scale, shift = self.scale_and_shift()
        return np.ascontiguousarray(pixels.astype(np.float32) * scale - shift)


def _center_crop(img: Image.Image, crop: tuple[int, int]) -> Image.Image:
    ch, cw = crop
    w, h = img.size
    if (w, h) == (cw, ch):
        return img
    top = (h - ch) // 2
    left = (w - cw) // 2
    # PIL pads with black where the crop is larger than the image, as transformers does.
    return img.crop((left, top, left + cw, top + ch))
