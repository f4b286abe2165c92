"""One call per (model, image, expression): the grounding answer and every map that explains it.

``analyze`` builds one ``MapContext`` (the backbone run once, with hooks that record attention probabilities and
scan inputs, then the LM's box) and computes similarity, LM attention, backbone attention and scan-path maps from
that one pass. Everything uses the feature contract (``grid``, ``attention_modules``, ``scan_modules``), never a
family name, so a family without attention or scans simply has empty dicts. Input checks live in
``toolkit.interpret.inputs``, attributions in ``toolkit.interpret.attribution``, a run's examples in
``toolkit.runs``; the same maps, one at a time and with their options, in ``toolkit.interpret.maps``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from toolkit.geometry import Geometry
from toolkit.interpret.attention import LMAttention, lm_image_attention, skip_summary
from toolkit.interpret.attribution import pixel_saliency
from toolkit.interpret.context import MapContext, build_context
from toolkit.interpret.inputs import format_pixel_box, load_image
from toolkit.interpret.scan_paths import ScanPath, scan_paths_from_inputs
from toolkit.interpret.similarity import Similarity, text_image_similarity
from toolkit.vlm import VLM, Grounding, validate_expression


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
    tap_mixer: str | None = None  # "scan" | "attention": the kind of token mixer the visual tokens leave last
    # the context the maps came from: any map type of toolkit.interpret.maps computes from it without another pass
    context: MapContext | None = field(default=None, repr=False, compare=False)

    @property
    def tap_scan(self) -> tuple[str, ScanPath] | None:
        """The scan path of the block at the tap (the last scan module before the visual tokens)."""
        return next(reversed(self.scan_paths.items()), None)

    def no_map_reason(self) -> str | None:
        """Why ``backbone_map`` is None, in one line (None when there is a map): the distinct reasons the backbone's
        modules were skipped (e.g. ViTDet's windowed attention, which has no layout), each with its module count."""
        if self.backbone_map() is not None:
            return None
        if not self.skipped:
            return "the backbone has no attention or scan modules"
        return skip_summary(self.skipped)

    def backbone_map(self) -> tuple[str, torch.Tensor] | None:
        """The backbone's own view from the query patch, from the kind of mixer nearest the tap (a hybrid such as
        MambaVision ends its stages in attention): the tap block's merged scan path, or the attention rollout (or
        the last captured layer); the other kind when that one has no map; else None."""
        scan = None if self.tap_scan is None else (f"scan path {self.tap_scan[0]}", self.tap_scan[1].merged)
        att = None
        if self.attention:
            name = "rollout" if "rollout" in self.attention else next(reversed(self.attention))
            att = (f"attention {name}", self.attention[name])
        return (att or scan) if self.tap_mixer == "attention" else (scan or att)


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
    ctx = build_context(vlm, image, expression, query=query, max_new_tokens=max_new_tokens)
    scans, scan_skipped = scan_paths_from_inputs(vlm.backbone, ctx.scan_inputs, ctx.point)
    return Analysis(
        image=image, expression=expression, grounding=ctx.grounding, iou=None if gt_box is None else ctx.iou(gt_box),
        gt_box=None if gt_box is None else tuple(gt_box), grid=ctx.grid, geometry=ctx.geometry, query=ctx.query,
        similarity=text_image_similarity(vlm, ctx.tokens, expression, ctx.grid, contextual=contextual),
        lm_attention=lm_image_attention(vlm, ctx.tokens, ctx.prompt, ctx.answer, ctx.grid),
        attention=ctx.attention.query_maps(ctx.query), scan_paths=scans,
        skipped={**ctx.attention.skipped, **scan_skipped},
        saliency=pixel_saliency(vlm, ctx.pixels, ctx.prompt, ctx.answer) if saliency else None,
        tap_mixer=tap_mixer(vlm.backbone), context=ctx,
    )


def tap_mixer(backbone) -> str | None:
    """"scan" or "attention": which of the backbone's mapped token mixers runs last before the tap (None: neither)."""
    order = {id(m): i for i, m in enumerate(backbone.modules())}  # registration order: the forward's, here
    last = {kind: max((order[id(m)] for _, m in modules), default=-1)
            for kind, modules in (("scan", backbone.scan_modules()), ("attention", backbone.attention_modules()))}
    kind = max(last, key=last.get)
    return kind if last[kind] >= 0 else None


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
