"""``vlmtk analyze``: every map type for every finished VLM of a run, scored against the ground truth, over a split
of the run's scene world or over your own images and expressions.

Per backbone, under ``<out>/<backbone>/``:

- ``samples.jsonl``: one line per sample, appended as it finishes: answer, box, IoU, and per map type the mass in
  the box, the pointing hit, the deletion curve and its AUC (scores only where a ground-truth box is known), plus
  the random-order deletion curve;
- ``maps/<id>.npz``: the sample's maps, ``(h, w)`` per map type. One file per sample keeps resuming simple: nothing
  written is ever rewritten (one npz would be rewritten whole at every sample, or lost with the process), and a
  sample is done once its line is written, after its maps.

A rerun skips the samples whose line holds every requested map (a sample's id hashes its image path, relative to
its data root, and its expression); lines of another model (``toolkit.eval.harness.model_fingerprint``) are refused.
At the end ``summary.csv`` (metric rows of ``toolkit.eval.metrics`` with 95% bootstrap intervals) and ``summary.md``
cover every sample of the split, resumed or new.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toolkit.interpret.context import build_context, probe
from toolkit.interpret.inputs import load_image
from toolkit.interpret.maps import MAP_TYPES, MapSpec, compute_map, parse_map_spec
from toolkit.interpret.scores import deletion_curves, mass_in_box, pointing_game, random_map
from toolkit.vlm import validate_expression
from toolkit.runs import RunDir, load_vlms, run_world, vlm_dirs

if TYPE_CHECKING:
    import pandas as pd

RANDOM = "random"  # the deletion curve of a seeded random ranking, once per sample
METRICS = (("mass_in_box", "mass in box"), ("pointing_game", "pointing game"), ("deletion_auc", "deletion AUC"),
           ("random_auc", "random-order AUC"))


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    expression: str
    gt_box: tuple[float, float, float, float] | None
    source: str  # where it came from: "refcoco val" or "file.jsonl:7"


@dataclass
class SplitAnalysis:
    out_dir: Path
    summary: pd.DataFrame | None  # metric rows (toolkit.report.COLUMNS): backbone, task (map type), metric, ...
    computed: int  # samples x backbones computed by this call (0 when everything was resumed)
    unavailable: dict[str, dict[str, str]] = field(default_factory=dict)  # backbone -> map type -> why
    skipped_backbones: dict[str, str] = field(default_factory=dict)  # backbone -> why it was not analysed
    problems: list[str] = field(default_factory=list)  # malformed lines, refused expressions, unreadable images


def sample_id(image: str, expression: str) -> str:
    return hashlib.sha1(f"{image}\n{expression}".encode()).hexdigest()[:16]


def world_samples(run_dir: Path, split: str, cache_root: Path, problems: list[str]) -> list[Sample]:
    """The referring expressions of ``split`` in the run's scene world, one style after another in turn (so that a
    ``limit`` keeps every style). The world is the one the run's evaluation caches name, else the one its
    config.json describes (made under ``cache_root`` if missing, as ``vlmtk demo`` would)."""
    from toolkit.data import load_refcoco
    from toolkit.data.expressions import STYLES

    world = run_world(run_dir)
    if world is None:
        if not RunDir(run_dir).config.is_file():
            raise FileNotFoundError(f"{run_dir} has neither evaluation caches nor a config.json naming its world: "
                                    "give --expressions (and --images) instead")
        from toolkit.config import ExperimentConfig
        from toolkit.pipeline import world_data

        world = world_data(ExperimentConfig.load(RunDir(run_dir).config), cache_root).root
    refs = [r for turn in zip_longest(*(load_refcoco(world, s, split) for s in STYLES)) for r in turn if r is not None]
    out = []
    for r in refs:
        try:
            expression = validate_expression(r.expression)
        except ValueError as e:
            problems.append(f"{r.dataset} {split} ref {r.ref_id}: {e}")
            continue
        rel = os.path.relpath(r.image_path, world)
        out.append(Sample(sample_id(rel, expression), Path(r.image_path), expression, tuple(r.box_xyxy),
                          f"{r.dataset} {split}"))
    return out


def file_samples(jsonl: Path, images: Path | None, problems: list[str]) -> list[Sample]:
    """Your own samples (``toolkit.eval.harness.load_expressions``); malformed lines go to ``problems``."""
    from toolkit.eval.harness import load_expressions

    base = images if images is not None else jsonl.parent
    return [Sample(sample_id(os.path.relpath(e["image"], base), e["expression"]), e["image"], e["expression"],
                   e["box"], f"{jsonl.name}:{e['line']}") for e in load_expressions(jsonl, images, problems)]


def _score_sample(vlm, s: Sample, specs: Sequence[MapSpec], max_new_tokens: int
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """One sample's line and maps (keyed by the specs' labels); an unreadable image gives a line with ``error``
    (retried on resume)."""
    row = dict(id=s.id, image=str(s.image), expression=s.expression, gt_box=s.gt_box, source=s.source)
    try:
        image = load_image(s.image)
    except ValueError as e:  # load_image's message names the file and what is wrong with it
        return dict(row, error=str(e)), {}
    ctx = build_context(vlm, image, s.expression, max_new_tokens=max_new_tokens)
    g = ctx.grounding
    row.update(answer=g.answer, valid=g.valid, pred_box=None if not g.valid else [round(v, 2) for v in g.box_pixels],
               iou=None if s.gt_box is None else round(ctx.iou(s.gt_box), 6), error=None)
    maps = {sp.label: compute_map(sp.name, ctx, **sp.options) for sp in specs}
    scores = {m: dict(mass_in_box=None, pointing_game=None, deletion_auc=None, deletion_iou=None) for m in maps}
    if s.gt_box is not None:
        seed = int(s.id[:8], 16)  # the same random ranking for a sample whatever the backbone or rerun
        curves = deletion_curves(ctx, {**maps, RANDOM: random_map(ctx.grid, seed)}, s.gt_box)
        for m, t in maps.items():
            mass = mass_in_box(t, s.gt_box, ctx.geometry)
            scores[m] = dict(mass_in_box=None if math.isnan(mass) else round(mass, 6),
                             pointing_game=pointing_game(t, s.gt_box, ctx.geometry),
                             deletion_auc=round(curves[m].auc, 6), deletion_iou=[round(v, 4) for v in curves[m].ious])
        row[RANDOM] = dict(deletion_auc=round(curves[RANDOM].auc, 6),
                           deletion_iou=[round(v, 4) for v in curves[RANDOM].ious])
    row["maps"] = scores
    return row, {m: t.numpy() for m, t in maps.items()}


def _analyze_backbone(vlm, name: str, samples: list[Sample], specs: list[MapSpec], out: Path, max_new_tokens: int,
                      progress: bool) -> tuple[list[dict], int]:
    """Every sample not yet in ``out/samples.jsonl`` with all of ``specs``' maps; returns every sample's line and
    how many were computed now."""
    from toolkit.eval.harness import _read_samples, model_fingerprint

    fp = model_fingerprint(vlm, max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.jsonl"
    labels = {sp.label for sp in specs}
    done = {k: r for k, r in _read_samples(path, fp, tqdm.write).items() if labels <= set(r["maps"])}
    todo = [s for s in samples if s.id not in done]
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(samples), initial=len(samples) - len(todo), desc=name, unit="sample",
                 disable=not progress) as bar:
        for s in todo:
            row, maps = _score_sample(vlm, s, specs, max_new_tokens)
            if maps:  # written before the line: a line means its maps are on disk
                (out / "maps").mkdir(exist_ok=True)
                np.savez_compressed(out / "maps" / f"{s.id}.npz", **maps)
            f.write(json.dumps(dict(row, model=fp)) + "\n")
            f.flush()
            done[s.id] = row
            bar.update()
    return [done[s.id] for s in samples], len(todo)


def _summary_rows(backbone: str, split: str, rows: list[dict], names: Sequence[str]) -> list[dict]:
    from toolkit.eval.metrics import metric_row

    ok = [r for r in rows if not r.get("error") and r.get("iou") is not None]
    out = [metric_row(backbone, "grounding", split, "iou", [r["iou"] for r in ok])] if ok else []
    for m in names:
        scored = [r for r in ok if r["maps"].get(m, {}).get("deletion_auc") is not None]
        if not scored:
            continue
        s = [r["maps"][m] for r in scored]
        values = dict(mass_in_box=[v["mass_in_box"] for v in s if v["mass_in_box"] is not None],
                      pointing_game=[float(v["pointing_game"]) for v in s],
                      deletion_auc=[v["deletion_auc"] for v in s],
                      random_auc=[r[RANDOM]["deletion_auc"] for r in scored])
        out += [metric_row(backbone, m, split, metric, values[metric]) for metric, _ in METRICS]
    return out


def analyze_split(run_dir: str | Path, split: str = "val", maps: Sequence[str] | None = None,
                  limit: int | None = None, images: str | Path | None = None, expressions: str | Path | None = None,
                  out: str | Path | None = None, cache_root: str | Path = "data_cache", device: str | None = None,
                  max_new_tokens: int = 24, progress: bool = True) -> SplitAnalysis:
    """Analyse every finished VLM of ``run_dir`` on the referring expressions of ``split`` of its scene world, or on
    ``expressions`` (a JSONL file as ``vlmtk eval`` reads it: ``{"image", "expression", "box"?}`` per line, images
    relative to ``images``, default the file's folder), the first ``limit`` of them; every map type of ``maps``
    (default: all registered) with its default options, or the options a map names (``"lm_attention:token=2"``:
    ``toolkit.interpret.maps.parse_map_spec``; scores and maps go by that name). Writes ``out`` (default
    ``<run>/analysis/<split>``, or ``<run>/analysis/<file stem>`` for own data) and returns its summary.

    Unknown map names, options or option values raise ValueError (naming the known ones); a map type a backbone does
    not have, a malformed line, a refused expression or an unreadable image is reported in the summary, not raised."""
    from toolkit.report import results_frame

    run_dir = Path(run_dir)
    specs = [MapSpec(n) for n in MAP_TYPES] if not maps else [parse_map_spec(m) for m in dict.fromkeys(maps)]
    skipped: dict[str, str] = {}
    dirs = vlm_dirs(run_dir, skipped)
    if not dirs and not skipped:
        raise FileNotFoundError(f"no trained VLMs under {RunDir(run_dir).vlms}")
    problems: list[str] = []
    if expressions is not None:
        samples = file_samples(Path(expressions), None if images is None else Path(images), problems)
        split = Path(expressions).stem
    else:
        samples = world_samples(run_dir, split, Path(cache_root), problems)
    samples = list({s.id: s for s in samples}.values())[:limit]  # a repeated image + expression counts once
    out = Path(out) if out is not None else RunDir(run_dir).analysis(split)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = SplitAnalysis(out, None, 0, skipped_backbones=skipped, problems=problems)
    rows = []
    for backbone in dirs:  # one model in memory at a time
        try:
            vlm = load_vlms(run_dir, [backbone], res.skipped_backbones)[backbone].to(device)
        except FileNotFoundError:  # it did not load: the reason is in skipped_backbones
            continue
        for sp in specs:  # a value outside a model's choices fails here, before any sample
            MAP_TYPES[sp.name].check_options(vlm, sp.options)
        cap = probe(vlm)  # one blank-image pass answers every map type's availability
        res.unavailable[backbone] = {sp.label: why for sp in specs
                                     if (why := MAP_TYPES[sp.name].available(cap)) is not None}
        have = [sp for sp in specs if sp.label not in res.unavailable[backbone]]
        lines, n = _analyze_backbone(vlm, backbone, samples, have, out / backbone, max_new_tokens, progress)
        res.computed += n
        rows += _summary_rows(backbone, split, lines, [sp.label for sp in have])
        problems += [why for why in (f"{r['source']}: {r['error']}" for r in lines if r.get("error"))
                     if why not in problems]  # the same image fails for every backbone: listed once
        del vlm
    res.summary = results_frame(rows)
    write_summary(res, run_dir.name, split, len(samples), sum(s.gt_box is not None for s in samples))
    return res


def score_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's scores, one row per backbone x map type, one column per metric, each "mean [ci_low, ci_high]"
    (empty when no sample had a ground-truth box)."""
    import pandas as pd

    from toolkit.report import _with_interval

    scores = summary[summary.task != "grounding"]
    if not len(scores):
        return pd.DataFrame(columns=["backbone", "map"] + [label for _, label in METRICS])
    shown = scores.assign(shown=scores.apply(_with_interval, axis=1)).pivot_table(
        index=["backbone", "task"], columns="metric", values="shown", aggfunc="first", sort=False)
    shown = shown.reindex(columns=[m for m, _ in METRICS]).rename(columns=dict(METRICS))
    return shown.rename_axis(index=["backbone", "map"]).reset_index().rename_axis(columns=None)


def write_summary(res: SplitAnalysis, run_name: str, split: str, n: int, n_boxed: int) -> None:
    """``summary.csv`` (the metric rows) and ``summary.md`` (a table per map type x backbone, the reasons for
    what is missing, the input problems) in ``res.out_dir``."""
    from toolkit.report import _with_interval

    res.out_dir.mkdir(parents=True, exist_ok=True)
    df = res.summary
    df.to_csv(res.out_dir / "summary.csv", index=False)
    lines = [f"# Explanation maps of `{run_name}`, {split}", "",
             f"{n} samples, {n_boxed} with a ground-truth box (the scores need one). Mean over samples with a 95% "
             "bootstrap interval. Mass in box: share of the map's positive mass inside the box; pointing game: the "
             "map's maximum inside the box; deletion AUC: mean IoU while the top 0-50% of visual tokens by the map "
             "are replaced by the mean token (lower = the answer needed what the map marked; compare with the "
             "random order).", ""]
    shown = score_table(df)
    if len(shown):
        lines += ["## Scores", "", shown.to_markdown(index=False), ""]
    iou = df[df.task == "grounding"]
    if len(iou):
        table = iou.assign(iou=iou.apply(_with_interval, axis=1)).set_index("backbone")[["iou", "n"]]
        lines += ["## Grounding of the explained answers (IoU)", "", table.to_markdown(), ""]
    missing = [f"- {b}: `{m}`: {why}" for b, per in res.unavailable.items() for m, why in per.items()]
    missing += [f"- {b}: not analysed: {why}" for b, why in res.skipped_backbones.items()]
    if missing:
        lines += ["## Not computed", ""] + missing + [""]
    if res.problems:
        lines += [f"## Input problems ({len(res.problems)})", ""] + [f"- {p}" for p in res.problems] + [""]
    (res.out_dir / "summary.md").write_text("\n".join(lines))
