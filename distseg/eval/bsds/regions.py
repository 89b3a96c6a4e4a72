"""The region benchmarks: segmentation covering, Probabilistic Rand Index and Variation of
Information per image (``evaluation_reg_image``) and over a dataset (``collect_eval_reg``), and the
:class:`RegionBenchmark` evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distseg.eval.bsds.boundaries import ratio
from distseg.eval.bsds.io import (
    GroundTruth,
    Prediction,
    as_boundary_strength,
    is_segmentation_list,
    parse_ground_truth,
    resolve_thresholds,
    segmentation_list,
)
from distseg.eval.bsds.maps import pixel_ucm_to_labels, ucm2_to_labels


@dataclass
class RegionImageCounts:
    """Per-image region-benchmark counts (the official ``*_ev2/3/4.txt`` files)."""

    thresholds: np.ndarray  # (T,) thresholds (or 1..T for a list of segmentations)
    # covering of the ground truth by the segmentation: area-weighted best overlap of every
    # annotator region, summed over annotators (cnt_r), and the total annotator area (sum_r)
    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray  # covering of the segmentation by the ground truth (cnt_p out of sum_p)
    sum_p: np.ndarray
    cnt_r_best: float  # cnt_r with each annotator region taking its best overlap over all thresholds (*_ev3.txt)
    ri: np.ndarray  # (T,) Rand index averaged over annotators (*_ev4.txt)
    voi: np.ndarray  # (T,) variation of information averaged over annotators (*_ev4.txt)


def _rand_index(n: np.ndarray) -> float:
    total = n.sum()
    n_u = n.sum(axis=1)
    n_v = n.sum(axis=0)
    n_choose_2 = total * (total - 1) / 2.0
    if n_choose_2 == 0:
        return 1.0
    return float(1.0 - ((n_u * n_u).sum() / 2 + (n_v * n_v).sum() / 2 - (n * n).sum()) / n_choose_2)


def _variation_of_information(n: np.ndarray) -> float:
    total = n.sum()
    if total == 0:
        return 0.0
    joint = n / total
    m2 = joint.sum(axis=0)
    m1 = joint.sum(axis=1)
    h1 = -np.sum(m1 * np.log2(m1 + (m1 == 0)))
    h2 = -np.sum(m2 * np.log2(m2 + (m2 == 0)))
    outer = np.outer(m1, m2)
    nz = joint > 0
    mi = np.sum(joint[nz] * np.log2(joint[nz] / outer[nz]))
    return float(h1 + h2 - 2.0 * mi)


def _region_scores_one(
    seg: np.ndarray, gts: Sequence[np.ndarray], gt_max: Sequence[int], gt_areas: np.ndarray
) -> tuple[float, float, float, float, np.ndarray, float, float]:
    """Covering counts, per-annotator-region best overlaps, RI and VOI of one segmentation."""
    seg = np.asarray(seg).astype(np.int64, copy=False)
    if seg.min() < 0:
        raise ValueError("segmentation labels must be >= 0")
    k = int(seg.max())
    seg_flat = seg.ravel()
    seg_area = np.bincount(seg_flat, minlength=k + 1).astype(np.float64)  # incl. label 0
    matches_seg = np.zeros(k, dtype=np.float64)
    matches_gt_parts = []
    ri_sum = 0.0
    voi_sum = 0.0
    for gt, g in zip(gts, gt_max):
        conf = np.bincount(gt * (k + 1) + seg_flat, minlength=(g + 1) * (k + 1))
        conf = conf.reshape(g + 1, k + 1).astype(np.float64)
        # covering (match_segmentations): Jaccard overlap of every (gt label, seg label) pair,
        # with all pixels (label 0 included) in the region sizes, label-0 rows/columns dropped
        gt_area = conf.sum(axis=1)
        union = gt_area[:, None] + seg_area[None, :] - conf
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = conf / union
        acc = np.nan_to_num(acc[1:, 1:], nan=0.0)  # MATLAB's max ignores the NaN of empty pairs
        if k > 0 and g > 0:
            matches_seg = np.maximum(matches_seg, acc.max(axis=0))
            matches_gt_parts.append(acc.max(axis=1))
        else:
            matches_gt_parts.append(np.zeros(g))
        # RI / VOI (match_segmentations2): label 0 ignored
        n = conf[1:, 1:].T
        ri_sum += _rand_index(n)
        voi_sum += _variation_of_information(n)
    matches_gt = np.concatenate(matches_gt_parts)
    cnt_p = float(np.dot(seg_area[1:], matches_seg))
    sum_p = float(seg_area[1:].sum())
    cnt_r = float(np.dot(gt_areas, matches_gt))
    sum_r = float(gt_areas.sum())
    return cnt_r, sum_r, cnt_p, sum_p, matches_gt, ri_sum / len(gts), voi_sum / len(gts)


def evaluate_regions_image(
    prediction: Prediction,
    gt_segmentations: Sequence[np.ndarray],
    thresholds: int | Sequence[float] | np.ndarray = 99,
) -> RegionImageCounts:
    """Region-benchmark counts of one image (the official ``evaluation_reg_image``), as a
    :class:`RegionImageCounts`.

    ``prediction`` is a double-resolution ``ucm2`` ``(2H+1, 2W+1)`` (segmentation at ``t`` =
    :func:`ucm2_to_labels`), a pixel-resolution UCM / boundary map ``(H, W)``
    (:func:`pixel_ucm_to_labels`, an extension of the official code), or a list of label maps (one
    threshold per segmentation; label 0 is ignored, as officially).  ``gt_segmentations`` are the
    annotators' ``(H, W)`` label maps (``Segmentation``, labels >= 1); ``thresholds`` a number of
    thresholds or explicit values (ignored for a list of segmentations).
    """
    gts = [np.asarray(g).astype(np.int64) for g in gt_segmentations]
    if not gts:
        raise ValueError("no ground-truth segmentations")
    shape = gts[0].shape
    if any(g.shape != shape for g in gts):
        raise ValueError("ground-truth segmentations differ in size")
    if any(g.min() < 0 for g in gts):
        raise ValueError("ground-truth labels must be >= 0")
    gt_max = [int(g.max()) for g in gts]
    gt_flat = [g.ravel() for g in gts]
    # regionprops(Segmentation, 'Area') for labels 1..max, concatenated over annotators
    gt_areas = np.concatenate([np.bincount(g, minlength=m + 1)[1:] for g, m in zip(gt_flat, gt_max)]).astype(np.float64)

    if is_segmentation_list(prediction):
        segs, thresh = segmentation_list(prediction, shape)  # type: ignore[arg-type]

        def segment(t: int) -> np.ndarray:
            return segs[t]

    else:
        pred = np.asarray(prediction)
        h, w = shape
        thresh = resolve_thresholds(thresholds)
        if pred.shape == (2 * h + 1, 2 * w + 1):
            ucm = as_boundary_strength(pred)

            def segment(t: int) -> np.ndarray:
                return ucm2_to_labels(ucm, thresh[t])

        elif pred.shape == (h, w):
            ucm = as_boundary_strength(pred)

            def segment(t: int) -> np.ndarray:
                return pixel_ucm_to_labels(ucm, thresh[t])

        else:
            raise ValueError(f"prediction of shape {pred.shape} fits neither the image {shape} nor its ucm2")

    nt = thresh.size
    cnt_r = np.zeros(nt)
    sum_r = np.zeros(nt)
    cnt_p = np.zeros(nt)
    sum_p = np.zeros(nt)
    ri = np.zeros(nt)
    voi = np.zeros(nt)
    best_matches_gt = np.zeros(gt_areas.size)
    prev: tuple[np.ndarray, tuple] | None = None
    for t in range(nt):
        seg = segment(t)
        if prev is not None and np.array_equal(prev[0], seg):  # same partition as before
            res = prev[1]
        else:
            res = _region_scores_one(seg, gt_flat, gt_max, gt_areas)
            prev = (seg, res)
        cnt_r[t], sum_r[t], cnt_p[t], sum_p[t], matches_gt, ri[t], voi[t] = res
        best_matches_gt = np.maximum(best_matches_gt, matches_gt)
    cnt_r_best = float(np.dot(gt_areas, best_matches_gt))
    return RegionImageCounts(thresh, cnt_r, sum_r, cnt_p, sum_p, cnt_r_best, ri, voi)


def collect_region_scores(per_image: Sequence[RegionImageCounts]) -> dict[str, Any]:
    """Covering, PRI and VOI from per-image counts (the official ``collect_eval_reg``).

    Returns a dict with the scalar scores ``covering_threshold, covering_ods, covering_ois,
    covering_best`` (``eval_cover.txt``), ``pri_threshold, pri_ods, pri_ois, voi_threshold, voi_ods,
    voi_ois`` (``eval_RI_VOI.txt``) and the tables ``cover_th`` (threshold, covering), ``cover_img``
    (index, best threshold, covering R, covering P) and ``ri_voi_thr`` (threshold, PRI, VOI).
    """
    if len(per_image) == 0:
        raise ValueError("no images to collect")
    thresh = np.asarray(per_image[0].thresholds, dtype=np.float64)
    nt = thresh.size
    cnt_r_total = np.zeros(nt)
    sum_r_total = np.zeros(nt)
    best = np.zeros(4)
    cnt_r_best_total = 0.0
    global_ri = np.zeros(nt)
    global_voi = np.zeros(nt)
    ri_best = 0.0
    voi_best = 0.0
    cover_img = np.zeros((len(per_image), 4))
    for i, c in enumerate(per_image):
        if np.asarray(c.thresholds).size != nt:
            raise ValueError("all images must be evaluated with the same number of thresholds")
        r = ratio(c.cnt_r, c.sum_r)
        p = ratio(c.cnt_p, c.sum_p)
        k = int(np.argmax(r))
        cover_img[i] = (i + 1, thresh[k], r[k], p[k])
        cnt_r_total += c.cnt_r
        sum_r_total += c.sum_r
        last = int(np.flatnonzero(r == r.max())[-1])  # ff(end)
        best += (c.cnt_r[last], c.sum_r[last], c.cnt_p[last], c.sum_p[last])
        cnt_r_best_total += c.cnt_r_best
        global_ri += c.ri
        global_voi += c.voi
        ri_best += c.ri[np.flatnonzero(c.ri == c.ri.max())[-1]]
        voi_best += c.voi[np.flatnonzero(c.voi == c.voi.min())[-1]]
    n = len(per_image)
    r = ratio(cnt_r_total, sum_r_total)
    k = int(np.argmax(r))
    global_ri /= n
    global_voi /= n
    k_ri = int(np.argmax(global_ri))
    k_voi = int(np.argmin(global_voi))
    return {
        "covering_threshold": float(thresh[k]),
        "covering_ods": float(r[k]),
        "covering_ois": float(ratio(best[0], best[1])),
        "covering_best": float(cnt_r_best_total / sum_r_total[0]) if sum_r_total[0] else 0.0,
        "pri_threshold": float(thresh[k_ri]),
        "pri_ods": float(global_ri[k_ri]),
        "pri_ois": float(ri_best / n),
        "voi_threshold": float(thresh[k_voi]),
        "voi_ods": float(global_voi[k_voi]),
        "voi_ois": float(voi_best / n),
        "cover_th": np.column_stack([thresh, r]),
        "cover_img": cover_img,
        "ri_voi_thr": np.column_stack([thresh, global_ri, global_voi]),
    }


class RegionBenchmark:
    """The BSDS500 region benchmarks (covering, PRI, VOI) as an evaluator.

    ``thresholds`` is a number of thresholds (official linspace) or explicit values; it is ignored
    for lists of segmentations.
    """

    def __init__(self, thresholds: int | Sequence[float] | np.ndarray = 99) -> None:
        self.thresholds = thresholds
        self.reset()

    def reset(self) -> None:
        """Forget all processed images."""
        self.image_ids: list[Any] = []
        self.counts: list[RegionImageCounts] = []

    def process(self, image_id: Any, prediction: Prediction, ground_truth: GroundTruth) -> RegionImageCounts:
        """Evaluate one image and keep its counts.

        ``image_id`` is any identifier; ``prediction`` a ``ucm2`` ``(2H+1, 2W+1)``, pixel-resolution
        UCM ``(H, W)`` or a list of label maps; ``ground_truth`` as for
        :meth:`BoundaryBenchmark.process` (segmentations are used).
        """
        segs, _ = parse_ground_truth(ground_truth, need_boundaries=False)
        if any(s is None for s in segs):
            raise ValueError("the region benchmark needs the annotators' segmentations")
        counts = evaluate_regions_image(prediction, segs, self.thresholds)
        self.image_ids.append(image_id)
        self.counts.append(counts)
        return counts

    def evaluate(self) -> dict[str, float]:
        """Covering / PRI / VOI over the processed images (``collect_eval_reg``): ``{'covering_ods',
        'covering_ois', 'covering_best', 'covering_threshold', 'pri_ods', 'pri_ois', 'pri_threshold',
        'voi_ods', 'voi_ois', 'voi_threshold', 'n_images'}``.
        """
        scores = collect_region_scores(self.counts)
        out = {k: float(v) for k, v in scores.items() if np.isscalar(v)}
        out["n_images"] = float(len(self.counts))
        return out

    def tables(self) -> dict[str, np.ndarray]:
        """``cover_th``, ``cover_img`` and ``ri_voi_thr`` as the official ``eval_cover_th.txt``,
        ``eval_cover_img.txt`` and ``eval_RI_VOI_thr.txt``."""
        scores = collect_region_scores(self.counts)
        return {k: scores[k] for k in ("cover_th", "cover_img", "ri_voi_thr")}
