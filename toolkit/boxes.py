"""Boxes as the Prismatic/RefCOCO harness writes and scores them.

A box answer is the text of a Python-literal list of four floats in [0, 1], ``[x1, y1, x2, y2]``,
normalised by the image size, written with two decimals. Anything else is an *invalid* answer:
it scores as wrong and is counted, never raised.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Sequence

import torch

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}"

_LIST_RE = re.compile(r"\[[^\[\]]*\]")


def format_box(box_xyxy_norm: Sequence[float]) -> str:
    """Normalised ``[x1, y1, x2, y2]`` -> the answer text, e.g. ``[0.12, 0.30, 0.56, 0.78]``."""
    if len(box_xyxy_norm) != 4:
        raise ValueError(f"a box has 4 coordinates, got {len(box_xyxy_norm)}: {box_xyxy_norm!r}")
    vals = [min(1.0, max(0.0, float(v))) for v in box_xyxy_norm]
    return "[" + ", ".join(f"{v:.2f}" for v in vals) + "]"


def parse_box(answer: str, allow_empty: bool = False) -> tuple[float, float, float, float] | None:
    """The first list literal in ``answer`` as 4 floats in [0, 1], or None when it is not a valid box.

    Only literals are evaluated (``ast.literal_eval``), so a model answer can never run code.
    Degenerate boxes (x2 < x1 or y2 < y1) are invalid too, and so are zero-area ones (x2 == x1 or y2 == y1)
    unless ``allow_empty`` (the collapse diagnostics count them): they cannot overlap anything.
    """
    if not isinstance(answer, str):
        return None
    m = _LIST_RE.search(answer)
    if m is None:
        return None
    try:
        vals = ast.literal_eval(m.group(0))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(vals, (list, tuple)) or len(vals) != 4:
        return None
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        v = float(v)
        if not math.isfinite(v) or v < 0.0 or v > 1.0:
            return None
        out.append(v)
    x1, y1, x2, y2 = out
    if x2 < x1 or y2 < y1 or (not allow_empty and (x2 == x1 or y2 == y1)):
        return None
    return (x1, y1, x2, y2)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of boxes ``a, b: (..., 4)`` in xyxy (any common unit)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def normalize_box(box_xyxy: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel xyxy -> [0, 1] xyxy by the image size (RefCOCO normalises by the ORIGINAL size)."""
    x1, y1, x2, y2 = box_xyxy
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def denormalize_box(box_norm: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """[0, 1] xyxy -> pixel xyxy (the inverse of ``normalize_box``)."""
    x1, y1, x2, y2 = box_norm
    return (x1 * width, y1 * height, x2 * width, y2 * height)
