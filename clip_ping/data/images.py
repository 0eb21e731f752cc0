"""The one image decoder: a file path or encoded bytes -> an RGB PIL image.

Every reader (CSV tables, tar shards, evaluation layouts, extraction, the
neighbour page) decodes through `load_image`, so the teacher and the student
see the same pixels: EXIF orientation applied, transparency composited on a
background, 16-bit greyscale scaled to 8 bits.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, ImageOps

from ..errors import DataError

# Truncated files must fail loudly (and be counted), not decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

WHITE = (255, 255, 255)
_BYTES_OBJECT = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class ImageDecodeError(DataError):
    """An image exists but cannot be decoded (corrupt, truncated, unknown format)."""


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None,
               background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode a file path, encoded bytes or a binary file object as RGB.

    ``name`` names the image in the error (default: the path). Raises
    `ImageDecodeError` when it cannot be decoded, so callers can count it.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as opened:
            opened.load()
            im: Image.Image = opened
            if "exif" in im.info or im.format == "TIFF":  # reading absent EXIF costs as much as the RGB conversion
                im = ImageOps.exif_transpose(im) or im
            return _to_rgb(im, background)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        why = _BYTES_OBJECT.sub("the bytes", str(exc))  # PIL names an in-memory buffer, not the image
        raise ImageDecodeError(f"cannot decode image {name}: {why}") from None


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # Palette images may carry a transparent colour index; make that real alpha first.
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything to white.
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im
