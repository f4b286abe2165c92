"""ViT-Adapter: official mmseg key layout, deformable attention against a brute-force sum, the 1024-token tap."""
from __future__ import annotations

import math

import pytest
import torch

from toolkit.backbones import CheckpointMismatchError
from toolkit.backbones.vit_adapter import MSDeformAttn, ms_deform_attn_sample, reference_points
from toolkit.registry import create_backbone

PAPER_ID = "vit-adapter-deit-b-ade20k-512"


def _official_deit_b_keys() -> set[str]:
    """The state-dict keys of the official ``ViTAdapter`` (czczup/ViT-Adapter, segmentation/mmseg_custom) built with
    ``upernet_deit_adapter_base_512_160k_ade20k.py``: 410 keys, no ``cls_token``, layer scale in every block."""
    wb = ("weight", "bias")
    bn = (*wb, "running_mean", "running_var", "num_batches_tracked")
    deform = [f"attn.{m}.{p}" for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
              for p in wb]
    norms = [f"{n}.{p}" for n in ("query_norm", "feat_norm") for p in wb]
    ffn = [f"{n}.{p}" for n in ("ffn.fc1", "ffn.dwconv.dwconv", "ffn.fc2", "ffn_norm") for p in wb]
    keys = {"pos_embed", "level_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "up.weight", "up.bias"}
    keys |= {f"norm{i}.{p}" for i in range(1, 5) for p in bn}
    keys |= {f"blocks.{j}.{n}.{p}" for j in range(12)
             for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in wb}
    keys |= {f"blocks.{j}.gamma{g}" for j in range(12) for g in (1, 2)}
    keys |= {f"spm.stem.{i}.weight" for i in (0, 3, 6)} | {f"spm.stem.{i}.{p}" for i in (1, 4, 7) for p in bn}
    keys |= {f"spm.conv{i}.0.weight" for i in (2, 3, 4)} | {f"spm.conv{i}.1.{p}" for i in (2, 3, 4) for p in bn}
    keys |= {f"spm.fc{i}.{p}" for i in range(1, 5) for p in wb}
    for i in range(4):
        keys |= {f"interactions.{i}.injector.{k}" for k in (*norms, *deform, "gamma")}
        keys |= {f"interactions.{i}.extractor.{k}" for k in (*norms, *deform, *ffn)}
    keys |= {f"interactions.3.extra_extractors.{e}.{k}" for e in (0, 1) for k in (*norms, *deform, *ffn)}
    return keys


def _mmseg_checkpoint(bb, seed: int = 0) -> dict:
    """What an mmseg UperNet file holds for ``bb``: ``{"meta", "state_dict": {"backbone.*", heads}}``, random values
    small enough that every layer stays tame, BatchNorm statistics as trained ones look."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in bb.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[f"backbone.{k}"] = torch.tensor(160000)
        elif k.endswith("running_var"):
            sd[f"backbone.{k}"] = 0.5 + torch.rand(v.shape, generator=g)
        else:
            sd[f"backbone.{k}"] = 0.1 * torch.randn(v.shape, generator=g)
    sd["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1, generator=g)
    sd["decode_head.psp_modules.0.1.conv.weight"] = torch.randn(512, bb.embed_dim, 1, 1, generator=g)
    sd["decode_head.fpn_bottleneck.bn.running_var"] = torch.rand(512, generator=g)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1, generator=g)
    meta = {"mmseg_version": "0.20.2", "iter": 160000, "CLASSES": ("wall", "building"),
            "PALETTE": [[120, 120, 120], [180, 120, 120]], "config": "model = dict(type='EncoderDecoder')"}
    return {"meta": meta, "state_dict": sd}


# -- the paper's configuration ------------------------------------------------------------------------------------

def test_paper_config_has_the_official_layout_and_1024_tokens():
    """DeiT-B adapter at 512 px, built on the meta device (no memory, no 512-px forward): 32x32 = 1024 tokens,
    exactly the official key set, and its parameter count (99.5M backbone; the 134M of the release adds UperNet)."""
    with torch.device("meta"):
        bb = create_backbone(PAPER_ID)
    assert bb.grid() == (32, 32) and bb.num_tokens((512, 512)) == 1024 and bb.embed_dim == bb.num_features == 768
    dc = bb.data_config
    assert (dc.img_size, dc.resize, dc.mean, dc.std) == ((512, 512), "shrink-and-pad", (0.485, 0.456, 0.406),
                                                         (0.229, 0.224, 0.225))
    sd = bb.state_dict()
    assert set(sd) == _official_deit_b_keys() and len(sd) == 410
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["pos_embed"] == (1, 197, 768)  # DeiT's 14x14 table + class slot, resized at every forward
    assert shapes["level_embed"] == (3, 768)
    assert shapes["spm.stem.0.weight"] == (64, 3, 3, 3) and shapes["spm.fc4.weight"] == (768, 256, 1, 1)
    inj, ext = "interactions.0.injector.attn.", "interactions.3.extra_extractors.1."
    assert shapes[inj + "sampling_offsets.weight"] == (12 * 3 * 4 * 2, 768)  # heads x levels x points x (x, y)
    assert shapes[inj + "attention_weights.weight"] == (12 * 3 * 4, 768)
    assert shapes[inj + "value_proj.weight"] == (384, 768)  # deform_ratio 0.5
    assert shapes[ext + "attn.sampling_offsets.weight"] == (12 * 1 * 4 * 2, 768)
    assert shapes[ext + "ffn.fc1.weight"] == (192, 768) and shapes[ext + "ffn.dwconv.dwconv.weight"] == (192, 1, 3, 3)
    assert shapes["up.weight"] == (768, 768, 2, 2)
    assert sum(p.numel() for p in bb.parameters()) == 99_495_392


# -- shapes, gradients, the tap --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_token_grid_and_shapes(hw):
    bb = create_backbone("vit-adapter-test", img_size=hw).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        tokens, pooled, pyramid = bb(x), bb.forward_pooled(x), bb.forward_pyramid(x)
    h, w = bb.grid()
    assert (h, w) == (hw[0] // 16, hw[1] // 16) and tokens.shape == (2, h * w, 32) and pooled.shape == (2, 32)
    assert [tuple(f.shape[-2:]) for f in pyramid] == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    assert torch.allclose(tokens, pyramid[2].flatten(2).transpose(1, 2), atol=1e-6)  # tap = stride-16 level
    assert torch.allclose(pooled, pyramid[3].mean((2, 3)), atol=1e-6)


def test_inputs_must_be_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        create_backbone("vit-adapter-test")(torch.randn(1, 3, 48, 64))


def test_gradient_reaches_the_input_and_every_module_the_tap_uses():
    """The tap reaches every ViT block and every adapter part except the other pyramid levels' own layers."""
    torch.manual_seed(0)
    bb = create_backbone("vit-adapter-test")
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    bb(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no_grad = {n.rsplit(".", 1)[0] for n, p in bb.named_parameters() if p.grad is None}
    assert no_grad == {"up", "norm1", "norm2", "norm4", "spm.fc1"}
    assert bb.pos_embed.grad[0, 0].abs().sum() == 0  # the class slot is never used


# -- deformable attention against an explicit per-point bilinear sum -----------------------------------------------

def _bilinear_zero_padded(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``img (D, H, W)`` at normalised (x, y) (0 and 1 = outer edges): four neighbours, zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5  # pixel coordinates, pixel centres at integers
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            if 0 <= xi < w and 0 <= yi < h:
                out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[:, yi, xi]
    return out


def _brute_force(value, shapes, locations, weights):
    b, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, lq, m, d, dtype=value.dtype)
    for bi in range(b):
        for q in range(lq):
            for hd in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    img = value[bi, starts[lvl]:starts[lvl + 1], hd].T.reshape(d, h, w)
                    for pt in range(p):
                        x, y = locations[bi, q, hd, lvl, pt].tolist()
                        out[bi, q, hd] += weights[bi, q, hd, lvl, pt] * _bilinear_zero_padded(img, x, y)
    return out.reshape(b, lq, m * d)


def test_deformable_sampling_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    b, m, d, lq, p = 2, 2, 3, 5, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    locations = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    assert ((locations < 0) | (locations > 1)).any()
    weights = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    got = ms_deform_attn_sample(value, shapes, locations, weights)
    assert got.shape == (b, lq, m * d)
    torch.testing.assert_close(got, _brute_force(value, shapes, locations, weights), rtol=1e-10, atol=1e-12)


def test_deformable_attention_module_matches_brute_force():
    """Offsets are in pixels of each level around the reference point; weights are a softmax over levels x points."""
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 3)]
    attn = MSDeformAttn(dim=8, n_levels=2, n_heads=2, n_points=3, ratio=0.5).double()
    with torch.no_grad():
        for lin in (attn.sampling_offsets, attn.attention_weights):
            lin.weight.normal_()
            lin.bias.normal_()
    query = torch.randn(1, 4, 8, dtype=torch.float64)
    feat = torch.randn(1, 16 + 6, 8, dtype=torch.float64)
    ref = reference_points([(2, 2)]).double()  # (1, 4, 1, 2): shared by both levels
    got = attn(query, ref, feat, shapes)

    value = attn.value_proj(feat).view(1, 22, 2, 2)
    offsets = attn.sampling_offsets(query).view(1, 4, 2, 2, 3, 2)
    weights = attn.attention_weights(query).view(1, 4, 2, 6).softmax(-1).view(1, 4, 2, 2, 3)
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(shapes):
        locations[:, :, :, lvl, :, 0] = ref[:, :, None, 0, None, 0] + offsets[:, :, :, lvl, :, 0] / w
        locations[:, :, :, lvl, :, 1] = ref[:, :, None, 0, None, 1] + offsets[:, :, :, lvl, :, 1] / h
    want = attn.output_proj(_brute_force(value, shapes, locations, weights))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_points_are_pixel_centres():
    ref = reference_points([(2, 4), (1, 1)])
    assert ref.shape == (1, 9, 1, 2)
    assert ref[0, :4, 0].tolist() == [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]
    assert ref[0, 8, 0].tolist() == [0.5, 0.5]


# -- checkpoints -----------------------------------------------------------------------------------------------------

def test_mmseg_checkpoint_roundtrip(tmp_path):
    """An mmseg UperNet file (``state_dict`` wrapper, ``backbone.`` prefix, heads beside) loads strictly."""
    src = create_backbone("vit-adapter-test").eval()
    ckpt = _mmseg_checkpoint(src)
    sd = ckpt["state_dict"]
    src.load_state_dict({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
    path = tmp_path / "upernet_deit_adapter_base_512_160k_ade20k.pth"
    torch.save(ckpt, path)
    dst = create_backbone("vit-adapter-test").eval()
    report = dst.load_official(path)
    assert report.missing == () and report.unexpected == () and report.path == str(path)
    assert report.renamed == sum(k.startswith("backbone.") for k in sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x)) and torch.equal(dst.forward_pooled(x), src.forward_pooled(x))
    assert dst.norm3.num_batches_tracked.item() == 160000  # BatchNorm buffers travel too


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    ckpt = _mmseg_checkpoint(create_backbone("vit-adapter-test"))
    sd = ckpt["state_dict"]
    del sd["backbone.interactions.3.extra_extractors.1.ffn.dwconv.dwconv.weight"]
    sd["backbone.spm.stem.1.running_variance"] = sd.pop("backbone.spm.stem.1.running_var")
    sd["backbone.pos_embed"] = torch.zeros(1, 17, 32)  # a 4x4 table where the model holds 2x2
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatchError, match=r"interactions\.3\.extra_extractors\.1\.ffn\.dwconv") as e:
        create_backbone("vit-adapter-test").load_official(path)
    lines = dict(line.strip().split(" key(s): ") for line in str(e.value).splitlines()[1:])
    assert lines == {"2 missing": "interactions.3.extra_extractors.1.ffn.dwconv.dwconv.weight, spm.stem.1.running_var",
                     "1 unexpected": "spm.stem.1.running_variance",  # the UperNet heads are dropped, not listed
                     "1 shape mismatch": "pos_embed: file (1, 17, 32) vs model (1, 5, 32)"}


# -- attention capture -----------------------------------------------------------------------------------------------

def test_attention_capture_and_fused_path_agree():
    from toolkit.interpret.attention import capture_attention, place_on_grid

    torch.manual_seed(0)
    bb = create_backbone("vit-adapter-test", img_size=(64, 96)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fused = bb(x)
        with capture_attention(bb) as store:
            plain = bb(x)
    torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)
    placed = place_on_grid(store, bb.grid())
    assert list(placed.layers) == [f"blocks.{j}.attn" for j in range(4)] and not placed.skipped
    assert placed.layers["blocks.0.attn"].shape == (24, 24)
