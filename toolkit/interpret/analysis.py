"""One call per (model, image, expression): the grounding answer and every map that explains it.

``analyze`` runs the backbone once, with hooks that record attention probabilities and scan inputs, then asks
the LM for the box and computes similarity, LM attention, backbone attention and scan-path maps from that one
pass. Everything uses the feature contract (``grid``, ``attention_modules``, ``scan_modules``), never a family
name, so a family without attention or scans simply has empty dicts. The app and the notebook call this module
and ``toolkit.viz`` only; input checks (images, expressions, boxes) live here so that every front end gives the
same clear messages.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from toolkit.boxes import GROUNDING_PROMPT, box_iou
from toolkit.geometry import Geometry
from toolkit.interpret.attention import LMAttention, capture_attention, lm_image_attention, place_on_grid
from toolkit.interpret.scan_paths import ScanPath, capture_scan_inputs, cell_of, scan_paths_from_inputs
from toolkit.interpret.similarity import Similarity, text_image_similarity
from toolkit.vlm import VLM, Grounding, validate_expression

MAX_SIDE = 4096  # larger images are downscaled on load: the models see at most ~1024 px anyway


# -- inputs ---------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Example:
    """An image with an expression to try, and its ground-truth box in original pixels when known."""

    image: str
    expression: str
    gt_box: tuple[float, float, float, float] | None = None


def example_images(run_dir: str | Path, limit: int = 8) -> list[Example]:
    """Scene-world val examples of a run (the referring expressions its evaluation scored), [] when it has none.

    They are read from the per-example evaluation records under ``vlms/*/eval_val_*.json`` (image paths relative to
    the world, the world relative to the VLM's directory); images that are no longer on disk are left out.
    """
    out: dict[str, Example] = {}
    for f in sorted(Path(run_dir).glob("vlms/*/eval_val_*.json")):
        record = json.loads(f.read_text())
        root = f.parent / record["world_root"] if "world_root" in record else Path()
        for r in record.get("grounding", []):
            if len(out) == limit:
                return list(out.values())
            path = str(root / r["image_path"])
            if path not in out and Path(path).is_file():
                out[path] = Example(path, r["expression"], tuple(r["gt_box"]))
        if out:  # every VLM of a run is scored on the same examples
            break
    return list(out.values())


def photo_examples() -> list[Example]:
    """A real photo (scikit-image's astronaut) written once to the temp dir; [] without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return []
    path = Path(tempfile.gettempdir()) / "toolkit-examples" / "astronaut.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.astronaut()).save(path)
    return [Example(str(path), "the face of the astronaut")]


# -- analysis -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    """Everything ``analyze`` found for one model. Maps are on the model's input frame (letterbox included);
    ``toolkit.viz`` maps them onto the original image through ``geometry``."""

    image: Image.Image  # the original image (after load_image's cap)
    expression: str
    grounding: Grounding  # answer, valid, box in original pixels
    iou: float | None  # with gt_box, when given (0 for an invalid answer)
    gt_box: tuple[float, float, float, float] | None
    grid: tuple[int, int]  # the tap grid (h, w)
    geometry: Geometry
    query: tuple[int, int]  # (row, col) on the tap grid: the patch backbone maps look from
    similarity: Similarity
    lm_attention: LMAttention
    attention: dict[str, torch.Tensor]  # backbone attention from the query patch, name -> (h, w); may be empty
    scan_paths: dict[str, ScanPath]  # scan module -> its path from the query; may be empty
    skipped: dict[str, str]  # attention/scan modules without a map, and why
    saliency: torch.Tensor | None = None  # (H_in, W_in) |d logit / d pixel| of the answer's first token

    @property
    def tap_scan(self) -> tuple[str, ScanPath] | None:
        """The scan path of the block at the tap (the last scan module before the visual tokens)."""
        return next(reversed(self.scan_paths.items()), None)

    def no_map_reason(self) -> str | None:
        """Why ``backbone_map`` is None, in one line (None when there is a map): the distinct reasons the backbone's
        modules were skipped (e.g. MaxViT's windowed attention), each with its module count."""
        if self.backbone_map() is not None:
            return None
        if not self.skipped:
            return "the backbone has no attention or scan modules"
        counts: dict[str, int] = {}
        for why in self.skipped.values():
            head = why.split(":")[0]  # the kind of reason, without the per-module numbers
            counts[head] = counts.get(head, 0) + 1
        return "; ".join(f"{why} ({n} module{'s' if n > 1 else ''})" for why, n in counts.items())

    def backbone_map(self) -> tuple[str, torch.Tensor] | None:
        """The backbone's own view from the query patch: the tap block's merged scan path, else the attention
        rollout (or the last captured layer), else None."""
        if self.tap_scan is not None:
            name, path = self.tap_scan
            return f"scan path {name}", path.merged
        if self.attention:
            name = "rollout" if "rollout" in self.attention else next(reversed(self.attention))
            return f"attention {name}", self.attention[name]
        return None


def analyze(vlm: VLM, image, expression: str, *, gt_box: Sequence[float] | None = None,
            query: tuple[int, int] | None = None, contextual: bool = False, saliency: bool = False,
            max_new_tokens: int = 24) -> Analysis:
    """Ground ``expression`` in ``image`` with ``vlm`` and compute the maps that explain the answer.

    ``query``: (row, col) on the tap grid that backbone maps look from; default the patch at the centre of the
    predicted box (the grid centre when the answer is not a box). ``contextual``: similarity of LM hidden states
    instead of input embeddings. ``saliency``: add a captum Saliency map (one backward pass through the frozen
    backbone; Integrated Gradients would cost ~50 of them on the CPU).
    """
    expression = validate_expression(expression)
    image = load_image(image)
    if gt_box is not None and (gt_box[2] > image.width or gt_box[3] > image.height):
        raise ValueError(f"the ground-truth box {format_pixel_box(gt_box)} leaves the {image.width}x{image.height} "
                         f"image: give it in the uploaded image's pixels")
    pixels, geom = vlm.preprocess(image)
    grid = vlm.backbone.grid(tuple(pixels.shape[-2:]))
    with capture_attention(vlm.backbone) as att, capture_scan_inputs(vlm.backbone) as scan_inputs:
        tokens = vlm.encode_images(pixels[None])  # (1, N, C_vis); one pass feeds every map below
    prompt = GROUNDING_PROMPT.format(expression=expression)
    (answer,) = vlm.generate(tokens, [prompt], max_new_tokens)
    g = vlm.read_box(answer, geom)
    point = _query_point(query, grid, g, geom)
    cell = cell_of(point, grid)
    bb_att = place_on_grid(att, grid)
    scans, scan_skipped = scan_paths_from_inputs(vlm.backbone, scan_inputs, point)
    iou = None
    if gt_box is not None:
        iou = float(box_iou(torch.tensor(g.box_pixels), torch.tensor(gt_box, dtype=torch.float32))) if g.valid else 0.0
    return Analysis(
        image=image, expression=expression, grounding=g, iou=iou, gt_box=None if gt_box is None else tuple(gt_box),
        grid=grid, geometry=geom, query=cell,
        similarity=text_image_similarity(vlm, tokens, expression, grid, contextual=contextual),
        lm_attention=lm_image_attention(vlm, tokens, prompt, answer, grid),
        attention=bb_att.query_maps(cell), scan_paths=scans, skipped={**bb_att.skipped, **scan_skipped},
        saliency=pixel_saliency(vlm, pixels, prompt, answer) if saliency else None,
    )


def _query_point(query, grid, g: Grounding, geom: Geometry) -> tuple[float, float]:
    """The query as (y, x) in [0, 1] of the input frame, so that grids of other resolutions can place it."""
    h, w = grid
    if query is not None:
        r, c = query
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"query {query} is outside the {h}x{w} token grid")
        return ((r + 0.5) / h, (c + 0.5) / w)
    if g.valid:
        x1, y1, x2, y2 = geom.box_to_input(g.box_pixels)
        return ((y1 + y2) / 2 / geom.in_h, (x1 + x2) / 2 / geom.in_w)
    return (0.5, 0.5)


def pixel_saliency(vlm: VLM, pixels: torch.Tensor, prompt: str, answer: str) -> torch.Tensor:
    """captum Saliency of the answer's first token w.r.t. the input pixels ``(3, H, W)`` -> ``(H, W)``."""
    from captum.attr import Saliency

    tok = vlm.tokenizer
    ids = tok(answer, add_special_tokens=False).input_ids
    target = ids[0] if ids else tok.eos_token_id

    def first_token_logits(px: torch.Tensor) -> torch.Tensor:
        b = vlm.assemble(vlm.backbone(px), [prompt] * len(px))
        return vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask).logits[:, -1]  # (B, V)

    with torch.enable_grad():
        px = pixels[None].to(vlm.device).requires_grad_()
        grad = Saliency(first_token_logits).attribute(px, target=target, abs=True)
    return grad[0].amax(0).detach().cpu()  # (H, W), max over colour channels


def compare(vlms: dict[str, VLM], image, expression: str, gt_box: Sequence[float] | None = None,
            **kw) -> dict[str, Analysis]:
    """``analyze`` for every model on the same input (checked once, before any model runs)."""
    if not vlms:
        raise ValueError("no backbone selected: choose at least one")
    expression = validate_expression(expression)
    image = load_image(image)
    return {name: analyze(vlm, image, expression, gt_box=gt_box, **kw) for name, vlm in vlms.items()}


def results_table(analyses: dict[str, Analysis]):
    """One row per backbone: answer, validity, box in original pixels, IoU, and the backbone map shown (or why
    there is none) (a pandas DataFrame)."""
    import pandas as pd

    rows = [dict(backbone=name, answer=a.grounding.answer, valid=a.grounding.valid,
                 box=format_pixel_box(a.grounding.box_pixels), iou=None if a.iou is None else round(a.iou, 3),
                 backbone_map=(a.backbone_map() or (a.no_map_reason(),))[0]) for name, a in analyses.items()]
    return pd.DataFrame(rows, columns=["backbone", "answer", "valid", "box", "iou", "backbone_map"])
