"""Core pieces: box format, registry contract, connector layouts, the VLM's sequence assembly, persistence, resume."""
from __future__ import annotations

import pytest
import torch

from toolkit.boxes import box_iou, format_box, parse_box
from toolkit.connector import MLPConnector, connector_depth
from toolkit.registry import create_backbone, list_backbones


@pytest.mark.parametrize("text,expected", [
    ("[0.12, 0.30, 0.56, 0.78]", (0.12, 0.30, 0.56, 0.78)),
    ("The box is [0, 0, 1, 1].", (0.0, 0.0, 1.0, 1.0)),
    ("[ 0.12 , 0.30 , 0.56 , 0.78 ]", (0.12, 0.30, 0.56, 0.78)),
])
def test_parse_box_valid(text, expected):
    assert parse_box(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", [
    "", "a red square", "[0.1, 0.2, 0.3]", "[0.1, 0.2, 0.3, 1.5]", "[0.5, 0.5, 0.1, 0.9]",
    "[__import__('os').system('true'), 0, 1, 1]", "[nan, 0, 1, 1]", "[True, 0, 1, 1]", "[0.1, 0.2, 0.3, 0.4",
    "[" * 5000, None,
])
def test_parse_box_invalid_is_none_never_raises(text):
    assert parse_box(text) is None


@pytest.mark.parametrize("text", ["[0.50, 0.50, 0.50, 0.90]", "[0.10, 0.40, 0.30, 0.40]", "[0, 0, 0, 0]"])
def test_zero_area_box_is_invalid_unless_allowed(text):
    assert parse_box(text) is None
    assert parse_box(text, allow_empty=True) is not None


def test_format_box_roundtrip_and_iou():
    assert format_box((0.1234, 0.5, 1.2, -0.1)) == "[0.12, 0.50, 1.00, 0.00]"
    assert parse_box(format_box((0.1, 0.2, 0.3, 0.4))) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert box_iou(a, a) == pytest.approx(1.0)
    assert box_iou(a, torch.tensor([1.0, 1.0, 3.0, 3.0])) == pytest.approx(1 / 7)


TEST_BACKBONES = list_backbones(tag="test")


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_registry_contract_forward_backward(name):
    bb = create_backbone(name)
    h, w = bb.data_config.img_size
    x = torch.randn(2, 3, h, w, requires_grad=True)
    tokens = bb(x)
    gh, gw = bb.grid()
    assert tokens.shape == (2, gh * gw, bb.embed_dim)
    assert torch.isfinite(tokens).all()
    pooled = bb.forward_pooled(x)
    assert pooled.shape == (2, bb.num_features)
    (tokens.square().mean() + pooled.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_backbone_names_registry():
    with pytest.raises(KeyError, match="list_backbones"):
        create_backbone("no-such-backbone")


@pytest.mark.parametrize("name,n_linear", [("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3),
                                           ("no-align+fused-gelu-mlp", 3)])
def test_connector_layouts(name, n_linear):
    c = MLPConnector(name, 16, 24)
    assert sum(isinstance(m, torch.nn.Linear) for m in c.projector) == n_linear
    assert c(torch.randn(2, 5, 16)).shape == (2, 5, 24)
    keys = set(c.state_dict())
    assert {"projector.0.weight", f"projector.{2 * (n_linear - 1)}.weight"} <= keys  # Prismatic's key layout


def test_connector_rejects_unknown():
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        connector_depth("mlp7x_relu")
