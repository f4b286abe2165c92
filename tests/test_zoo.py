"""The zoo table (params, FLOPs, tokens), the `vlmtk zoo` command and the backbone throughput benchmark's functions."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from toolkit.registry import create_backbone, list_backbones
from toolkit.zoo import count_flops, format_zoo, scan_flops, zoo_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def test_rows() -> dict[str, dict]:
    return {r["id"]: r for r in zoo_table(list_backbones(tag="test"))}


def test_rows_have_positive_params_flops_and_the_backbones_token_counts(test_rows):
    assert set(test_rows) == set(list_backbones(tag="test"))
    for name, row in test_rows.items():
        bb = create_backbone(name)
        assert row["tokens"] == bb.num_tokens() == bb.num_tokens(bb.data_config.img_size)
        h, w = bb.grid()
        assert row["grid"] == f"{h}x{w}" and row["dim"] == bb.embed_dim
        assert row["_params"] == sum(p.numel() for p in bb.parameters()) > 0
        assert 0 < row["_params_tap"] <= row["_params"]
        assert row["_macs"] > 0 and row["GFLOPs"] > 0


def test_scan_formula_is_vmambas():
    # MzeroMiko/VMamba flops_selective_scan_fn: 9*B*L*D*N, + B*D*L with D
    assert scan_flops(2, 10, 3, 4) == 9 * 2 * 10 * 3 * 4 + 2 * 3 * 10
    assert scan_flops(2, 10, 3, 4, with_d=False) == 9 * 2 * 10 * 3 * 4


def test_vmamba_scan_flops_are_added_exactly():
    """vmamba-test: 32 px, v2 stem (stride 4) -> 8x8, dims 8/16/32, one block per stage, ssm_ratio 1 (d_inner = dim),
    d_state 2, tap after stage 3. SS2D counts D = 4 * d_inner, with the D skip term:
    stage 1: 9*64*32*2 + 32*64 = 38912; stage 2: 9*16*64*2 + 64*16 = 19456; stage 3: 9*4*128*2 + 128*4 = 9728."""
    by_hand = 38912 + 19456 + 9728
    assert by_hand == 68096
    model = create_backbone("vmamba-test").eval()
    x = torch.zeros(1, 3, 32, 32)
    with_scans, without = count_flops(model, x), count_flops(model, x, scans=False)
    assert with_scans["scan_calls"] == 3 and with_scans["scan"] == by_hand
    assert with_scans["total"] - without["total"] == by_hand
    assert without["total"] == without["counter"] == with_scans["counter"] > 0
    # batch scales the scan term linearly; meta and real tensors count the same
    assert count_flops(model, torch.zeros(3, 3, 32, 32))["scan"] == 3 * by_hand
    assert count_flops(model.to("meta"), x.to("meta")) == with_scans


def test_mambavision_selective_scan_is_counted(test_rows):
    """mambavision-test: stage 3 at 2x2 in one 2x2 window, one mixer: d_model 32 -> scan on D = 16 channels,
    N = 4, L = 4: 9*4*16*4 + 16*4 = 2368. Its attention block is counted by FlopCounterMode (SDPA on meta)."""
    row = test_rows["mambavision-test"]
    assert row["_macs_scan"] == 2368 and row["_scan_calls"] == 1
    assert test_rows["vit-test"]["_macs_scan"] == 0


def test_cpu_attention_is_counted_like_meta():
    """On real CPU tensors SDPA runs the CPU flash kernel, which FlopCounterMode does not know; the zoo maps it."""
    model = create_backbone("vit-test").eval()
    x = torch.zeros(1, 3, 32, 32)
    assert count_flops(model, x) == count_flops(model.to("meta"), x.to("meta"))


def test_format_names_the_convention(test_rows):
    text = format_zoo(list(test_rows.values()))
    assert "1 multiply-add = 1 FLOP" in text and "vmamba-test" in text and "_macs" not in text


def test_cli_zoo_prints_the_table(capsys):
    from toolkit.cli import main

    main(["zoo", "--names", "vit-test,vmamba-test"])
    out = capsys.readouterr().out
    assert "vit-test" in out and "vmamba-test" in out and "GFLOPs" in out and "tokens" in out


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_backbones", ROOT / "benchmarks" / "bench_backbones.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_functions_run_one_tiny_step():
    bench = _bench_module()
    rows = bench.measure(["vit-test", "vmamba-test"], batch=2, steps=1, warmup=0)
    assert [r["backbone"] for r in rows] == ["vit-test", "vmamba-test"]
    for r in rows:
        assert r["N"] == 1 and r["infer_img_s"] > 0 and r["train_img_s"] > 0 and r["input"] == "32x32"
    assert rows[0]["infer_x"] == rows[0]["train_x"] == 1.0
    b = bench.Bench("mambavision-test", 2, "cpu", "fp32", None)  # a train step changes the weights (AdamW ran)
    before = [p.detach().clone() for p in b.model.parameters()]
    b.train_step()
    assert any(not torch.equal(p0, p) for p0, p in zip(before, b.model.parameters()))


def test_bench_main_prints_a_table(capsys):
    out = _bench_module().main(["--names", "vit-test,maxvit-test", "--batch", "2", "--steps", "1", "--warmup", "0",
                                "--img-size", "0", "--quiet"])
    assert [r["backbone"] for r in out["rows"]] == ["vit-test", "maxvit-test"]
    printed = capsys.readouterr().out
    assert "maxvit-test" in printed and "N = 1" in printed and "infer_img_s" in printed
    assert _bench_module().embedded_names()[0] == "vit-scene-128"


def test_bench_official_vmamba_needs_its_models_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _bench_module().main(["--official-vmamba", str(tmp_path), "--names", "vit-test", "--quiet"])
    assert "no vmamba.py there" in capsys.readouterr().err
