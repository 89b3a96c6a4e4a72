"""Non-maximum suppression of an edge map along its normal (a leaf: numpy and OpenCV only)."""

from __future__ import annotations

import cv2
import numpy as np


def non_maximum_suppression(strength: np.ndarray, orientation: np.ndarray, radius: int = 1) -> np.ndarray:
    """Keep pixels that are maxima along the edge normal (bilinear neighbours at +-1..radius)."""
    height, width = strength.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = np.cos(orientation).astype(np.float32), np.sin(orientation).astype(np.float32)
    keep = np.ones_like(strength, bool)
    for step in range(1, radius + 1):
        for sign in (1, -1):
            neighbour = cv2.remap(
                strength,
                xs + sign * step * dx,
                ys + sign * step * dy,
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            keep &= strength >= neighbour
    return np.where(keep, strength, 0).astype(np.float32)
