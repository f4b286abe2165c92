"""Reports of a run: results.csv (one row per backbone x task x split x metric), results.md, figures/."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


COLUMNS = ["backbone", "task", "split", "metric", "value", "n", "ci_low", "ci_high"]
COLLAPSE_METRICS = ["box_spread", "top_answer_share", "zero_area_rate"]
RELIANCE_METRICS = ["loss_true", "loss_shuffled", "token_acc_true", "token_acc_shuffled", "token_acc_drop"]


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
    for title, task, metric, interval in (("Grounding Acc@IoU>=0.5", "grounding", "acc@0.5", True),
                                          ("Grounding mean IoU", "grounding", "mean_iou", True),
                                          ("Grounding invalid-answer rate", "grounding", "invalid_rate", False),
                                          ("VQA exact-match accuracy", "vqa", "accuracy", True),
                                          ("Backbone pretraining top-1 (classification set)", "pretrain", "top1", False),
                                          ("Dense-task tuning: segmentation mIoU (val scenes)", "dense", "miou", False)):
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


def write_report(run_dir: Path, rows: Sequence[dict], pretrain: dict, cfg) -> pd.DataFrame:
    df = results_frame(rows)
    df.to_csv(run_dir / "results.csv", index=False)
    lines = [f"# Results: {cfg.name}", "",
             f"Backbones: {', '.join(cfg.backbones)}; connector {cfg.connector}; "
             "rows named `chance:*` are model-free baselines.", ""]
    lines += reliance_flags(df)
    for title, table in summary_tables(df).items():
        lines += [f"## {title}", "", table.to_markdown(floatfmt=".3f"), ""]
    (run_dir / "results.md").write_text("\n".join(lines))
    return df


def reliance_flags(df: pd.DataFrame) -> list[str]:
    """Report lines naming every VLM whose answers do not depend on its image (see toolkit.eval.reliance)."""
    from toolkit.eval.reliance import RELIANCE_MIN_DROP

    drop = df[(df.task == "reliance") & (df.metric == "token_acc_drop")].set_index("backbone").value
    blind = [b for b, v in drop.items() if v < RELIANCE_MIN_DROP]
    if not blind:
        return [f"Every VLM depends on its image: answer-token accuracy drops by at least {RELIANCE_MIN_DROP} "
                "when its image tokens are swapped for another scene's.", ""] if len(drop) else []
    return [f"**Flagged: {', '.join(blind)} barely depend(s) on the image** (answer-token accuracy drops by less "
            f"than {RELIANCE_MIN_DROP} with another scene's image tokens): their scores come from the text alone.", ""]


def print_summary(df: pd.DataFrame) -> None:
    for title, table in summary_tables(df).items():
        print(f"\n{title}\n{table.to_string(float_format=lambda v: f'{v:.3f}')}")


def write_figures(run_dir: Path, refs: Sequence, cfg) -> list[Path]:
    """The side-by-side figure (box, similarity, LM attention, backbone map per backbone) for a few val
    expressions, one of each style, as PNG (when a Chromium is at hand) and self-contained HTML."""
    from toolkit.interpret import compare
    from toolkit.runs import load_vlms
    from toolkit.viz.figures import save_figure, side_by_side

    vlms = load_vlms(run_dir, list(cfg.backbones))
    chosen, seen = [], {}
    for r in refs:  # round-robin over styles so every style is shown
        if seen.get(r.dataset, 0) <= len(chosen) // 3:
            chosen.append(r)
            seen[r.dataset] = seen.get(r.dataset, 0) + 1
        if len(chosen) == cfg.figure_examples:
            break
    out_dir = run_dir / "figures"
    written, png_error = [], None
    for i, r in enumerate(chosen):
        fig = side_by_side(compare(vlms, r.image_path, r.expression, gt_box=r.box_xyxy))
        fig.update_layout(title=f"{r.dataset}: \u201c{r.expression}\u201d")
        stem = out_dir / f"side_by_side_{i:02d}"
        written.append(save_figure(fig, stem.with_suffix(".html")))
        if png_error is None:  # what failed once (no browser for kaleido) fails for every figure
            try:
                written.append(save_figure(fig, stem.with_suffix(".png")))
            except Exception as e:  # the HTML still holds the figure
                png_error = e
    if png_error is not None:
        reason = (str(png_error).splitlines() or [""])[0]
        print(f"PNG export skipped ({type(png_error).__name__}: {reason}); the figures are HTML in {out_dir}. "
              "For PNGs: `make chromium`, then run again.")
    return written
