"""The registry contract, once for every registered backbone; adding a backbone exactly as the README says; the
decorator's errors; registration without an import cycle."""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toolkit.backbones
from toolkit import registry
from toolkit.backbones.base import Backbone, DataConfig
from toolkit.backbones.vit import ViTBackbone
from toolkit.registry import backbone_entry, create_backbone, list_backbones, register_backbone

ROOT = Path(__file__).resolve().parents[1]

# name: (token grid (h, w) at the configured input size, token width C). A new backbone gets a line here (README).
GRIDS = {
    "mambavision-b-in1k-224-s3": ((14, 14), 512),
    "mambavision-l-in1k-224-s3": ((14, 14), 784),
    "mambavision-s-in1k-224-s3": ((14, 14), 384),
    "mambavision-scene-128-s3": ((8, 8), 128),
    "mambavision-t-in1k-224-s3": ((14, 14), 320),
    "mambavision-t2-in1k-224-s3": ((14, 14), 320),
    "mambavision-test": ((2, 2), 32),
    "maxvit-scene-128-s3": ((8, 8), 128),
    "maxvit-t-in1k-224-s3": ((14, 14), 256),
    "maxvit-test": ((4, 4), 32),
    "vit-adapter-deit-b-ade20k-512": ((32, 32), 768),
    "vit-adapter-test": ((4, 4), 32),
    "vit-b-in1k-224": ((14, 14), 768),
    "vit-s-in1k-224": ((14, 14), 384),
    "vit-scene-128": ((8, 8), 128),
    "vit-patch-scene-128": ((8, 8), 128),
    "vit-test": ((4, 4), 32),
    "vitdet-b-coco-1024": ((64, 64), 768),
    "vitdet-test": ((4, 4), 32),
    "vmamba-b-in1k-224-s3": ((14, 14), 512),
    "vmamba-dense-test": ((3, 2), 32),
    "vmamba-s-ade20k-512": ((32, 32), 384),
    "vmamba-s-coco-1333x800": ((50, 84), 384),  # 84 = ceil(1333 / 16): padded stride-2 convolutions
    "vmamba-s-in1k-224-s3": ((14, 14), 384),
    "vmamba-scene-128-s3": ((8, 8), 128),
    "vmamba-t-in1k-224-s3": ((14, 14), 384),
    "vmamba-test": ((2, 2), 32),
    "vmamba-v0-t-in1k-224-s3": ((14, 14), 384),
    "vmamba-v0-test": ((2, 2), 32),
}
# Tags small enough to build for real and run forward and backward; the rest are built on the meta device, where a
# forward gives shapes without memory or compute.
RUN = ("test", "embedded")
# The CPU reference scan steps through every position even on meta tensors (7 s and 28 s on one thread): grid only.
NO_META_FORWARD = {"vmamba-s-ade20k-512", "vmamba-s-coco-1333x800"}


def check_contract(name: str, grid: tuple[int, int], dim: int) -> None:
    """What the VLM, the trainers and the analysis rely on, for backbone ``name`` with the expected ``grid``/``dim``."""
    entry = backbone_entry(name)
    assert name == entry.fn.__name__.replace("_", "-") and name.startswith(entry.family + "-")
    assert issubclass(entry.cls, Backbone) and entry.family == entry.cls.family
    real = any(t in entry.tags for t in RUN)
    with torch.device("cpu" if real else "meta"):
        bb = create_backbone(name).eval()
    assert isinstance(bb, entry.cls) and isinstance(bb.data_config, DataConfig)
    assert bb.grid() == bb.grid(bb.data_config.img_size) == grid and bb.num_tokens() == grid[0] * grid[1]
    assert bb.embed_dim == dim
    if not real and name in NO_META_FORWARD:
        return
    x = torch.randn(2, 3, *bb.data_config.img_size, device="cpu" if real else "meta", requires_grad=real)
    tokens, pooled = bb(x), bb.forward_pooled(x)
    assert tokens.shape == (2, grid[0] * grid[1], dim) and pooled.shape == (2, bb.num_features)
    if real:
        assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
        (tokens.square().mean() + pooled.square().mean()).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_every_registered_backbone_has_an_expected_grid():
    missing, stale = set(list_backbones()) - set(GRIDS), set(GRIDS) - set(list_backbones())
    assert not missing, f"add the expected token grid of {sorted(missing)} to GRIDS (README: adding a backbone)"
    assert not stale, f"GRIDS names backbones that are not registered: {sorted(stale)}"


@pytest.mark.parametrize("name", list_backbones())
def test_contract(name):
    if name not in GRIDS:
        pytest.fail(f"`{name}` has no expected grid in GRIDS")
    check_contract(name, *GRIDS[name])


def test_unknown_backbone_names_the_registry():
    with pytest.raises(KeyError, match="list_backbones"):
        create_backbone("no-such-backbone")


# -- adding a backbone as the README says ----------------------------------------------------------------------

def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- readme-example:{marker}\b[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```python block after <!-- readme-example:{marker} -->"
    return m.group(1)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test go to a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(registry, "_BACKBONES", dict(registry._BACKBONES))


def test_adding_a_backbone_as_the_readme_says(tmp_path, monkeypatch, scratch_registry):
    source = _readme_block("backbone-file")
    path = Path(source.splitlines()[0].removeprefix("# ").strip())  # the block names its file
    assert path.parent == Path("toolkit/backbones") and not (ROOT / path).exists()
    (tmp_path / path.name).write_text(source)
    ((name, (grid, dim)),) = ast.literal_eval("{" + _readme_block("grid-entry") + "}").items()
    assert name not in list_backbones()

    # The file goes into a folder of the package's path, as if into toolkit/backbones/, and is found the way the
    # package finds every family: no import line anywhere.
    module = f"toolkit.backbones.{path.stem}"
    monkeypatch.setattr(toolkit.backbones, "__path__", [*toolkit.backbones.__path__, str(tmp_path)])
    importlib.invalidate_caches()
    try:
        assert path.stem in toolkit.backbones.import_families()
        cls = sys.modules[module].PatchConvBackbone
        entry = backbone_entry(name)
        assert entry.cls is cls and entry.family == cls.family == "patchconv"
        assert list_backbones(family=cls.family) == [name] and name in list_backbones(tag="test")
        assert create_backbone(name, img_size=(96, 64)).grid() == (6, 4)
        check_contract(name, grid, dim)
    finally:  # the registry entry goes with scratch_registry; the module must go too, or a rerun would not import it
        sys.modules.pop(module, None)
        if hasattr(toolkit.backbones, path.stem):
            delattr(toolkit.backbones, path.stem)


# -- the decorator's errors ------------------------------------------------------------------------------------

class NoFamilyBackbone(Backbone):  # forgot ``family``
    pass


def test_name_and_family_come_from_the_function_and_its_class(scratch_registry):
    @register_backbone(tags=("demo",))
    def vit_demo_variant(**kw) -> ViTBackbone:
        return None

    entry = backbone_entry("vit-demo-variant")
    assert (entry.fn, entry.cls, entry.family, entry.tags) == (vit_demo_variant, ViTBackbone, "vit", ("demo",))

    @register_backbone
    def vit_bare(**kw) -> ViTBackbone:
        return None

    assert backbone_entry("vit-bare").tags == ()


def test_decorator_errors(scratch_registry):
    before = dict(registry._BACKBONES)
    with pytest.raises(ValueError, match="`vit-test` is registered twice"):
        @register_backbone
        def vit_test(**kw) -> ViTBackbone:
            return None
    with pytest.raises(TypeError, match="needs a return annotation"):
        @register_backbone
        def vit_unannotated(**kw):
            return None
    with pytest.raises(TypeError, match="cannot resolve its return annotation 'LaterBackbone'"):
        @register_backbone
        def vit_forward_ref(**kw) -> LaterBackbone:  # noqa: F821
            return None
    with pytest.raises(TypeError, match="NoFamilyBackbone.*sets no `family`"):
        @register_backbone
        def nofamily_test(**kw) -> NoFamilyBackbone:
            return None
    with pytest.raises(TypeError, match="one Backbone class"):
        @register_backbone
        def vit_optional(**kw) -> ViTBackbone | None:
            return None
    with pytest.raises(TypeError, match="takes no name"):
        register_backbone("vit-named")
    with pytest.raises(TypeError, match="tags must be a tuple"):
        register_backbone(tags="test")
    assert registry._BACKBONES == before


# -- registration without an import cycle ----------------------------------------------------------------------

def test_registry_imports_no_family():
    """registry.py may name the backbones package only for type checkers; the package imports every family."""
    tree = ast.parse((ROOT / "toolkit" / "registry.py").read_text())
    type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in type_checking]
    names = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in imports if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.startswith("toolkit")}, names


def test_importing_only_the_registry_registers_every_family():
    code = "from toolkit.registry import list_backbones; print(' '.join(list_backbones()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == list_backbones()


def test_embedded_vit_has_a_convolutional_stem_on_the_same_grid():
    import torch.nn as nn

    from toolkit.backbones.vit import ViTConfig, ViTBackbone, conv_stem

    conv, patch = create_backbone("vit-scene-128"), create_backbone("vit-patch-scene-128")
    strides = [m.stride for m in conv.model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert strides == [(2, 2)] * 4 + [(1, 1)] and isinstance(patch.model.patch_embed.proj, nn.Conv2d)
    assert conv.grid() == patch.grid() == (8, 8) and conv.embed_dim == patch.embed_dim == 128
    assert conv_stem(8, 64)(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 4, 4)
    with pytest.raises(ValueError, match="power-of-two"):
        conv_stem(14, 64)
    with pytest.raises(ValueError, match="unknown ViT stem"):
        ViTBackbone(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, stem="hybrid"))
