"""The study's eight configurations: the paper's numbers pinned, and every registered one reproduces its tokens."""
from __future__ import annotations

import pytest

from toolkit.paper import PAPER_CONFIGS, paper_table
from toolkit.registry import backbone_entry, list_backbones

# id: (visual tokens, weighted VQA, weighted Loc, weighted overall), as the paper and its release list them
PAPER = {
    "vit-s-in1k-224": (196, 57.25, 17.82, 51.95),
    "maxvit-t-in1k-224-s3": (196, 58.75, 15.79, 52.98),
    "mambavision-b-in1k-224-s3": (196, 56.53, 31.17, 53.12),
    "vmamba-s-in1k-224-s3": (196, 62.39, 39.17, 59.27),
    "vitdet-b-coco-1024": (4096, 63.00, 43.74, 60.42),
    "vmamba-s-coco-1333x800": (4150, 62.78, 47.94, 60.78),
    "vit-adapter-deit-b-ade20k-512": (1024, 60.69, 33.77, 57.07),
    "vmamba-s-ade20k-512": (1024, 63.21, 44.98, 60.76),
}


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    return {row["id"]: row for row in paper_table()}


def test_the_eight_configurations_and_their_scores():
    assert list(PAPER_CONFIGS) == list(PAPER)
    for cid, (tokens, vqa, loc, overall) in PAPER.items():
        c = PAPER_CONFIGS[cid]
        assert (c.tokens, c.vqa, c.loc, c.overall) == (tokens, vqa, loc, overall)
        assert c.tokens == (c.input_hw[0] // 16) * (c.input_hw[1] // 16)  # every tap is at stride 16


@pytest.mark.parametrize("cid", list(PAPER))
def test_registered_config_reproduces_the_token_count(table, cid):
    row, c = table[cid], PAPER_CONFIGS[cid]
    if cid not in list_backbones():
        assert row["tokens_built"] == "not built"
        pytest.skip(f"`{cid}` has no registered backbone")
    assert row["tokens_built"] == (c.tokens_built or c.tokens)
    assert row["tokens_paper"] == c.tokens


def test_families_are_the_registry_families():
    """Tables and figures group by these strings: one spelling per family, the registry's."""
    for cid, c in PAPER_CONFIGS.items():
        if cid in list_backbones():
            assert c.family == backbone_entry(cid).family, cid


def test_the_one_nominal_count_is_explained(table):
    """The release lists 4150 = 50 x 83 for VMamba-S at 1333x800; its padded stride-2 convs give 84 columns."""
    c = PAPER_CONFIGS["vmamba-s-coco-1333x800"]
    assert c.tokens == (800 // 16) * (1333 // 16) and c.tokens_built == 50 * -(-1333 // 16)
    assert [cid for cid, cfg in PAPER_CONFIGS.items() if cfg.tokens_built is not None] == ["vmamba-s-coco-1333x800"]


@pytest.mark.parametrize("cid", ["vmamba-s-in1k-224-s3", "vitdet-b-coco-1024", "vmamba-s-coco-1333x800",
                                 "vmamba-s-ade20k-512"])
def test_vmamba_and_vitdet_configs_preprocess_like_the_release(table, cid):
    assert table[cid]["preprocessing_matches"] is True


def test_table_rows_carry_the_paper_and_the_build(table):
    row = table["vmamba-s-in1k-224-s3"]
    assert row["input"] == "224x224" and row["resize"] == "letterbox" and row["params_paper_m"] == 50
    assert row["params_built_m"] == pytest.approx(49.4, abs=0.1)  # the release's 50M includes the 1000-class head
    assert table["vmamba-s-coco-1333x800"]["input"] == "1333x800"
