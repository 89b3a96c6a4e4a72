"""``linear``: a 1x1 conv probe (or a DeepLab-v2 ASPP head) trained on frozen features.

Whose protocol: He et al. 2022's "linear classification" (seed 001, Sec. 4.1: a 1x1 conv softmax
classifier on the frozen embedding, 60k iterations, batch 16, lr 0.1 decayed x0.1 at 20k and 50k),
with our own training recipe: Adam at lr 1e-2, ``epochs`` passes over the cached train features
(30), batch 8 images, no crops or augmentation, features centred and scaled with train statistics.
Zhang & Maire 2020 (seed 000, Sec. 4.2) instead train a DeepLab **v3** ASPP head with SGD (weight
decay 5e-4, momentum 0.9, 20k iterations, batch 20, 384 px crops, lr 0.03 decayed x0.1 at 10k and
15k): that is the ``deeplab`` protocol. ``head="aspp"`` here is a cheaper stand-in, not that head:
DeepLab-v2-style summed dilated 3x3 class convs on the embedding, trained with the recipe above.
Neither number is comparable with the papers' (63.47 He et al., 46.51 Zhang & Maire).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.metrics import ConfusionMatrix
from distseg.eval.protocols.base import EvalResult, Evaluator, FeatureSample, _pixels, register_protocol, resize_nearest


class LinearParams(Section):
    """``evaluate.protocol_args.linear``."""

    head: Literal["linear", "aspp"] = Field(
        "linear", description="1x1 conv, or DeepLab-v2 ASPP (3x3 convs at `dilations`)"
    )
    epochs: int = Field(30, ge=1, description="passes over the cached train features")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    batch_size: int = Field(8, ge=1, description="images per optimizer step")
    dilations: tuple[int, ...] = Field((1, 6, 12), min_length=1, description="ASPP dilations")
    device: str | None = Field(None, description="torch device of the probe (default: cuda when available)")


class ASPPHead(nn.Module):
    """DeepLab-v2 style ASPP: parallel 3x3 convolutions at several dilations (at feature
    resolution) whose class scores are summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (1, 6, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


@register_protocol("linear", headline="miou", params=LinearParams, needs_train=True, stochastic=True)
class LinearProbeProtocol(Evaluator):
    """A 1x1 conv (``head="linear"``) or ASPP (``head="aspp"``) probe on frozen features.

    Trained with Adam and cross-entropy (``ignore_index`` ignored) for ``epochs`` passes over the
    cached train-split features, ``batch_size`` images a step, against labels downsampled to
    feature resolution (nearest); features are centred with the train mean and divided by one
    train RMS scale. Weights start near zero (std 0.01, seeded). Eval logits are upsampled
    bilinearly to label resolution before the argmax. Train and eval features are cached.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        head: Literal["linear", "aspp"] = "linear",
        epochs: int = 30,
        lr: float = 1e-2,
        batch_size: int = 8,
        dilations: Sequence[int] = (1, 6, 12),
        device: str | None = None,
    ) -> None:
        if head not in ("linear", "aspp"):
            raise ValueError(f"head must be 'linear' or 'aspp', got {head!r}")
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.dilations = tuple(dilations)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._train: list[tuple[np.ndarray, np.ndarray]] = []
        self._eval: list[tuple[str, np.ndarray, np.ndarray]] = []

    def _process_train(self, sample: FeatureSample) -> None:
        if self._labelled(sample):
            label = resize_nearest(self._clean_label(sample.label), sample.features.shape[1:])
            self._train.append((sample.features, label))

    def _process_eval(self, sample: FeatureSample) -> None:
        if self._labelled(sample):
            self._eval.append((sample.image_id, sample.features, self._clean_label(sample.label)))

    def _make_head(self, in_channels: int) -> nn.Module:
        if self.head == "aspp":
            head: nn.Module = ASPPHead(in_channels, self.num_classes, self.dilations)
        else:
            head = nn.Conv2d(in_channels, self.num_classes, 1)
        # near-zero start (as MAE's linear probe): PyTorch's default init gives the ASPP's many
        # context taps logits of order 1 that a short probe training does not undo
        for module in head.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        return head

    def _standardizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel train mean and one global scale (the RMS of the centred features).

        A single scale keeps the embedding's geometry (per-channel standardisation would blow
        near-constant noise channels up to unit variance) while giving Adam unit-sized inputs.
        """
        pixels = np.concatenate([_pixels(f) for f, _ in self._train]).astype(np.float64)
        mean = pixels.mean(0)
        scale = max(float(np.sqrt(pixels.var(0).mean())), 1e-6)
        return (
            torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1),
            torch.tensor(scale, dtype=torch.float32, device=self.device),
        )

    def _batch_loss(self, head: nn.Module, batch: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over a batch whose images may differ in size (grouped by shape)."""
        groups: dict[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]] = {}
        for item in batch:
            groups.setdefault(item[0].shape, []).append(item)
        total, count = torch.zeros((), device=self.device), 0
        for items in groups.values():
            x = torch.from_numpy(np.stack([f for f, _ in items])).to(self.device)
            y = torch.from_numpy(np.stack([t for _, t in items])).to(self.device)
            logits = head((x - self._mean) / self._std)
            total = total + F.cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum")
            count += int((y != self.ignore_index).sum())
        return total, count

    def _fit(self, head: nn.Module) -> float:
        optimizer = torch.optim.Adam(head.parameters(), lr=self.lr)
        rng = np.random.default_rng(self.seed)
        epoch_loss = float("nan")
        for _ in range(self.epochs):
            order = rng.permutation(len(self._train))
            losses, pixels = 0.0, 0
            for start in range(0, len(order), self.batch_size):
                batch = [self._train[i] for i in order[start : start + self.batch_size]]
                total, count = self._batch_loss(head, batch)
                if count == 0:
                    continue
                optimizer.zero_grad()
                (total / count).backward()
                optimizer.step()
                losses, pixels = losses + float(total.detach()), pixels + count
            epoch_loss = losses / max(pixels, 1)
        return epoch_loss

    @torch.no_grad()
    def _predict(self, head: nn.Module, features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        x = torch.from_numpy(features[None]).to(self.device)
        logits = head((x - self._mean) / self._std)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].cpu().numpy().astype(np.int64)

    def evaluate(self) -> EvalResult:
        if not self._train:
            raise ValueError("linear: no labelled train-split samples were processed")
        if not self._eval:
            raise ValueError("linear: no labelled eval-split samples were processed")
        self._mean, self._std = self._standardizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = self._make_head(self._train[0][0].shape[0]).to(self.device)
            train_loss = self._fit(head)
        head.eval()
        cm = ConfusionMatrix(self.num_classes, self.ignore_index)
        predictions: dict[str, np.ndarray] = {}
        for image_id, features, label in self._eval:
            pred = self._predict(head, features, label.shape)
            cm.update(pred, label)
            if len(predictions) < self.num_examples:
                predictions[image_id] = pred
        return self._result(cm, {"train_loss": train_loss}, predictions)
