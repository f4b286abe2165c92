"""MaxViT family: timm-format checkpoints, attention hooks, the paper's 196-token tap against timm."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from toolkit.backbones import CheckpointMismatchError
from toolkit.registry import create_backbone


def _timm_state_dict(bb) -> dict[str, torch.Tensor]:
    """What a timm MaxViT file holds for ``bb``: the wrapped model's keys plus a 1000-class head."""
    sd = {k.removeprefix("model."): v.clone() for k, v in bb.state_dict().items()}
    sd["head.fc.weight"] = torch.randn(1000, bb.num_features)
    sd["head.fc.bias"] = torch.randn(1000)
    return sd


def test_timm_checkpoint_roundtrip(tmp_path):
    """A timm-layout file (head included) loads strictly and reproduces tokens and timm's pre-logits features."""
    src, dst = create_backbone("maxvit-test").eval(), create_backbone("maxvit-test").eval()
    path = tmp_path / "model.safetensors"
    save_file(_timm_state_dict(src), str(path))
    report = dst.load_official(path)
    assert report.missing == () and report.unexpected == ()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        pooled = dst.forward_pooled(x)
        assert torch.equal(pooled, src.forward_pooled(x))
        assert torch.equal(pooled, src.model.forward_head(src.model.forward_features(x), pre_logits=True))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    sd = _timm_state_dict(create_backbone("maxvit-test"))
    del sd["stem.conv1.weight"]
    sd["stages.9.bogus"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"model\.stem\.conv1\.weight") as err:
        create_backbone("maxvit-test").load_official(path)
    assert "model.stages.9.bogus" in str(err.value)


def test_attention_modules_are_block_and_grid_attention_up_to_the_tap():
    bb = create_backbone("maxvit-test").eval()
    names = [n for n, _ in bb.attention_modules()]
    assert names == [f"stages.{i}.blocks.0.attn_{kind}.attn" for i in range(3) for kind in ("block", "grid")]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, o.shape))) for n, m in bb.attention_modules()]
    with torch.no_grad():
        bb(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert [n for n, _ in seen] == names
    # stage 3 (4x4 map, window/grid 2): 4 partitions of 2x2 tokens x 32 channels, channels last
    assert seen[-1][1] == (4, 2, 2, 32)


def _layouts_per_block(bb, img_size):
    """``attention_layouts`` as it was computed before it shared layouts: one partition per block and kind."""
    from timm.models.maxxvit import grid_partition, window_partition

    out = {}
    for i in range(bb.cfg.tap_stage + 1):
        h, w = bb._stage_grid(i, img_size)
        ids = torch.arange(h * w).view(1, h, w, 1)
        for j, blk in enumerate(bb.model.stages[i].blocks):
            for kind, part in (("attn_block", blk.attn_block), ("attn_grid", blk.attn_grid)):
                p = tuple(part.partition_size)
                if not (h % p[0] or w % p[1]):
                    fn = window_partition if part.partition_block else grid_partition
                    out[f"stages.{i}.blocks.{j}.{kind}.attn"] = ((h, w), fn(ids, p).reshape(-1, p[0] * p[1]))
    return out


@pytest.mark.parametrize("img_size", [None, (48, 48)])  # at 48 px stage 3's 3x3 grid has no 2x2 partition
def test_attention_layouts_are_computed_once_per_stage_and_kind(img_size):
    bb = create_backbone("maxvit-test", depths=(2, 3, 2, 1))
    layouts, want = bb.attention_layouts(img_size), _layouts_per_block(bb, img_size)
    assert list(layouts) == list(want) and len(want) == 2 * (2 + 3 + (2 if img_size is None else 0))
    for name, (grid, index) in want.items():
        assert layouts[name].grid == grid and torch.equal(layouts[name].index, index)
    for name, lay in layouts.items():  # every block of a stage holds its stage's one layout of that kind
        stage, kind = name.split(".")[1], name.split(".")[-2]
        assert lay is layouts[f"stages.{stage}.blocks.0.{kind}.attn"]
    assert layouts["stages.0.blocks.0.attn_block.attn"] is not layouts["stages.0.blocks.0.attn_grid.attn"]


def test_maxvit_t_matches_timm_at_224(tmp_path):
    """MaxViT-T stage 3 is timm's ``stages.2`` (stride 16): 14x14 = 196 tokens; a timm file loads and reproduces it."""
    ref = timm.create_model("maxvit_tiny_tf_224", pretrained=False).eval()
    info = {f["module"]: f for f in ref.feature_info}
    assert info["stages.2"]["reduction"] == 16 and info["stages.2"]["num_chs"] == 256
    bb = create_backbone("maxvit-t-in1k-224-s3").eval()
    assert bb.grid() == (14, 14) and bb.num_tokens() == 196
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    assert bb.load_official(tmp_path / "model.safetensors").unexpected == ()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = bb(x)
        (want,) = ref.forward_intermediates(x, indices=[3], stop_early=True, intermediates_only=True)
    assert tokens.shape == (1, 196, 256)
    torch.testing.assert_close(tokens, want.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
