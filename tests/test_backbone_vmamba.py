"""VMamba: official key layout (v2 and v0), legacy names, dense (mmdet/mmseg) files, taps, timm registration."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import scan_kernels_available
from toolkit.backbones import CheckpointMismatchError
from toolkit.registry import create_backbone

_FIXTURE_NAME = "official_vmamba_keys.json"
FIXTURE = next((p for p in (Path(__file__).parent / "fixtures" / _FIXTURE_NAME,
                            Path("/work/shared/fixtures") / _FIXTURE_NAME) if p.is_file()), None)
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason=f"{_FIXTURE_NAME} not found under tests/fixtures/")
needs_scan = pytest.mark.skipif(not scan_kernels_available(), reason="toolkit_kernels.ss2d_scan_fn is not built")

# our registered config -> the official model whose keys and shapes it must match
OFFICIAL = {"vmamba-t-in1k-224-s3": "vmamba_tiny_s1l8", "vmamba-s-in1k-224-s3": "vmamba_small_s2l15",
            "vmamba-b-in1k-224-s3": "vmamba_base_s2l15", "vmamba-v0-t-in1k-224-s3": "vanilla_vmamba_tiny"}
HEAD = ("classifier.head.weight", "classifier.head.bias")


def _official_shapes(name: str) -> dict[str, list[int]]:
    return json.loads(FIXTURE.read_text())[name]


def _random_official(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes; small so every layer stays in a numerically tame range."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in _official_shapes(name).items()}


def _legacy(key: str) -> str:
    """The older checkpoints' names that the official loader renames (the inverse of our convert_state_dict)."""
    for new, old in (("patch_embed.0.", "patch_embed.proj."), ("patch_embed.2.", "patch_embed.norm."),
                     ("classifier.norm.", "norm."), ("classifier.head.", "head.")):
        if key.startswith(new):
            return old + key[len(new):]
    old = {"norm": "ln_1", "op": "self_attention"}
    return re.sub(r"^(layers\.\d+\.blocks\.\d+\.)(norm|op)\.", lambda m: f"{m[1]}{old[m[2]]}.", key)


@needs_fixture
@pytest.mark.parametrize("ours,official", OFFICIAL.items())
def test_config_matches_official_keys_and_shapes(ours, official):
    shapes = {k: list(v.shape) for k, v in create_backbone(ours).state_dict().items()}
    expected = {k: s for k, s in _official_shapes(official).items() if k not in HEAD}
    assert shapes == expected


@needs_fixture
@pytest.mark.parametrize("ours,official", OFFICIAL.items())
def test_official_file_loads_strictly(tmp_path, ours, official):
    sd = _random_official(official)
    path = tmp_path / f"{official}.pth"
    torch.save({"model": sd, "epoch": 300}, path)
    bb = create_backbone(ours)
    report = bb.load_official(path)
    assert report.missing == () and report.unexpected == () and report.renamed == 0
    own = bb.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k not in HEAD)


@needs_fixture
def test_legacy_names_are_renamed(tmp_path):
    sd = _random_official("vanilla_vmamba_tiny")
    legacy = {_legacy(k): v for k, v in sd.items()}
    n_legacy = sum(_legacy(k) != k for k in sd)  # every key but the downsamples'
    path = tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth"
    torch.save({"model": legacy}, path)
    bb = create_backbone("vmamba-v0-t-in1k-224-s3")
    report = bb.load_official(path)
    assert report.renamed == n_legacy and report.missing == () and report.unexpected == ()
    assert all(torch.equal(bb.state_dict()[k], v) for k, v in sd.items() if k not in HEAD)


def _dense_file(bb, seed: int = 0) -> dict[str, torch.Tensor]:
    """An mmdet/mmseg checkpoint for dense backbone ``bb``: ``backbone.*`` (outnorm0-3 included) plus neck and heads."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"backbone.{k}": 0.1 * torch.randn(v.shape, generator=g) for k, v in bb.state_dict().items()}
    sd.update({"neck.lateral_convs.0.conv.weight": torch.randn(256, 96, 1, 1),
               "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3),
               "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 1024),
               "decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1),
               "auxiliary_head.conv_seg.weight": torch.randn(150, 256, 1, 1)})
    return sd


@needs_fixture
@pytest.mark.parametrize("name", ["vmamba-s-coco-1333x800", "vmamba-s-ade20k-512"])
def test_dense_paper_configs_have_the_mmdet_backbone_layout(name):
    """Backbone_VSSM in mmdet/mmseg: the classification model without ``classifier``, plus ``outnorm0..3``."""
    shapes = {k: list(v.shape) for k, v in create_backbone(name).state_dict().items()}
    expected = {k: s for k, s in _official_shapes("vmamba_small_s2l15").items() if not k.startswith("classifier.")}
    for i, c in enumerate((96, 192, 384, 768)):
        expected.update({f"outnorm{i}.weight": [c], f"outnorm{i}.bias": [c]})
    assert shapes == expected


@pytest.mark.parametrize("nesting", ["state_dict", "model"])
def test_dense_checkpoint_loads_after_stripping_backbone(tmp_path, nesting):
    bb = create_backbone("vmamba-dense-test")
    sd = _dense_file(bb)
    path = tmp_path / "mask_rcnn_vssm_fpn_coco_small_epoch_12.pth"
    torch.save({nesting: sd, "meta": {"epoch": 12, "mmdet_version": "3.3.0"}}, path)
    report = bb.load_official(path)
    n_backbone = sum(k.startswith("backbone.") for k in sd)
    assert report.missing == () and report.unexpected == () and report.renamed == n_backbone
    assert torch.equal(bb.outnorm2.bias, sd["backbone.outnorm2.bias"])


def test_classification_file_does_not_fit_a_dense_config(tmp_path):
    cls_sd = {k: v for k, v in create_backbone("vmamba-test").state_dict().items()}
    path = tmp_path / "cls.pth"
    torch.save({"model": cls_sd}, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): outnorm0\.bias") as e:
        create_backbone("vmamba-dense-test").load_official(path)
    assert "classifier.norm.weight" in str(e.value)


@pytest.mark.parametrize("name,img_size,grid", [
    ("vmamba-s-coco-1333x800", (800, 1344), (50, 84)),  # mmdet's pad to a multiple of 32 gives the same grid
    ("vmamba-v0-t-in1k-224-s3", (800, 1333), (50, 84)),  # v0: floor in the k4/s4 stem, ceil in patch merging
])
def test_grids(name, img_size, grid):
    assert create_backbone(name).grid(img_size) == grid


def test_dense_paper_configs_preprocess_like_the_release():
    coco, ade = create_backbone("vmamba-s-coco-1333x800"), create_backbone("vmamba-s-ade20k-512")
    assert coco.data_config.img_size == (800, 1333) and ade.data_config.img_size == (512, 512)
    assert coco.data_config.resize == ade.data_config.resize == "shrink-and-pad"
    assert coco.num_tokens() == 4200 == 50 * 84  # the paper's 4150 is (800 // 16) * (1333 // 16), see toolkit.paper


# ---- forward passes (need the scan kernel) ----------------------------------------------------------------------

def _selective_scan(u, delta, a, b, c, d):
    """Plain S6 recurrence for one batch of sequences: u, delta (B, D, L); a (D, N); b, c (B, N, L); d (D,)."""
    h = torch.zeros(u.shape[0], u.shape[1], a.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * a) * h + (delta[..., t] * u[..., t])[..., None] * b[:, None, :, t]
        ys.append((h * c[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + u * d[:, None]


def _ss2d_v0_reference(op, x):
    """The official v0 SS2D written out channel-last: in_proj -> (x, z) -> dwconv -> SiLU -> 4 scans -> merge ->
    out_norm -> * SiLU(z) -> out_proj. ``x (B, H, W, C)``."""
    bsz, hgt, wid, _ = x.shape
    xz = F.linear(x, op.in_proj.weight)
    xs, z = xz.chunk(2, dim=-1)
    u = F.silu(op.conv2d(xs.permute(0, 3, 1, 2)))  # (B, D, H, W)
    seqs = [u.flatten(2), u.transpose(2, 3).flatten(2)]
    seqs += [s.flip(-1) for s in seqs]  # row-major, column-major, both reversed
    k, dd, n = 4, op.d_inner, op.d_state
    ys = []
    for i, s in enumerate(seqs):
        dbl = torch.einsum("bdl,cd->bcl", s, op.x_proj_weight[i])
        dts, bs, cs = dbl.split([op.dt_rank, n, n], dim=1)
        delta = F.softplus(torch.einsum("brl,dr->bdl", dts, op.dt_projs_weight[i]) + op.dt_projs_bias[i][:, None])
        a = -torch.exp(op.A_logs.view(k, dd, n)[i])
        ys.append(_selective_scan(s, delta, a, bs, cs, op.Ds.view(k, dd)[i]))
    y = ys[0] + ys[2].flip(-1)
    y = y + (ys[1] + ys[3].flip(-1)).view(bsz, dd, wid, hgt).transpose(2, 3).flatten(2)
    y = F.layer_norm(y.transpose(1, 2), (dd,), op.out_norm.weight, op.out_norm.bias, op.out_norm.eps)
    return F.linear(y * F.silu(z.reshape(bsz, -1, dd)), op.out_proj.weight).view(bsz, hgt, wid, -1)


@needs_scan
def test_v0_ss2d_matches_the_official_formulation():
    torch.manual_seed(0)
    op = create_backbone("vmamba-v0-test").layers[1].blocks[0].op.eval()
    for p in (op.conv2d.bias, op.out_norm.weight, op.out_norm.bias):
        p.data.normal_()  # non-trivial values, so a misplaced bias, norm or gate would show
    x = torch.randn(2, 16, 3, 5)  # (B, C, H, W), non-square
    with torch.no_grad():
        ours = op(x)
        ref = _ss2d_v0_reference(op, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-4)


@needs_scan
@needs_fixture
@pytest.mark.parametrize("ours,official", [("vmamba-s-in1k-224-s3", "vmamba_small_s2l15"),
                                           ("vmamba-v0-t-in1k-224-s3", "vanilla_vmamba_tiny")])
def test_official_file_reproduces_tokens_after_round_trip(tmp_path, ours, official):
    """Load an official file, save our weights back in the official layout, load them again: identical tokens."""
    first, second = create_backbone(ours).eval(), create_backbone(ours).eval()
    torch.save({"model": _random_official(official)}, tmp_path / "a.pth")
    first.load_official(tmp_path / "a.pth")
    torch.save({"model": first.state_dict()}, tmp_path / "b.pth")
    second.load_official(tmp_path / "b.pth")
    x = torch.randn(1, 3, 64, 96)  # small and non-square: the scan is sequential on the CPU
    with torch.no_grad():
        tokens = first(x)
        assert tokens.shape == (1, 4 * 6, 384) and torch.isfinite(tokens).all()
        assert torch.equal(second(x), tokens)


@needs_scan
@pytest.mark.parametrize("name", ["vmamba-test", "vmamba-v0-test", "vmamba-dense-test"])
@pytest.mark.parametrize("img_size", [(37, 53), (30, 18)])
def test_tokens_match_grid_at_any_size(name, img_size):
    bb = create_backbone(name).eval()
    with torch.no_grad():
        tokens = bb(torch.randn(2, 3, *img_size))
    assert tokens.shape == (2, bb.num_tokens(img_size), bb.embed_dim) and torch.isfinite(tokens).all()


@needs_scan
def test_tap_norms():
    """Classification taps: LayerNorm without affine (the release's untrained outnorm); dense: the trained outnorm."""
    with torch.no_grad():
        plain = create_backbone("vmamba-v0-test").eval()(torch.randn(2, 3, 32, 32))  # (B, N, C)
        assert torch.allclose(plain.mean(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(plain.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
        dense, x = create_backbone("vmamba-dense-test").eval(), torch.randn(1, 3, 48, 32)
        before = dense(x)
        dense.outnorm2.bias.fill_(3.0)
        assert torch.allclose(dense(x) - before, torch.full_like(before, 3.0), atol=1e-5)


# ---- timm registration --------------------------------------------------------------------------------------------

@needs_fixture
@pytest.mark.parametrize("official", ["vmamba_small_s2l15", "vanilla_vmamba_tiny"])
def test_timm_create_model_with_official_checkpoint(tmp_path, official):
    import timm

    import toolkit.timm_compat  # noqa: F401  (registers the official names)

    sd = _random_official(official)
    path = tmp_path / f"{official}.pth"
    torch.save({"model": sd, "epoch": 300}, path)
    model = timm.create_model(official, pretrained=False, checkpoint_path=str(path))
    own = model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], v) for k, v in sd.items())
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.get_classifier().out_features == 1000
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {_legacy(k): v for k, v in sd.items()}}, legacy)  # strict load still passes
    own = timm.create_model(official, checkpoint_path=str(legacy)).state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())


@needs_fixture
def test_timm_prefers_ema_weights_our_loader_takes_model(tmp_path):
    """timm's load_checkpoint takes ``model_ema`` before ``model``; ``load_official`` takes ``model``."""
    import timm

    import toolkit.timm_compat  # noqa: F401

    sd, ema = _random_official("vmamba_tiny_s1l8", 0), _random_official("vmamba_tiny_s1l8", 1)
    path = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    torch.save({"model": sd, "model_ema": ema}, path)
    key = "layers.2.blocks.0.op.A_logs"
    assert torch.equal(timm.create_model("vmamba_tiny_s1l8", checkpoint_path=str(path)).state_dict()[key], ema[key])
    bb = create_backbone("vmamba-t-in1k-224-s3")
    bb.load_official(path)
    assert torch.equal(bb.state_dict()[key], sd[key])


def test_timm_refuses_downloads():
    import timm

    import toolkit.timm_compat  # noqa: F401

    with pytest.raises(ValueError, match="checkpoint_path"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True)
