"""Benchmark inputs: BSDS500 ground-truth files, the accepted ground-truth and prediction forms,
thresholds, and their validation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.io

from distseg.eval.bsds.maps import gt_boundaries_from_segmentation, ucm2_to_pixel

#: A soft boundary map, pixel-resolution UCM or ``ucm2``, or a list of label maps.
Prediction = np.ndarray | Sequence[np.ndarray]
PathLike = str | os.PathLike[str]
#: A BSDS ``.mat`` path, a list of label maps, a list of dicts with ``Segmentation`` /
#: ``Boundaries``, or a ``(segmentations, boundaries)`` tuple.
GroundTruth = PathLike | Sequence[np.ndarray] | Sequence[dict] | tuple[Sequence[np.ndarray], Sequence[np.ndarray]]


def load_bsds_ground_truth(mat_path: PathLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Load a BSDS500 ``groundTruth/*.mat`` file.

    ``mat_path`` holds a ``1xN`` cell ``groundTruth`` whose entries have the fields ``Segmentation``
    (uint16 labels, 1-based) and ``Boundaries`` (uint8 0/1). Returns ``(segmentations, boundaries)``:
    two lists with one ``(H, W)`` array per annotator (``int32`` labels and ``bool`` boundary maps).
    """
    cell = scipy.io.loadmat(os.fspath(mat_path))["groundTruth"]
    segmentations: list[np.ndarray] = []
    boundaries: list[np.ndarray] = []
    for entry in cell.ravel():
        segmentations.append(np.asarray(entry["Segmentation"][0, 0]).astype(np.int32))
        boundaries.append(np.asarray(entry["Boundaries"][0, 0]).astype(bool))
    if not segmentations:
        raise ValueError(f"bad ground-truth file (no annotators): {mat_path}")
    return segmentations, boundaries


def default_thresholds(nthresh: int) -> np.ndarray:
    """The official thresholds ``linspace(1/(n+1), 1-1/(n+1), n)`` for soft maps and UCMs."""
    if nthresh < 1:
        raise ValueError("nthresh must be >= 1")
    return np.linspace(1.0 / (nthresh + 1), 1.0 - 1.0 / (nthresh + 1), nthresh)


def is_segmentation_list(prediction: Any) -> bool:
    """Whether a prediction is a list (or tuple) of label maps rather than one 2-D map."""
    return isinstance(prediction, (list, tuple))


def segmentation_list(items: Sequence[np.ndarray], shape: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Validated label maps and their thresholds 1..N (one "threshold" per segmentation)."""
    segs = [np.asarray(s) for s in items]
    if not segs:
        raise ValueError("empty list of segmentations")
    for s in segs:
        if s.shape != shape:
            raise ValueError(f"segmentation shape {s.shape} != image shape {shape}")
    return segs, np.arange(1, len(segs) + 1, dtype=np.float64)


def as_boundary_strength(pb: np.ndarray) -> np.ndarray:
    """A boundary map as float64 (``uint8`` divided by 255)."""
    pb = np.asarray(pb)
    if pb.dtype == np.uint8:  # a PNG boundary map, read as in the official code: imread / 255
        return pb.astype(np.float64) / 255.0
    return pb.astype(np.float64, copy=False)


def resolve_thresholds(thresholds: int | Sequence[float] | np.ndarray) -> np.ndarray:
    """Threshold values: :func:`default_thresholds` of a count, or the given values."""
    if np.isscalar(thresholds):
        return default_thresholds(int(thresholds))  # type: ignore[arg-type]
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if t.size == 0:
        raise ValueError("empty threshold list")
    return t


def pixel_map(prediction: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D prediction as a pixel-resolution boundary-strength map (ucm2 is subsampled)."""
    pred = np.asarray(prediction)
    if pred.ndim != 2:
        raise ValueError(f"a boundary map must be 2-D, got shape {pred.shape}")
    h, w = shape
    if pred.shape == (2 * h + 1, 2 * w + 1):
        return ucm2_to_pixel(as_boundary_strength(pred))
    if pred.shape == (h, w):
        return as_boundary_strength(pred)
    raise ValueError(
        f"prediction of shape {pred.shape} fits neither the image {shape} nor its ucm2 {(2 * h + 1, 2 * w + 1)}"
    )


def parse_ground_truth(ground_truth: Any, need_boundaries: bool = True) -> tuple[list[Any], list[Any]]:
    """Normalise the accepted ground-truth forms to ``(segmentations, boundaries)``.

    Missing boundaries are derived from the segmentations (:func:`gt_boundaries_from_segmentation`)
    when ``need_boundaries``, else left as ``None``.
    """

    def derive(seg: np.ndarray) -> np.ndarray | None:
        return gt_boundaries_from_segmentation(seg) if need_boundaries else None

    if isinstance(ground_truth, (str, os.PathLike)):
        return load_bsds_ground_truth(ground_truth)
    if isinstance(ground_truth, dict):
        ground_truth = [ground_truth]
    if (
        isinstance(ground_truth, tuple)
        and len(ground_truth) == 2
        and all(
            isinstance(part, (list, tuple)) or (isinstance(part, np.ndarray) and part.ndim == 3)
            for part in ground_truth
        )
    ):
        segs = [np.asarray(s) for s in ground_truth[0]]
        bdrys = [np.asarray(b) != 0 for b in ground_truth[1]]
        if len(bdrys) == 0:
            bdrys = [derive(s) for s in segs]
        return segs, bdrys
    items = list(ground_truth)
    if not items:
        raise ValueError("empty ground truth")
    segs, bdrys = [], []
    for item in items:
        if isinstance(item, dict):
            seg = item.get("Segmentation", item.get("segmentation"))
            bdry = item.get("Boundaries", item.get("boundaries"))
            if seg is None and bdry is None:
                raise ValueError("ground-truth dicts need 'Segmentation' and/or 'Boundaries'")
            seg = None if seg is None else np.asarray(seg)
            segs.append(seg)
            if bdry is None:
                bdrys.append(derive(seg))
            else:
                bdrys.append(np.asarray(bdry) != 0)
        else:
            seg = np.asarray(item)
            segs.append(seg)
            bdrys.append(derive(seg))
    return segs, bdrys
