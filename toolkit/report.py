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
                                ("Grounding invalid-answer rate", "grounding", "invalid_rate"),
                                ("VQA exact-match accuracy", "vqa", "accuracy"),
                                ("Backbone pretraining top-1 (classification set)", "pretrain", "top1")):
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
