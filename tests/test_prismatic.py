"""The study's release: Prismatic run directories open as our VLM, and backbone weights load from either kind of file.

Tiny release run directories are written in exactly the release's layout: ``config.json`` with the model fields under
"model", ``checkpoints/latest-checkpoint.pt`` = {"model": {"projector": ..., "llm_backbone": {"llm." + key: ...}}},
a local LLM directory (a 1-layer Llama + tokenizer, save_pretrained) and the vision backbone's official file (a shrunk
``in1k-vit-s`` in timm's key names).
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import scene_image
from toolkit.backbones import CheckpointMismatchError
from toolkit.checkpoints import save_safetensors
from toolkit.cli import main as vlmtk
from toolkit.connector import PRISMATIC_ARCH, MLPConnector
from toolkit.llm import LMConfig, train_tokenizer
from toolkit.paper import HALF, PAPER_CONFIGS, RELEASE_BACKBONES, registry_name_for_release
from toolkit.prismatic import load_prismatic
from toolkit.registry import create_backbone
from toolkit.vlm import VLM, VLMConfig, load_backbone_weights

TEXTS = ["the red square", "the small blue star to the left of the yellow circle", "How many red objects?"]
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)  # in1k-vit-s shrunk, timm's key names
LLM_WIDTH = 32
TINY_LM = LMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)  # a fresh LM, for VLM.build
ARCHS = {"gelu-mlp": "no-align+gelu-mlp", "fused-gelu-mlp": "no-align+fused-gelu-mlp", "linear": "linear"}
# the release's vision backbone ids, in the order of PAPER_CONFIGS
RELEASE_IDS = ["in1k-vit-s", "in1k-224px-maxvit-t-s3", "mambavision-b-s3", "vmamba-small-s2l15", "vitdet-b-maskrcnn",
               "vmamba-small-s2l15-det-maskrcnn-1x", "vit-adapter-upernet-deit-b-ade20k-512",
               "vmamba-small-s2l15-seg-ade20k"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300)


def _llama(tokenizer, seed: int, hidden: int = LLM_WIDTH) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tokenizer):
    """The local "LLM directory": a 1-layer Llama (untied head, as Vicuna) and its tokenizer."""
    d = tmp_path_factory.mktemp("vicuna-tiny")
    _llama(tokenizer, seed=1).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _timm_file(bb, path):
    """``bb``'s weights as timm's file holds them: no ``model.`` prefix, plus a 1000-class head."""
    sd = {k.removeprefix("model."): v.clone() for k, v in bb.state_dict().items()}
    sd.update({"head.weight": torch.randn(1000, bb.num_features), "head.bias": torch.randn(1000)})
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def vision_weights(tmp_path_factory):
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    _timm_file(create_backbone("vit-s-in1k-224", **VIT), path)
    return path


def _projector(arch: str, vis: int = VIT["embed_dim"], seed: int = 3) -> dict[str, torch.Tensor]:
    """A projector state dict in the release's key names (a linear one is ``projector.{weight,bias}``)."""
    torch.manual_seed(seed)
    sd = MLPConnector(PRISMATIC_ARCH[arch], vis, LLM_WIDTH).state_dict()
    if PRISMATIC_ARCH[arch] == "mlp1x_gelu":
        sd = {k.replace("projector.0.", "projector."): v for k, v in sd.items()}
    return sd


def _write_run(run, tokenizer, arch="no-align+gelu-mlp", vocab_rows=None, **model_fields):
    """A release run directory; returns the projector and llm_backbone state dicts it holds."""
    model = dict(model_id="vit-s-in1k-224", vision_backbone_id="in1k-vit-s", llm_backbone_id="vicuna-v15-7b",
                 arch_specifier=arch, image_resize_strategy="letterbox", llm_max_length=2048)
    model.update(model_fields)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"model": model, "stage": "finetune", "seed": 7}))
    lm = _llama(tokenizer, seed=4)  # other weights than the LLM directory's: the checkpoint's must win
    if vocab_rows:
        lm.resize_token_embeddings(vocab_rows)
    projector = _projector(arch)
    llm = {f"llm.{k}": v.clone() for k, v in lm.state_dict().items()}
    (run / "checkpoints").mkdir(exist_ok=True)
    torch.save({"model": {"projector": projector, "llm_backbone": llm}}, run / "checkpoints" / "latest-checkpoint.pt")
    return projector, llm


def _answers(vlm):
    images = [scene_image(), scene_image((30, 40)).rotate(90)]
    return vlm.answer(images, ["the red square", "How many red objects?"], max_new_tokens=6)


@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_release_run_loads_and_survives_save_and_load(tmp_path, tokenizer, llm_dir, vision_weights, arch):
    projector, llm = _write_run(tmp_path / "release", tokenizer, arch)
    vlm = load_prismatic(tmp_path / "release", llm_dir, vision_weights, backbone_overrides=VIT)

    cfg = vlm.cfg
    assert (cfg.backbone, cfg.connector, cfg.image_resize_strategy) == ("vit-s-in1k-224", PRISMATIC_ARCH[arch],
                                                                         "letterbox")
    assert cfg.lm == LMConfig(name_or_path=str(llm_dir), template="vicuna_v11")
    assert cfg.backbone_weights == str(vision_weights.resolve())
    assert cfg.box_frame == "original"  # LLaVA's RefCOCO boxes are normalised by the original image size
    assert vlm.template.name == "vicuna_v11" and vlm.resize == PAPER_CONFIGS["vit-s-in1k-224"].resize
    assert tuple(vlm.backbone.data_config.mean) == tuple(vlm.backbone.data_config.std) == HALF  # augreg ViT-S
    linear = PRISMATIC_ARCH[arch] == "mlp1x_gelu"
    for k, v in vlm.connector.state_dict().items():
        assert torch.equal(v, projector[k.replace("projector.0.", "projector.") if linear else k]), k
    for k, v in vlm.lm.state_dict().items():
        assert torch.equal(v, llm[f"llm.{k}"]), k
    official = load_file(str(vision_weights))
    assert all(torch.equal(v, official[k.removeprefix("model.")]) for k, v in vlm.backbone.state_dict().items())

    answers = _answers(vlm)
    vlm.save(tmp_path / "ours")
    again = VLM.load(tmp_path / "ours").eval()
    assert again.cfg.to_dict() == json.loads(json.dumps(cfg.to_dict()))
    for (k, a), b in zip(vlm.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert _answers(again) == answers


def test_padded_vocabulary_gets_the_release_pad_token(tmp_path, tokenizer, llm_dir, vision_weights):
    """Prismatic's LLaMa-2 backbone adds <PAD> and pads the embeddings to a multiple of 64: the file's row count."""
    rows = -(-(len(tokenizer) + 1) // 64) * 64
    _, llm = _write_run(tmp_path / "release", tokenizer, vocab_rows=rows)
    vlm = VLM.from_prismatic(tmp_path / "release", llm_dir, vision_weights, backbone_overrides=VIT)
    assert vlm.tokenizer.pad_token == "<PAD>" and len(vlm.tokenizer) == len(tokenizer) + 1
    assert vlm.lm.get_input_embeddings().weight.shape[0] == rows
    assert torch.equal(vlm.lm.lm_head.weight, llm["llm.lm_head.weight"])
    answers = _answers(vlm)
    vlm.save(tmp_path / "ours")
    assert _answers(VLM.load(tmp_path / "ours").eval()) == answers


def _set(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _ckpt(run, fn):
    path = run / "checkpoints" / "latest-checkpoint.pt"
    obj = torch.load(path, weights_only=True)
    fn(obj)
    torch.save(obj, path)


def _other_llm(tokenizer):
    return {f"llm.{k}": v for k, v in _llama(tokenizer, seed=5, hidden=48).state_dict().items()}


# name: (change to the run dir / call, exception, message pattern)
BAD = {
    "no config.json": (lambda c: (c.run / "config.json").unlink(), FileNotFoundError,
                       r"config\.json not found: .* is not a release run directory"),
    "config not JSON": (lambda c: (c.run / "config.json").write_text("{model"), ValueError, r"is not valid JSON"),
    "no model block": (lambda c: _set(c.run / "config.json", lambda o: o.update(o.pop("model")))
                       , ValueError, r'config\.json has no "model" block'),
    "no arch_specifier": (lambda c: _set(c.run / "config.json", lambda o: o["model"].pop("arch_specifier")),
                          ValueError, r'the "model" block has no `arch_specifier`'),
    "no vision_backbone_id": (lambda c: _set(c.run / "config.json", lambda o: o["model"].pop("vision_backbone_id")),
                              ValueError, r"has no `vision_backbone_id`"),
    "unknown backbone": (lambda c: _set(c.run / "config.json",
                                        lambda o: o["model"].update(vision_backbone_id="in22k-vit-x")),
                         ValueError, r"unknown vision_backbone_id `in22k-vit-x`: the release's are in1k-vit-s, "
                                     r".*vmamba-small-s2l15-seg-ade20k"),
    "unknown arch": (lambda c: _set(c.run / "config.json", lambda o: o["model"].update(arch_specifier="qformer")),
                     ValueError, r"unknown arch_specifier `qformer`; known: no-align\+gelu-mlp"),
    "unknown resize": (lambda c: _set(c.run / "config.json",
                                      lambda o: o["model"].update(image_resize_strategy="squash")),
                       ValueError, r"unknown image_resize_strategy `squash`; known: letterbox"),
    "other LLM": (lambda c: _set(c.run / "config.json", lambda o: o["model"].update(llm_backbone_id="llama2-7b-pure")),
                  ValueError, r"llm_backbone_id `llama2-7b-pure` is not supported"),
    "VMamba tap on a ViT": (lambda c: _set(c.run / "config.json", lambda o: o.update(vmamba_feature_stage=2)),
                            ValueError, r"VMamba feature taps .* non-VMamba backbone `in1k-vit-s`"),
    "no checkpoint": (lambda c: (c.ckpt).unlink(), FileNotFoundError,
                      r"latest-checkpoint\.pt not found: a release run directory holds its weights in"),
    "truncated checkpoint": (lambda c: c.ckpt.write_bytes(c.ckpt.read_bytes()[:200]), ValueError,
                             r"cannot read checkpoint .*latest-checkpoint\.pt safely \(weights_only=True\)"),
    "unsafe checkpoint": (lambda c: torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, c.ckpt), ValueError,
                          r"cannot read checkpoint .*latest-checkpoint\.pt safely"),
    "no model dict": (lambda c: _ckpt(c.run, lambda o: o.update(weights=o.pop("model"))), ValueError,
                      r'holds no "model" dict \(top-level keys: \[\'weights\'\]\)'),
    "no projector": (lambda c: _ckpt(c.run, lambda o: o["model"].pop("projector")), ValueError,
                     r'"model" holds no "projector" state dict \(it holds: \[\'llm_backbone\'\]\)'),
    "no llm_backbone": (lambda c: _ckpt(c.run, lambda o: o["model"].pop("llm_backbone")), ValueError,
                        r'"model" holds no "llm_backbone" state dict'),
    "projector width": (lambda c: _ckpt(c.run, lambda o: o["model"].update(projector=_projector(
                            "no-align+gelu-mlp", vis=64))), ValueError,
                        r"projector does not fit arch_specifier `no-align\+gelu-mlp`: 1 shape mismatch key\(s\): "
                        r"projector\.0\.weight: file \(32, 64\) vs model \(32, 48\)"),
    "projector key missing": (lambda c: _ckpt(c.run, lambda o: o["model"]["projector"].pop("projector.2.bias")),
                              ValueError, r"1 missing key\(s\): projector\.2\.bias"),
    "3-layer file, 2-layer arch": (lambda c: _ckpt(c.run, lambda o: o["model"].update(projector=_projector(
                                       "no-align+fused-gelu-mlp"))), ValueError,
                                   r"2 unexpected key\(s\): projector\.4\.weight, projector\.4\.bias"),
    "LLM key missing": (lambda c: _ckpt(c.run, lambda o: o["model"]["llm_backbone"].pop("llm.model.norm.weight")),
                        ValueError, r"llm_backbone does not fit the LLM in .*: 1 missing key\(s\): "
                                    r"llm\.model\.norm\.weight"),
    "LLM keys without llm. prefix": (lambda c: _ckpt(c.run, lambda o: o["model"].update(llm_backbone={
                                         k[4:]: v for k, v in o["model"]["llm_backbone"].items()})), ValueError,
                                     r"missing key\(s\): llm\.model\.embed_tokens\.weight.*unexpected key\(s\): "
                                     r"model\.embed_tokens\.weight"),
    "LLM width": (lambda c: _ckpt(c.run, lambda o: o["model"].update(llm_backbone=_other_llm(c.tokenizer))),
                  ValueError, r"shape mismatch key\(s\): llm\.model\.embed_tokens\.weight: file \(\d+, 48\) vs "
                              r"model \(\d+, 32\)"),
    "no LLM directory": (lambda c: c.call.update(llm=c.run / "vicuna-7b-v1.5"), FileNotFoundError,
                         r"LLM directory not found locally: .*vicuna-7b-v1\.5"),
    "no vision weights": (lambda c: c.call.update(vision_weights=c.run / "vit.safetensors"), FileNotFoundError,
                          r"backbone weights not found: .*vit\.safetensors"),
    "vision weights of another depth": (lambda c: c.call.update(backbone_overrides={**VIT, "depth": 3}),
                                        CheckpointMismatchError, r"missing key\(s\): model\.blocks\.2\."),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_release_input_names_the_problem(tmp_path, tokenizer, llm_dir, vision_weights, case):
    change, exc, pattern = BAD[case]
    run = tmp_path / "release"
    _write_run(run, tokenizer)
    ctx = argparse.Namespace(run=run, ckpt=run / "checkpoints" / "latest-checkpoint.pt", tokenizer=tokenizer,
                             call=dict(llm=llm_dir, vision_weights=vision_weights, backbone_overrides=VIT))
    change(ctx)
    with pytest.raises(exc, match=pattern) as err:
        load_prismatic(run, **ctx.call)
    assert "\n" not in str(err.value) or exc is CheckpointMismatchError  # one line, but for the key list


def test_release_ids_map_to_the_eight_configurations():
    assert list(RELEASE_BACKBONES) == RELEASE_IDS
    assert list(RELEASE_BACKBONES.values()) == list(PAPER_CONFIGS)
    assert registry_name_for_release("vmamba-small-s2l15-seg-ade20k") == "vmamba-s-ade20k-512"
    with pytest.raises(ValueError, match=r"unknown vision_backbone_id `vit-h`: the release's are in1k-vit-s, "):
        registry_name_for_release("vit-h")


@pytest.mark.parametrize("cid", list(PAPER_CONFIGS))
def test_release_letterbox_is_each_registered_backbones_own_resize(cid):
    """"letterbox" in a release config means the backbone's own transform: the registered data config already uses
    it at the release's input size; only ViT-S normalises otherwise (the release's augreg: 0.5), which
    load_prismatic overrides."""
    with torch.device("meta"):
        dc = create_backbone(cid).data_config
    c = PAPER_CONFIGS[cid]
    assert (tuple(dc.img_size), dc.resize) == (c.input_hw, c.resize)
    assert ((tuple(dc.mean), tuple(dc.std)) == (c.mean, c.std)) == (cid != "vit-s-in1k-224")


def test_vlmtk_models_lists_the_eight_release_models(capsys):
    vlmtk(["models"])
    out = capsys.readouterr().out
    for cid, c in PAPER_CONFIGS.items():
        line = next(row for row in out.splitlines() if row.startswith(cid + " "))
        for field in (c.family, c.release_backbone_id, "vicuna-v15-7b", "mlp2x_gelu", str(c.tokens),
                      f"{c.vqa:.2f}", f"{c.loc:.2f}", f"{c.overall:.2f}", f"{c.input_hw[1]}x{c.input_hw[0]}"):
            assert field in line.split(), (cid, field)


# -- backbone weights: the toolkit's own file or an official one, at build and at load ----------------------------

def test_build_takes_an_official_timm_safetensors(tmp_path, tokenizer):
    torch.manual_seed(6)
    sd = _timm_file(create_backbone("vit-test"), tmp_path / "model.safetensors")
    vlm = VLM.build(VLMConfig(backbone="vit-test", lm=TINY_LM, backbone_weights=str(tmp_path / "model.safetensors")),
                    tokenizer)
    for k, v in vlm.backbone.state_dict().items():
        assert torch.equal(v, sd[k.removeprefix("model.")]), k
    vlm.save(tmp_path / "vlm")
    again = VLM.load(tmp_path / "vlm")
    assert all(torch.equal(a, b) for a, b in zip(vlm.backbone.state_dict().values(),
                                                 again.backbone.state_dict().values()))


def test_vlm_on_an_official_vmamba_pth_saves_and_reloads(tmp_path, tokenizer):
    torch.manual_seed(7)
    bb = create_backbone("vmamba-test")
    sd = {k: torch.randn_like(v) for k, v in bb.state_dict().items()}  # our names are VMamba's official ones
    head = {"classifier.head.weight": torch.randn(1000, bb.num_features), "classifier.head.bias": torch.randn(1000)}
    torch.save({"model": {**sd, **head}, "epoch": 300}, tmp_path / "vssm_test_ckpt_epoch_300.pth")
    cfg = VLMConfig(backbone="vmamba-test", lm=TINY_LM, backbone_weights=str(tmp_path / "vssm_test_ckpt_epoch_300.pth"))
    VLM.build(cfg, tokenizer).save(tmp_path / "vlm")
    again = VLM.load(tmp_path / "vlm")
    for k, v in again.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_weights_that_fit_neither_layout_name_the_keys(tmp_path):
    bb = create_backbone("vit-test")
    own = bb.state_dict()
    ours = tmp_path / "ours.safetensors"
    save_safetensors({k: v for k, v in own.items() if k != "model.blocks.0.norm1.weight"}, ours)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)against ours: .*1 missing key\(s\): model\.blocks\.0\."):
        load_backbone_weights(bb, ours)
    official = {k.removeprefix("model."): v for k, v in own.items() if k != "model.cls_token"}
    save_file(official, str(tmp_path / "timm.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)against the official one: .*key\(s\): model\.cls_token"):
        load_backbone_weights(bb, tmp_path / "timm.safetensors")
