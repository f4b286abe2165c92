"""What every explanation of one grounding answer reads, computed once per (model, image, expression).

``capture`` runs the backbone once with hooks that record attention probabilities and scan inputs; ``build_context``
adds the grounding answer (one ``generate``) and the query point that backbone maps look from. ``analyze`` and every
map type of ``toolkit.interpret.maps`` start from a ``MapContext``, so nothing is encoded or generated twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from toolkit.boxes import GROUNDING_PROMPT, box_iou
from toolkit.geometry import Geometry
from toolkit.interpret.attention import BackboneAttention, capture_attention, place_on_grid
from toolkit.interpret.inputs import load_image
from toolkit.interpret.scan_paths import capture_scan_inputs, cell_of
from toolkit.vlm import VLM, Grounding, validate_expression


@dataclass(frozen=True)
class Capture:
    """One hooked backbone pass over one image."""

    vlm: VLM
    pixels: torch.Tensor  # (3, H_in, W_in), normalised model input
    grid: tuple[int, int]  # the tap grid (h, w)
    tokens: torch.Tensor  # (1, N, C_vis), N = h * w: the backbone output, i.e. the connector input
    attention: BackboneAttention  # global attention per captured module (and why others have none)
    scan_inputs: dict[str, torch.Tensor]  # scan module -> its input, for scan paths


@dataclass(frozen=True)
class MapContext(Capture):
    """A ``Capture`` plus the grounding answer it explains."""

    image: Image.Image  # the original image (after load_image's cap)
    expression: str
    geometry: Geometry
    prompt: str
    answer: str
    grounding: Grounding  # answer, validity, box in original pixels
    point: tuple[float, float]  # (y, x) in [0, 1] of the input frame: where backbone maps look from by default
    max_new_tokens: int

    @property
    def query(self) -> tuple[int, int]:
        """The ``point``'s (row, col) on the tap grid."""
        return cell_of(self.point, self.grid)

    def iou(self, gt_box: Sequence[float]) -> float:
        return grounding_iou(self.grounding, gt_box)


def grounding_iou(g: Grounding, gt_box: Sequence[float]) -> float:
    """IoU of an answer's box with ``gt_box`` (original pixels); 0 for an answer that is not a box."""
    if not g.valid:
        return 0.0
    return float(box_iou(torch.tensor(g.box_pixels), torch.tensor(gt_box, dtype=torch.float32)))


def capture(vlm: VLM, pixels: torch.Tensor) -> Capture:
    """Encode ``pixels (3, H_in, W_in)`` once, recording attention probabilities and scan inputs on the way."""
    grid = vlm.backbone.grid(tuple(pixels.shape[-2:]))
    with capture_attention(vlm.backbone) as att, capture_scan_inputs(vlm.backbone) as scan_inputs:
        tokens = vlm.encode_images(pixels[None])  # (1, N, C_vis)
    layouts = vlm.backbone.attention_layouts(tuple(pixels.shape[-2:]))
    return Capture(vlm, pixels, grid, tokens, place_on_grid(att, grid, layouts), dict(scan_inputs))


def probe(vlm: VLM) -> Capture:
    """A ``capture`` of a blank image at the model's input size: what a backbone records, without a real image
    (which modules give global attention, which scans are 2-D)."""
    h, w = vlm.backbone.data_config.img_size
    return capture(vlm, vlm.preprocess(Image.new("RGB", (w, h)))[0])


def build_context(vlm: VLM, image, expression: str, *, query: tuple[int, int] | None = None,
                  max_new_tokens: int = 24) -> MapContext:
    """Ground ``expression`` in ``image`` and keep everything the maps read.

    ``query``: (row, col) on the tap grid that backbone maps look from; default the patch at the centre of the
    predicted box (the grid centre when the answer is not a box).
    """
    expression = validate_expression(expression)
    image = load_image(image)
    pixels, geom = vlm.preprocess(image)
    cap = capture(vlm, pixels)
    prompt = GROUNDING_PROMPT.format(expression=expression)
    (answer,) = vlm.generate(cap.tokens, [prompt], max_new_tokens)
    g = vlm.read_box(answer, geom)
    return MapContext(**vars(cap), image=image, expression=expression, geometry=geom, prompt=prompt, answer=answer,
                      grounding=g, point=query_point(query, cap.grid, g, geom), max_new_tokens=max_new_tokens)


def query_point(query: tuple[int, int] | None, grid: tuple[int, int], g: Grounding,
                geom: Geometry) -> tuple[float, float]:
    """The query as (y, x) in [0, 1] of the input frame, so that grids of other resolutions can place it."""
    h, w = grid
    if query is not None:
        r, c = query
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"query {tuple(query)} is outside the {h}x{w} token grid")
        return ((r + 0.5) / h, (c + 0.5) / w)
    if g.valid:
        x1, y1, x2, y2 = geom.box_to_input(g.box_pixels)
        return ((y1 + y2) / 2 / geom.in_h, (x1 + x2) / 2 / geom.in_w)
    return (0.5, 0.5)
