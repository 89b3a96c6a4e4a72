"""The hypercolumn embedding network and backbones by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from distseg.checkpoint import load_embedding_model
from distseg.config import ModelConfig, load_config, to_yaml
from distseg.models import create_backbone, create_model


@pytest.mark.parametrize("backbone, c3, c4", [("resnet18", 128, 256), ("resnet50", 512, 1024)])
def test_torchvision_backbones_give_res3_res4(backbone, c3, c4):
    net = create_backbone(backbone)
    assert net.channels == (c3, c4)
    res3, res4 = net(torch.zeros(1, 3, 64, 96))
    assert res3.shape == (1, c3, 8, 12) and res4.shape == (1, c4, 4, 6)


def test_timm_backbone_by_name():
    net = create_backbone("timm:resnet10t")
    res3, res4 = net(torch.zeros(1, 3, 64, 64))
    assert res3.shape[-1] == 8 and res4.shape[-1] == 4
    assert (res3.shape[1], res4.shape[1]) == net.channels


def test_unknown_backbone_lists_known_names():
    with pytest.raises(KeyError, match="resnet18"):
        create_backbone("resnet7")


def test_hypercolumn_shape_and_unit_norm():
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet18", embed_dim=16, head_channels=32)).eval()
    emb = model(torch.randn(2, 3, 96, 128))
    assert emb.shape == (2, 16, 24, 32)  # 1/4 of the input
    norms = emb.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    emb.sum().backward()
    assert model.backbone.body.conv1.weight.grad is not None


def test_hypercolumn_returns_the_decoder_features_on_request():
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet18", embed_dim=16, head_channels=32)).eval()
    x = torch.randn(2, 3, 64, 96)
    emb, feat = model(x, return_features=True)
    # the concatenated Res3 / Res4 projections (2 x head_channels) at the embedding's resolution
    assert model.feature_dim == 64 and feat.shape == (2, 64, 16, 24) and emb.shape == (2, 16, 16, 24)
    assert torch.allclose(emb, F.normalize(model.embed(feat), dim=1), atol=1e-6)  # the embedding head reads them
    assert torch.equal(model(x), emb)  # a plain call still returns the embedding alone


def test_return_features_passes_through_ddp(tmp_path):
    import torch.distributed as dist

    model = create_model(ModelConfig(backbone="resnet18", embed_dim=8, head_channels=16)).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            emb, feat = ddp(x, return_features=True)
            assert feat.shape == (1, 32, 8, 8) and torch.equal(emb, ddp(x))
    finally:
        dist.destroy_process_group()


def test_backbone_weights_from_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    net = create_backbone("resnet18", weights=str(tmp_path / "r18.pt"))
    assert torch.equal(net.body.conv1.weight, reference.conv1.weight)
    torch.save({"conv1.weight": reference.conv1.weight}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt"):
        create_backbone("resnet18", weights=str(tmp_path / "partial.pt"))


def test_load_embedding_model_from_checkpoint_dir(tmp_path):
    cfg = load_config("demo")
    model = create_model(cfg.model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    loaded, loaded_cfg = load_embedding_model(tmp_path)
    assert loaded_cfg.model == cfg.model
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_embedding_model(tmp_path / "nowhere")


def test_init_from_a_checkpoint_copies_every_weight_and_rejects_a_mismatch(tmp_path):
    cfg = load_config("demo")
    source = create_model(cfg.model)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    for where in (tmp_path, tmp_path / "model.pt"):  # the folder or the file
        net = create_model(cfg.model.model_copy(update={"init_from": str(where)}))
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    other = cfg.model.model_copy(update={"embed_dim": cfg.model.embed_dim + 1, "init_from": str(tmp_path)})
    with pytest.raises(ValueError, match="model.pt does not fit this model"):
        create_model(other)
    with pytest.raises(FileNotFoundError, match="model.init_from: .*missing"):
        create_model(cfg.model.model_copy(update={"init_from": str(tmp_path / "missing")}))


def test_reflect_padding_leaves_no_border_signal_and_loads_the_same_weights(tmp_path):
    """`model.padding=reflect`: on a constant image every pixel's embedding is the same (no zero border
    tells a unit where the frame edge is); with the papers' zero padding the border pixels differ. The
    weights are the same tensors, so a checkpoint trained with either padding loads under the other."""
    torch.manual_seed(0)
    zeros = create_model(ModelConfig(backbone="resnet18", embed_dim=8, head_channels=16)).eval()
    reflect = create_model(ModelConfig(backbone="resnet18", embed_dim=8, head_channels=16, padding="reflect")).eval()
    reflect.load_state_dict(zeros.state_dict())
    assert reflect.padding == "reflect" and zeros.padding == "zeros"
    flat = torch.full((1, 3, 96, 96), 0.3)
    with torch.no_grad():
        e_zero, e_reflect = zeros(flat)[0], reflect(flat)[0]
    spread = lambda e: (e - e[:, 12:13, 12:13]).abs().amax().item()  # noqa: E731  farthest pixel from the centre's
    assert spread(e_reflect) < 1e-4
    assert spread(e_zero) > 0.05  # the border differs from the centre
    cfg = load_config("demo", ["model.padding=reflect", "model.embed_dim=8", "model.head_channels=16"])
    assert create_model(cfg.model).padding == "reflect"
    with pytest.raises(Exception, match="padding"):
        load_config("demo", ["model.padding=circular"])


def test_export_replaces_a_checkpoint_whole_or_not_at_all(tmp_path):
    """checkpoint.export_checkpoint: the export drops optimizer.pt and replaces an earlier one; a copy that
    fails midway (a source entry that cannot be copied, as a full disk would) leaves the earlier export
    as it was, with no partial folder beside it."""
    from distseg.checkpoint import export_checkpoint

    source = tmp_path / "ray" / "checkpoint_1"
    source.mkdir(parents=True)
    for name, text in (("model.pt", "m1"), ("optimizer.pt", "o"), ("meta.json", "{}")):
        (source / name).write_text(text)
    target = tmp_path / "checkpoints" / "run"
    export_checkpoint(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "model.pt"]
    (source / "model.pt").write_text("m2")
    export_checkpoint(source, target)
    assert (target / "model.pt").read_text() == "m2"
    (source / "zz_unreadable").mkdir()  # copy2 of a folder raises, midway through the copy
    (source / "model.pt").write_text("m3")
    with pytest.raises(IsADirectoryError):
        export_checkpoint(source, target, exclude=("optimizer.pt",))
    assert (target / "model.pt").read_text() == "m2"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.startswith(".")) == ["run"]
    (source / "zz_unreadable").rmdir()
    export_checkpoint(source, target)  # the next export clears what the failed one left
    assert (target / "model.pt").read_text() == "m3" and [p.name for p in target.parent.iterdir()] == ["run"]
