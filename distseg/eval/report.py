"""Pictures and tables of an evaluation: confusion matrix, per-class IoU, PCA of embeddings, examples.

`log_protocol` logs what one protocol run reports; the PCA sheet of a source's embeddings is made once
per source (`pca_sheet`) and logged by the caller.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from distseg.core.constants import IGNORE_INDEX
from distseg.viz import color_labels, contact_sheet


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(1, keepdims=True).clip(min=1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n + 2), max(3.5, 0.35 * n + 1.5)))
    im = ax.imshow(confusion / rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _fit(picture: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if picture.shape[:2] == shape:
        return picture
    return cv2.resize(picture, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def _labels_rgb(labels: np.ndarray) -> np.ndarray:
    rgb = color_labels(np.where(labels == IGNORE_INDEX, 0, labels))
    rgb[labels == IGNORE_INDEX] = 0
    return rgb


def examples_sheet(split, predictions: dict[str, np.ndarray]) -> np.ndarray | None:
    """Rows of image | ground truth | prediction for the protocol's example predictions."""
    tiles = []
    index = {image_id: i for i, image_id in enumerate(split.ids)}
    for image_id, pred in predictions.items():
        if image_id not in index:
            continue
        i = index[image_id]
        shape = split.labels[i].shape
        tiles += [
            _fit(split.images[i], shape),
            _labels_rgb(split.labels[i]),
            _labels_rgb(_fit(pred.astype(np.uint8), shape)),
        ]
    return contact_sheet(tiles, columns=3) if tiles else None


def pca_sheet(split, features: list[np.ndarray], count: int, pca) -> np.ndarray:
    """Rows of image | PCA-to-RGB of its embedding for the first `count` images."""
    tiles = []
    for i in range(min(count, len(features))):
        shape = split.images[i].shape[:2]
        tiles += [split.images[i], _fit(pca(features[i]), shape)]
    return contact_sheet(tiles, columns=2)


def save_picture(picture: np.ndarray, path: Path) -> None:
    cv2.imwrite(str(path), picture[:, :, ::-1])


def log_protocol(tracker, name: str, result, split, class_names: list[str], num_examples: int) -> None:
    """The per-class table, confusion picture and example segmentations of one protocol's result
    (examples need the eval `split` the predictions are keyed into; None: no examples)."""
    if result.per_class:
        tracker.log_table(
            {k: [row[k] for row in result.per_class] for k in result.per_class[0]}, f"{name}_per_class_iou.json"
        )
    if result.confusion is not None and len(class_names) == result.confusion.shape[0]:
        import matplotlib.pyplot as plt

        fig = confusion_figure(result.confusion, class_names, f"{name}: row-normalised confusion")
        tracker.log_figure(fig, f"{name}_confusion.png")
        plt.close(fig)
    if num_examples and result.predictions and split is not None:
        sheet = examples_sheet(split, dict(list(result.predictions.items())[:num_examples]))
        if sheet is not None:
            tracker.log_image(sheet, f"{name}_examples.png")
