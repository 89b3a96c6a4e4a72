"""MaskDistill's confident masks (Sec. 3.3, Sec. 4.1): an image's instance predictions -> the masks kept
-> one pseudo semantic label map. Pure functions (numpy only), used by the confident stage.

    kept = confident_masks(predictions, threshold=0.9)            # list[Mask], most confident first
    labels = label_map(kept, height, width)                        # uint8, 0 = background

The rules, in the paper's order:
1. keep the predictions with score >= threshold (0.9 in the paper);
2. when none passes, keep the single most confident prediction ("we keep the mask with the largest
   confidence score when thresholding excludes all predictions");
3. when two kept masks overlap, keep the most confident one: walking from the most confident down,
   a mask sharing more than `max_overlap` of its pixels with the masks kept so far is dropped.
   `max_overlap = 0` (the default) drops a mask that shares any pixel, as MaskDistill's released
   code does; a larger value keeps a mask that only touches a better one, and it then paints only the
   pixels still free.
Each kept mask paints its class (`label`, the cluster id + 1, so 0 stays background). Ties in score
keep the input order (a stable sort).
"""

from __future__ import annotations

import numpy as np

from distseg.grouping.types import Mask


def confident_masks(predictions: list[Mask], threshold: float = 0.9, max_overlap: float = 0.0) -> list[Mask]:
    """The masks kept from one image's predictions, most confident first (see the module docstring)."""
    if not 0 <= max_overlap < 1:
        raise ValueError(f"max_overlap must be in [0, 1), got {max_overlap}")
    ranked = sorted((p for p in predictions if p.mask.any()), key=lambda p: -p.score)
    if not ranked:
        return []
    candidates = [p for p in ranked if p.score >= threshold] or ranked[:1]
    claimed = np.zeros(candidates[0].mask.shape, bool)
    kept = []
    for p in candidates:
        if p.mask.shape != claimed.shape:
            raise ValueError(f"a predicted mask of shape {p.mask.shape} among masks of shape {claimed.shape}")
        shared = np.count_nonzero(p.mask & claimed) / np.count_nonzero(p.mask)
        if shared > max_overlap:
            continue
        kept.append(p)
        claimed |= p.mask
    return kept


def label_map(masks: list[Mask], height: int, width: int) -> np.ndarray:
    """uint8 (H, W): each mask's label on the pixels no earlier mask took; 0 elsewhere."""
    out = np.zeros((height, width), np.uint8)
    free = np.ones((height, width), bool)
    for m in masks:
        if not 0 < m.label < 256:
            raise ValueError(f"a mask label must be in 1..255 to fit a uint8 label map, got {m.label}")
        paint = m.mask & free
        out[paint] = m.label
        free &= ~m.mask
    return out
