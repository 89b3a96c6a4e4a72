"""The hypercolumn embedding network of Zhang & Maire (2020).

Res3 and Res4 of the backbone (standard strides 8 and 16) are each projected by one 3x3 Conv-BN-ReLU,
upsampled to 1/4 of the input, concatenated, and mapped by one 3x3 conv to a D-dimensional embedding
that is L2-normalised per pixel.

`model(x)` returns the embedding; `model(x, return_features=True)` returns (embedding, features),
the features being the decoder output the embedding head reads: the concatenated Res3/Res4
projections, `feature_dim` = 2 * head_channels channels at the embedding's resolution (a head parallel
to the embedding, such as MaskContrast's saliency conv, sits on them). The keyword passes through DDP.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distseg.models.backbones import create_backbone
from distseg.models.config import ModelConfig


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HypercolumnNet(nn.Module):
    def __init__(
        self, backbone: str = "resnet18", embed_dim: int = 32, head_channels: int = 256, weights: str | None = None
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, weights)
        c3, c4 = self.backbone.channels
        self.proj3 = _conv_bn_relu(c3, head_channels)
        self.proj4 = _conv_bn_relu(c4, head_channels)
        self.embed = nn.Conv2d(2 * head_channels, embed_dim, 3, padding=1)
        self.embed_dim = embed_dim
        self.feature_dim = 2 * head_channels  # channels of the decoder features (return_features=True)
        self.padding = "zeros"

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The unit embedding (B, D, H/4, W/4); with `return_features`, also the decoder features
        (B, 2 * head_channels, H/4, W/4) it is computed from."""
        size = (max(1, x.shape[-2] // 4), max(1, x.shape[-1] // 4))
        res3, res4 = self.backbone(x)
        h3 = F.interpolate(self.proj3(res3), size=size, mode="bilinear", align_corners=False)
        h4 = F.interpolate(self.proj4(res4), size=size, mode="bilinear", align_corners=False)
        features = torch.cat([h3, h4], 1)
        embedding = F.normalize(self.embed(features), dim=1)
        return (embedding, features) if return_features else embedding


def set_padding(model: nn.Module, mode: str) -> nn.Module:
    """Every convolution of `model` that pads pads with `mode` ("zeros" | "reflect" | "replicate").

    Departure from the papers (their ResNets pad with zeros), opt-in through `model.padding`: a zero
    border tells every deep unit where the frame edge is, which is the absolute-position shortcut the
    position diagnostic measures (fidelity audit, finding 4; Kayhan & van Gemert 2020, "On translation
    invariance in CNNs"). Reflect padding keeps the border's statistics and removes that cue. The
    weights do not change, so a checkpoint loads under any padding; the max-pool keeps its implicit
    -inf padding (it never wins the max, so it carries no border signal)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(p > 0 for p in module.padding):
            module.padding_mode = mode
    if isinstance(model, HypercolumnNet):
        model.padding = mode
    return model


def create_model(cfg: ModelConfig) -> HypercolumnNet:
    """The embedding network a `ModelConfig` describes: random init, the backbone from `cfg.weights`,
    or every weight from the distseg checkpoint `cfg.init_from`; convolutions pad with `cfg.padding`."""
    model = HypercolumnNet(cfg.backbone, cfg.embed_dim, cfg.head_channels, cfg.weights)
    if cfg.padding != "zeros":
        set_padding(model, cfg.padding)
    if cfg.init_from:
        load_network_weights(model, cfg.init_from)
    return model


def load_network_weights(model: HypercolumnNet, checkpoint: str | Path) -> None:
    """Load a checkpoint's whole network (a folder holding model.pt, or the file) into `model`, strictly."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: {path} does not exist (give a checkpoint folder or its model.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise ValueError(
            f"model.init_from: {path} does not fit this model (backbone, embed_dim and head_channels must match "
            f"the checkpoint's config.yaml): {' '.join(line.strip() for line in first)}"
        ) from None
