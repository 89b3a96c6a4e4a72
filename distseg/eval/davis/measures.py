"""DAVIS J and F measures and the per-sequence / per-dataset statistics (:class:`DavisEvaluator`).

As the official DAVIS code defines them (``davis2017-evaluation/davis2017/metrics.py`` and
``utils.db_statistics``; the DAVIS 2016 Python package ``davis/measures/{jaccard,f_boundary,
statistics}.py`` and ``davis/dataset/evaluation.py``; Perazzi et al., CVPR 2016):

* J, region similarity (:func:`db_eval_iou`): ``|pred & gt| / |pred | gt|``, 1 when both are empty.
* F, contour accuracy (:func:`db_eval_boundary`): the boundaries of both masks are extracted as
  ``seg2bmap`` does (:func:`boundary_map`); a boundary pixel counts as matched when it lies within
  ``ceil(bound_th * image diagonal)`` pixels (``bound_th = 0.008``; a value >= 1 is a radius in
  pixels) of the other boundary, i.e. inside the other boundary dilated by a disk of that radius.
  precision = matched predicted / predicted, recall = matched true / true, F = their harmonic mean;
  both boundaries empty -> 1, exactly one empty -> 0.
* Per sequence: mean, recall (fraction of frames scoring > 0.5) and decay (mean of the first quarter
  of the frames minus mean of the last quarter, four overlapping bins as ``db_statistics``). The
  dataset number is the mean of the per-sequence numbers; ``JF_mean = (J_mean + F_mean) / 2``.
  The official semi-supervised evaluation scores frames ``[1:-1]``: the first frame (whose mask is
  given) and also the last are left out. :class:`DavisEvaluator` does the same by default
  (``skip_last=False`` keeps the last frame).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from skimage.morphology import disk


def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    return pred, gt


def db_eval_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J: intersection over union of two binary masks (1.0 when both are empty)."""
    pred, gt = _as_bool_pair(pred, gt)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel-wide boundary of a binary mask (non-zero = foreground), as DAVIS's ``seg2bmap``.

    A pixel is a boundary pixel when its right, lower or lower-right neighbour differs from it. The
    image is extended past its last row and column by replication, so the image border itself is never
    a boundary; the outline therefore sits half a pixel towards the origin (outside the object on its
    top/left sides, inside it on its bottom/right sides).
    """
    seg = np.asarray(mask)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map needs a 2-D mask, got shape {seg.shape}")
    seg = seg.astype(bool)
    padded = np.pad(seg, ((0, 1), (0, 1)), mode="edge")
    return (seg != padded[:-1, 1:]) | (seg != padded[1:, :-1]) | (seg != padded[1:, 1:])


def boundary_radius(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """The matching tolerance in pixels: ``bound_th`` itself when >= 1, else a fraction of the diagonal."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def db_eval_boundary(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Contour accuracy F: boundary F-measure of two binary masks with a disk tolerance (see module doc)."""
    pred, gt = _as_bool_pair(pred, gt)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    footprint = disk(boundary_radius(pred.shape, bound_th)).astype(np.uint8)
    pred_near = cv2.dilate(pred_b.view(np.uint8), footprint).astype(bool)
    gt_near = cv2.dilate(gt_b.view(np.uint8), footprint).astype(bool)
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------
# statistics


def _decay(values: np.ndarray, bins: int = 4) -> float:
    """Mean of the first quarter of the frames minus the last (overlapping bins, as db_statistics)."""
    if len(values) == 0:
        return float("nan")
    edges = np.floor(np.linspace(0, len(values) - 1, bins + 1) + 0.5).astype(int)
    parts = [values[edges[i] : edges[i + 1] + 1] for i in range(bins)]
    return float(np.mean(parts[0]) - np.mean(parts[-1]))


def _statistics(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    return {"mean": float(np.mean(values)), "recall": float(np.mean(values > 0.5)), "decay": _decay(values)}


@dataclass
class _SequenceScores:
    frames: list[int] = field(default_factory=list)
    j: list[float] = field(default_factory=list)
    f: list[float] = field(default_factory=list)


class DavisEvaluator:
    """Accumulates per-frame J and F of DAVIS-2016 sequences (one object: label > 0) and summarises them.

    As the official evaluation, the first frame (given) and by default the last frame are not scored;
    frames whose ground truth is None (not annotated) are skipped.
    """

    def __init__(self, bound_th: float = 0.008, skip_first: bool = True, skip_last: bool = True) -> None:
        self.bound_th = bound_th
        self.skip_first = skip_first
        self.skip_last = skip_last
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, _SequenceScores] = {}

    def process(
        self, sequence: str, predictions: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray | None]
    ) -> None:
        """Score one sequence's predicted label maps against its masks (both lists in frame order)."""
        if len(predictions) != len(ground_truth):
            raise ValueError(f"{sequence}: {len(predictions)} predictions for {len(ground_truth)} ground-truth frames")
        start = 1 if self.skip_first else 0
        stop = len(ground_truth) - (1 if self.skip_last else 0)
        scores = _SequenceScores()
        for i in range(start, stop):
            if ground_truth[i] is None:
                continue
            pred, gt = np.asarray(predictions[i]) > 0, np.asarray(ground_truth[i]) > 0
            scores.frames.append(i)
            scores.j.append(db_eval_iou(pred, gt))
            scores.f.append(db_eval_boundary(pred, gt, self.bound_th))
        self._scores[sequence] = scores

    def table(self) -> list[dict[str, Any]]:
        """One row per sequence: frames scored, J/F mean, recall and decay, JF mean."""
        rows = []
        for name, s in self._scores.items():
            j, f = _statistics(np.asarray(s.j)), _statistics(np.asarray(s.f))
            row: dict[str, Any] = {"sequence": name, "frames": len(s.frames)}
            row.update({f"J_{k}": v for k, v in j.items()})
            row.update({f"F_{k}": v for k, v in f.items()})
            row["JF_mean"] = (j["mean"] + f["mean"]) / 2
            rows.append(row)
        return rows

    def evaluate(self) -> dict[str, float]:
        """``davis/{J,F}_{mean,recall,decay}`` and ``davis/JF_mean`` (means over sequences), plus per sequence."""
        rows = self.table()
        if not rows:
            raise RuntimeError("DavisEvaluator.evaluate() before any sequence was processed")
        scored = [r for r in rows if r["frames"] > 0]
        out: dict[str, float] = {}
        for key in ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"):
            out[f"davis/{key}"] = float(np.mean([r[key] for r in scored])) if scored else float("nan")
        out["davis/JF_mean"] = (out["davis/J_mean"] + out["davis/F_mean"]) / 2
        out["davis/num_sequences"] = float(len(scored))
        out["davis/num_frames"] = float(sum(r["frames"] for r in rows))
        for r in rows:
            for key in ("J_mean", "F_mean", "JF_mean"):
                out[f"davis/{r['sequence']}/{key}"] = r[key]
        return out
