"""ViTDet: detectron2 key layout (.pth and .pkl), windowed vs global attention, the paper's 4096-token tap."""
from __future__ import annotations

import pickle

import pytest
import torch

from toolkit.backbones import CheckpointMismatchError
from toolkit.registry import create_backbone


def _detectron2_state_dict(bb) -> dict[str, torch.Tensor]:
    """What a detectron2 Mask R-CNN file holds for ``bb``: ``backbone.net.*`` plus pyramid and heads."""
    sd = {f"backbone.net.{k}": torch.randn_like(v) for k, v in bb.state_dict().items()}
    sd["backbone.simfp_2.0.weight"] = torch.randn(bb.embed_dim, bb.embed_dim // 2, 2, 2)
    sd["backbone.simfp_4.0.norm.weight"] = torch.randn(256)
    sd["proposal_generator.rpn_head.conv.weight"] = torch.randn(256, 256, 3, 3)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.randn(81, 1024)
    return sd


def test_paper_config_shapes_match_detectron2_vitdet_b():
    """ViT-B/16 at 1024 px: 64x64 = 4096 tokens; 224-px pos embed with class slot; rel-pos tables per block."""
    bb = create_backbone("vitdet-b-coco-1024")
    assert bb.grid() == (64, 64) and bb.num_tokens() == 4096 and bb.embed_dim == 768
    sd = bb.state_dict()
    assert sd["pos_embed"].shape == (1, 197, 768)
    glob = [i for i in range(12) if sd[f"blocks.{i}.attn.rel_pos_h"].shape == (127, 64)]
    assert glob == [2, 5, 8, 11]  # global attention over the 64x64 grid; the rest use 14x14 windows (27 = 2*14-1)
    assert all(sd[f"blocks.{i}.attn.rel_pos_w"].shape == (27, 64) for i in range(12) if i not in glob)
    assert [bb.blocks[i].window_size for i in range(12)] == [0 if i in glob else 14 for i in range(12)]
    assert bb.data_config.resize == "shrink-and-pad"


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_detectron2_checkpoint_roundtrip(tmp_path, suffix):
    """A detectron2 file (``{"model": {"backbone.net.*": ...}}``, pyramid and heads beside) loads strictly."""
    src = create_backbone("vitdet-test").eval()
    sd = _detectron2_state_dict(src)
    src.load_state_dict({k.removeprefix("backbone.net."): v for k, v in sd.items() if k.startswith("backbone.net.")})
    path = tmp_path / f"model_final{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd, "iteration": 90000}, path)
    else:  # detectron2's own format: a pickle of numpy arrays
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "test"}, f)
    dst = create_backbone("vitdet-test").eval()
    report = dst.load_official(path)
    assert report.missing == () and report.unexpected == () and report.path == str(path)
    assert report.renamed == sum(k.startswith("backbone.net.") for k in sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_pkl_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": print}}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        create_backbone("vitdet-test").load_official(path)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    sd = _detectron2_state_dict(create_backbone("vitdet-test"))
    del sd["backbone.net.blocks.1.attn.rel_pos_h"]
    sd["backbone.net.blocks.1.attn.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.attn\.rel_pos_h") as e:
        create_backbone("vitdet-test").load_official(path)
    assert "blocks.1.attn.extra" in str(e.value)


def test_windowed_blocks_are_local_and_global_blocks_are_not():
    """A windowed block leaves other windows untouched by a change in one token; a global block spreads it."""
    torch.manual_seed(0)
    bb = create_backbone("vitdet-test").eval()
    x = torch.randn(1, 4, 4, 32)
    y = x.clone()
    y[0, 0, 0] += torch.randn(32)  # a token in the top-left 3x3 window (not a constant: LayerNorm would remove it)
    with torch.no_grad():
        local = (bb.blocks[0](y) - bb.blocks[0](x)).abs().sum(-1)[0]  # (4, 4)
        glob = (bb.blocks[2](y) - bb.blocks[2](x)).abs().sum(-1)[0]
    assert local[:3, :3].sum() > 0 and local[3:, :].sum() == 0 and local[:, 3:].sum() == 0
    assert (glob > 1e-4).all()


def test_relative_position_bias_is_used():
    bb = create_backbone("vitdet-test").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = bb(x)
        bb.blocks[2].attn.rel_pos_w.normal_()
        assert not torch.allclose(bb(x), before)


def test_non_square_input_and_attention_capture():
    from toolkit.interpret.attention import capture_attention, place_on_grid

    bb = create_backbone("vitdet-test", img_size=(24, 40)).eval()
    assert bb.grid() == (3, 5)
    with capture_attention(bb) as store, torch.no_grad():
        tokens = bb(torch.randn(1, 3, 24, 40))
    assert tokens.shape == (1, 15, 32)
    placed = place_on_grid(store, bb.grid())
    assert list(placed.layers) == ["blocks.2.attn"]  # the global block; windowed ones are skipped with a reason
    assert set(placed.skipped) == {"blocks.0.attn", "blocks.1.attn"}


def test_fused_and_plain_attention_agree():
    bb = create_backbone("vitdet-test").eval()
    for blk in bb.blocks:
        blk.attn.rel_pos_h.data.normal_()
        blk.attn.rel_pos_w.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = bb(x)
        for blk in bb.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(bb(x), fused, atol=1e-5)
