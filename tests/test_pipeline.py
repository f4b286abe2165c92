"""The main job end to end on the smoke preset: world -> matched pretraining -> VLMs -> evaluation -> report,
then a second call that must reuse everything it finds on disk."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import pandas as pd
import pytest

from toolkit.config import StageConfig, apply_overrides, preset
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
        # a dense-tuned spec reports its segmentation scores; pretraining rows are per registry backbone
        own = {"dense"} if bb.endswith("+dense") else set() if "@" in bb else {"pretrain"}
        assert set(mine.task) == own | {"grounding", "vqa", "reliance"}
        g = mine[mine.task == "grounding"]
        assert set(g.split) == {"refcoco", "refcoco+", "refcocog"}
        assert {"acc@0.5", "invalid_rate", "mean_iou", "top_answer_share"} <= set(g.metric)
        scored = mine[mine.metric.isin(["acc@0.5", "mean_iou", "accuracy"])]
        assert scored.ci_low.notna().all() and (scored.ci_low <= scored.value).all() \
            and (scored.value <= scored.ci_high).all()
        rel = mine[mine.task == "reliance"].set_index("metric").value
        assert {"loss_true", "loss_shuffled", "loss_gain", "token_acc_true", "token_acc_shuffled",
                "token_acc_drop"} <= set(rel.index)
        assert mine[mine.task != "reliance"].value.dropna().between(0, 1).all()
    assert {"chance:mean-box", "chance:random-object", "chance:majority"} <= set(df.backbone)
    assert not df.duplicated(["backbone", "task", "split", "metric"]).any()
    assert set(df[df.task == "dense"].metric) == {"miou", "pixel_acc"}
    assert json.loads((run / "vlms" / "vit-test@mlp3x_gelu" / "config.json").read_text())["connector"] == "mlp3x_gelu"
    for bb in cfg.backbones:  # grounding watched while training: monitor_points readings, the last at the end
        curve = json.loads((run / "vlms" / bb / "train_record.json").read_text())["monitor_curve"]
        assert len(curve) == cfg.train.monitor_points and curve[-1][0] == sum(s.steps for s in cfg.train.stages)
        assert all(0 <= v["acc@0.5"] <= 1 for _, v in curve)
    report = (run / "results.md").read_text()
    for section in ("Grounding Acc@IoU>=0.5", "Image reliance", "Collapse diagnostics"):
        assert section in report
    assert sorted((run / "figures").glob("side_by_side_*.html"))


def test_run_dir_names_every_file_a_run_writes(smoke_run):
    from toolkit.runs import RunDir

    cfg, _, res, _ = smoke_run
    run = RunDir(res["run_dir"])
    assert run.config.is_file() and run.results_csv.is_file() and run.results_md.is_file() and run.figures.is_dir()
    assert (run.lm_base / "config.json").is_file() and not run.lm_base_state.exists()  # removed once warmed up
    for spec in cfg.backbones:
        assert (run.vlm(spec) / "model.safetensors").is_file() and not (run.vlm(spec) / "train_state.pt").exists()
        assert any(p.parent == run.vlm(spec) for p in run.eval_caches())
    assert {p.stem for p in run.backbone_records()} == {"vit-test", "vmamba-test", "vmamba-test+dense"}
    assert all(run.backbone(p.stem).is_file() for p in run.backbone_records())
    assert {p.parent.name for p in run.train_records()} == set(cfg.backbones)


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


def test_overrides_take_lists_of_stages_and_check_every_type(tmp_path):
    """`--set train.stages=[...]` used to store plain dicts that crashed only after pretraining."""
    cfg = apply_overrides(preset("smoke"), ['train.stages=[{"name": "align", "steps": 5, "train_lm": false}, '
                                            '{"steps": 9, "lr": 1}]'])
    assert cfg.train.stages == (StageConfig("align", 5, StageConfig.lr, StageConfig.batch_size, False),
                                StageConfig(steps=9, lr=1.0))
    assert isinstance(cfg.train.stages[1].lr, float)
    cfg = apply_overrides(preset("smoke"), [f"lm.name_or_path={tmp_path}", "backbones=[\"vit-test\"]"])
    assert cfg.lm.name_or_path == str(tmp_path) and cfg.backbones == ("vit-test",)
    bad = {"pretrain.epochs=four": "`pretrain.epochs` takes a int", "train.stages=[{\"step\": 5}]": "step not field",
           "train.stages=[]": "train.stages is empty", "train.stages.3.steps=1": "no entry 3",
           "train.stages.0=5": "JSON object of StageConfig", "eval.batch_size=true": "takes a int",
           "world.n_trian=5": "n_trian not field", "pretrain.lr=0": "must be positive", "backbones=[]": "is empty",
           "train.stages.0.train_lm=1": "takes a bool", "lm.name_or_path=/models/none": "neither a local directory",
           "train.strategy=zero": "choose one of"}
    for assignment, message in bad.items():
        with pytest.raises((KeyError, ValueError, FileNotFoundError), match=message.replace(" ", ".*")):
            apply_overrides(preset("smoke"), [assignment])


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


@pytest.mark.slow
def test_seeds_repeat_the_comparison_and_report_mean_and_sd(tmp_path):
    from toolkit.pipeline import run_seeds

    cfg = preset("smoke", backbones=("vit-test",), name="seeds")
    res = run_seeds(cfg, 2, tmp_path / "runs", tmp_path / "cache")
    s = res["summary"]
    assert (tmp_path / "runs" / "seeds-seed0").is_dir() and (tmp_path / "runs" / "seeds-seed1").is_dir()
    assert set(s.seeds[s.backbone == "vit-test"]) == {2}
    assert {"mean", "sd"} <= set(s.columns)
    assert "seed-to-seed noise" in (res["run_dir"] / "summary.md").read_text()


def test_only_differences_beyond_twice_the_standard_error_count():
    from toolkit.report import separable_pairs

    rows = [dict(backbone=b, task="grounding", split="refcoco", metric="acc@0.5", value=v, seed=k)
            for b, vals in (("a", (0.80, 0.82, 0.81)), ("b", (0.50, 0.52, 0.51)), ("c", (0.79, 0.83, 0.80)))
            for k, v in enumerate(vals)]
    from toolkit.report import seed_summary

    pairs = separable_pairs(seed_summary(pd.DataFrame(rows)), "grounding", "acc@0.5")
    assert len(pairs) == 2 and all(" > b " in p for p in pairs)  # a and c beat b; a vs c is noise


@pytest.mark.slow
def test_a_run_finds_its_models_and_examples_from_any_directory(smoke_run, tmp_path, monkeypatch):
    from pathlib import Path

    from toolkit.interpret import example_images
    from toolkit.runs import load_vlms

    run = smoke_run[2]["run_dir"].resolve()
    monkeypatch.chdir(tmp_path)
    examples = example_images(run)
    assert examples and all(Path(e.image).is_file() for e in examples)
    assert set(smoke_run[0].backbones) <= set(load_vlms(run))  # a run may have grown by backbones


@pytest.mark.slow
def test_pretraining_and_dense_tuning_feed_each_backbone_its_own_input_size(smoke_run, tmp_path, monkeypatch):
    """The smoke world is 32 px; a backbone configured at 48x32 (shrink-and-pad) and one at 40 px (letterbox) are
    trained on it at their own sizes, as the VLM will run them (they used to get the world's size, or fail)."""
    import torch

    from toolkit.config import DenseConfig, PretrainConfig
    from toolkit.pipeline import world_data
    from toolkit.train import dense, pretrain

    seen = []

    def recording(images, backbone, fit=pretrain.to_input):
        x = fit(images, backbone)
        seen.append(tuple(x.shape[-2:]))
        return x

    monkeypatch.setattr(pretrain, "to_input", recording)
    monkeypatch.setattr(dense, "to_input", recording)
    cfg, root, _, _ = smoke_run
    world = world_data(cfg, root / "cache")
    cls = tuple(pretrain.load_image_folder(world.classification / s) for s in ("train", "val"))
    assert cls[0][0].shape[-2:] == (32, 32)
    for name, kw, hw in (("vmamba-dense-test", {}, (48, 32)), ("vit-test", {"img_size": 40}, (40, 40))):
        rec = pretrain.pretrain_backbone(name, cls[0], cls[1], PretrainConfig(epochs=1, batch_size=64, warmup_steps=1),
                                         tmp_path / f"{name}.safetensors", torch.device("cpu"), backbone_overrides=kw)
        assert set(seen) == {hw} and 0 <= rec["top1"] <= 1
        seen.clear()
    rec = dense.dense_tune_backbone("vmamba-dense-test", tmp_path / "vmamba-dense-test.safetensors", world.root,
                                    DenseConfig(epochs=1, batch_size=32, warmup_steps=1), tmp_path / "d.safetensors",
                                    torch.device("cpu"))
    assert set(seen) == {(48, 32)} and rec["label_hw"] == [12, 8] and 0 <= rec["miou"] <= 1


@pytest.mark.slow
def test_given_backbone_weights_and_own_llava_data(smoke_run, capsys):
    """Paper-scale inputs on the smoke world: a backbone taken from a file instead of pretrained (and dense-tuned
    from it), and VLMs trained on a LLaVA file of one's own (text-only conversations left out, with a line)."""
    cfg, root, res, _ = smoke_run
    given = res["run_dir"] / "backbones" / "vit-test.safetensors"
    world = next((root / "cache").glob("world-*"))
    records = json.loads((world / "llava" / "train.json").read_text())
    records.append({"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    own = root / "own_llava.json"
    own.write_text(json.dumps(records))
    mine = apply_overrides(replace(cfg, name="given", backbones=("vit-test", "vit-test+dense")),
                           [f'backbone_weights={{"vit-test": "{given}"}}', f"train_llava={own}",
                            f"train_images={world}"])
    out = run_experiment(mine, root / "runs", root / "cache", make_figures=False)["run_dir"]
    assert not (out / "backbones" / "vit-test.safetensors").exists()  # not pretrained again
    assert json.loads((out / "backbones" / "vit-test+dense.json").read_text())["init"] == str(given.resolve())
    assert json.loads((out / "vlms" / "vit-test" / "config.json").read_text())["backbone_weights"] == \
        str(given.resolve())
    df = pd.read_csv(out / "results.csv")
    assert not ((df.backbone == "vit-test") & (df.task == "pretrain")).any()
    assert "1 text-only ones left out" in capsys.readouterr().out
    for bad, message in ((['backbone_weights={"vit-b-in1k-224": "x"}'], "not among the run's backbones"),
                         ([f'backbone_weights={{"vit-test": "{root / "missing.pth"}"}}'], "not found"),
                         ([f"train_llava={own}"], "go together")):
        with pytest.raises((KeyError, ValueError, FileNotFoundError), match=message):
            apply_overrides(mine, bad + (["train_images=null"] if "train_llava" in bad[0] else []))


@pytest.mark.slow
def test_a_damaged_vlm_is_named_and_skipped_while_the_others_load(smoke_run, tmp_path):
    import shutil

    from toolkit.runs import load_vlms

    run = tmp_path / "copy"
    shutil.copytree(smoke_run[2]["run_dir"], run)
    weights = run / "vlms" / "vit-test" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (run / "vlms" / "half-trained").mkdir()
    skipped = {}
    vlms = load_vlms(run, skipped=skipped)
    assert "vit-test" not in vlms and "vmamba-test" in vlms
    assert set(skipped) == {"vit-test", "half-trained"} and "do not load" in skipped["vit-test"]
    assert "no config.json" in skipped["half-trained"] and str(tmp_path) not in skipped["vit-test"]
    with pytest.raises(Exception):
        load_vlms(run)  # without `skipped` a damaged model still raises


@pytest.mark.slow
def test_vlmtk_figures_rewrites_every_figure_and_table(smoke_run, capsys):
    from toolkit.cli import main
    from toolkit.config import ExperimentConfig

    cfg, _, res, _ = smoke_run
    run = res["run_dir"]
    saved = json.loads((run / "config.json").read_text())
    assert json.loads(json.dumps(ExperimentConfig.load(run / "config.json").to_dict())) == saved  # reads back
    main(["figures", "--run", str(run), "--formats", "html"])
    listed = capsys.readouterr().out.split()
    for stem in ("training_curves.html", "scores.html", "top1_vs_grounding.html", "tables.md", "tables.tex",
                 "side_by_side_00.html"):
        assert str(run / "figures" / stem) in listed and (run / "figures" / stem).is_file()
    tex = (run / "figures" / "tables.tex").read_text()
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") >= 4 and r"\toprule" in tex
    assert "## Grounding Acc@IoU>=0.5" in (run / "figures" / "tables.md").read_text()
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        main(["figures", "--run", str(run / "nowhere")])
