"""Backbones by name, each returning the Res3 (stride 8) and Res4 (stride 16) feature maps.

Names: torchvision ResNets (`resnet18`, `resnet34`, `resnet50`, `resnet101`) and any timm model as
`timm:<name>` (e.g. `timm:resnet26d`, `timm:convnext_atto`). Random init by default; `weights` is a
local state-dict file (a classifier checkpoint; the head is ignored) or, for torchvision, a weights
enum name such as `IMAGENET1K_V1` (downloaded from the hub, so only where the hub is reachable).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distseg.core.registry import Registry

# name -> factory(weights=None) -> Backbone; `timm:<model>` names are resolved by create_backbone, not here
BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", hint="or timm:<model name>")


class Backbone(nn.Module):
    """Wraps a feature extractor; `forward` returns (res3, res4) and `channels` their widths."""

    def __init__(self, body: nn.Module, channels: tuple[int, int], keys: tuple[str, str] | None = None):
        super().__init__()
        self.body = body
        self.channels = channels
        self.keys = keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        if self.keys is None:  # timm features_only: a list in out_indices order
            return out[0], out[1]
        return out[self.keys[0]], out[self.keys[1]]


def register_backbone(name: str, **meta):
    """Factory decorator: the backbone `name`, built as `factory(weights=...)`."""
    return BACKBONES.register(name, **meta)


def create_backbone(name: str, weights: str | None = None) -> Backbone:
    """The backbone called `name` (a registry name, or `timm:<model>` for any timm model)."""
    if name.startswith("timm:"):
        return _timm_backbone(name[len("timm:") :], weights)
    import distseg.models.vit  # noqa: F401  (registers the ViT backbones when this module was imported alone)

    return BACKBONES.build(name, weights=weights)  # unknown: KeyError listing the names (and timm:<model name>)


def _load_local(model: nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    trunk_missing = [k for k in missing if not k.startswith("fc.")]
    if trunk_missing:
        raise ValueError(
            f"backbone weights {path}: {len(trunk_missing)} trunk tensors missing, e.g. {trunk_missing[:3]}"
        )


def _torchvision_resnet(name: str, weights: str | None) -> Backbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    local = weights is not None and Path(weights).is_file()
    model = torchvision.models.get_model(name, weights=None if local else weights)
    if local:
        _load_local(model, weights)
    body = create_feature_extractor(model, return_nodes={"layer2": "res3", "layer3": "res4"})
    channels = (model.layer2[-1].conv1.in_channels, model.layer3[-1].conv1.in_channels)
    return Backbone(body, channels, keys=("res3", "res4"))


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register_backbone(_name)(lambda weights=None, _n=_name: _torchvision_resnet(_n, weights))


def _timm_backbone(name: str, weights: str | None) -> Backbone:
    import timm

    probe = timm.create_model(name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    try:
        indices = (reductions.index(8), reductions.index(16))
    except ValueError:
        raise ValueError(
            f"timm model {name!r} has no stride-8 and stride-16 features (reductions {reductions})"
        ) from None
    kwargs = {}
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}
    body = timm.create_model(name, features_only=True, out_indices=indices, **kwargs)
    channels = tuple(body.feature_info.channels())
    return Backbone(body, channels)
