"""Contracts of the registries: every registered entry of EDGE_DETECTORS, PRIORS, DATASETS and BACKBONES
builds and behaves as its stage expects, and the shared `Registry` class itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distseg.core.registry import DuplicateNameError, Registry, UnknownNameError
from distseg.data import DATASETS, open_dataset
from distseg.data.synthetic import make_scene
from distseg.grouping.edges import EDGE_DETECTORS, EdgeMap, create_edge_detector, edge_detector_from_config
from distseg.grouping.priors import PRIORS, Mask, PriorOutput, create_prior
from distseg.models.backbones import BACKBONES, Backbone

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTSEG_DATA_ROOT", REPO.parent / "shared" / "data"))
# entries that cannot be built here, and why (each must still fail with a message saying what to supply)
NEEDS_A_FILE = {
    "sed": "OpenCV's structured-edge model file (model.yml.gz) is the user's to supply; it cannot be downloaded here"
}
PRIOR_NEEDS_A_FILE = {"vit_masks": "ViT weights (DINO) are the user's to supply; tests/test_distill_masks.py runs it"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A small natural image: a BSDS500 photo (80 x 120) when the real data is here, else a synthetic scene."""
    photos = sorted((SHARED_DATA / "bsds500" / "images" / "test").glob("*.jpg"))
    if photos:
        bgr = cv2.imread(str(photos[0]), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(cv2.resize(bgr, (120, 80), interpolation=cv2.INTER_AREA)[:, :, ::-1])
    return make_scene(0, 96, seed=0, split="train").image


@pytest.fixture(scope="module")
def prior_config():
    from distseg.config import load_config

    return load_config("demo", ["edges.detector=gradient"])


# ---------------------------------------------------------------- the Registry class


def test_registry_register_get_list_meta_build():
    reg: Registry = Registry("widget")

    @reg.register("b", size=2)
    def make_b(x, scale=1):
        return ("b", x, scale)

    reg.register("a", dict)
    assert reg.get("b") is make_b and reg["b"] is make_b  # the decorator returns the object unchanged
    assert reg.list() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2 and "a" in reg
    assert reg.meta("b") == {"size": 2} and reg.params("b") is None
    assert reg.build("b", 3, scale=5) == ("b", 3, 5)  # positional and keyword arguments reach the factory
    assert reg.build("a", k=1) == {"k": 1}
    reg.unregister("a")
    assert reg.list() == ["b"]


def test_registry_refuses_a_duplicate_name():
    reg: Registry = Registry("widget")
    reg.register("x", int)
    reg.register("x", int)  # the same object again (a module imported twice) is harmless
    with pytest.raises(DuplicateNameError, match="widget 'x' is already registered"):
        reg.register("x", float)
    assert reg.get("x") is int
    with pytest.raises(TypeError):
        reg.register("", int)


def test_unknown_name_lists_the_known_names_and_is_key_and_value_error():
    reg: Registry = Registry("widget", hint="or plugin:<name>")
    reg.register("beta", int)
    reg.register("alpha", int)
    with pytest.raises(UnknownNameError) as err:
        reg.get("gamma")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert str(err.value) == "unknown widget 'gamma' (known: alpha, beta, or plugin:<name>)"  # not quoted
    for style in (KeyError, ValueError):
        with pytest.raises(style, match="known: alpha, beta"):
            reg.build("gamma")
        with pytest.raises(style, match="gamma"):
            reg.meta("gamma")
    assert "known: none" in str(pytest.raises(UnknownNameError, Registry("empty").get, "x").value)


# ---------------------------------------------------------------- edge detectors


@pytest.mark.parametrize("name", EDGE_DETECTORS.list())
def test_edge_detector_contract(name, image):
    from distseg.config import EdgesConfig

    takes = EDGE_DETECTORS.meta(name).get("takes", ())
    assert set(takes) <= set(EdgesConfig.model_fields), f"{name} takes keys EdgesConfig lacks: {takes}"
    if name in NEEDS_A_FILE:
        with pytest.raises(FileNotFoundError, match="edges.weights"):
            edge_detector_from_config(EdgesConfig(detector=name))
        pytest.skip(f"edge detector {name!r}: {NEEDS_A_FILE[name]}")
    for detector in (create_edge_detector(name), edge_detector_from_config(EdgesConfig(detector=name))):
        edges = detector(image)
        assert isinstance(edges, EdgeMap)
        assert edges.strength.shape == edges.orientation.shape == image.shape[:2]
        assert np.isfinite(edges.strength).all() and 0 <= edges.strength.min() and edges.strength.max() <= 1
        assert edges.strength.max() > 0  # a natural image has edges
        assert 0 <= edges.orientation.min() and edges.orientation.max() < np.pi + 1e-5
        assert edges.thinned().shape == image.shape[:2]


# ---------------------------------------------------------------- priors


@pytest.mark.parametrize("name", PRIORS.list())
def test_prior_contract(name, image, prior_config):
    yields = PRIORS.meta(name).get("yields")
    assert yields in ("regions", "masks")
    params = PRIORS.params(name)
    if params is not None:  # its settings are the config section priors.<name>
        assert isinstance(getattr(prior_config.priors, name), params)
    if name in PRIOR_NEEDS_A_FILE:
        with pytest.raises(FileNotFoundError, match=f"priors.{name}"):
            create_prior(name, prior_config)
        pytest.skip(f"prior {name!r}: {PRIOR_NEEDS_A_FILE[name]}")
    out = create_prior(name, prior_config)(image)
    assert isinstance(out, PriorOutput)
    if yields == "regions":
        assert out.regions is not None and out.regions.shape == image.shape[:2] and out.regions.dtype == np.uint8
        k = int(out.regions.max()) + 1
        assert set(np.unique(out.regions)) == set(range(k))  # consecutive ids
        if out.region_dist is not None:
            assert out.region_dist.shape == (k, k) and np.allclose(out.region_dist, out.region_dist.T)
        if out.ucm is not None:
            assert out.ucm.shape == image.shape[:2] and 0 <= out.ucm.min() and out.ucm.max() <= 1
        assert out.masks == []
    else:
        assert out.regions is None and isinstance(out.masks, list)
        for m in out.masks:
            assert isinstance(m, Mask) and m.mask.shape == image.shape[:2] and m.mask.dtype == bool
            assert 0 <= m.score <= 1


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", BACKBONES.list())
def test_backbone_contract(name):
    torch.manual_seed(0)
    net = BACKBONES.build(name, weights=None)  # random init: no download
    assert isinstance(net, Backbone)
    with torch.inference_mode():
        res3, res4 = net.eval()(torch.zeros(1, 3, 64, 64))
    assert res3.shape == (1, net.channels[0], 8, 8)  # stride 8
    assert res4.shape == (1, net.channels[1], 4, 4)  # stride 16


def test_unknown_backbone_mentions_timm():
    with pytest.raises(KeyError, match=r"resnet18.*or timm:<model name>"):
        BACKBONES.get("resnet7")


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", DATASETS.list())
def test_dataset_registration_says_where_its_files_are(name, tmp_path, monkeypatch):
    meta = DATASETS.meta(name)
    where = [key for key in ("default_dir", "builtin", "path_arg") if meta.get(key)]
    assert len(where) == 1, f"data source {name!r} needs exactly one of default_dir, builtin, path_arg: {meta}"
    monkeypatch.setenv("DISTSEG_DATA_ROOT", str(tmp_path))
    if meta.get("default_dir"):
        assert isinstance(meta["default_dir"], str) and meta["default_dir"]
        with pytest.raises(FileNotFoundError, match=str(tmp_path / meta["default_dir"])):
            open_dataset(name)  # looks under the data root / default_dir
    elif meta.get("builtin"):
        assert len(open_dataset(name, num_images=1, image_size=32, seed=0)) == 1
    else:
        cv2.imwrite(str(tmp_path / "one.png"), np.zeros((8, 8, 3), np.uint8))
        if meta.get("splits"):  # a labelled layout (labeled, voc, coco): a bare image folder is none, and says so
            with pytest.raises(FileNotFoundError, match=str(tmp_path)):
                open_dataset(f"{name}:{tmp_path}")
        else:
            assert len(open_dataset(f"{name}:{tmp_path}")) == 1
        with pytest.raises(ValueError, match=f"{name}:PATH"):
            open_dataset(name)


def test_unknown_data_source_lists_every_reader():
    with pytest.raises(ValueError) as err:
        open_dataset("pascal")
    for name in DATASETS:
        assert name in str(err.value)


# ---------------------------------------------------------------- import graph


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distseg"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("distseg"))
    return names


def test_grouping_and_shards_import_graph_has_no_cycle():
    modules = {"distseg.shards": REPO / "distseg" / "shards.py"}
    for path in (REPO / "distseg" / "grouping").glob("*.py"):
        modules["distseg.grouping" if path.stem == "__init__" else f"distseg.grouping.{path.stem}"] = path
    graph = {name: _top_level_imports(path) & set(modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join(stack + (name,))}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, stack + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())
    assert not {"distseg.grouping.edgenet"} & graph["distseg.grouping.edges"]


def test_shards_import_no_priors_higra_torch_or_config():
    heavy = ["higra", "torch", "distseg.config", "distseg.grouping.priors", "distseg.grouping.hierarchy"]
    code = f"import sys, distseg.shards; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
