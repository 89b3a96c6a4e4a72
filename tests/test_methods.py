"""Methods as units: every registered method passes one contract (iterating the registry), and a toy
method defined in one module plus one YAML (tests/plugins) trains through `distseg pretrain`'s code
path on a real local Ray cluster, with a real sqlite MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distseg.cluster import shutdown_ray
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


@pytest.fixture
def toy_plugin():
    yield PLUGINS / "toy.yaml"
    METHODS.unregister("toy")
    for module in [m for m in sys.modules if m.startswith("distseg_plugin_toy_method")]:
        del sys.modules[module]
    shutdown_ray()


def test_toy_method_plugin_trains_through_the_pretrain_path(toy_plugin, tmp_path):
    """One module + one YAML: the config gains `losses.toy`, the Ray workers import the plugin, and the
    run leaves a checkpoint and the method's own metric in MLflow."""
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri
    from distseg.train.pretrain import pretrain

    tiny = [
        "data.num_images=8",
        "data.image_size=48",
        "mine.max_side=48",
        "hierarchy.max_regions=8",
        "edges.detector=gradient",
        "pretrain.batch_size=2",
        "pretrain.crop=32",
        "pretrain.steps=2",
        "pretrain.log_every=1",
        "pretrain.checkpoint_every=2",
        "pretrain.num_workers=1",
        "ray.num_cpus=3",
    ]
    cfg = load_config(toy_plugin, [f"workdir={tmp_path}", "name=toy", *SMALL, *tiny])
    assert cfg.pretrain.method == "toy" and cfg.losses.toy.weight == 2.0
    assert Path(cfg.plugins[0]).is_absolute()  # the workers run elsewhere
    result = pretrain(cfg)
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["step"] == 2 and meta["mlflow_run_id"] == result.run_id and meta["config_hash"]
    saved = load_config(result.checkpoint / "config.yaml")
    assert saved.pretrain.method == "toy" and saved.losses.toy.weight == 2.0
    history = MlflowClient(tracking_uri(cfg.workdir)).get_metric_history(result.run_id, "toy_agreement")
    assert sorted(m.step for m in history) == [1, 2]
    assert all(-1 <= m.value <= 1 for m in history)
