"""Segmentation metrics: a reducible confusion matrix and cluster-to-class matching.

Conventions used throughout: a confusion (or contingency) matrix has one **row per ground-truth
class** and one **column per prediction** (class, cluster, segment or concept), counting pixels.
:class:`ConfusionMatrix` is the square, class-vs-class case; :func:`contingency` builds the
rectangular class-vs-cluster one that :func:`hungarian_match` and :func:`majority_vote_match` turn
into a ``cluster -> class`` mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from distseg.core.constants import IGNORE_INDEX

__all__ = [
    "ConfusionMatrix",
    "contingency",
    "hungarian_match",
    "majority_vote_match",
    "remap",
]


def _as_int_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise TypeError(f"expected an integer array, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def contingency(
    pred: Any, target: Any, num_pred: int, num_target: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """Pixel counts ``(num_target, num_pred)``: entry ``[t, p]`` counts pixels of class ``t``
    predicted as ``p``.

    ``pred`` and ``target`` are integer arrays (numpy or torch) of the same shape. Pixels whose
    target is ``ignore_index`` or outside ``[0, num_target)``, or whose prediction is outside
    ``[0, num_pred)`` (e.g. ``-1`` for an unmatched cluster), are not counted.
    """
    p = _as_int_array(pred).ravel()
    t = _as_int_array(target).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in size: {p.size} vs {t.size}")
    keep = (t >= 0) & (t < num_target) & (p >= 0) & (p < num_pred)
    if ignore_index is not None:
        keep &= t != ignore_index
    flat = np.bincount(t[keep] * num_pred + p[keep], minlength=num_target * num_pred)
    return flat.reshape(num_target, num_pred).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    if np.all(np.isnan(x)):
        return float("nan")
    return float(np.nanmean(x))


class ConfusionMatrix:
    """Class-vs-class pixel counts that can be summed across workers.

    ``mat[t, p]`` (int64) counts pixels of ground-truth class ``t`` predicted as ``p``. Targets
    equal to ``ignore_index`` and predictions outside ``[0, num_classes)`` are not counted (map an
    unmatched cluster to a class first if its pixels should count as errors).

    Example::

        cm = ConfusionMatrix(21)
        for pred, target in batches:
            cm.update(pred, target)
        cm.reduce_from_all_processes()   # sums over torch.distributed workers, if any
        print(cm.miou(), cm.pixel_accuracy())
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.mat[:] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add the pixels of one prediction / ground-truth pair (same shape, any shape)."""
        n = self.num_classes
        self.mat += contingency(pred, target, n, n, self.ignore_index)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to this matrix (in place) and return it."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.mat += other.mat
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.mat = self.mat.copy()
        return out.merge(other)

    def reduce_from_all_processes(self) -> None:
        """Sum ``mat`` over all torch.distributed ranks (a no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":  # NCCL only reduces CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.from_numpy(self.mat.copy()).to(device)
        torch.distributed.all_reduce(t)
        self.mat = t.cpu().numpy().astype(np.int64)

    def iou(self) -> np.ndarray:
        """Per-class IoU ``tp / (tp + fp + fn)``; NaN for a class absent from both sides."""
        tp = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - tp
        return _safe_div(tp, union)

    def miou(self) -> float:
        """Mean IoU over the classes present in ground truth or prediction."""
        return _nanmean(self.iou())

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall ``tp / ground-truth pixels``; NaN for classes absent from ground truth."""
        return _safe_div(np.diag(self.mat).astype(np.float64), self.mat.sum(1))

    def mean_accuracy(self) -> float:
        return _nanmean(self.class_accuracy())

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else float("nan")

    def per_class_table(self, class_names: Sequence[str] | None = None) -> list[dict]:
        """One row per class: ``class``, ``iou``, ``accuracy`` and ``pixels`` (ground truth)."""
        n = self.num_classes
        names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for {n} classes")
        iou, acc, pixels = self.iou(), self.class_accuracy(), self.mat.sum(1)
        return [
            {"class": names[i], "iou": float(iou[i]), "accuracy": float(acc[i]), "pixels": int(pixels[i])}
            for i in range(n)
        ]

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())}, "
            f"miou={self.miou():.4f}, pixel_acc={self.pixel_accuracy():.4f})"
        )


def majority_vote_match(confusion: np.ndarray) -> np.ndarray:
    """Map each cluster (column) to its majority ground-truth class (row).

    The usual mapping for over-clustering (more clusters than classes). Clusters without any
    labelled pixel map to ``-1``.
    """
    confusion = np.asarray(confusion)
    mapping = confusion.argmax(0).astype(np.int64)
    mapping[confusion.sum(0) == 0] = -1
    return mapping


def iou_matrix(confusion: np.ndarray) -> np.ndarray:
    """``(num_classes, num_clusters)`` IoU of every class with every cluster from pixel counts:
    ``n / (class pixels + cluster pixels - n)`` (0 where both are empty)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    return np.nan_to_num(_safe_div(confusion, union), nan=0.0)


def hungarian_match(confusion: np.ndarray, majority: bool = False, score: str = "pixels") -> np.ndarray:
    """One-to-one ``cluster -> class`` mapping maximising the matched pixels (or the summed IoU).

    Args:
        confusion: ``(num_classes, num_clusters)`` pixel counts (rows ground truth, columns
            clusters), e.g. from :func:`contingency`.
        majority: map the clusters left unmatched (when there are more clusters than classes) to
            their majority class instead of ``-1``.
        score: ``"pixels"`` maximises the pixels on the matched pairs; ``"iou"`` the sum of their
            IoU (:func:`iou_matrix`; MaskContrast's ``_hungarian_match(..., metric='iou')``).

    Returns:
        int64 ``(num_clusters,)``: the class of each cluster, ``-1`` when unmatched.
    """
    confusion = np.asarray(confusion)
    if score not in ("pixels", "iou"):
        raise ValueError(f"score must be 'pixels' or 'iou', got {score!r}")
    gain = iou_matrix(confusion) if score == "iou" else confusion
    classes, clusters = linear_sum_assignment(gain, maximize=True)
    mapping = np.full(confusion.shape[1], -1, dtype=np.int64)
    mapping[clusters] = classes
    if majority:
        unmatched = mapping < 0
        mapping[unmatched] = majority_vote_match(confusion)[unmatched]
    return mapping


def remap(pred: Any, mapping: np.ndarray, fill: int = -1) -> np.ndarray:
    """``mapping[pred]`` for every pixel; predictions outside ``mapping``'s range get ``fill``."""
    p = _as_int_array(pred)
    mapping = np.asarray(mapping, dtype=np.int64)
    valid = (p >= 0) & (p < mapping.size)
    out = np.full(p.shape, fill, dtype=np.int64)
    out[valid] = mapping[p[valid]]
    return out
