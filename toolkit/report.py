"""Reports of a run: results.csv (one row per backbone x task x split x metric), results.md, figures/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import pandas as pd

from toolkit.runs import RunDir, load_vlms, run_world


COLUMNS = ["backbone", "task", "split", "metric", "value", "n", "ci_low", "ci_high"]
COLLAPSE_METRICS = ["box_spread", "top_answer_share", "zero_area_rate"]
RELIANCE_METRICS = ["loss_true", "loss_shuffled", "loss_gain", "token_acc_true", "token_acc_shuffled",
                    "token_acc_drop"]
# (title, task, metric, shown with its interval): the score tables of results.md and of the seed summary.
SCORE_TABLES = (("Grounding Acc@IoU>=0.5", "grounding", "acc@0.5", True),
                ("Grounding mean IoU", "grounding", "mean_iou", True),
                ("Grounding invalid-answer rate", "grounding", "invalid_rate", False),
                ("Scenes with 2+ objects: answers that box some object", "grounding", "on_object", True),
                ("Scenes with 2+ objects: of those, the object the expression names", "grounding", "right_object",
                 True),
                ("VQA exact-match accuracy", "vqa", "accuracy", True),
                ("Backbone pretraining top-1 (classification set)", "pretrain", "top1", False),
                ("Dense-task tuning: segmentation mIoU (val scenes)", "dense", "miou", False))
RESULT_FIGURES = (("training_curves", "Training loss per backbone: backbone pretraining and VLM training"),
                  ("scores", "Grounding and VQA scores with their 95% intervals, beside the chance baselines"))


class Written(NamedTuple):
    """The files a report function wrote, and the notes its user should see (an export skipped, a table not made):
    the caller shows them, since library code prints nothing."""

    paths: list[Path]
    notes: list[str]


def _joined(parts: Iterable[Written]) -> Written:
    parts = list(parts)
    return Written([p for w in parts for p in w.paths], [n for w in parts for n in w.notes])


def results_frame(rows: Sequence[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def _with_interval(row) -> str:
    if pd.isna(row.ci_low):
        return f"{row.value:.3f}"
    return f"{row.value:.3f} [{row.ci_low:.2f}, {row.ci_high:.2f}]"


def summary_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pivoted views: grounding Acc@0.5, mean IoU and invalid rate per style, VQA accuracy per type (scores with
    their 95% bootstrap interval), pretraining top-1, dense mIoU, and the collapse diagnostics."""
    out = {}
    for title, task, metric, interval in SCORE_TABLES:
        sub = df[(df.task == task) & (df.metric == metric)]
        if not len(sub):
            continue
        if interval:
            sub = sub.assign(shown=sub.apply(_with_interval, axis=1))
            out[title] = sub.pivot_table(index="backbone", columns="split", values="shown", aggfunc="first", sort=False)
        else:
            out[title] = sub.pivot_table(index="backbone", columns="split", values="value", sort=False)
    sub = df[df.task == "reliance"]
    if len(sub):
        out["Image reliance (val turns, own vs shuffled image tokens)"] = sub.pivot_table(
            index="backbone", columns="metric", values="value", sort=False).reindex(columns=RELIANCE_METRICS)
    sub = df[df.task.isin(["grounding", "vqa"]) & df.metric.isin(COLLAPSE_METRICS)]
    if len(sub):
        table = sub.pivot_table(index=["backbone", "task", "split"], columns="metric", values="value", sort=False)
        out["Collapse diagnostics"] = table.reindex(columns=[m for m in COLLAPSE_METRICS if m in table.columns]) \
            .reset_index(["task", "split"])
    return out


def write_report(run_dir: Path, rows: Sequence[dict], pretrain: dict, cfg, figures: bool = False) -> pd.DataFrame:
    """results.csv and results.md; returns the results frame. ``figures``: link from results.md the figures that
    ``write_result_figures`` (given that frame) and ``write_figures`` write after this."""
    df = results_frame(rows)
    df.to_csv(RunDir(run_dir).results_csv, index=False)
    lines = [f"# Results: {cfg.name}", "",
             f"Backbones: {', '.join(cfg.backbones)}; connector {cfg.connector}; "
             "rows named `chance:*` are model-free baselines.", ""]
    lines += reliance_flags(df)
    lines += choice_flags(df)
    for title, table in summary_tables(df).items():
        lines += [f"## {title}", "", table.to_markdown(floatfmt=".3f"), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- {title}: [interactive](figures/{stem}.html), [PNG](figures/{stem}.png)"
                  for stem, title in RESULT_FIGURES]
        lines += ["- Box, text-image similarity, LM attention and backbone map side by side for a few val "
                  "expressions: `figures/side_by_side_*.html`", "",
                  "PNGs are written only where a Chromium was found (see the run's log).", ""]
    RunDir(run_dir).results_md.write_text("\n".join(lines))
    return df


def choice_flags(df: pd.DataFrame) -> list[str]:
    """Report lines naming every VLM that boxes objects but not the one its expression names: its
    ``right_object`` interval reaches the random-object chance on some split (see eval.evaluate.object_choice)."""
    rows = df[(df.task == "grounding") & (df.metric == "right_object")]
    chance = rows[rows.backbone == "chance:random-object"].set_index("split").value
    blind = sorted({r.backbone for r in rows.itertuples() if not r.backbone.startswith("chance:")
                    and r.split in chance and not pd.isna(r.ci_low) and r.ci_low <= chance[r.split]})
    if not blind:
        return []
    return [f"**Flagged: {', '.join(blind)} box(es) an object but not reliably the one named**: on some split, the "
            "share of right objects among the boxed ones is within noise of picking one at random (mean 1/n): "
            "the LM localises without reading the expression.", ""]


def reliance_flags(df: pd.DataFrame) -> list[str]:
    """Report lines naming every VLM whose answers do not depend on its image (see toolkit.eval.reliance)."""
    from toolkit.eval.reliance import RELIANCE_MIN_LOSS_GAIN as gain

    rel = df[df.task == "reliance"]
    if rel.empty or "loss_gain" not in set(rel.metric):
        return []
    loss_gain = rel[rel.metric == "loss_gain"].set_index("backbone").value
    blind = [b for b, v in loss_gain.items() if v < gain]
    if not blind:
        return [f"Every VLM depends on its image: with another scene's image tokens its answer loss rises by "
                f"{loss_gain.min():.2f}-{loss_gain.max():.2f} nats per token (flagged below {gain}).", ""]
    return [f"**Flagged: {', '.join(blind)} barely depend(s) on the image** (answer loss rises by less than {gain} "
            "nats per token with another scene's image tokens): their scores come from the text alone.", ""]


def summary_text(df: pd.DataFrame) -> str:
    """``summary_tables`` as plain text for a terminal, each table after a blank line and its title."""
    return "".join(f"\n{title}\n{table.to_string(float_format=lambda v: f'{v:.3f}')}\n"
                   for title, table in summary_tables(df).items())


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(s) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s))


def latex_table(title: str, df: pd.DataFrame) -> str:
    """A booktabs table (no jinja2 needed) with the index as leading columns."""
    flat = df.reset_index()
    cols = list(flat.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title)}}}", r"\small",
             rf"\begin{{tabular}}{{{'l' * len(cols)}}}", r"\toprule", " & ".join(_tex(c) for c in cols) + r" \\",
             r"\midrule"]
    lines += [" & ".join(_tex(v) for v in row) + r" \\" for row in flat.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_figures(run_dir: Path, refs: Sequence, cfg, formats: Sequence[str] = ("html", "png")) -> Written:
    """The side-by-side figure (box, similarity, LM attention, backbone map per backbone) for a few val
    expressions, one of each style, as PNG (when a Chromium is at hand) and self-contained HTML."""
    from toolkit.interpret import compare
    from toolkit.viz.figures import side_by_side

    vlms = load_vlms(run_dir, list(cfg.backbones))
    chosen, seen = [], {}
    for r in refs:  # round-robin over styles so every style is shown
        if seen.get(r.dataset, 0) <= len(chosen) // 3:
            chosen.append(r)
            seen[r.dataset] = seen.get(r.dataset, 0) + 1
        if len(chosen) == cfg.figure_examples:
            break

    def figures():  # built one at a time: each holds every backbone's maps
        for i, r in enumerate(chosen):
            fig = side_by_side(compare(vlms, r.image_path, r.expression, gt_box=r.box_xyxy))
            fig.update_layout(title=f"{r.dataset}: \u201c{r.expression}\u201d")
            yield fig, f"side_by_side_{i:02d}"

    return _save_figures(figures(), RunDir(run_dir).figures, formats)


def write_result_figures(run_dir: Path, df: pd.DataFrame, formats: Sequence[str] = ("html", "png")) -> Written:
    """Training curves (from the pretraining records in ``backbones/`` and each VLM's ``train_record.json``) and the
    score bars of ``df``, as self-contained HTML and PNG (when a Chromium is at hand)."""
    return _save_figures(result_figures(run_dir, df), RunDir(run_dir).figures, formats)


def result_figures(run_dir: str | Path, df: pd.DataFrame) -> list[tuple]:
    """(figure, file stem) of a run's result figures: training curves from its records, the score bars of ``df``,
    and backbone top-1 against VLM grounding where two or more backbones have a top-1."""
    from toolkit.config import split_spec
    from toolkit.viz.results import score_bars, training_curves

    run_dir = Path(run_dir)
    records: dict[str, dict] = {}
    for path in RunDir(run_dir).backbone_records():
        rec = json.loads(path.read_text())
        # a dense-tuned record's curve is a segmentation loss, not comparable with the classification pretraining
        if "loss_curve" in rec and not split_spec(path.stem)[1]:
            records.setdefault(path.stem, {})["pretrain"] = rec
    for path in RunDir(run_dir).train_records():
        records.setdefault(path.parent.name, {})["vlm"] = json.loads(path.read_text())
    # the results' backbone order, so that a backbone has the same colour in both figures
    order = list(dict.fromkeys(df.backbone))
    records = dict(sorted(records.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    figures = [(training_curves(records), "training_curves"), (score_bars(df), "scores")]
    if len(df[(df.task == "pretrain") & (df.metric == "top1")]) >= 2:
        figures.append((top1_vs_grounding(df), "top1_vs_grounding"))
    return figures


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """A finished run's results.csv; FileNotFoundError (saying what makes it) before the run has finished."""
    path = RunDir(run_dir).results_csv
    if not path.is_file():
        raise FileNotFoundError(f"run `{Path(run_dir).name}` has no results.csv: it is written when the run "
                                "finishes (`vlmtk demo`)")
    return pd.read_csv(path)


def tables_markdown(tables: dict[str, pd.DataFrame], level: int = 2, floatfmt: str = "g") -> str:
    """``summary_tables``' tables as Markdown, each under a heading of ``level``."""
    return "\n\n".join(f"{'#' * level} {t}\n\n{tab.to_markdown(floatfmt=floatfmt)}" for t, tab in tables.items())


def write_all_figures(run_dir: str | Path, formats: Sequence[str] = ("html", "png", "pdf", "svg"),
                      examples: bool = True) -> Written:
    """Every figure and table of a finished run, again, from what it saved (``vlmtk figures``): training curves,
    score bars with intervals, backbone top-1 against VLM grounding, the side-by-side examples (they rerun the
    VLMs on a few val expressions; ``examples=False`` skips them) in ``formats``, the report's tables as
    ``figures/tables.md`` and ``figures/tables.tex``, and the map-score tables of the run's ``vlmtk analyze``
    outputs as ``figures/map_scores.md`` and ``.tex`` (``write_map_score_tables``); with the notes of what was
    not made."""
    from toolkit.config import ExperimentConfig
    from toolkit.data import load_refcoco

    run_dir = Path(run_dir)
    df = load_results(run_dir)
    out = RunDir(run_dir).figures
    parts = [write_result_figures(run_dir, df, formats), Written(write_tables(summary_tables(df), out / "tables"), []),
             write_map_score_tables(run_dir, out)]
    world = run_world(run_dir)
    if examples and world is not None:
        cfg = ExperimentConfig.load(RunDir(run_dir).config)
        refs = [r for s in ("refcoco", "refcoco+", "refcocog")
                for r in load_refcoco(world, s, "val")[: cfg.eval.max_per_style]]
        parts.append(write_figures(run_dir, refs, cfg, formats))
    return _joined(parts)


def write_tables(tables: dict[str, pd.DataFrame], stem: Path) -> list[Path]:
    """``tables`` (title -> table) as ``<stem>.md`` (``tables_markdown``) and ``<stem>.tex`` (``latex_table``)."""
    md, tex = stem.with_suffix(".md"), stem.with_suffix(".tex")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(tables_markdown(tables) + "\n")
    tex.write_text("\n".join(latex_table(t, tab) for t, tab in tables.items()))
    return [md, tex]


def write_map_score_tables(run_dir: str | Path, out_dir: Path) -> Written:
    """The scores of every ``vlmtk analyze`` output of the run (``toolkit.interpret.browse.map_scores``: map type
    x backbone, mass in box, pointing game, deletion AUC beside the random-order baseline, with their intervals) as
    ``out_dir/map_scores.md`` and ``.tex``. A run without one gets none, and one note saying how to make one."""
    from toolkit.interpret.browse import find_analyses, map_scores, no_analysis_message

    tables = dict(map_scores(d) for d in find_analyses(run_dir).values())
    if not tables:
        return Written([], [f"No map-score table: {no_analysis_message(run_dir)}"])
    return Written(write_tables(tables, out_dir / "map_scores"), [])


def top1_vs_grounding(df: pd.DataFrame):
    """The study's "ImageNet accuracy does not predict VLM quality", on a run: each backbone's pretraining top-1
    against its VLM's grounding Acc@0.5 per style (95% intervals), with Spearman's rank correlation per style."""
    import plotly.graph_objects as go

    top1 = df[(df.task == "pretrain") & (df.metric == "top1")].set_index("backbone").value
    g = df[(df.task == "grounding") & (df.metric == "acc@0.5") & df.backbone.isin(top1.index)]
    fig = go.Figure()
    notes = []
    for i, (split, rows) in enumerate(g.groupby("split", sort=False)):
        x = top1.reindex(rows.backbone).values
        fig.add_trace(go.Scatter(x=x, y=rows.value, mode="markers+text" if i == 0 else "markers", name=split,
                                 text=list(rows.backbone), textposition="middle left",  # named once, by the first
                                 error_y=dict(type="data", array=rows.ci_high - rows.value,
                                              arrayminus=rows.value - rows.ci_low)))
        if len(rows) >= 3:
            rho = pd.Series(x).rank().corr(pd.Series(rows.value.values).rank())
            notes.append(f"{split} {rho:+.2f}")
    fig.update_layout(title="Backbone top-1 against VLM grounding; Spearman " + (", ".join(notes) or "n/a"),
                      xaxis_title="backbone pretraining top-1", yaxis_title="grounding Acc@0.5 (95% interval)",
                      width=900, height=500)
    span = max(top1.max() - top1.min(), 0.01)
    fig.update_xaxes(range=[top1.min() - 0.6 * span, top1.max() + 0.1 * span])  # room for the names on the left
    return fig


def _save_figures(figures: Iterable, out_dir: Path, formats: Sequence[str] = ("html", "png")) -> Written:
    """(figure, file stem) pairs -> ``out_dir/<stem>.<format>``; image export (png, pdf, svg through kaleido) is
    skipped, with one note, once it fails (no browser for kaleido), since it would fail for every figure."""
    from toolkit.viz.figures import save_figure_as

    written, image_error = [], None
    html = [f for f in formats if f == "html"]
    images = [f for f in formats if f != "html"]
    for fig, stem in figures:
        written += save_figure_as(fig, out_dir / stem, html)
        if images and image_error is None:
            try:  # every image format of a figure through one kaleido call
                written += save_figure_as(fig, out_dir / stem, images)
            except Exception as e:  # the HTML still holds the figure
                image_error = e
    if image_error is None:
        return Written(written, [])
    reason = (str(image_error).splitlines() or [""])[0]
    return Written(written, [f"PNG/PDF/SVG export skipped ({type(image_error).__name__}: {reason}); the figures are "
                             f"HTML in {out_dir}. For images: `make chromium`, then run again."])


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of several seeds (a ``seed`` column) -> mean, sd and count per backbone x task x split x metric."""
    g = df.groupby(["backbone", "task", "split", "metric"], sort=False).value
    return g.agg(mean="mean", sd="std", seeds="count").reset_index()


def separable_pairs(summary: pd.DataFrame, task: str, metric: str) -> list[str]:
    """Pairs of (non-chance) backbones whose mean differs by more than twice the standard error of the difference
    over seeds, per split: the differences larger than the seed-to-seed noise."""
    sub = summary[(summary.task == task) & (summary.metric == metric) & ~summary.backbone.str.startswith("chance:")]
    out = []
    for split, rows in sub.groupby("split", sort=False):
        rows = rows.set_index("backbone")
        names = list(rows.index)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ra, rb = rows.loc[a], rows.loc[b]
                se = (ra.sd ** 2 / ra.seeds + rb.sd ** 2 / rb.seeds) ** 0.5
                if pd.notna(se) and abs(ra["mean"] - rb["mean"]) > 2 * se:
                    hi, lo = (a, b) if ra["mean"] > rb["mean"] else (b, a)
                    out.append(f"{split}: {hi} > {lo} ({max(ra['mean'], rb['mean']):.3f} vs "
                               f"{min(ra['mean'], rb['mean']):.3f}, 2 SE = {2 * se:.3f})")
    return out


def write_seed_summary(out_dir: Path, summary: pd.DataFrame, cfg, n_seeds: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    lines = [f"# Results over {n_seeds} seeds: {cfg.name}", "",
             "mean +- sd over seeds (train.seed = 0..n-1; one shared world).", ""]
    shown = summary.assign(shown=[f"{m:.3f} +- {s:.3f}" if pd.notna(s) else f"{m:.3f}"
                                  for m, s in zip(summary["mean"], summary.sd)])
    for title, task, metric, _ in SCORE_TABLES:
        sub = shown[(shown.task == task) & (shown.metric == metric)]
        if len(sub):
            table = sub.pivot_table(index="backbone", columns="split", values="shown", aggfunc="first", sort=False)
            lines += [f"## {title}", "", table.to_markdown(), ""]
    pairs = separable_pairs(summary, "grounding", "acc@0.5") + separable_pairs(summary, "vqa", "accuracy")
    lines += ["## Differences larger than the seed-to-seed noise (|difference| > 2 SE)", ""]
    lines += [f"- {p}" for p in pairs] or ["None: every difference between backbones is within the noise."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
