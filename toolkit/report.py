"""Reports of a run: results.csv (one row per backbone x task x split x metric), results.md, figures/."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


def results_frame(rows: Sequence[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["backbone", "task", "split", "metric", "value", "n"])


def summary_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pivoted views: grounding Acc@0.5 and invalid rate per style, VQA accuracy per type, pretraining top-1."""
    out = {}
    for title, task, metric in (("Grounding Acc@IoU>=0.5", "grounding", "acc@0.5"),
                                ("Grounding mean IoU", "grounding", "mean_iou"),
                                ("Grounding invalid-answer rate", "grounding", "invalid_rate"),
                                ("VQA exact-match accuracy", "vqa", "accuracy"),
                                ("Backbone pretraining top-1 (classification set)", "pretrain", "top1"),
                                ("Dense-task tuning: segmentation mIoU (val scenes)", "dense", "miou")):
        sub = df[(df.task == task) & (df.metric == metric)]
        if len(sub):
            out[title] = sub.pivot_table(index="backbone", columns="split", values="value", sort=False)
    return out


def write_report(run_dir: Path, rows: Sequence[dict], pretrain: dict, cfg) -> pd.DataFrame:
    df = results_frame(rows)
    df.to_csv(run_dir / "results.csv", index=False)
    lines = [f"# Results: {cfg.name}", "",
             f"Backbones: {', '.join(cfg.backbones)}; connector {cfg.connector}; "
             "rows named `chance:*` are model-free baselines.", ""]
    for title, table in summary_tables(df).items():
        lines += [f"## {title}", "", table.to_markdown(floatfmt=".3f"), ""]
    (run_dir / "results.md").write_text("\n".join(lines))
    return df


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
    written = []
    for i, r in enumerate(chosen):
        fig = side_by_side(compare(vlms, r.image_path, r.expression, gt_box=r.box_xyxy))
        fig.update_layout(title=f"{r.dataset}: \u201c{r.expression}\u201d")
        stem = out_dir / f"side_by_side_{i:02d}"
        written.append(save_figure(fig, stem.with_suffix(".html")))
        try:
            written.append(save_figure(fig, stem.with_suffix(".png")))
        except Exception as e:  # no browser for kaleido: the HTML still holds the figure
            print(f"PNG export skipped ({type(e).__name__}: {e}); open {stem.with_suffix('.html')}")
    return written
