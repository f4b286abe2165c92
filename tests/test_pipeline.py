"""The main job end to end on the smoke preset: world -> matched pretraining -> VLMs -> evaluation -> report,
then a second call that must reuse everything it finds on disk."""
from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd
import pytest

from toolkit.config import apply_overrides, preset
from toolkit.pipeline import run_experiment


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg = preset("smoke")
    t0 = time.time()
    res = run_experiment(cfg, root / "runs", root / "cache", make_figures=True)
    return cfg, root, res, time.time() - t0


@pytest.mark.slow
def test_report_has_one_row_per_backbone_task_metric(smoke_run):
    cfg, _, res, _ = smoke_run
    run = res["run_dir"]
    df = pd.read_csv(run / "results.csv")
    for bb in cfg.backbones:
        mine = df[df.backbone == bb]
        # a dense-tuned spec reports its segmentation scores; its pretraining row is its base's
        assert set(mine.task) == ({"dense", "grounding", "vqa"} if bb.endswith("+dense") else
                                  {"pretrain", "grounding", "vqa"})
        g = mine[mine.task == "grounding"]
        assert set(g.split) == {"refcoco", "refcoco+", "refcocog"}
        assert {"acc@0.5", "invalid_rate"} <= set(g.metric)
        assert mine.value.between(0, 1).all()
    assert {"chance:mean-box", "chance:random-object", "chance:majority"} <= set(df.backbone)
    assert not df.duplicated(["backbone", "task", "split", "metric"]).any()
    assert set(df[df.task == "dense"].metric) == {"miou", "pixel_acc"}
    assert "Grounding Acc@IoU>=0.5" in (run / "results.md").read_text()
    assert sorted((run / "figures").glob("side_by_side_*.html"))


@pytest.mark.slow
def test_second_run_reuses_data_and_checkpoints(smoke_run):
    cfg, root, res, first = smoke_run
    stamps = {p: p.stat().st_mtime for p in (res["run_dir"] / "backbones").glob("*.safetensors")}
    t0 = time.time()
    again = run_experiment(cfg, root / "runs", root / "cache", make_figures=False)
    assert {p: p.stat().st_mtime for p in stamps} == stamps  # nothing retrained
    assert time.time() - t0 < first
    pd.testing.assert_frame_equal(pd.read_csv(again["run_dir"] / "results.csv"),
                                  pd.read_csv(res["run_dir"] / "results.csv"))


def test_overrides_reject_unknown_fields():
    cfg = apply_overrides(preset("smoke"), ["train.stages.0.steps=7", "world.n_train=50"])
    assert cfg.train.stages[0].steps == 7 and cfg.world["n_train"] == 50
    with pytest.raises(KeyError, match="not a field"):
        apply_overrides(preset("smoke"), ["pretrain.epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(preset("smoke"), ["pretrain.epochs"])


@pytest.mark.slow
def test_short_training_beats_chance_on_grounding(tmp_path):
    """Two-object 32 px scenes, a ViT, 1500 VLM steps (about a minute on 2 cores): the predicted boxes must overlap
    the referred object better than the best constant box (chance:mean-box), pooled over the three styles."""
    from toolkit.config import EvalConfig, StageConfig

    cfg = preset("smoke", backbones=("vit-test",), name="chance")
    cfg = replace(cfg, world=dict(cfg.world, n_train=600, n_val=60, min_objects=2, max_objects=2),
                  train=replace(cfg.train, stages=(StageConfig("finetune", 1500, 3e-3, 32, True),),
                                grounding_fraction=0.9),
                  eval=EvalConfig(max_per_style=120, max_vqa=20, batch_size=64, max_new_tokens=20))
    df = pd.DataFrame(run_experiment(cfg, tmp_path / "runs", tmp_path / "cache", make_figures=False)["rows"])
    g = df[df.task == "grounding"]

    def pooled(backbone, metric):
        rows = g[(g.backbone == backbone) & (g.metric == metric)]
        return float((rows.value * rows.n).sum() / rows.n.sum())

    model, chance = pooled("vit-test", "mean_iou"), pooled("chance:mean-box", "mean_iou")
    print(f"grounding mean IoU {model:.3f}, constant-box chance {chance:.3f}")
    assert pooled("vit-test", "invalid_rate") < 0.1
    assert model > chance + 0.015, f"mean IoU {model:.3f} vs constant-box chance {chance:.3f}"


@pytest.mark.slow
def test_changed_config_never_reuses_a_run(smoke_run):
    cfg, root, res, _ = smoke_run
    changed = apply_overrides(cfg, ["pretrain.lr=0.1"])
    with pytest.raises(ValueError, match="different config .*pretrain"):
        run_experiment(changed, root / "runs", root / "cache", make_figures=False)


@pytest.mark.slow
def test_a_run_grows_by_backbones_and_reuses_the_rest(smoke_run):
    cfg, root, res, _ = smoke_run
    backbones = res["run_dir"] / "backbones"
    stamps = {p: p.stat().st_mtime for p in backbones.glob("*.safetensors")}
    grown = run_experiment(replace(cfg, backbones=cfg.backbones + ("mambavision-test",)), root / "runs", root / "cache",
                           make_figures=False)
    assert {p: p.stat().st_mtime for p in stamps} == stamps  # the first backbones were not retrained
    df = pd.read_csv(grown["run_dir"] / "results.csv")
    assert {"mambavision-test", *cfg.backbones} <= set(df.backbone)
