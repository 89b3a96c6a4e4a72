"""``deeplab``: Zhang & Maire's semantic segmentation transfer, a DeepLab-v3 ASPP head on frozen features.

Whose protocol: Zhang & Maire 2020 (seed 000, Sec. 4.2 / 5.2, their 46.51 mIoU on VOC): "we train an
ASPP module (DeepLab v3) on top of the frozen features", with SGD (momentum 0.9, weight decay 5e-4),
batch 20, 384-px crops, lr 0.03 decayed x0.1 at 10k and 15k of 20k iterations. The head is
torchvision's ``DeepLabHead`` (ASPP: a 1x1 branch, three dilated 3x3 branches and image pooling, 256
channels with BatchNorm, projection with dropout 0.5, then a 3x3 conv and the 1x1 classifier). The
settings are the paper's; ``iterations`` is theirs too, so a CPU run sets fewer (milestones are
fractions of it).

Departures, each deliberate:

* the head trains on the cached frozen features at the embedding's 1/4 grid, so a crop is
  ``crop // 4`` feature cells (96 for the paper's 384 px) cut from the standardised features and the
  labels resized to that grid (nearest, as ``linear``); a feature map smaller than the crop is padded
  with zeros (the train mean after standardisation) and ignored labels;
* augmentation is the crop and a horizontal flip; the paper does not list its augmentation and the
  features are frozen, so no rescaling (it would need the network);
* ``rates`` (12, 24, 36) are torchvision's ``DeepLabHead`` defaults (DeepLab v3 at output stride 8);
  the paper does not say which rates or which base features its ASPP sits on (the fidelity audit E3);
* evaluation runs the head on each eval image's whole feature map (BatchNorm in eval mode) and
  upsamples the logits bilinearly to the label, as ``linear``.

He et al.'s linear classification is ``linear`` (a 1x1 conv); this protocol is not comparable with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.protocols.base import register_protocol
from distseg.eval.protocols.linear import LinearProbeProtocol


class DeepLabParams(Section):
    """``evaluate.protocol_args.deeplab`` (defaults: Zhang & Maire's recipe)."""

    iterations: int = Field(20_000, ge=1, description="SGD steps (Zhang & Maire: 20k; fewer on a CPU)")
    batch_size: int = Field(20, ge=2, description="crops per step (Zhang & Maire: 20; BatchNorm needs 2)")
    crop: int = Field(384, ge=4, description="crop side in image pixels, cut at the 1/4 feature grid (384 -> 96 cells)")
    lr: float = Field(0.03, gt=0, description="initial SGD learning rate (Zhang & Maire: 0.03)")
    milestones: tuple[float, ...] = Field(
        (0.5, 0.75), description="fractions of the iterations where lr drops x0.1 (10k, 15k of 20k)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    rates: tuple[int, ...] = Field((12, 24, 36), min_length=1, description="ASPP dilation rates (torchvision's)")
    device: str | None = Field(None, description="torch device of the head (default: cuda when available)")


@register_protocol("deeplab", headline="miou", params=DeepLabParams, needs_train=True, stochastic=True)
class DeepLabProtocol(LinearProbeProtocol):
    """A DeepLab-v3 ASPP head trained with SGD on random crops of the cached train features
    (module docstring); scored like ``linear``."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        iterations: int = 20_000,
        batch_size: int = 20,
        crop: int = 384,
        lr: float = 0.03,
        milestones: Sequence[float] = (0.5, 0.75),
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        rates: Sequence[int] = (12, 24, 36),
        device: str | None = None,
    ) -> None:
        if any(not 0 < m < 1 for m in milestones):
            raise ValueError(f"milestones are fractions of the iterations in (0, 1), got {tuple(milestones)}")
        super().__init__(
            num_classes, class_names, seed, ignore_index, num_examples, lr=lr, batch_size=batch_size, device=device
        )
        self.iterations = iterations
        self.cells = max(1, crop // 4)
        self.milestones = tuple(milestones)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.rates = tuple(rates)

    def _make_head(self, in_channels: int) -> nn.Module:
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        return DeepLabHead(in_channels, self.num_classes, self.rates)

    def _crop(self, rng: np.random.Generator, features: np.ndarray, label: np.ndarray):
        """A random ``cells`` x ``cells`` window of standardised ``features`` (padded: zero features,
        the train mean, and ignored labels), flipped left-right half the time."""
        c = self.cells
        d, h, w = features.shape
        x = np.zeros((d, max(h, c), max(w, c)), np.float32)
        y = np.full((max(h, c), max(w, c)), self.ignore_index, np.int64)
        x[:, :h, :w] = features
        y[:h, :w] = label
        top, left = rng.integers(0, x.shape[1] - c + 1), rng.integers(0, x.shape[2] - c + 1)
        x, y = x[:, top : top + c, left : left + c], y[top : top + c, left : left + c]
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def _fit(self, head: nn.Module) -> float:
        mean, std = self._mean.cpu().numpy()[0], float(self._std.cpu())
        # standardised once, not at every crop (an image is cropped ~iterations * batch / images times)
        train = [(((f - mean) / std).astype(np.float32), y) for f, y in self._train]
        optimizer = torch.optim.SGD(
            head.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        steps = sorted({max(1, round(m * self.iterations)) for m in self.milestones})
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=0.1)
        rng = np.random.default_rng(self.seed)
        head.train()
        order, at, last = rng.permutation(len(train)), 0, float("nan")
        for _ in range(self.iterations):
            batch = []
            for _ in range(self.batch_size):
                if at == len(order):
                    order, at = rng.permutation(len(train)), 0
                batch.append(self._crop(rng, *train[order[at]]))
                at += 1
            x = torch.from_numpy(np.stack([b[0] for b in batch])).to(self.device)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).to(self.device)
            if not (y != self.ignore_index).any():
                schedule.step()
                continue
            loss = F.cross_entropy(head(x), y, ignore_index=self.ignore_index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            last = float(loss.detach())
        return last
