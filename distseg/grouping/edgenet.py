"""The `learned` edge detector: a compact fully-convolutional network trained from scratch on BSDS500.

Architecture: four VGG-like stages (full, 1/2, 1/4, 1/8 resolution; dilated convs in the last for
context) with a side output per stage and a learned fusion, as HED/RCF do, but ~0.5 M parameters
so it trains on CPUs. The loss is a class-balanced BCE whose positives are weighted by annotator
consensus (the fraction of annotators who drew a boundary there); pixels only a minority of annotators
marked are ignored rather than called negatives.

The detector is registered as `learned` (with its config keys) in distseg/grouping/__init__.py, which
imports this module only when the detector is built, so importing the grouping package needs no torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.grouping.edges import as_rgb, orientation_of
from distseg.grouping.types import EdgeMap

SHIPPED_WEIGHTS = "edgenet.pt"
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the input normalisation (edge_training imports these names)


def _block(cin: int, cout: int, n: int, dilation: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class EdgeNet(nn.Module):
    """Returns logits: a list of side outputs (full resolution) and the fused output last."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stages = nn.ModuleList(
            [_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 3), _block(4 * w, 8 * w, 3, dilation=2)]
        )
        self.sides = nn.ModuleList([nn.Conv2d(c, 1, 1) for c in (w, 2 * w, 4 * w, 8 * w)])
        self.fuse = nn.Conv2d(4, 1, 1)
        nn.init.constant_(self.fuse.weight, 0.25)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        sides = []
        for i, (stage, side) in enumerate(zip(self.stages, self.sides)):
            if i > 0:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = stage(x)
            sides.append(F.interpolate(side(x), size=size, mode="bilinear", align_corners=False))
        return sides + [self.fuse(torch.cat(sides, 1))]


def edge_loss(
    logits: list[torch.Tensor], consensus: torch.Tensor, threshold: float = 0.3, balance: float = 1.1
) -> torch.Tensor:
    """Class-balanced, consensus-weighted BCE summed over side and fused outputs.

    consensus: B x 1 x H x W fraction of annotators marking each pixel. Positives: >= threshold,
    weighted by their consensus (normalised to mean 1); negatives: 0; pixels in between are ignored.
    """
    positive = consensus >= threshold
    negative = consensus <= 0
    n_pos = positive.sum(dim=(1, 2, 3), keepdim=True).float()
    n_neg = negative.sum(dim=(1, 2, 3), keepdim=True).float()
    total = (n_pos + n_neg).clamp(min=1)
    pos_consensus = torch.where(positive, consensus, torch.zeros_like(consensus))
    mean_pos = pos_consensus.sum(dim=(1, 2, 3), keepdim=True) / n_pos.clamp(min=1)
    weight = torch.where(
        positive, balance * n_neg / total * pos_consensus / mean_pos.clamp(min=1e-6), torch.zeros_like(consensus)
    )
    weight = torch.where(negative, (n_pos / total).expand_as(consensus), weight)
    target = positive.float()
    losses = [F.binary_cross_entropy_with_logits(lg, target, weight=weight, reduction="sum") for lg in logits]
    return torch.stack(losses).sum() / consensus.shape[0]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W normalised float tensor."""
    x = torch.from_numpy(as_rgb(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def shipped_weights_path() -> Path:
    return Path(str(resources.files("distseg") / "weights" / SHIPPED_WEIGHTS))


def load_edgenet(weights: str | Path | None = None, map_location: str = "cpu") -> EdgeNet:
    """EdgeNet with weights from a file (a state_dict, or a checkpoint dir with model.pt); default: shipped."""
    path = Path(weights) if weights else shipped_weights_path()
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no edge-network weights at {path}. Train them with `distseg edges train --root PATH_TO_BSDS500` "
            "and pass edges.weights=PATH, or use edges.detector=gradient (needs no weights)."
        )
    payload = torch.load(path, map_location=map_location, weights_only=True)
    width = int(payload.pop("_width", torch.tensor(16)).item()) if isinstance(payload, dict) else 16
    model = EdgeNet(width=width)
    model.load_state_dict({k: v.float() for k, v in payload.items()})
    return model.eval()


class LearnedEdges:
    """Inference with the trained EdgeNet: optional multi-scale averaging, orientation from the map."""

    def __init__(
        self, weights: str | Path | None = None, scales: tuple[float, ...] = (1.0,), device: str | None = None
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_edgenet(weights).to(self.device)
        self.scales = tuple(scales)

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        image = as_rgb(image)
        height, width = image.shape[:2]
        total = np.zeros((height, width), np.float32)
        for scale in self.scales:
            scaled = (
                image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            )
            logits = self.model(to_tensor(scaled).to(self.device))[-1]
            prob = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
            total += prob if scale == 1 else cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        return total / len(self.scales)

    def __call__(self, image: np.ndarray) -> EdgeMap:
        strength = self.predict(image)
        return EdgeMap(strength=strength, orientation=orientation_of(strength))


def export_weights(model: EdgeNet, path: str | Path, half: bool = True) -> Path:
    """Save a compact state_dict (fp16 by default) loadable with torch.load(weights_only=True)."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    state["_width"] = torch.tensor(model.stages[0][0].out_channels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
