"""The VLM: sequence assembly, loss masking, generation, grounding on any image, save/load, resumable training."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.checkpoints import save_safetensors
from toolkit.config import StageConfig, TrainConfig
from toolkit.llm import LMConfig, answer_logits, train_tokenizer
from toolkit.registry import create_backbone
from toolkit.train import vlm_trainer
from toolkit.train.vlm_trainer import Turn, train_vlm
from toolkit.vlm import IGNORE_INDEX, VLM, VLMConfig

TEXTS = ["the red square", "the small blue star to the left of the yellow circle",
         "Please provide the bounding box coordinate of the region this sentence describes:", "How many red objects?"]
TINY_LM = LMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300)


def _vlm(tokenizer, backbone="vit-test", **kw):
    torch.manual_seed(0)
    return VLM.build(VLMConfig(backbone=backbone, lm=TINY_LM, **kw), tokenizer)


def test_tokenizer_roundtrip_and_coordinate_tokens(tokenizer):
    s = "USER: the red square ASSISTANT: [0.12, 0.30, 0.56, 1.00]"
    ids = tokenizer(s, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == s
    box_ids = tokenizer("[0.12, 0.30, 0.56, 1.00]", add_special_tokens=False).input_ids
    assert len(box_ids) == 9  # "[" + 4 coordinates + 3 commas + "]"


def test_assemble_masks_everything_but_the_answer(tokenizer):
    vlm = _vlm(tokenizer)
    vis = torch.randn(2, 16, vlm.backbone.embed_dim)
    b = vlm.assemble(vis, ["the red square", "a much longer prompt about the blue star"], ["[0.10, 0.20, 0.30, 0.40]", "3"])
    assert b.image_mask.sum(1).tolist() == [16, 16]
    assert b.image_mask[:, 1:17].all()  # image tokens right after BOS (Prismatic)
    for i, ans in enumerate(["[0.10, 0.20, 0.30, 0.40]", "3"]):
        sup = b.labels[i][b.labels[i] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(sup[:-1]) == ans and sup[-1] == tokenizer.eos_token_id
    assert (b.labels[b.attention_mask == 0] == IGNORE_INDEX).all()
    left = vlm.assemble(vis, ["a", "a much longer prompt"], padding_side="left")
    assert left.attention_mask[:, -1].all() and left.image_mask.sum() == 32


def test_answer_only_logits_give_the_full_sequence_loss(tokenizer):
    """The training loss computes logits at answer positions only; it must equal HF's loss over the whole sequence."""
    vlm = _vlm(tokenizer)
    vis = torch.randn(2, 16, vlm.backbone.embed_dim)
    b = vlm.assemble(vis, ["the red square", "a much longer prompt about the blue star"], ["[0.10, 0.20, 0.30, 0.40]", "3"])
    full = vlm.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, labels=b.labels).loss
    torch.testing.assert_close(vlm(vis, ["the red square", "a much longer prompt about the blue star"],
                                   ["[0.10, 0.20, 0.30, 0.40]", "3"]), full, rtol=1e-5, atol=1e-6)


def test_isolated_turns_train_as_single_turn_rows(tokenizer):
    """A row of K isolated turns about one image gives each turn exactly the logits its own single-turn row gives."""
    vlm = _vlm(tokenizer)
    vis = torch.randn(2, 16, vlm.backbone.embed_dim)
    convs = [[("the red square", "[0.10, 0.20, 0.30, 0.40]"), ("How many red objects?", "3"), ("a", "no")],
             [("the small blue star", "[0.50, 0.50, 0.90, 1.00]")]]
    packed = vlm.assemble_turns(vis, convs, isolate=True)
    assert packed.attention_mask.shape == (2, 1, packed.labels.shape[1], packed.labels.shape[1])
    logits, labels = answer_logits(vlm.lm, packed.inputs_embeds, packed.attention_mask, packed.labels,
                                   packed.position_ids)
    singles = [(vis[i:i + 1], p, a) for i, conv in enumerate(convs) for p, a in conv]
    want = [answer_logits(vlm.lm, (b := vlm.assemble(v, [p], [a])).inputs_embeds, b.attention_mask, b.labels)
            for v, p, a in singles]
    torch.testing.assert_close(logits, torch.cat([w[0] for w in want]), rtol=1e-4, atol=1e-5)
    assert labels.tolist() == torch.cat([w[1] for w in want]).tolist()
    # Written as one conversation instead, later turns see the earlier ones: different logits.
    joined = vlm.assemble_turns(vis, convs)
    assert not torch.allclose(answer_logits(vlm.lm, joined.inputs_embeds, joined.attention_mask, joined.labels)[0],
                              logits, atol=1e-3)


def test_per_turn_loss_weighs_every_answer_alike(tokenizer):
    """unit="turn": the mean over answers of each answer's own mean token loss (its single-turn row's loss)."""
    vlm = _vlm(tokenizer).eval()
    vis = torch.randn(2, 16, vlm.backbone.embed_dim)
    convs = [[("the red square", "[0.10, 0.20, 0.30, 0.40]"), ("How many red objects?", "3")],
             [("the small blue star", "[0.50, 0.50, 0.90, 1.00]")]]
    with torch.no_grad():
        singles = [vlm.turns_loss(vis[i:i + 1], [[turn]]) for i, conv in enumerate(convs) for turn in conv]
        per_turn = vlm.turns_loss(vis, convs, isolate=True, unit="turn")
        summed = vlm.turns_loss(vis, convs, isolate=True, unit="turn", reduction="sum")
        per_token = vlm.turns_loss(vis, convs, isolate=True)
    torch.testing.assert_close(per_turn, torch.stack(singles).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(summed, torch.stack(singles).sum(), rtol=1e-4, atol=1e-5)
    counts = torch.tensor(vlm.answer_token_counts(["[0.10, 0.20, 0.30, 0.40]", "3", "[0.50, 0.50, 0.90, 1.00]"]))
    assert counts[1] < counts[0]  # a one-word answer has fewer tokens, so the two units differ
    torch.testing.assert_close(per_token, (torch.stack(singles) * counts).sum() / counts.sum(), rtol=1e-4, atol=1e-5)


def test_loss_backward_reaches_connector_not_backbone(tokenizer):
    vlm = _vlm(tokenizer)
    x = torch.randn(2, 3, 32, 32)
    loss = vlm(vlm.encode_images(x), ["p", "q"], ["yes", "no"])
    loss.backward()
    assert vlm.connector.projector[0].weight.grad is not None
    assert all(p.grad is None for p in vlm.backbone.parameters())


@pytest.mark.parametrize("size", [(50, 80), (300, 20), (32, 32)])
def test_ground_any_image_and_invalid_answers_do_not_raise(tokenizer, size):
    vlm = _vlm(tokenizer).eval()
    img = Image.fromarray((np.random.default_rng(0).random((*size, 3)) * 255).astype("uint8"))
    g = vlm.ground(img, "the red square")
    assert isinstance(g.answer, str)
    assert g.valid == (g.box_pixels is not None)
    assert (g.geometry.orig_w, g.geometry.orig_h) == (size[1], size[0])


@pytest.mark.parametrize("bad", ["", "   ", "x" * 10000])
def test_ground_rejects_bad_expressions(tokenizer, bad):
    vlm = _vlm(tokenizer)
    with pytest.raises(ValueError, match="expression"):
        vlm.ground(Image.new("RGB", (32, 32)), bad)


def test_read_box_frames(tokenizer):
    img = Image.new("RGB", (200, 100))
    for frame, expect in (("input", (0.0, 0.0, 200.0, 100.0)), ("original", (0.0, 0.0, 200.0, 100.0))):
        vlm = _vlm(tokenizer, box_frame=frame)
        _, geom = vlm.preprocess(img)
        box = "[0.00, 0.25, 1.00, 0.75]" if frame == "input" else "[0.00, 0.00, 1.00, 1.00]"
        assert vlm.read_box(box, geom).box_pixels == pytest.approx(expect, abs=1e-4)
    assert _vlm(tokenizer).read_box("not a box", geom).valid is False


def test_save_load_roundtrip_and_incomplete_run(tokenizer, tmp_path):
    vlm = _vlm(tokenizer).eval()
    vis = torch.randn(1, 16, vlm.backbone.embed_dim)
    vlm.save(tmp_path / "run")
    again = VLM.load(tmp_path / "run").eval()
    b1, b2 = vlm.assemble(vis, ["the red square"]), again.assemble(vis, ["the red square"])
    with torch.no_grad():
        l1 = vlm.lm(inputs_embeds=b1.inputs_embeds, attention_mask=b1.attention_mask).logits
        l2 = again.lm(inputs_embeds=b2.inputs_embeds, attention_mask=b2.attention_mask).logits
    torch.testing.assert_close(l1, l2)
    (tmp_path / "run" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VLM.load(tmp_path / "run")


def test_training_resumes_to_the_same_weights(tokenizer, tmp_path, monkeypatch):
    turns = [Turn(i % 4, f"prompt {i}", "[0.10, 0.20, 0.30, 0.40]" if i % 2 else "yes",
                  "grounding" if i % 2 else "vqa") for i in range(16)]
    feats = torch.randn(4, 16, 32)
    cfg = TrainConfig(stages=(StageConfig("align", 6, 1e-3, 4, False), StageConfig("finetune", 6, 1e-3, 4, True)),
                      checkpoint_every=2, monitor_points=5)

    def monitor(vlm):  # a reading of the weights, so a resumed run's readings can be compared with the straight run's
        assert not vlm.training
        return {"w": float(sum(p.sum() for p in vlm.connector.parameters()))}

    ref = _vlm(tokenizer)
    ref_record = train_vlm(ref, feats, turns, cfg, tmp_path / "straight", torch.device("cpu"), monitor=monitor)
    assert [s for s, _ in ref_record["monitor_curve"]] == [2, 5, 7, 10, 12]  # evenly spaced over both stages
    unwatched = _vlm(tokenizer)
    train_vlm(unwatched, feats, turns, cfg, tmp_path / "unwatched", torch.device("cpu"))
    for (k, a), b in zip(ref.trainable_state_dict().items(), unwatched.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # watching does not change the training

    real_save, calls = vlm_trainer.save_train_state, {"n": 0}

    def crash_after_third_save(path, **state):
        real_save(path, **state)
        calls["n"] += 1
        if calls["n"] == 3:  # the first save inside the finetune stage, then the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(vlm_trainer, "save_train_state", crash_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        train_vlm(_vlm(tokenizer), feats, turns, cfg, tmp_path / "resumed", torch.device("cpu"), monitor=monitor)
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    monkeypatch.setattr(vlm_trainer, "save_train_state", real_save)
    resumed = _vlm(tokenizer)
    record = train_vlm(resumed, feats, turns, cfg, tmp_path / "resumed", torch.device("cpu"), monitor=monitor)
    assert [s for s, _ in record["monitor_curve"]] == [2, 5, 7, 10, 12]  # the readings before the crash come back
    assert [v["w"] for _, v in record["monitor_curve"]] == pytest.approx(
        [v["w"] for _, v in ref_record["monitor_curve"]], abs=1e-3)
    assert not (tmp_path / "resumed" / "train_state.pt").exists()
    assert [s for s, _ in record["loss_curve"]] == list(range(1, 13))  # the losses before the crash come back too
    assert [v for _, v in record["loss_curve"]] == pytest.approx([v for _, v in ref_record["loss_curve"]], abs=1e-3)
    for (k, a), b in zip(ref.trainable_state_dict().items(), resumed.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)



def test_lm_text_warmup_resumes_to_the_same_weights(tokenizer, tmp_path, monkeypatch):
    from toolkit.llm import TEMPLATES, build_lm

    turns = [Turn(0, "the red square", "[0.10, 0.20, 0.30, 0.40]", "grounding"),
             Turn(0, "How many red objects?", "2", "vqa")]

    def warm_up(state_path):
        torch.manual_seed(0)
        lm, tok = build_lm(TINY_LM, tokenizer)
        loss = vlm_trainer.pretrain_lm_text(lm, tok, TEMPLATES["vicuna_v11"], turns, 6, 4, 1e-3, torch.device("cpu"),
                                            state_path=state_path, checkpoint_every=2)
        return lm, loss

    ref, ref_loss = warm_up(tmp_path / "straight.state.pt")
    real_save, calls = vlm_trainer.save_train_state, {"n": 0}

    def crash_after_second_save(path, **state):
        real_save(path, **state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(vlm_trainer, "save_train_state", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        warm_up(tmp_path / "resumed.state.pt")
    assert (tmp_path / "resumed.state.pt").is_file()
    monkeypatch.setattr(vlm_trainer, "save_train_state", real_save)
    resumed, loss = warm_up(tmp_path / "resumed.state.pt")
    assert not (tmp_path / "resumed.state.pt").exists() and not (tmp_path / "straight.state.pt").exists()
    assert loss == ref_loss
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)

def test_image_position_code_is_saved_and_checked(tokenizer, tmp_path):
    from toolkit.connector import sincos_2d

    code = sincos_2d(3, 4, 16)
    assert code.shape == (12, 16) and len({tuple(r) for r in code.tolist()}) == 12  # every cell distinct
    vlm = _vlm(tokenizer, "vit-test", image_pos="sincos2d")
    assert "connector.pos_scale" in vlm.trainable_state_dict()
    vlm.save(tmp_path / "v")
    again = VLM.load(tmp_path / "v")
    tokens = torch.randn(1, vlm.connector.pos_code.shape[0], vlm.backbone.embed_dim)
    torch.testing.assert_close(again.connector(tokens), vlm.connector(tokens))
    with pytest.raises(ValueError, match="grid"):
        vlm.connector(tokens[:, :-1])



def test_a_moved_run_loads_its_own_backbone_from_any_cwd(tokenizer, tmp_path, monkeypatch):
    torch.manual_seed(1)
    trained = create_backbone("vit-test").state_dict()
    save_safetensors(trained, tmp_path / "orig" / "backbones" / "vit-test.safetensors")
    monkeypatch.chdir(tmp_path)  # the pipeline names the weights relative to the cwd
    _vlm(tokenizer, backbone_weights="orig/backbones/vit-test.safetensors").save(tmp_path / "orig" / "vlms" / "vit-test")
    cfg = json.loads((tmp_path / "orig" / "vlms" / "vit-test" / "config.json").read_text())
    assert cfg["backbone_weights"] == "../../backbones/vit-test.safetensors"

    shutil.copytree(tmp_path / "orig", tmp_path / "moved")
    shutil.rmtree(tmp_path / "orig")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = VLM.load("../moved/vlms/vit-test")
    assert again.cfg.backbone_weights == str(tmp_path.resolve() / "moved" / "backbones" / "vit-test.safetensors")
    for k, v in again.backbone.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)


def test_backbone_weights_outside_the_run_stay_absolute(tokenizer, tmp_path):
    weights = tmp_path / "shared" / "vit-test.safetensors"
    save_safetensors(_vlm(tokenizer).backbone.state_dict(), weights)
    _vlm(tokenizer, backbone_weights=str(weights)).save(tmp_path / "run" / "vlms" / "vit-test")
    cfg = json.loads((tmp_path / "run" / "vlms" / "vit-test" / "config.json").read_text())
    assert cfg["backbone_weights"] == str(weights.resolve())
