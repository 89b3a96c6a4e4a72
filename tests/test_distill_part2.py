"""MaskDistill part 2: the hard-pixel loss, the confident-mask aggregation, the Mask R-CNN and DeepLab
stages through Ray Train, the confident-masks stage on Ray Data, and the pipeline end to end.

Real parts throughout: torchvision's Mask R-CNN and DeepLab-v3 (random init: no pretrained weights
exist here and nothing is downloaded), a real in-process Ray cluster, real Parquet shards, a real
sqlite MLflow store in tmp_path. The loss and the aggregation run on hand-made batches whose answers
are worked out in the tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.distill.aggregate import confident_masks, label_map
from distseg.distill.losses import hard_pixel_count, hard_pixel_cross_entropy
from distseg.grouping.types import Mask

# ---------------------------------------------------------------- the hard-pixel loss


def test_hard_pixel_loss_averages_exactly_the_top_k_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255  # 5 ignored pixels
    target[1, 2, 1:3] = 255  # 2 more: 40 - 7 = 33 labelled
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    labelled = per_pixel[target != 255]
    assert labelled.numel() == 33
    k = hard_pixel_count(33, 0.2)
    assert k == 6  # floor(0.2 * 33)
    expected = labelled.sort(descending=True).values[:6].mean()
    loss = hard_pixel_cross_entropy(logits, target, fraction=0.2)
    assert torch.allclose(loss, expected)
    # ignored pixels are never candidates: give them huge losses and the result does not move
    spiked = logits.detach().clone()
    spiked[0, :, 0, :] = torch.tensor([-50.0, 50.0, -50.0])[:, None]
    assert torch.allclose(hard_pixel_cross_entropy(spiked, target, 0.2), expected.detach(), atol=1e-6)
    # only the chosen pixels get a gradient
    loss.backward()
    touched = (logits.grad.abs().sum(1) > 0).sum().item()
    assert touched == 6
    # fraction 1 is the plain mean cross entropy over labelled pixels
    plain = F.cross_entropy(logits.detach(), target, ignore_index=255)
    assert torch.allclose(hard_pixel_cross_entropy(logits.detach(), target, 1.0), plain)


def test_hard_pixel_loss_small_and_empty_batches():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.full((1, 2, 2), 255)
    target[0, 0, 0] = 1
    assert hard_pixel_count(1, 0.2) == 1  # at least one pixel
    assert hard_pixel_cross_entropy(logits, target).item() == pytest.approx(np.log(2))
    empty = hard_pixel_cross_entropy(logits.requires_grad_(), torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="fraction"):
        hard_pixel_count(10, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hard_pixel_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- confident masks


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_confident_masks_threshold_keeps_the_confident_ones():
    a = Mask(box(8, 8, 0, 4, 0, 4), 0.95, 3)
    b = Mask(box(8, 8, 4, 8, 4, 8), 0.91, 5)
    c = Mask(box(8, 8, 0, 4, 4, 8), 0.89, 7)  # below 0.9: out
    kept = confident_masks([c, b, a], threshold=0.9)
    assert [m.label for m in kept] == [3, 5]  # most confident first
    labels = label_map(kept, 8, 8)
    assert (labels[:4, :4] == 3).all() and (labels[4:, 4:] == 5).all()
    assert (labels[:4, 4:] == 0).all() and (labels[4:, :4] == 0).all()
    assert np.bincount(labels.ravel(), minlength=8).tolist() == [32, 0, 0, 16, 0, 16, 0, 0]


def test_confident_masks_fall_back_to_the_most_confident_one():
    a = Mask(box(6, 6, 0, 3, 0, 3), 0.5, 2)
    b = Mask(box(6, 6, 3, 6, 3, 6), 0.7, 4)
    kept = confident_masks([a, b], threshold=0.9)
    assert [(m.label, m.score) for m in kept] == [(4, 0.7)]
    assert confident_masks([], 0.9) == []
    # an empty mask is never a fallback
    assert confident_masks([Mask(np.zeros((6, 6), bool), 0.99, 1)], 0.9) == []


def test_confident_masks_overlap_keeps_the_more_confident():
    big = Mask(box(10, 10, 0, 10, 0, 6), 0.93, 1)
    over = Mask(box(10, 10, 0, 10, 5, 10), 0.97, 2)  # shares column 5 (10 of its 50 pixels) with big
    far = Mask(box(10, 10, 0, 2, 8, 10), 0.92, 3)  # inside `over`: dropped
    kept = confident_masks([big, over, far], threshold=0.9)
    assert [m.label for m in kept] == [2]  # any shared pixel drops the less confident mask
    # with max_overlap 0.2, `big` (10 of 60 pixels shared = 0.167) stays and paints only its free pixels
    kept = confident_masks([big, over, far], threshold=0.9, max_overlap=0.2)
    assert [m.label for m in kept] == [2, 1]
    labels = label_map(kept, 10, 10)
    assert (labels[:, 5:] == 2).all() and (labels[:, :5] == 1).all()
    with pytest.raises(ValueError, match="1..255"):
        label_map([Mask(box(2, 2, 0, 1, 0, 1), 1.0, 256)], 2, 2)
