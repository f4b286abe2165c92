"""An ipywidgets front end for notebooks: the app's Compare view in JupyterLab.

Pick an image (a run's example or an upload), type an expression and optionally a ground-truth box, choose
backbones, run: the answers table and the side-by-side figure, then the map gallery: a map type of the registry
with its options as menus (``toolkit.interpret.explore.option_controls``), drawn for every backbone with one set of
options and linked axes. A click on a patch of the gallery chooses the query patch of map types that have one
(backbone attention, scan paths) for every backbone at once. Export buttons write the figure (PNG/SVG/PDF) and the
analysis (JSON) next to the notebook.

Thin over ``toolkit.interpret`` and ``toolkit.viz``; ipywidgets (and anywidget, which plotly's FigureWidget needs)
come with the ``notebooks`` extra and are imported only when the UI is built.
"""
from __future__ import annotations

import html
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from toolkit.interpret import (MAP_TYPES, Analysis, Example, compare, format_pixel_box, load_image, option_controls,
                               parse_pixel_box, results_table)
from toolkit.interpret.explore import Gallery, PixelPoint, gallery_maps, is_query
from toolkit.viz.figures import export_comparison, map_gallery, side_by_side

EXPORT_FORMATS = ("png", "svg", "pdf", "json")


def _widgets():
    try:
        import ipywidgets
    except ImportError as e:
        raise ImportError("the notebook UI needs ipywidgets: install the toolkit's `notebooks` extra "
                          "(pip install -e '.[notebooks]')") from e
    return ipywidgets


def _error(message: str) -> str:
    return f"<b style='color:#b00020'>{html.escape(message)}</b>"


class Explorer:
    """Image chooser (examples or an upload), expression and ground-truth box, backbone multi-select, run button,
    the results table and side-by-side figure; then the map gallery with its map type and generated option menus,
    and export buttons. Display it as the last expression of a cell. ``run()`` does what the button does and returns
    the analyses (None after a bad input, whose message is shown); ``export(fmt)`` what an export button does.
    Exports go to ``export_dir`` (default: the working directory, i.e. next to the notebook)."""

    def __init__(self, vlms: dict, examples: Sequence[Example] = (), export_dir: str | Path | None = None):
        w = _widgets()
        self.vlms, self.examples = vlms, list(examples)
        self.export_dir = Path.cwd() if export_dir is None else Path(export_dir)
        self.analyses: dict[str, Analysis] | None = None
        self.gallery: Gallery | None = None
        self.gallery_figure = None  # the gallery's FigureWidget (or static figure without anywidget)
        self.controls: dict[str, object] = {}  # option name -> its Dropdown
        self.query_option: str | None = None  # the chosen map type's query option, which a click sets
        self._quiet = False  # set while menus are filled in, so that filling them draws nothing
        wide = w.Layout(width="520px")
        labels = [(f"{e.image.rsplit('/', 1)[-1]}: {e.expression}", i) for i, e in enumerate(self.examples)]
        self.example = w.Dropdown(options=[("(upload an image)", None)] + labels, description="example", layout=wide)
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.expression = w.Text(description="expression", placeholder="the red circle left of the square",
                                 layout=wide)
        self.gt = w.Text(description="truth box", placeholder="x1, y1, x2, y2 in pixels (optional)", layout=wide)
        self.backbones = w.SelectMultiple(options=list(vlms), value=tuple(vlms), description="backbones")
        self.button = w.Button(description="Run", button_style="primary")
        self.status, self.output = w.HTML(), w.Output()
        self.map_type = w.Dropdown(options=list(MAP_TYPES), value=next(iter(MAP_TYPES)), description="map type")
        self.options_box = w.HBox([])
        self.gallery_status, self.gallery_output = w.HTML(), w.Output()
        self.export_buttons = {f: w.Button(description=f"{'analysis' if f == 'json' else 'figure'} {f.upper()}")
                               for f in EXPORT_FORMATS}
        self.export_status = w.HTML()
        self.example.observe(self._on_example, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.button.on_click(lambda _: self.run())
        self.map_type.observe(lambda _: self._show_map_type(), names="value")
        for fmt, b in self.export_buttons.items():
            b.on_click(lambda _, fmt=fmt: self.export(fmt))
        if self.examples:
            self.example.value = 0
        self.widget = w.VBox([w.HBox([self.example, self.upload]), self.expression, self.gt,
                              w.HBox([self.backbones, self.button]), self.status, self.output,
                              w.HTML("<b>Map gallery</b>: one map type for every backbone; click a patch to look "
                                     "from it (backbone attention, scan paths)"),
                              w.HBox([self.map_type, self.options_box]), self.gallery_status, self.gallery_output,
                              w.HBox(list(self.export_buttons.values())), self.export_status])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _on_example(self, change) -> None:
        if change["new"] is not None:
            self.upload.value = ()
            ex = self.examples[change["new"]]
            self.expression.value, self.gt.value = ex.expression, format_pixel_box(ex.gt_box)

    def _on_upload(self, change) -> None:
        if change["new"]:
            self.example.value = None
            self.gt.value = ""

    def run(self) -> dict[str, Analysis] | None:
        from IPython.display import display

        ex = None if self.example.value is None else self.examples[self.example.value]
        try:
            source = self.upload.value[0]["content"] if self.upload.value else (ex.image if ex else None)
            analyses = compare({n: self.vlms[n] for n in self.backbones.value}, load_image(source),
                               self.expression.value, gt_box=parse_pixel_box(self.gt.value))
        except ValueError as e:
            self.status.value = _error(str(e))
            return None
        self.analyses = analyses
        self.status.value = results_table(analyses).to_html(index=False)
        self.output.clear_output()
        with self.output:
            display(_figure_widget(side_by_side(analyses)))
        self._show_map_type()
        return analyses

    @contextmanager
    def _filling(self):
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _show_map_type(self) -> None:
        """Option menus for the chosen map type, from its declared options over the analysed backbones; then the
        gallery with their defaults."""
        if self.analyses is None:
            self.gallery_status.value = "The map gallery shows once <b>Run</b> has grounded an expression."
            return
        w = _widgets()
        with self._filling():
            self.controls, self.query_option = {}, None
            for c in option_controls(self.map_type.value, self.analyses):
                menu = w.Dropdown(options=list(c.choices), value=c.default, description=c.name, tooltip=c.help)
                menu.observe(lambda _: None if self._quiet else self.show_gallery(), names="value")
                self.controls[c.name] = menu
                self.query_option = c.name if is_query(c) else self.query_option
            self.options_box.children = tuple(self.controls.values())
        self.show_gallery()

    def show_gallery(self) -> Gallery | None:
        """The chosen map type with the chosen options for every analysed backbone (recomputed from the analyses'
        contexts: nothing is encoded or generated again)."""
        from IPython.display import display

        if self.analyses is None:
            return None
        options = {name: menu.value for name, menu in self.controls.items()}
        try:
            self.gallery = gallery_maps(self.analyses, self.map_type.value, **options)
        except ValueError as e:
            self.gallery_status.value = _error(str(e))
            return None
        missing = "; ".join(f"{b}: {why}" for b, why in self.gallery.unavailable.items())
        self.gallery_status.value = html.escape(f"No map for {missing}") if missing else ""
        self.gallery_figure = _figure_widget(map_gallery(self.analyses, self.gallery))
        for trace in self.gallery_figure.data:  # calls back only from a FigureWidget, on a click
            trace.on_click(self.on_click)
        self.gallery_output.clear_output()
        with self.gallery_output:
            display(self.gallery_figure)
        return self.gallery

    def on_click(self, trace, points, state=None) -> None:
        """A click on the gallery (a FigureWidget calls this for every trace, the clicked one with its points): the
        clicked pixel becomes the query patch of every backbone, and the maps are recomputed."""
        if not points.xs:
            return
        if self.query_option is None:
            self.gallery_status.value = (f"<code>{html.escape(self.map_type.value)}</code> has no query patch: a "
                                         "click chooses one for backbone_attention and scan_path maps")
            return
        point = PixelPoint(round(float(points.xs[0]), 1), round(float(points.ys[0]), 1))
        menu = self.controls[self.query_option]
        with self._filling():
            if point not in [v for _, v in menu.options]:
                menu.options = [*menu.options, (f"clicked (x {point.x:g}, y {point.y:g})", point)]
            menu.value = point
        self.show_gallery()

    def export(self, fmt: str) -> Path | None:
        """Write the side-by-side figure (``png``/``svg``/``pdf``) or the analysis with the gallery (``json``) to
        ``export_dir``; the status line says what was written, or why not."""
        if self.analyses is None:
            self.export_status.value = "Nothing to export yet: press <b>Run</b> first."
            return None
        written, problem = export_comparison(self.analyses, self.export_dir, self.gallery, stem="explore",
                                             formats=(fmt,))
        if problem:
            self.export_status.value = _error(problem)
            return None
        self.export_status.value = f"wrote {html.escape(written[fmt].name)} in {html.escape(self.export_dir.name)}/"
        return written[fmt]


def _figure_widget(fig):
    """A live plotly FigureWidget where anywidget is installed, else the static figure."""
    try:
        import anywidget  # noqa: F401  (plotly's FigureWidget is built on it)
    except ImportError:
        return fig
    import plotly.graph_objects as go

    return go.FigureWidget(fig)
