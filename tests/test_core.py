"""Core pieces: box format, connector layouts, the VLM's sequence assembly, persistence, resume."""
from __future__ import annotations

import pytest
import torch

from toolkit.boxes import box_iou, format_box, parse_box
from toolkit.connector import MLPConnector, connector_depth


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


def _fit_tiny(state_path):
    """A small regression through fit_minibatches; its loss draws noise from the sampler generator and dropout from
    the global RNG, so a resume must restore both (and the epoch's order) to reach the same weights."""
    import torch.nn.functional as F

    from toolkit.train.common import fit_minibatches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)

    def batch_loss(idx):
        return F.mse_loss(model(x[idx]), x[idx].sum(1, keepdim=True) + 0.1 * torch.randn(len(idx), 1, generator=gen))

    steps, _, losses = fit_minibatches(list(model.parameters()), batch_loss, 20, 4, 3, 1e-2, 0.0, 2, gen, "tiny",
                                       state_path=state_path, modules=[model], checkpoint_every=4)
    assert steps == 15 and len(losses) == 15
    return model, losses


def test_fit_minibatches_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from toolkit.train import common

    ref, ref_losses = _fit_tiny(tmp_path / "straight.state.pt")
    assert not (tmp_path / "straight.state.pt").exists()

    real_save, calls = common.save_train_state, {"n": 0}

    def crash_after_second_save(path, **state):
        real_save(path, **state)
        calls["n"] += 1
        if calls["n"] == 2:  # step 8: mid-way through the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_train_state", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(tmp_path / "resumed.state.pt")
    assert common.load_train_state(tmp_path / "resumed.state.pt")["step"] == 8
    monkeypatch.setattr(common, "save_train_state", real_save)
    resumed, losses = _fit_tiny(tmp_path / "resumed.state.pt")
    assert not (tmp_path / "resumed.state.pt").exists()
    assert losses == pytest.approx(ref_losses)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_loss_curve_keeps_block_means_at_their_last_step():
    from toolkit.train.common import loss_curve

    assert loss_curve([4.0, 2.0, 3.0, 1.0, 0.5], points=2) == [[2, 3.0], [4, 2.0], [5, 0.5]]
    assert len(loss_curve([1.0] * 250)) == 125 and loss_curve([]) == []
