"""MambaVision family: window padding, official checkpoints, analysis hooks, and equivalence with the
official model code (PyPI ``mambavision==1.2.0``; installed by scripts/install.d/requirements-mambavision.sh)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn

from toolkit.backbones import CheckpointMismatchError
from toolkit.backbones.mambavision import Attention, MambaVisionMixer
from toolkit.registry import create_backbone


def _official_file(bb, tmp_path, nesting: str = "state_dict", prefix: str = ""):
    """Write ``bb``'s weights as the official trainer saves them: nested, with a 1000-class head and metadata."""
    sd = {prefix + k: v.clone() for k, v in bb.state_dict().items()}
    sd[prefix + "head.weight"], sd[prefix + "head.bias"] = torch.randn(1000, bb.num_features), torch.randn(1000)
    path = tmp_path / "mambavision.pth.tar"
    torch.save({nesting: sd, "epoch": 309, "arch": "mamba_vision_T"}, path)
    return path


def test_map_not_a_multiple_of_the_window_is_padded():
    bb = create_backbone("mambavision-test").eval()  # 40 px: a 3x3 map at the tap, window 2
    with torch.no_grad():
        tokens = bb(torch.randn(2, 3, 40, 40))
    assert bb.grid((40, 40)) == (3, 3) and tokens.shape == (2, 9, 32) and torch.isfinite(tokens).all()


@pytest.mark.parametrize("nesting,prefix", [("state_dict", ""), ("model", "module.")])
def test_official_checkpoint_roundtrip(tmp_path, nesting, prefix):
    src, dst = create_backbone("mambavision-test").eval(), create_backbone("mambavision-test").eval()
    report = dst.load_official(_official_file(src, tmp_path, nesting, prefix))
    assert report.missing == () and report.unexpected == ()
    assert report.renamed == (len(src.state_dict()) + 2 if prefix else 0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        assert torch.equal(dst.forward_pooled(x), src.forward_pooled(x))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    bb = create_backbone("mambavision-test")
    path = _official_file(bb, tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["levels.2.blocks.0.mixer.A_log"]
    ckpt["state_dict"]["levels.2.blocks.0.mixer.bogus"] = torch.zeros(1)
    ckpt["state_dict"]["norm.weight"] = torch.ones(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatchError) as err:
        create_backbone("mambavision-test").load_official(path)
    for key in ("levels.2.blocks.0.mixer.A_log", "levels.2.blocks.0.mixer.bogus", "norm.weight"):
        assert key in str(err.value)


def test_scan_and_attention_modules_up_to_the_tap():
    bb = create_backbone("mambavision-test").eval()  # stage 3 = levels.2: one mixer block, then one attention block
    assert [(n, type(m)) for n, m in bb.scan_modules()] == [("levels.2.blocks.0.mixer", MambaVisionMixer)]
    assert [(n, type(m)) for n, m in bb.attention_modules()] == [("levels.2.blocks.1.mixer", Attention)]
    (_, mixer), (_, attn) = next(bb.scan_modules()), next(bb.attention_modules())
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: seen.update({k: i[0].shape})) for k, m in
             (("mixer", mixer), ("attn", attn))]
    with torch.no_grad():
        bb(torch.randn(3, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == {"mixer": (3, 4, 32), "attn": (3, 4, 32)}  # one 2x2 window per image, channels last
    s = mixer.ssm_inputs(torch.randn(3, 4, 32))
    assert s["u"].shape == s["delta"].shape == s["z"].shape == (3, 16, 4)
    assert s["A"].shape == (16, 4) and s["B"].shape == s["C"].shape == (3, 4, 4)
    assert s["D"].shape == s["delta_bias"].shape == (16,)


# -- equivalence with the official model code -------------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    """The official ``mambavision.models.mamba_vision`` module, its scan routed to mamba-ssm's CPU reference."""
    with pytest.MonkeyPatch.context() as mp:
        # mamba-ssm imports its compiled extension at import time; without a CUDA build a placeholder stands in
        # (only the reference scan, plain PyTorch, is used here).
        if importlib.util.find_spec("selective_scan_cuda") is None:
            mp.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its deprecated timm import paths
            pytest.importorskip("mambavision")
            mv = importlib.import_module("mambavision.models.mamba_vision")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        mp.setattr(mv, "selective_scan_fn", selective_scan_ref)
        yield mv


@torch.no_grad()
def _randomize(model: nn.Module) -> None:
    """Move every parameter and BatchNorm statistic off its init so that no path is invisible: the init's small
    linear weights (std 0.02) leave the scan's contribution below the tolerance, the zero dt bias would hide how
    it is applied and layer scales of 1e-5 would hide the mixers. Unit-gain weights keep activations O(1)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("factory,name,official_kw,our_kw,size", [
    # MambaVision-T as released: 224 px, stage 3 is one 14x14 window.
    ("mamba_vision_T", "mambavision-t-in1k-224-s3", {}, {}, 224),
    # A narrow MambaVision-B: layer scale, odd and even depths, windows that need padding in stages 3 and 4.
    ("mamba_vision_B", "mambavision-b-in1k-224-s3",
     dict(dim=16, in_dim=8, depths=[1, 2, 3, 5], window_size=[8, 8, 4, 2]),
     dict(dim=16, in_dim=8, depths=(1, 2, 3, 5), window_size=(4, 2), img_size=96), 96),
])
def test_matches_official_model(official, tmp_path, factory, name, official_kw, our_kw, size):
    """Both models in float64 (both scans keep an fp32 state, as mamba-ssm does): an fp32-only comparison of
    MambaVision-T's O(10) activations leaves no margin under 1e-5, float64 leaves about 30x."""
    torch.manual_seed(0)
    ref = getattr(official, factory)(pretrained=False, **official_kw).eval()
    _randomize(ref)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, path)
    ref.double()
    ours = create_backbone(name, **our_kw).eval().double()
    report = ours.load_official(path)
    assert report.missing == () and report.unexpected == ()

    taps = []  # the official stage 3 output is the input of its downsample
    hook = ref.levels[2].downsample.register_forward_pre_hook(lambda m, args: taps.append(args[0]))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        pooled_ref = ref.forward_features(x)  # (B, C_last): norm -> avg pool, what the head sees
        tokens, pooled = ours(x), ours.forward_pooled(x)
    hook.remove()
    torch.testing.assert_close(tokens, taps[0].flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=1e-5)
