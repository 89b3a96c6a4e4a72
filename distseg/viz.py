"""Pictures people look at: label maps in colour, contact sheets, boundary overlays."""

from __future__ import annotations

import cv2
import numpy as np


def palette(n: int, seed: int = 7) -> np.ndarray:
    """n distinct-ish RGB colours (uint8), colour 0 dark grey for background/void."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 230)], axis=1).astype(np.uint8)
    rgb = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    rgb[0] = (40, 40, 40)
    return rgb


def color_labels(labels: np.ndarray) -> np.ndarray:
    """H x W integer labels -> H x W x 3 uint8 picture."""
    labels = np.asarray(labels).astype(np.int64)
    return palette(int(labels.max()) + 1)[labels]


def to_rgb(picture: np.ndarray) -> np.ndarray:
    if picture.ndim == 2:
        if picture.dtype != np.uint8:
            picture = (np.clip(picture, 0, 1) * 255).astype(np.uint8)
        picture = np.repeat(picture[..., None], 3, axis=2)
    return picture


def contact_sheet(pictures: list[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
    """Tile pictures (RGB or [0,1] grey) into one image, each resized to the first one's size."""
    if not pictures:
        raise ValueError("contact_sheet needs at least one picture")
    h, w = pictures[0].shape[:2]
    tiles = [cv2.resize(to_rgb(p), (w, h), interpolation=cv2.INTER_NEAREST) for p in pictures]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    return sheet
