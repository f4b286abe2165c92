"""Scoring as the RefCOCO / VQAv2 harnesses do, on any records the real-format loaders return.

Grounding: the answer must parse to 4 numbers in [0, 1] (else it is *invalid* and wrong); it is mapped
onto the original image through the model's geometry; correct when IoU >= 0.5 with the ground truth.
Every function returns per-example rows; ``summarize`` turns them into metric rows.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Iterator, Sequence
from weakref import WeakKeyDictionary

import torch
from tqdm.auto import tqdm

from toolkit.boxes import GROUNDING_PROMPT, box_iou
from toolkit.eval.answers import Answer, Encoded, answer_batch, batches
from toolkit.eval.metrics import grounding_collapse, metric_row, normalize_answer, vqa_collapse
from toolkit.vlm import VLM

IOU_THRESHOLD = 0.5


@torch.no_grad()
def evaluate_grounding(vlm: VLM, records: Sequence, batch_size: int = 64, max_new_tokens: int = 20,
                       desc: str = "grounding") -> list[dict]:
    """``records``: RefExample-like (image_path, expression, box_xyxy in original pixels, dataset).
    Returns one dict per record: answer, valid, iou, correct, the boxes and the image's (w, h) size."""
    return _grounding_rows(vlm, records, batch_size, max_new_tokens, desc)


def _grounding_rows(vlm: VLM, records: Sequence, batch_size: int, max_new_tokens: int, desc: str,
                    encoded: dict[int, Encoded] | None = None) -> list[dict]:
    rows = []
    for r, a in _answered(vlm, records, lambda r: GROUNDING_PROMPT.format(expression=r.expression), batch_size,
                          max_new_tokens, desc, encoded):
        g = a.box
        iou = float(box_iou(torch.tensor(g.box_pixels), torch.tensor(r.box_xyxy, dtype=torch.float32))) \
            if g.valid else 0.0
        rows.append(dict(dataset=r.dataset, expression=r.expression, answer=a.text, valid=g.valid, iou=iou,
                         correct=iou >= IOU_THRESHOLD, image_path=str(r.image_path), pred_box=g.box_pixels,
                         gt_box=tuple(r.box_xyxy), image_size=(g.geometry.orig_w, g.geometry.orig_h)))
    return rows


def grounding_monitor(records: Sequence, batch_size: int = 64, max_new_tokens: int = 20):
    """A ``train_vlm`` monitor: ``vlm -> {"acc@0.5": share of records grounded at IoU >= 0.5}``.

    The backbone is frozen while a VLM trains, so the records' visual tokens are computed at the monitor's first
    reading and reused at the later ones; they are kept per VLM, since one monitor watches each VLM in turn."""
    encoded: WeakKeyDictionary = WeakKeyDictionary()  # VLM -> its tokens, gone with the VLM

    def monitor(vlm: VLM) -> dict[str, float]:
        rows = _grounding_rows(vlm, records, batch_size, max_new_tokens, "monitor grounding",
                               encoded.setdefault(vlm, {}))
        return {"acc@0.5": sum(r["correct"] for r in rows) / max(1, len(rows))}
    return monitor


@torch.no_grad()
def evaluate_vqa(vlm: VLM, records: Sequence, prompt_format: str, batch_size: int = 64, max_new_tokens: int = 8,
                 desc: str = "vqa") -> list[dict]:
    """``records``: VQAExample-like (image_path, question, answer, question_type); exact match after normalising."""
    return [dict(question_type=r.question_type, question=r.question, answer=a.text, gt=r.answer,
                 correct=normalize_answer(a.text) == normalize_answer(r.answer))
            for r, a in _answered(vlm, records, lambda r: prompt_format.format(question=r.question), batch_size,
                                  max_new_tokens, desc)]


def _answered(vlm: VLM, records: Sequence, prompt_of: Callable[[object], str], batch_size: int, max_new_tokens: int,
              desc: str, encoded: dict[int, Encoded] | None = None) -> Iterator[tuple[object, Answer]]:
    """(record, its answer) for every record, a batch at a time. ``encoded`` keeps each batch's visual tokens by
    batch number, not one set for all batches: an image met again in a later batch is then encoded again, as without
    it, because a backbone's tokens can differ in the last bits with the batch they were computed in."""
    vlm.eval()
    for i, chunk in enumerate(tqdm(list(batches(records, batch_size)), desc=desc, unit="batch", leave=False)):
        answers = answer_batch(vlm, [r.image_path for r in chunk], [prompt_of(r) for r in chunk], max_new_tokens,
                               None if encoded is None else encoded.setdefault(i, {}))
        for r, a in zip(chunk, answers):
            if a.error is not None:  # the world's own images: a missing one is a broken world, not a wrong answer
                raise OSError(a.error)
            yield r, a


def summarize(backbone: str, grounding: Sequence[dict], vqa: Sequence[dict]) -> list[dict]:
    """Metric rows: one per backbone x task x split/type x metric, scores with bootstrap intervals,
    then the collapse diagnostics (see ``toolkit.eval.metrics``)."""
    out = []
    by_ds = defaultdict(list)
    for r in grounding:
        by_ds[r["dataset"]].append(r)
    for ds, rs in sorted(by_ds.items()):
        out.append(metric_row(backbone, "grounding", ds, "acc@0.5", [r["correct"] for r in rs]))
        out.append(metric_row(backbone, "grounding", ds, "invalid_rate", [not r["valid"] for r in rs]))
        out.append(metric_row(backbone, "grounding", ds, "mean_iou", [r["iou"] for r in rs]))
    by_q = defaultdict(list)
    for r in vqa:
        by_q[r["question_type"]].append(r["correct"])
    for q, v in sorted(by_q.items()):
        out.append(metric_row(backbone, "vqa", q, "accuracy", v))
    if vqa:
        out.append(metric_row(backbone, "vqa", "all", "accuracy", [r["correct"] for r in vqa]))
    for task, per_split, n_of in (("grounding", grounding_collapse(grounding), by_ds),
                                  ("vqa", vqa_collapse(vqa), by_q)):
        for split, metrics in per_split.items():
            out += [metric_row(backbone, task, split, m, v, n=len(n_of[split]), ci=False) for m, v in metrics.items()]
    return out


def grounding_baselines(train_records: Sequence, val_records: Sequence, objects_of: dict) -> list[dict]:
    """Chance levels for Acc@0.5 (and, for the constant guess, mean IoU) per split, with no model:

    - ``chance:mean-box``: always answer the mean training box (normalised), the best-known constant guess;
    - ``chance:random-object``: pick one of the image's objects uniformly (a perfect detector that ignores
      the expression); ``objects_of[image_path]`` lists that image's object boxes in pixels. Its ``right_object``
      (see ``object_choice``) is the mean of 1/n over the expressions about scenes with n >= 2 objects.
    """
    def norm(r):
        return torch.tensor(r.box_xyxy) / torch.tensor([r.image_width, r.image_height] * 2)

    mean_box = torch.stack([norm(r) for r in train_records]).mean(0)
    by_ds = defaultdict(list)
    for r in val_records:
        by_ds[r.dataset].append(r)
    out = []
    for ds, rs in sorted(by_ds.items()):
        ious = [float(box_iou(mean_box, norm(r))) for r in rs]
        out.append(metric_row("chance:mean-box", "grounding", ds, "acc@0.5", [i >= IOU_THRESHOLD for i in ious]))
        out.append(metric_row("chance:mean-box", "grounding", ds, "mean_iou", ious))
        fr, choice = [], []
        for r in rs:
            boxes = torch.tensor(objects_of[str(r.image_path)], dtype=torch.float32)
            fr.append(float((box_iou(boxes, torch.tensor(r.box_xyxy, dtype=torch.float32)[None]) >= IOU_THRESHOLD)
                            .float().mean()))
            if len(boxes) >= 2:
                choice.append(1.0 / len(boxes))
        out.append(metric_row("chance:random-object", "grounding", ds, "acc@0.5", fr))
        if choice:
            out.append(metric_row("chance:random-object", "grounding", ds, "right_object", choice))
    return out


def object_choice(backbone: str, grounding: Sequence[dict], objects_of: dict) -> list[dict]:
    """Does the VLM pick the object the expression names, or just an object? On the expressions about scenes with
    two or more objects, per split: ``on_object``, the share of answers that box some object (IoU >= 0.5 with any
    of the scene's boxes), and ``right_object``, the share of those that box the referred one. A VLM that localises
    objects but ignores the expression scores ``right_object`` near ``chance:random-object``'s mean 1/n; the
    backbone alone cannot lift it, because choosing among objects is the LM's reading of the expression."""
    by_ds: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r in grounding:
        boxes = objects_of.get(str(r["image_path"]), [])
        if len(boxes) < 2:
            continue
        hit = r["valid"] and bool((box_iou(torch.tensor(boxes, dtype=torch.float32),
                                           torch.tensor(r["pred_box"], dtype=torch.float32)[None])
                                   >= IOU_THRESHOLD).any())
        by_ds[r["dataset"]].append((hit, bool(r["correct"])))
    out = []
    for ds, pairs in sorted(by_ds.items()):
        out.append(metric_row(backbone, "grounding", ds, "on_object", [h for h, _ in pairs]))
        right = [c for h, c in pairs if h]
        if right:  # undefined when no answer boxes an object
            out.append(metric_row(backbone, "grounding", ds, "right_object", right))
    return out


def vqa_baselines(train_records: Sequence, val_records: Sequence) -> list[dict]:
    """``chance:majority``: the most frequent training answer of each question type."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in train_records:
        counts[r.question_type][normalize_answer(r.answer)] += 1
    major = {q: c.most_common(1)[0][0] for q, c in counts.items()}
    by_q = defaultdict(list)
    for r in val_records:
        by_q[r.question_type].append(normalize_answer(r.answer) == major.get(r.question_type))
    out = [metric_row("chance:majority", "vqa", q, "accuracy", v) for q, v in sorted(by_q.items())]
    allv = [x for v in by_q.values() for x in v]
    if allv:
        out.append(metric_row("chance:majority", "vqa", "all", "accuracy", allv))
    return out
