"""A finished ``vlmtk analyze`` output read back for browsing: which outputs a run holds, their score table, and
the samples of two backbones side by side, sorted by how differently they ground and filtered to their failures.

An output is ``<run>/analysis/<name>/`` with ``summary.csv`` (written once every backbone is done) and one
``<backbone>/samples.jsonl`` per backbone (``toolkit.interpret.batch``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from toolkit.interpret.batch import score_table
from toolkit.interpret.inputs import format_pixel_box
from toolkit.runs import Example, RunDir

ANALYZE_COMMAND = "vlmtk analyze --run {run} --split val --limit 50"
SHOW = {"all": "all samples", "failures": "failures (IoU < 0.5)", "invalid": "invalid answers"}
FAILURE_IOU = 0.5


def find_analyses(run_dir: str | Path) -> dict[str, Path]:
    """Finished analysis outputs of a run by name (``val``, or a JSONL file's stem), in name order."""
    root = RunDir(run_dir).analyses
    return {p.parent.name: p.parent for p in sorted(root.glob("*/summary.csv"))} if root.is_dir() else {}


def no_analysis_message(run_dir: str | Path) -> str:
    """What to run when a run has no analysis output (the run named relative to here, else by its name)."""
    rel = os.path.relpath(Path(run_dir).resolve())
    run = rel if not rel.startswith("..") else f"runs/{Path(run_dir).resolve().name}"
    return (f"No finished `vlmtk analyze` output in this run yet: make one with "
            f"`{ANALYZE_COMMAND.format(run=run)}` (or over your own data: `--expressions file.jsonl`).")


def analysis_scores(out_dir: str | Path) -> pd.DataFrame:
    """The output's score table: backbone x map type rows, each metric "mean [95% interval]"."""
    return score_table(pd.read_csv(Path(out_dir) / "summary.csv"))


def map_scores(out_dir: str | Path) -> tuple[str, pd.DataFrame]:
    """The output's scores for a report, with a title naming it and how many samples it scored: one row per map
    type x backbone, indexed by map type (in the summary's order); mass in box, pointing game, deletion AUC and the
    random-order deletion baseline, each "mean [95% interval]"."""
    summary = pd.read_csv(Path(out_dir) / "summary.csv")
    table = score_table(summary)
    order = list(dict.fromkeys(table["map"]))
    table = table.sort_values("map", key=lambda m: m.map(order.index), kind="stable").set_index("map")
    n = summary[summary.task == "grounding"].n.max()  # the samples with a ground-truth box, which the scores need
    return (f"Explanation maps, analysis {Path(out_dir).name}" + (f" ({n:.0f} samples)" if pd.notna(n) else "") +
            ": mean [95% interval]; deletion AUC: lower = the answer needed what the map marked, "
            "beside the random-order AUC", table)


def load_samples(out_dir: str | Path) -> pd.DataFrame:
    """One row per sample and backbone: ``id, backbone, image, expression, gt_box, answer, valid, iou, error``.
    A sample written again (a resumed error) counts by its last line; malformed lines are skipped."""
    rows = []
    for path in sorted(Path(out_dir).glob("*/samples.jsonl")):
        latest = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                latest[r["id"]] = r
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        rows += [dict(id=r["id"], backbone=path.parent.name, image=r.get("image"), expression=r.get("expression"),
                      gt_box=None if r.get("gt_box") is None else tuple(r["gt_box"]), answer=r.get("answer"),
                      valid=r.get("valid"), iou=r.get("iou"), error=r.get("error")) for r in latest.values()]
    return pd.DataFrame(rows, columns=["id", "backbone", "image", "expression", "gt_box", "answer", "valid", "iou",
                                       "error"])


def sample_pairs(samples: pd.DataFrame, a: str, b: str, show: str = "all") -> pd.DataFrame:
    """The samples both backbones answered, one row each (index: sample id): expression, image file name, truth box,
    each one's IoU, ``IoU a - b``, and the answers. Sorted by that difference, largest first (samples without a
    ground-truth box last); ``show``: "all", "failures" (IoU < 0.5 for either) or "invalid" (either answer not a
    box)."""
    if a == b:
        raise ValueError(f"choose two different backbones to compare (both are {a})")
    if show not in SHOW:
        raise ValueError(f"show is one of {list(SHOW)}, not {show!r}")
    ok = samples[samples.error.isna()]
    known = set(ok.backbone)
    missing = [n for n in (a, b) if n not in known]
    if missing:
        raise ValueError(f"{', '.join(missing)} has no samples in this analysis; it has {', '.join(sorted(known))}")
    pair = ok[ok.backbone == a].merge(ok[ok.backbone == b], on="id", suffixes=("_a", "_b")).set_index("id")
    iou_a, iou_b = pair.iou_a.astype(float), pair.iou_b.astype(float)
    if show == "failures":
        keep = (iou_a < FAILURE_IOU) | (iou_b < FAILURE_IOU)
    elif show == "invalid":
        keep = ~(pair.valid_a.astype(bool) & pair.valid_b.astype(bool))
    else:
        keep = pd.Series(True, index=pair.index)
    out = pd.DataFrame({"expression": pair.expression_a, "image": [Path(p).name for p in pair.image_a],
                        "truth": [format_pixel_box(g) for g in pair.gt_box_a],
                        f"IoU {a}": iou_a.round(3), f"IoU {b}": iou_b.round(3),
                        f"IoU {a} - {b}": (iou_a - iou_b).round(3),
                        f"answer {a}": pair.answer_a, f"answer {b}": pair.answer_b}, index=pair.index)[keep]
    return out.sort_values(f"IoU {a} - {b}", ascending=False, na_position="last", kind="stable")


def sample_example(samples: pd.DataFrame, sample_id: str) -> Example:
    """A sample as an Example (image path, expression, ground-truth box) to explore again."""
    rows = samples[samples.id == sample_id]
    if not len(rows):
        raise KeyError(f"no sample {sample_id} in this analysis")
    r = rows.iloc[0]
    return Example(r.image, r.expression, r.gt_box)
