"""Figures over ``toolkit.interpret.Analysis`` results: side by side across backbones, scan directions, export."""
from __future__ import annotations

import html
import textwrap

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.interpret.analysis import Analysis
from toolkit.viz.overlays import box_shapes, cell_box, heatmap_trace, image_trace

# SS2D's cross-scan order (VMamba): row-major, column-major, then both reversed.
DIRECTIONS = ("row-major", "column-major", "row-major reversed", "column-major reversed")


def grounding_title(name: str, a: Analysis, limit: int = 32) -> str:
    """``name`` over ``'answer'`` with the IoU, or the reason there is no score (two lines: a long backbone name
    and a box would not fit over one panel)."""
    ans = a.grounding.answer if len(a.grounding.answer) <= limit else a.grounding.answer[:limit] + "..."
    score = "invalid answer" if not a.grounding.valid else "no ground truth" if a.iou is None else f"IoU {a.iou:.2f}"
    return f"{html.escape(name, False)}<br>{html.escape(repr(ans), False)} ({score})"  # titles are HTML: markup as text


def _panels(name: str, a: Analysis) -> list[tuple[str, list[go.BaseTraceType], list[dict]]]:
    """The four panels of one analysis as (title, heatmap traces, shapes)."""
    g = a.geometry
    bb = a.backbone_map()
    if bb is not None:
        backbone = (bb[0], [heatmap_trace(bb[1], g, name=bb[0])], box_shapes(query_box=cell_box(a.query, a.grid, g)))
    else:
        why = textwrap.wrap(a.no_map_reason(), 42, max_lines=2, placeholder=" ...")  # a panel is ~40 characters wide
        backbone = ("no backbone map:<br>" + "<br>".join(html.escape(line, False) for line in why), [], [])
    return [
        (grounding_title(name, a), [], box_shapes(a.grounding.box_pixels, a.gt_box)),
        (f"text-image cosine, {len(a.similarity.tokens)} tokens",
         [heatmap_trace(a.similarity.mean, g, colorscale="RdBu_r", zmid=0.0, name="cosine")], []),
        ("LM attention, answer -> image", [heatmap_trace(a.lm_attention.mean(), g, name="attention")], []),
        backbone,
    ]


def _grid_figure(rows: list[list[tuple[str, list, list]]], images: list, aspect: float, panel_px: int,
                 max_side: int, title: str) -> go.Figure:
    """Panels (title, traces, shapes) laid out row by row, each over its row's image."""
    n_rows, n_cols = len(rows), len(rows[0])
    panel_h = panel_px * min(max(aspect, 0.3), 1.5)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[t for row in rows for t, _, _ in row],
                        horizontal_spacing=0.015, vertical_spacing=min(0.12, 50 / (n_rows * (panel_h + 50))))
    for r, (row, image) in enumerate(zip(rows, images), start=1):
        for c, (_, traces, shapes) in enumerate(row, start=1):
            fig.add_trace(image_trace(image, max_side), row=r, col=c)
            sub = fig.get_subplot(r, c)
            (x0, x1), (y0, y1) = sub.xaxis.domain, sub.yaxis.domain
            for t in traces:
                if isinstance(t, go.Heatmap):  # each map its own scale, inside its panel's right edge
                    t.update(showscale=True, colorbar=dict(x=x1, xanchor="right", y=(y0 + y1) / 2, len=0.9 * (y1 - y0),
                                                           thickness=8, outlinewidth=0, tickfont=dict(size=8)))
                fig.add_trace(t, row=r, col=c)
            for s in shapes:
                fig.add_shape(**s, row=r, col=c)
    fig.update_annotations(font_size=11)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, width=panel_px * n_cols + 20, height=round(n_rows * (panel_h + 50) + 70),
                      margin=dict(l=10, r=10, t=70, b=10), showlegend=False)
    return fig


def side_by_side(analyses: dict[str, Analysis], *, max_side: int = 256, panel_px: int = 240) -> go.Figure:
    """Rows: backbones; columns: the image with predicted (solid) and ground-truth (dashed) boxes, text-image
    similarity, LM attention, and the backbone's own map (attention rollout or tap scan path) from the query."""
    if not analyses:
        raise ValueError("nothing to draw: no analyses given")
    first = next(iter(analyses.values()))
    return _grid_figure([_panels(n, a) for n, a in analyses.items()], [a.image for a in analyses.values()],
                        first.geometry.orig_h / first.geometry.orig_w, panel_px, max_side,
                        f"“{html.escape(first.expression, False)}” (dotted: the patch the backbone maps look from)")


def scan_path_figure(a: Analysis, module: str | None = None, *, max_side: int = 256, panel_px: int = 240) -> go.Figure:
    """One scan module's paths from the query patch: one panel per direction, then their sum (the merged map).
    Default module: the tap block's. Raises ValueError when the analysis has no scan paths."""
    if not a.scan_paths:
        raise ValueError("this analysis has no scan paths: its backbone has no 2-D selective-scan modules")
    module = module or a.tap_scan[0]
    if module not in a.scan_paths:
        raise ValueError(f"no scan path for `{module}`; available: {list(a.scan_paths)}")
    p = a.scan_paths[module]
    query = box_shapes(query_box=cell_box(p.query, p.grid, a.geometry))
    maps = list(p.per_direction) + [p.merged]
    titles = [DIRECTIONS[k] if k < len(DIRECTIONS) else f"direction {k}" for k in range(len(maps) - 1)] + ["merged"]
    row = [(t, [heatmap_trace(m, a.geometry, name=t)], query) for t, m in zip(titles, maps)]
    return _grid_figure([row], [a.image], a.geometry.orig_h / a.geometry.orig_w, panel_px, max_side,
                        f"scan paths of {module} from patch {p.query} of its {p.grid[0]}x{p.grid[1]} grid (dotted)")


def save_figure(fig: go.Figure, path: str | Path, *, scale: float = 1.0) -> Path:
    """Write ``.html`` (self-contained, plotly.js inlined) or an image format kaleido renders (``.png``, ``.svg``,
    ``.pdf``). Kaleido drives a Chrome: without ``BROWSER_PATH`` set, a ``chromium`` on the PATH is used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".html":
        fig.write_html(path, include_plotlyjs=True)
        return path
    browser = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError(f"exporting {path.name} needs Chrome or Chromium for kaleido: install one "
                           "(e.g. `apt-get install chromium`) or set BROWSER_PATH to it")
    os.environ["BROWSER_PATH"] = browser
    fig.write_image(path, scale=scale)
    return path
