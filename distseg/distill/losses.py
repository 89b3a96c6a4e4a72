"""MaskDistill's segmentation loss (Sec. 3.3, Eq. 4): cross entropy on the hardest pixels of a batch.

    loss = hard_pixel_cross_entropy(logits, target, fraction=0.2, ignore_index=255)

Every labelled pixel of the batch gets its cross entropy; the k = max(1, floor(fraction x labelled
pixels)) largest are averaged (the paper: the top-20 % hardest pixels, after Wu et al.'s online
bootstrapping). Pixels labelled `ignore_index` take no part, neither as a candidate nor in the count.

Departure: MaskDistill's released code takes fraction x ALL pixels of the batch (ignored ones
included), capped at the labelled count. Here k counts labelled pixels only, as the paper's text
reads ("the top-k most difficult pixels in each batch"); the two agree on its pseudo label maps,
which have no ignored pixels. fraction = 1 is the plain mean cross entropy (the ablation without
hard pixel mining).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hard_pixel_count(labelled: int, fraction: float) -> int:
    """How many of `labelled` pixels the loss averages."""
    if not 0 < fraction <= 1:
        raise ValueError(f"hard pixel fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * labelled + 1e-9)) if labelled else 0


def hard_pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, fraction: float = 0.2, ignore_index: int = 255
) -> torch.Tensor:
    """Mean cross entropy over the top `fraction` of labelled pixels by loss.

    logits: (B, C, H, W); target: (B, H, W) int, class ids or `ignore_index`. A batch with no
    labelled pixel gives a zero that still carries a gradient (so every worker steps alike)."""
    if (
        logits.dim() != 4
        or target.dim() != 3
        or logits.shape[0] != target.shape[0]
        or logits.shape[2:] != target.shape[1:]
    ):
        raise ValueError(
            f"logits (B, C, H, W) and target (B, H, W) expected, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    losses = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")
    valid = losses[target != ignore_index]
    k = hard_pixel_count(valid.numel(), fraction)
    if k == 0:
        return logits.sum() * 0.0
    return valid.topk(k, sorted=False).values.mean()
