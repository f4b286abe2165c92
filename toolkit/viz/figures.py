"""Figures over ``toolkit.interpret.Analysis`` results: side by side across backbones, one map type for every
backbone (the map gallery), scan directions, export."""
from __future__ import annotations

import html
import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.interpret.analysis import Analysis
from toolkit.interpret.context import MapContext
from toolkit.interpret.explore import Gallery, analysis_json, context_of, describe_options, gallery_maps
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
        backbone = (_reason_title("no backbone map:", a.no_map_reason()), [], [])
    return [
        (grounding_title(name, a), [], box_shapes(a.grounding.box_pixels, a.gt_box)),
        (f"text-image cosine, {len(a.similarity.tokens)} tokens",
         [heatmap_trace(a.similarity.mean, g, colorscale="RdBu_r", zmid=0.0, name="cosine")], []),
        ("LM attention, answer -> image", [heatmap_trace(a.lm_attention.mean(), g, name="attention")], []),
        backbone,
    ]


def _reason_title(head: str, why: str) -> str:
    """A panel title: ``head`` over the reason there is no map, wrapped over at most two lines (a panel is ~40
    characters wide), shown as text."""
    lines = textwrap.wrap(why, 42, max_lines=2, placeholder=" ...")
    return head + "<br>" + "<br>".join(html.escape(line, False) for line in lines)


def _grid_figure(rows: list[list[tuple[str, list, list]]], images: list, aspect: float, panel_px: int,
                 max_side: int, title: str, linked: bool = False) -> go.Figure:
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
    if linked:  # every panel shows the same image: zooming or panning one moves them all
        fig.update_xaxes(matches="x")
        fig.update_yaxes(matches="y")
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


def map_gallery(sources: Mapping[str, Analysis | MapContext], gallery: str | Gallery, *,
                gt_box: Sequence[float] | None = None, max_side: int = 256, panel_px: int = 240,
                **options) -> go.Figure:
    """One map type for every backbone side by side, with one set of options: ``gallery`` is a map type's name
    (computed here from ``sources``' contexts with ``options``, see ``toolkit.interpret.explore.gallery_maps``) or
    a ``Gallery`` already computed. Each panel holds the backbone's predicted box (solid), the ground truth
    (dashed; an analysis's own, else ``gt_box``), the patch the map looks from (dotted) where the map type has a
    query, and its own colour scale (diverging around 0 for a signed map); a backbone without the map says why.
    The panels' axes are linked, so that zooming one zooms all."""
    if not sources:
        raise ValueError("nothing to draw: no backbones given")
    if isinstance(gallery, str):
        gallery = gallery_maps(sources, gallery, **options)
    panels = []
    for name, source in sources.items():
        ctx = context_of(source)
        gt = source.gt_box if isinstance(source, Analysis) else gt_box
        query = gallery.queries.get(name)
        shapes = box_shapes(ctx.grounding.box_pixels if ctx.grounding.valid else None, gt,
                            None if query is None else cell_box(query, ctx.grid, ctx.geometry))
        label = html.escape(name, False)
        if name in gallery.maps:
            m = gallery.maps[name]
            signed = bool((m < 0).any())
            trace = heatmap_trace(m, ctx.geometry, colorscale="RdBu_r" if signed else "Inferno",
                                  zmid=0.0 if signed else None, name=gallery.name)
            where = "" if query is None else f"<br>from patch {query} of its {ctx.grid[0]}x{ctx.grid[1]} grid"
            panels.append((label + where, [trace], shapes))
        else:
            panels.append((_reason_title(f"{label}: no map", gallery.unavailable.get(name, "not computed")), [],
                           shapes))
    first = context_of(next(iter(sources.values())))
    options_text = describe_options(gallery.options)
    title = f"{gallery.name}" + (f" ({html.escape(options_text, False)})" if options_text else "") + \
        f" for “{html.escape(first.expression, False)}”"
    return _grid_figure([panels], [first.image], first.geometry.orig_h / first.geometry.orig_w, panel_px, max_side,
                        title, linked=True)


def for_screen(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` that takes its container's width (its own width dropped, its height kept), so that a page
    narrower than the figure shrinks it instead of cutting it off; images keep their aspect inside their panels. A
    legend goes under the panels, where it takes no width from them, and panel titles are at most 12 px high."""
    out = go.Figure(fig)
    out.update_layout(width=None, autosize=True, legend=dict(orientation="h", x=0, xanchor="left", y=-0.2,
                                                             yanchor="top"))
    out.update_annotations(selector=lambda a: a.font.size is None or a.font.size > 12, font_size=12)
    return out


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


def _kaleido_browser(what: str) -> None:
    """Point kaleido at a Chrome: ``BROWSER_PATH`` when set, else a ``chromium`` on the PATH; RuntimeError (naming
    ``what``) when there is none."""
    browser = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError(f"exporting {what} needs Chrome or Chromium for kaleido: install one "
                           "(e.g. `apt-get install chromium`) or set BROWSER_PATH to it")
    os.environ["BROWSER_PATH"] = browser


def save_figure(fig: go.Figure, path: str | Path, *, scale: float = 1.0) -> Path:
    """Write ``.html`` (self-contained, plotly.js inlined) or an image format kaleido renders (``.png``, ``.svg``,
    ``.pdf``). Kaleido drives a Chrome: without ``BROWSER_PATH`` set, a ``chromium`` on the PATH is used."""
    return save_figure_as(fig, Path(path).with_suffix(""), [Path(path).suffix.lstrip(".")], scale=scale)[0]


def save_figure_as(fig: go.Figure, stem: str | Path, formats: Sequence[str], *, scale: float = 1.0) -> list[Path]:
    """``fig`` as ``<stem>.<format>`` for each of ``formats`` (``html`` and what kaleido renders: ``png``, ``svg``,
    ``pdf``), the image formats through one kaleido call (one browser start, not one per format)."""
    import plotly.io as pio

    paths = [Path(f"{stem}.{fmt}") for fmt in formats]
    if paths:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    images = [p for p in paths if p.suffix != ".html"]
    for p in paths:
        if p.suffix == ".html":
            fig.write_html(p, include_plotlyjs=True)
    if images:
        _kaleido_browser(", ".join(p.name for p in images))
        # write_images, unlike write_image, does not read the size from the layout
        pio.write_images([fig] * len(images), images, scale=scale, width=fig.layout.width, height=fig.layout.height)
    return paths


def export_comparison(analyses: Mapping[str, Analysis], out_dir: str | Path, gallery: Gallery | None = None, *,
                      stem: str = "comparison", formats: Sequence[str] = ("png", "svg", "pdf", "json")
                      ) -> tuple[dict[str, Path], str | None]:
    """The side-by-side figure of ``analyses`` (``png``/``svg``/``pdf``/``html``) and the analysis as ``json``
    (``toolkit.interpret.explore.analysis_json``, with the map gallery when given) under ``out_dir``.

    Returns the files written by format, and None or one line saying why the figure's image formats were not
    (no Chromium for kaleido): the JSON is written either way."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "json" in formats:
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps(analysis_json(analyses, gallery), allow_nan=False))
        written["json"] = path
    figure_formats = [f for f in formats if f != "json"]
    if not figure_formats:
        return written, None
    figures, problem = _export_figure(side_by_side(analyses), out_dir, stem, figure_formats)
    return written | figures, problem


def export_gallery(sources: Mapping[str, Analysis | MapContext], gallery: Gallery, out_dir: str | Path, *,
                   stem: str = "gallery", formats: Sequence[str] = ("png", "svg", "pdf")
                   ) -> tuple[dict[str, Path], str | None]:
    """The map gallery figure (``map_gallery`` of an already computed ``gallery``) as ``<stem>.<format>`` under
    ``out_dir``; returns the files by format, and None or one line saying why they could not be written."""
    return _export_figure(map_gallery(sources, gallery), Path(out_dir), stem, formats)


def _export_figure(fig: go.Figure, out_dir: Path, stem: str, formats: Sequence[str]
                   ) -> tuple[dict[str, Path], str | None]:
    """``save_figure_as`` that answers a failure with one line instead of raising: a front end keeps serving what
    it has (kaleido without a browser, or a browser that does not start)."""
    try:
        paths = save_figure_as(fig, out_dir / stem, formats)
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0].replace(str(out_dir), "").strip()
        return {}, f"{'/'.join(f.upper() for f in formats)} export is unavailable here ({reason[:160]})"
    return dict(zip(formats, paths)), None
