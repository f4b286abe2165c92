"""Input checks every front end shares: images (any form, EXIF-upright, size-capped, decompression bombs refused)
and pixel boxes, each failing with a message meant for the user."""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_SIDE = 4096  # larger images are downscaled on load: the models see at most ~1024 px anyway


def load_image(source, max_side: int = MAX_SIDE) -> Image.Image:
    """A path, bytes, PIL image or ``(H, W[, C])`` array -> RGB PIL image, upright (its EXIF orientation applied, as
    a phone photo is meant to be seen), downscaled to ``max_side`` if larger.

    Anything unreadable raises ValueError with a message for the user that names the file by its name only (an
    upload's server-side folder means nothing to the user); PIL's decompression-bomb guard
    (``Image.MAX_IMAGE_PIXELS``) is turned into such a message instead of a warning or a crash.
    """
    if source is None:
        raise ValueError("no image given: upload an image or pick an example")
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        img = _open(source, max_side)
    else:
        raise ValueError(f"not an image: got a {type(source).__name__}; give a file path, bytes, a PIL image "
                         "or an (H, W[, 3]) array")
    img = ImageOps.exif_transpose(img)  # a copy only when the EXIF orientation says to turn it
    if min(img.size) < 1:
        raise ValueError(f"the image is empty ({img.size[0]}x{img.size[1]} pixels)")
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR, reducing_gap=2)
    return img if img.mode == "RGB" else img.convert("RGB")  # a PIL image that needs nothing comes back as is


def _open(source, max_side: int) -> Image.Image:
    raw = isinstance(source, (bytes, bytearray, memoryview))
    label = "the uploaded data" if raw else f"`{Path(os.fspath(source)).name}`"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(source)) if raw else source)
            img.draft("RGB", (max_side, max_side))  # JPEGs decode straight at a reduced scale
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{label} is too large to decode safely: {e} Downscale it below "
                         f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} million pixels first.") from None
    except FileNotFoundError:
        raise ValueError(f"{label} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        why = "its format is not one PIL reads" if isinstance(e, UnidentifiedImageError) else \
            "the file is truncated or damaged"
        raise ValueError(f"{label} is not a readable image: {why}") from None
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array is (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":  # floats are read as [0, 1] intensities
        a = np.clip(np.nan_to_num(a), 0, 1) * 255
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def parse_pixel_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1, y1, x2, y2"`` in original pixels (blank: None) -> a box; malformed text raises ValueError."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in re.split(r"[\s,;\[\]()]+", str(text)) if p]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) and v >= 0 for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"the ground-truth box {text!r} is not `x1, y1, x2, y2` in pixels with x2 > x1 and y2 > y1")
    return box  # type: ignore[return-value]


def format_pixel_box(box: Sequence[float] | None) -> str:
    """The text ``parse_pixel_box`` reads back ("" for no box)."""
    return "" if box is None else ", ".join(f"{v:.0f}" for v in box)
