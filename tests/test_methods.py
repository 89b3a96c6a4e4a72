"""Methods as units: every registered method passes one contract (iterating the registry), and a toy
method defined in one module plus one YAML (tests/plugins) is loaded as a plugin (its training through
`distseg pretrain` on a real local Ray cluster is a phase of tests/test_pretrain.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distseg.config import ConfigError, load_config
from distseg.methods import METHODS, Views, create_method

PLUGINS = Path(__file__).parent / "plugins"
SMALL = [
    "model.backbone=resnet18",
    "model.head_channels=16",
    "model.embed_dim=8",
    "losses.concepts.num_concepts=16",
    "losses.maskcontrast.queue_size=8",
]


def tiny_views(batch: int = 2, size: int = 48, masks: bool = False) -> Views:
    torch.manual_seed(0)
    cols = (torch.arange(size) * 3 // size).expand(batch, size, size).clone()  # 3 stripes
    seg = (cols == 1).long() if masks else cols
    dist = torch.full((batch, 4, 4), 0.9)
    dist[:, 0, 1] = dist[:, 1, 0] = 0.3
    return Views(
        images=torch.randn(2 * batch, 3, size, size),
        seg1=seg,
        seg2=seg.flip(-1),
        dist=dist,
        image_ids=torch.arange(batch),
    )


@pytest.mark.parametrize("name", METHODS.list())
def test_every_method_trains_a_step_and_round_trips_its_state(name):
    """The contract the generic loop relies on, for each registered method (no list kept by hand)."""
    method_cls = METHODS.get(name)
    cfg = load_config("demo", [*SMALL, f"pretrain.method={name}", f"pretrain.prior={method_cls.default_prior}"])
    method = create_method(cfg)
    assert method.params == getattr(cfg.losses, name)  # its config section is the registered params model
    assert METHODS.params(name) is method_cls.Params and method_cls.prior_yields in ("regions", "masks")
    net, loss = method.build_model(), method.build_loss()
    method.setup(net, loss, torch.device("cpu"))
    params = list(net.parameters()) + [p for p in loss.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    terms = method.forward(net, tiny_views(masks=method_cls.prior_yields == "masks"))
    assert "loss" in terms and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    optimizer.step()
    method.after_step()
    changed = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed, f"{name}: one step changed no weight"
    state = method.extra_state()
    other = create_method(cfg)
    other.setup(method.build_model(), method.build_loss(), torch.device("cpu"))
    other.load_extra_state(state)
    for key, value in state.items():
        for tensor_name, tensor in value.items():
            assert torch.equal(other.extra_state()[key][tensor_name], tensor)


def test_unknown_method_and_wrong_section_key_fail_at_load():
    with pytest.raises(ConfigError, match="pretrain.method: unknown name 'simclr' .*hiergroup"):
        load_config("demo", ["pretrain.method=simclr"])
    with pytest.raises(ConfigError, match=r"losses\.hiergroup.*allowed: sigma_p"):
        load_config("demo", ["losses.hiergroup.sigma=1"])
    with pytest.raises(ConfigError, match="plugins: file not found"):
        load_config("demo", ["plugins=[nowhere/missing.py]"])


def test_a_plugin_method_gets_its_config_section_and_unknown_keys_fail():
    """tests/plugins/toy.yaml names toy_method.py beside it: loading it registers the method and its
    section; its training through `distseg pretrain` runs in tests/test_pretrain.py (one Ray start)."""
    try:
        cfg = load_config(PLUGINS / "toy.yaml")
        assert cfg.pretrain.method == "toy" and cfg.losses.toy.weight == 2.0 and "toy" in METHODS
        assert Path(cfg.plugins[0]) == (PLUGINS / "toy_method.py").resolve()
        with pytest.raises(ConfigError, match=r"losses\.toy.*allowed: weight"):
            load_config(PLUGINS / "toy.yaml", ["losses.toy.wieght=1"])
    finally:  # as if never loaded: the pretrain test loads it again
        METHODS.unregister("toy")
        for module in [m for m in sys.modules if m.startswith("distseg_plugin_toy_method")]:
            del sys.modules[module]
