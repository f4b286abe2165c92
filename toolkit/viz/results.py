"""Figures over a run's results: training loss curves and scores with their intervals, per backbone."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

# (record, curve key, panel title, log y axis)
CURVE_PANELS = (("pretrain", "loss_curve", "backbone pretraining loss (classification)", True),
                ("vlm", "loss_curve", "VLM training loss", True),
                ("vlm", "monitor_curve", "VLM grounding Acc@0.5 (val subset)", False))
SCORE_PANELS = (("grounding", "acc@0.5", "grounding Acc@0.5 per style"),
                ("vqa", "accuracy", "VQA accuracy per question type"))
CHANCE_PATTERNS = ("/", "x", ".", "\\")


def _colour(i: int) -> str:
    return qualitative.Plotly[i % len(qualitative.Plotly)]


def training_curves(records: dict[str, dict]) -> go.Figure:
    """``records[backbone]`` holds the ``"pretrain"`` and/or ``"vlm"`` record of that backbone, with a
    ``loss_curve`` ([[step, loss], ...]) and, for VLMs, a ``monitor_curve`` ([[step, {"acc@0.5": a}], ...]); one
    line per backbone and panel, none where a curve is missing."""
    fig = make_subplots(rows=1, cols=len(CURVE_PANELS), subplot_titles=[t for _, _, t, _ in CURVE_PANELS])
    for i, (name, recs) in enumerate(records.items()):
        in_legend = False
        for col, (rec, key, _, _) in enumerate(CURVE_PANELS, start=1):
            curve = (recs.get(rec) or {}).get(key)
            if not curve:
                continue
            steps, values = zip(*curve)
            if key == "monitor_curve":
                values = [v.get("acc@0.5") for v in values]
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers" if key == "monitor_curve" else "lines",
                                     name=name, legendgroup=name, showlegend=not in_legend,
                                     line=dict(color=_colour(i))), row=1, col=col)
            in_legend = True
    fig.update_xaxes(title_text="step")
    for col, (_, _, _, log) in enumerate(CURVE_PANELS, start=1):
        # a log axis keeps the slow tail of a loss visible after its early drop
        fig.update_yaxes(type="log" if log else "linear", col=col)
    fig.update_yaxes(title_text="training loss (block mean)", col=1)
    fig.update_yaxes(range=[0, 1], col=len(CURVE_PANELS))
    fig.update_layout(title="Training curves", width=1400, height=450)
    return fig


def _or_none(values: pd.Series) -> list:
    return [None if pd.isna(v) else float(v) for v in values]


def score_bars(df: pd.DataFrame) -> go.Figure:
    """Rows of results.csv -> grouped bars per backbone with their 95% interval, one panel per score in
    ``SCORE_PANELS``; the model-free ``chance:*`` baselines follow the backbones in hatched grey."""
    names = list(dict.fromkeys(df.backbone))
    models = [n for n in names if not n.startswith("chance:")]
    chances = [n for n in names if n.startswith("chance:")]
    markers = {n: dict(color=_colour(i)) for i, n in enumerate(models)}
    markers.update({n: dict(color="lightgrey", line=dict(color="grey", width=1),
                            pattern=dict(shape=CHANCE_PATTERNS[i % len(CHANCE_PATTERNS)]))
                    for i, n in enumerate(chances)})
    fig = make_subplots(rows=1, cols=len(SCORE_PANELS), subplot_titles=[t for _, _, t in SCORE_PANELS])
    in_legend = set()
    for col, (task, metric, _) in enumerate(SCORE_PANELS, start=1):
        panel = df[(df.task == task) & (df.metric == metric)]
        splits = list(dict.fromkeys(panel.split))
        splits = [s for s in splits if s != "all"] + [s for s in splits if s == "all"]  # the pooled score last
        for name in models + chances:
            rows = panel[panel.backbone == name]
            if not len(rows):
                continue
            fig.add_trace(go.Bar(x=list(rows.split), y=list(rows.value), name=name, legendgroup=name,
                                 showlegend=name not in in_legend, marker=markers[name],
                                 error_y=dict(type="data", array=_or_none(rows.ci_high - rows.value),
                                              arrayminus=_or_none(rows.value - rows.ci_low))), row=1, col=col)
            in_legend.add(name)
        # traces list their own splits: without a fixed order a backbone missing one would reorder the axis
        fig.update_xaxes(categoryorder="array", categoryarray=splits, row=1, col=col)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="score (95% bootstrap interval)", col=1)
    fig.update_layout(title="Scores per backbone; hatched grey: chance baselines (no model)", barmode="group",
                      width=1100, height=450)
    return fig
