"""Metric rows, their bootstrap intervals, and collapse diagnostics: the one place results rows are made.

A metric row has the columns of ``results.csv``: backbone, task, split, metric, value, n, ci_low, ci_high.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from toolkit.boxes import parse_box

N_RESAMPLES = 1000
SEED = 0


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    # A fixed seed keeps results.csv identical when a resumed run recomputes it from cached evaluations.
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // v.size)  # resample in chunks so large splits stay small in memory
    for i in range(0, n_resamples, step):
        k = min(step, n_resamples - i)
        means[i:i + k] = v[rng.integers(0, v.size, (k, v.size))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def metric_row(backbone: str, task: str, split: str, metric: str, values_or_value, n: int | None = None,
               ci: bool = True) -> dict:
    """One results row. Per-example values give their mean (with a bootstrap interval when ``ci``);
    a single number is taken as the value, without an interval."""
    low = high = None
    if isinstance(values_or_value, (int, float, np.number)):
        value = float(values_or_value)
    else:
        values = np.asarray(values_or_value, dtype=np.float64)
        value = float(values.mean()) if values.size else float("nan")
        n = values.size if n is None else n
        if ci:
            low, high = bootstrap_ci(values)
    return dict(backbone=backbone, task=task, split=split, metric=metric, value=value, n=n,
                ci_low=low, ci_high=high)


def normalize_answer(s: str) -> str:
    """VQA answers compare after lower-casing, trimming a final period and collapsing spaces."""
    return " ".join(s.lower().strip().rstrip(".").split())


def _top_share(answers: Sequence[str]) -> float:
    return Counter(answers).most_common(1)[0][1] / len(answers)


def grounding_collapse(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per split, signs that a model answers the same whatever the image or expression says:

    - ``box_spread``: std of the valid predicted boxes (normalised by image size), averaged over the 4 coordinates;
      left out when fewer than 2 rows have a box and an ``image_size`` (caches written before it was recorded);
    - ``top_answer_share``: share of the single most common answer text;
    - ``zero_area_rate``: among answers that are well-formed boxes, the share with zero width or height (these
      score as invalid, so the invalid rate alone does not tell them from unparseable text).
    """
    by_ds = defaultdict(list)
    for r in rows:
        by_ds[r["dataset"]].append(r)
    out = {}
    for ds, rs in sorted(by_ds.items()):
        m = {"top_answer_share": _top_share([r["answer"] for r in rs])}
        boxes = [np.asarray(r["pred_box"], dtype=np.float64) / np.tile(r["image_size"], 2)
                 for r in rs if r["valid"] and r.get("pred_box") is not None and r.get("image_size")]
        if len(boxes) >= 2:
            m["box_spread"] = float(np.std(boxes, axis=0).mean())
        formed = [b for b in (parse_box(r["answer"], allow_empty=True) for r in rs) if b is not None]
        if formed:
            m["zero_area_rate"] = sum(b[2] == b[0] or b[3] == b[1] for b in formed) / len(formed)
        out[ds] = m
    return out


def vqa_collapse(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per question type, ``top_answer_share``: share of the most common answer (normalised as scoring does)."""
    by_q = defaultdict(list)
    for r in rows:
        by_q[r["question_type"]].append(normalize_answer(r["answer"]))
    return {q: {"top_answer_share": _top_share(a)} for q, a in sorted(by_q.items())}
