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
