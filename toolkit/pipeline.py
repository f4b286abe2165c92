"""The main job: scene world -> matched backbone pretraining [-> dense-task tuning] -> one VLM per backbone ->
evaluation -> report.

Every step is cached in the run directory (see ``toolkit.runs``), so a second run reuses the data,
backbones, VLMs and evaluations it finds, and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from toolkit.config import ExperimentConfig, split_spec, split_vlm_spec, validate
from toolkit.connector import connector_depth
from toolkit.eval.evaluate import (evaluate_grounding, evaluate_vqa, grounding_baselines, grounding_monitor,
                                   object_choice, summarize, vqa_baselines)
from toolkit.eval.metrics import metric_row
from toolkit.eval.reliance import image_reliance
from toolkit.llm import TEMPLATES
from toolkit.registry import backbone_entry
from toolkit.runs import RunDir
from toolkit.train import distributed
from toolkit.train.common import pick_device, seed_everything
from toolkit.train.dense import dense_tune_backbone
from toolkit.train.pretrain import load_image_folder, pretrain_backbone
from toolkit.train.vlm_trainer import Turn, encode_all, pretrain_lm_text, train_vlm, visual_tokens
from toolkit.vlm import VLM, VLMConfig

STYLES = ("refcoco", "refcoco+", "refcocog")


def _log(msg: str) -> None:
    if distributed.current().main:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _check_same_config(path: Path, cfg: ExperimentConfig) -> None:
    """Resuming reuses every checkpoint in the run directory, so it must be the same experiment. The backbone list
    may differ: every checkpoint and evaluation is kept per backbone, so a run can grow (or show a subset)."""
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), json.loads(json.dumps(cfg.to_dict()))
    changed = sorted(k for k in set(old) | set(new) if k != "backbones" and old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{path.parent} holds a run with a different config (fields: {', '.join(changed)}); its "
                         f"checkpoints would be reused. Pick another --name, or delete that directory to start over.")


def world_data(cfg: ExperimentConfig, cache_root: Path):
    """Generate (or reuse) the scene world and read it back through the real-format loaders."""
    from toolkit.data import SceneWorldConfig, build_world

    wcfg = SceneWorldConfig(**cfg.world)
    key = hashlib.sha1(json.dumps(cfg.world, sort_keys=True).encode()).hexdigest()[:10]
    return build_world(cache_root / f"world-{key}", wcfg, progress=True)


def turns_from_llava(records, image_index: dict[str, int]) -> list[Turn]:
    """LLaVA conversation records -> single-turn training examples (the ``<image>`` marker is stripped:
    the image tokens are spliced after BOS instead, as Prismatic does)."""
    out = []
    for rec in records:
        i = image_index[str(rec.image_path)]
        for human, gpt in rec.turns:
            prompt = human.replace("<image>", "").strip()
            kind = "grounding" if prompt.startswith("Please provide the bounding box") else "vqa"
            out.append(Turn(i, prompt, gpt, kind))
    return out


def object_list_turns(world, split: str, image_index: dict[str, int]) -> list[Turn]:
    """The auxiliary "list every object with its box" turn of every image of a split (from its COCO file)."""
    from toolkit.data import load_coco_instances
    from toolkit.data.formats import object_list_turn

    images = load_coco_instances(world.coco / f"instances_{split}.json", world.images)
    return [Turn(image_index[str(im.image_path)], *object_list_turn(im), "objects") for im in images
            if str(im.image_path) in image_index]


def run_experiment(cfg: ExperimentConfig, runs_root: str | Path = "runs", cache_root: str | Path = "data_cache",
                   make_figures: bool = True) -> dict:
    """Run (or resume) the whole job; returns {"run_dir", "rows", "pretrain"}."""
    from toolkit.data import load_llava, load_refcoco, load_vqa_split, scene_objects, VQA_PROMPT

    t_start = time.time()
    validate(cfg)
    d = distributed.current()
    run = RunDir(Path(runs_root) / cfg.name)
    device = distributed.device_for(d, pick_device(cfg.device))
    seed_everything(cfg.train.seed)

    def prepare():
        run.root.mkdir(parents=True, exist_ok=True)
        _check_same_config(run.config, cfg)
        if d.main:
            cfg.save(run.config)
        return world_data(cfg, Path(cache_root))

    world = distributed.main_first(prepare)  # under torchrun the others read what rank 0 wrote
    _log(f"run {run.root} on {device}; backbones: {', '.join(cfg.backbones)}")
    _log(f"scene world ready at {world.root}")

    # 1. matched backbone pretraining on the classification set, then dense-task tuning where a spec asks for it
    vlm_specs = {spec: split_vlm_spec(spec) for spec in cfg.backbones}  # VLM -> (backbone spec, connector)
    specs = {w: split_spec(w) for w, _ in vlm_specs.values()}  # backbone spec -> (registry name, dense-tuned)
    for _, conn in vlm_specs.values():
        if conn is not None:
            connector_depth(conn)  # an unknown connector fails here too
    for base, _ in specs.values():
        backbone_entry(base)  # an unknown name fails here, before any training
    pre, dense = {}, {}
    cls_data = None

    def weights_of(spec: str) -> str:
        """The file a backbone spec's weights are in: given (``backbone_weights``) or trained in this run."""
        base, is_dense = specs.get(spec, split_spec(spec))
        if not is_dense and base in cfg.backbone_weights:
            return str(Path(cfg.backbone_weights[base]).resolve())
        return str(run.backbone(spec))

    for base in dict.fromkeys(b for b, _ in specs.values()):
        if base in cfg.backbone_weights:
            pre[base] = dict(backbone=base, weights=weights_of(base), top1=None)
            continue
        path = run.backbone(base)
        if path.is_file() and path.with_suffix(".json").is_file():
            pre[base] = json.loads(path.with_suffix(".json").read_text())
            continue
        if cls_data is None:
            cls_data = tuple(load_image_folder(world.classification / s) for s in ("train", "val"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pre[base] = pretrain_backbone(base, cls_data[0], cls_data[1], cfg.pretrain, path, device, cfg.train.seed)
        _log(f"pretrained {base}: top-1 {pre[base]['top1']:.3f} in {pre[base]['train_seconds']} s")
    for spec, (base, is_dense) in specs.items():
        if not is_dense:
            continue
        path = run.backbone(spec)
        if path.is_file() and path.with_suffix(".json").is_file():
            dense[spec] = json.loads(path.with_suffix(".json").read_text())
            continue
        dense[spec] = dense_tune_backbone(base, weights_of(base), world.root, cfg.dense, path, device, cfg.train.seed)
        _log(f"dense-tuned {spec}: val mIoU {dense[spec]['miou']:.3f} in {dense[spec]['train_seconds']} s")

    # 2. training turns (LLaVA format) and a tokenizer + text-only LM shared by every backbone
    if cfg.train_llava is None:
        train_conv = load_llava(world.llava / "train.json", world.root)
    else:
        train_conv = load_llava(cfg.train_llava, cfg.train_images)
        text_only = sum(r.image_path is None for r in train_conv)
        train_conv = [r for r in train_conv if r.image_path is not None]
        _log(f"training data {cfg.train_llava}: {len(train_conv)} conversations with an image"
             + (f" ({text_only} text-only ones left out: the VLM trains on image turns)" if text_only else ""))
    train_images = sorted({str(r.image_path) for r in train_conv})
    index = {p: i for i, p in enumerate(train_images)}
    turns = turns_from_llava(train_conv, index)
    if cfg.train.objects_fraction > 0 and cfg.train_llava is None:
        turns += object_list_turns(world, "train", index)
    lm_cfg = cfg.lm
    if cfg.lm.name_or_path is None:  # a fresh LM: train tokenizer + text warm-up once, shared by every backbone
        lm_dir = run.lm_base
        if d.main and not (lm_dir / "config.json").is_file():
            _build_lm_base(cfg, turns, run, device)
        distributed.barrier()  # the others read the LM rank 0 warmed up
        lm_cfg = replace(cfg.lm, name_or_path=str(lm_dir))

    # 3. one VLM per spec (backbone spec and connector), watched on a few validation expressions while it trains
    monitor = None
    if cfg.train.monitor_points > 0 and d.main:
        monitor = grounding_monitor([r for s in STYLES for r in load_refcoco(world.root, s, "val")
                                     [: cfg.train.monitor_expressions]], cfg.eval.batch_size, cfg.eval.max_new_tokens)
    for name, (weights, conn) in vlm_specs.items():
        out = run.vlm(name)
        if (out / "config.json").is_file():
            continue
        vcfg = VLMConfig(backbone=specs[weights][0], connector=conn or cfg.connector, lm=lm_cfg, image_pos=cfg.image_pos,
                         backbone_weights=weights_of(weights))
        vlm = VLM.build(vcfg).to(device)
        feats = visual_tokens(vlm, train_images, desc=f"encode {name}")
        rec = train_vlm(vlm, feats, turns, cfg.train, out, device, monitor=monitor)
        if not d.main:
            continue
        (out / "train_record.json").write_text(json.dumps(rec, indent=2))
        _log(f"trained VLM on {name}: {rec['steps']} steps in {rec['seconds']} s, final loss {rec['final_loss']}")

    if not d.main:
        return dict(run_dir=run.root, rows=[], pretrain=pre)

    # 4. evaluation on val (cached per VLM and eval config), by rank 0 alone
    refs = [r for s in STYLES for r in load_refcoco(world.root, s, "val")[: cfg.eval.max_per_style]]
    vqa = load_vqa_split(world.root, "val")[: cfg.eval.max_vqa]
    val_conv = load_llava(world.llava / "val.json", world.root)
    val_images = sorted({str(r.image_path) for r in val_conv})
    val_turns = turns_from_llava(val_conv, {p: i for i, p in enumerate(val_images)})
    order = torch.randperm(len(val_turns), generator=torch.Generator().manual_seed(cfg.train.seed))
    val_turns = [val_turns[int(i)] for i in order[: cfg.eval.max_reliance]]
    rows = []
    objects_of = scene_objects(world.root, "val")
    for name in cfg.backbones:
        g, q, rel = _evaluate_cached(run.vlm(name), refs, vqa, (val_images, val_turns), world.root, cfg,
                                     device, VQA_PROMPT)
        rows += summarize(name, g, q) + object_choice(name, g, objects_of)
        rows += [metric_row(name, "reliance", "val", k, float(v), len(val_turns)) for k, v in rel.items()]
    train_refs = [r for s in STYLES for r in load_refcoco(world.root, s, "train")]
    rows += grounding_baselines(train_refs, refs, objects_of)
    rows += vqa_baselines(load_vqa_split(world.root, "train"), vqa)
    for name, rec in pre.items():
        if rec["top1"] is not None:  # None: weights given, not pretrained here
            rows.append(metric_row(name, "pretrain", "val", "top1", rec["top1"]))
    for name, rec in dense.items():
        rows += [metric_row(name, "dense", "val", m, rec[m]) for m in ("miou", "pixel_acc")]

    from toolkit.report import write_report

    df = write_report(run.root, rows, pre, cfg, figures=make_figures)
    if make_figures:
        from toolkit.report import write_figures, write_result_figures

        for note in write_result_figures(run.root, df).notes + write_figures(run.root, refs, cfg).notes:
            _log(note)
    _log(f"done in {time.time() - t_start:.0f} s; report: {run.results_md}")
    return dict(run_dir=run.root, rows=rows, pretrain=pre)


def _build_lm_base(cfg: ExperimentConfig, turns: list[Turn], run: RunDir, device: torch.device) -> None:
    """Tokenizer trained on the world's text + a fresh small Llama warmed up on text alone."""
    from toolkit.llm import build_lm, train_tokenizer

    texts = [t.prompt for t in turns] + [t.answer for t in turns] + ["USER: ASSISTANT:"]
    tok = train_tokenizer(texts, cfg.lm.vocab_size)
    lm, tok = build_lm(replace(cfg.lm, name_or_path=None), tok)
    loss = pretrain_lm_text(lm, tok, TEMPLATES[cfg.lm.template], turns, cfg.train.lm_pretrain_steps,
                            batch_size=64, lr=2e-3, device=device, seed=cfg.train.seed,
                            state_path=run.lm_base_state)
    lm.save_pretrained(str(run.lm_base))
    tok.save_pretrained(str(run.lm_base))
    _log(f"LM warm-up (text only): {cfg.train.lm_pretrain_steps} steps, final loss {loss}")


def _evaluate_cached(vlm_dir: Path, refs, vqa, reliance_set, world_root: Path, cfg: ExperimentConfig, device,
                     vqa_prompt: str):
    """Per-example evaluation results and the image-reliance check, cached next to the VLM and keyed by the eval
    config and weights. The cache names its images relative to the world (``image_path``) and the world relative
    to the VLM's directory (``world_root``), so a run moved together with its data cache still finds them."""
    key = hashlib.sha1(json.dumps([cfg.eval.__dict__, len(refs), len(vqa), len(reliance_set[1]),
                                   (vlm_dir / "model.safetensors").stat().st_mtime_ns]).encode()).hexdigest()[:12]
    cache = vlm_dir / f"eval_val_{key}.json"
    if cache.is_file():
        d = json.loads(cache.read_text())
        return d["grounding"], d["vqa"], d["reliance"]
    vlm = VLM.load(vlm_dir).to(device)
    g = evaluate_grounding(vlm, refs, cfg.eval.batch_size, cfg.eval.max_new_tokens, desc=f"eval {vlm_dir.name} grounding")
    q = evaluate_vqa(vlm, vqa, vqa_prompt, cfg.eval.batch_size, desc=f"eval {vlm_dir.name} vqa")
    images, turns = reliance_set
    feats = encode_all(vlm, images, desc=f"encode val {vlm_dir.name}")
    rel = image_reliance(vlm, feats, turns, cfg.eval.batch_size, seed=cfg.train.seed)
    stored = [dict(r, image_path=os.path.relpath(r["image_path"], world_root)) for r in g]
    cache.write_text(json.dumps(dict(grounding=stored, vqa=q, reliance=rel,
                                     world_root=os.path.relpath(world_root, vlm_dir))))
    return g, q, rel


def run_seeds(cfg: ExperimentConfig, n_seeds: int, runs_root: str | Path = "runs", cache_root: str | Path = "data_cache",
              make_figures: bool = False) -> dict:
    """The whole comparison ``n_seeds`` times (``train.seed`` = 0..n-1: pretraining, LM, VLM sampling; the world is
    shared), each in its own run directory ``<name>-seed<k>``, then mean +- sd over seeds per metric in
    ``<runs>/<name>-seeds/`` (summary.csv, summary.md). Returns {"run_dir", "summary"}."""
    import pandas as pd

    from toolkit.report import seed_summary, write_seed_summary

    frames = []
    for k in range(n_seeds):
        run = replace(cfg, name=f"{cfg.name}-seed{k}", train=replace(cfg.train, seed=k))
        _log(f"seed {k + 1} of {n_seeds}")
        frames.append(pd.DataFrame(run_experiment(run, runs_root, cache_root, make_figures)["rows"]).assign(seed=k))
    out = Path(runs_root) / f"{cfg.name}-seeds"
    if not distributed.current().main:
        return dict(run_dir=out, summary=None)
    summary = seed_summary(pd.concat(frames, ignore_index=True))
    write_seed_summary(out, summary, cfg, n_seeds)
    return dict(run_dir=out, summary=summary)
