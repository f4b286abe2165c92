"""An ipywidgets front end for notebooks: pick an image, type an expression, choose backbones, compare.

Thin over ``toolkit.interpret.compare`` and ``toolkit.viz.side_by_side``; ipywidgets (and anywidget, which
plotly's FigureWidget needs) come with the ``notebooks`` extra and are imported only when the UI is built.
"""
from __future__ import annotations

import html
from typing import Sequence

from toolkit.interpret import Analysis, Example, compare, load_image, results_table
from toolkit.viz.figures import side_by_side


def _widgets():
    try:
        import ipywidgets
    except ImportError as e:
        raise ImportError("the notebook UI needs ipywidgets: install the toolkit's `notebooks` extra "
                          "(pip install -e '.[notebooks]')") from e
    return ipywidgets


class Explorer:
    """Image chooser (examples or an upload), expression box, backbone multi-select, run button and the
    side-by-side figure with its results table. Display it as the last expression of a cell; ``run()`` does
    what the button does and returns the analyses (None after a bad input, whose message is shown)."""

    def __init__(self, vlms: dict, examples: Sequence[Example] = ()):
        w = _widgets()
        self.vlms, self.examples = vlms, list(examples)
        labels = [(f"{e.image.rsplit('/', 1)[-1]}: {e.expression}", i) for i, e in enumerate(self.examples)]
        self.example = w.Dropdown(options=[("(upload an image)", None)] + labels, description="example",
                                  layout=w.Layout(width="520px"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.expression = w.Text(description="expression", placeholder="the red circle left of the square",
                                 layout=w.Layout(width="520px"))
        self.backbones = w.SelectMultiple(options=list(vlms), value=tuple(vlms), description="backbones")
        self.button = w.Button(description="Run", button_style="primary")
        self.status, self.output = w.HTML(), w.Output()
        self.example.observe(self._on_example, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.button.on_click(lambda _: self.run())
        if self.examples:
            self.example.value = 0
        self.widget = w.VBox([w.HBox([self.example, self.upload]), self.expression,
                              w.HBox([self.backbones, self.button]), self.status, self.output])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _on_example(self, change) -> None:
        if change["new"] is not None:
            self.upload.value = ()
            self.expression.value = self.examples[change["new"]].expression

    def _on_upload(self, change) -> None:
        if change["new"]:
            self.example.value = None

    def run(self) -> dict[str, Analysis] | None:
        from IPython.display import display

        ex = None if self.example.value is None else self.examples[self.example.value]
        try:
            source = self.upload.value[0]["content"] if self.upload.value else (ex.image if ex else None)
            analyses = compare({n: self.vlms[n] for n in self.backbones.value}, load_image(source),
                               self.expression.value, gt_box=ex.gt_box if ex else None)
        except ValueError as e:
            self.status.value = f"<b style='color:#b00020'>{html.escape(str(e))}</b>"
            return None
        self.status.value = results_table(analyses).to_html(index=False)
        self.output.clear_output()
        with self.output:
            display(_figure_widget(side_by_side(analyses)))
        return analyses


def _figure_widget(fig):
    """A live plotly FigureWidget where anywidget is installed, else the static figure."""
    try:
        import anywidget  # noqa: F401  (plotly's FigureWidget is built on it)
    except ImportError:
        return fig
    import plotly.graph_objects as go

    return go.FigureWidget(fig)
