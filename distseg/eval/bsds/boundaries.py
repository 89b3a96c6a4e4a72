"""The boundary benchmark: per-image precision/recall counts (``evaluation_bdry_image``), ODS / OIS /
AP (``collect_eval_bdry``) and the :class:`BoundaryBenchmark` evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distseg.eval.bsds.io import (
    GroundTruth,
    Prediction,
    is_segmentation_list,
    parse_ground_truth,
    pixel_map,
    resolve_thresholds,
    segmentation_list,
)
from distseg.eval.bsds.maps import seg2bdry, thin_boundaries
from distseg.eval.bsds.matching import (
    DEFAULT_MAX_DIST,
    DEFAULT_OUTLIER_COST,
    CandidatePairs,
    max_dist_pixels,
    solve_matching,
)


def evaluate_boundaries_image(
    pb_or_segs: Prediction,
    gt_boundaries: Sequence[np.ndarray],
    thresholds: int | Sequence[float] | np.ndarray = 99,
    max_dist: float = DEFAULT_MAX_DIST,
    thin: bool = True,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    exact: bool = False,
) -> np.ndarray:
    """Boundary precision/recall counts of one image (the official ``evaluation_bdry_image``).

    ``pb_or_segs`` is a soft boundary map or pixel-resolution UCM ``(H, W)`` (``uint8`` is divided
    by 255), a double-resolution ``ucm2`` ``(2H+1, 2W+1)`` (its ``[2::2, 2::2]`` pixels are
    thresholded), or a list of label maps (one threshold per segmentation); ``gt_boundaries`` are
    the annotators' ``(H, W)`` boundary maps (``Boundaries``).  ``thresholds`` is a number of
    thresholds (``linspace(1/(n+1), 1-1/(n+1), n)``) or explicit threshold values (``pb >= t`` is a
    boundary); it is ignored for a list of segmentations (thresholds ``1..len(segs)``).
    ``max_dist`` is the matching tolerance as a fraction of the image diagonal; ``thin`` thins the
    binarised map with ``bwmorph(.., 'thin', inf)`` first (official default); ``outlier_cost`` and
    ``exact`` (solve each correspondence exactly; slow) are as for :func:`correspond_pixels`.

    Returns a ``(T, 5)`` array with columns ``threshold, cntR, sumR, cntP, sumP`` (the
    ``*_ev1.txt`` file of the official code): ``cntR`` matched annotator pixels summed over
    annotators out of ``sumR`` annotator pixels, ``cntP`` machine pixels matched to at least one
    annotator out of ``sumP`` machine pixels.
    """
    gts = [np.asarray(b) != 0 for b in gt_boundaries]
    if not gts:
        raise ValueError("no ground-truth boundary maps")
    shape = gts[0].shape
    if len(shape) != 2 or any(g.shape != shape for g in gts):
        raise ValueError("ground-truth boundary maps must be 2-D and of one size")

    if is_segmentation_list(pb_or_segs):
        segs, thresh = segmentation_list(pb_or_segs, shape)  # type: ignore[arg-type]
        maps = (seg2bdry(s, "imageSize") for s in segs)
    else:
        pb = pixel_map(pb_or_segs, shape)  # type: ignore[arg-type]
        thresh = resolve_thresholds(thresholds)
        maps = (pb >= t for t in thresh)

    # binarise (and thin) every threshold first: their union is the domain of the candidate pairs
    machine: list[np.ndarray] = []
    domain = np.zeros(shape, dtype=bool)
    prev_raw: np.ndarray | None = None
    for raw in maps:
        if prev_raw is not None and np.array_equal(raw, prev_raw):  # e.g. a UCM between levels
            machine.append(machine[-1])
            continue
        bmap = thin_boundaries(raw) if thin else raw
        machine.append(np.flatnonzero(bmap))
        domain |= bmap
        prev_raw = raw

    radius = max_dist_pixels(shape, max_dist)
    outlier = outlier_cost * radius
    pairs = [CandidatePairs(g, domain, radius) for g in gts]
    sum_r = float(sum(int(g.sum()) for g in gts))
    # per annotator: the last selection of candidate pairs and its result, to skip thresholds
    # whose machine pixels near that annotator's boundaries did not change
    last: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(gts)

    counts = np.zeros((thresh.size, 5), dtype=np.float64)
    counts[:, 0] = thresh
    flat = np.zeros(domain.size, dtype=bool)
    for t, pixels in enumerate(machine):
        flat[pixels] = True
        acc_p = np.zeros(domain.size, dtype=bool)
        cnt_r = 0
        for a, cand in enumerate(pairs):
            sel = cand.select(flat)
            prev = last[a]
            if prev is not None and np.array_equal(prev[0], sel):
                matched_pix, n_matched = prev[1], prev[2]
            else:
                idx = np.flatnonzero(sel)
                matched_pix, matched_node = solve_matching(
                    cand.pixel[idx], cand.node[idx], cand.cost[idx], outlier, cand.n_target, exact
                )
                n_matched = int(matched_node.size)
                last[a] = (sel, matched_pix, n_matched)
            acc_p[matched_pix] = True
            cnt_r += n_matched
        counts[t, 1:] = (cnt_r, sum_r, float(acc_p.sum()), float(pixels.size))
        flat[pixels] = False
    return counts


def _fmeasure(r: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    s = p + r
    return 2.0 * p * r / (s + (s == 0))


def ratio(cnt: np.ndarray, tot: np.ndarray) -> np.ndarray:
    """``cnt / tot``, 0 where ``tot`` is 0 (the official ``cnt ./ (tot + (tot == 0))``)."""
    return cnt / (tot + (tot == 0))


def _max_f(thresh: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """``maxF`` of ``collect_eval_bdry``: best F along the piecewise-linear P/R curve."""
    best_t, best_r, best_p = float(thresh[0]), float(r[0]), float(p[0])
    best_f = float(_fmeasure(r[0], p[0]))
    d = np.linspace(0.0, 1.0, 100)
    for i in range(1, thresh.size):
        tt = thresh[i] * d + thresh[i - 1] * (1 - d)
        rr = r[i] * d + r[i - 1] * (1 - d)
        pp = p[i] * d + p[i - 1] * (1 - d)
        ff = _fmeasure(rr, pp)
        k = int(np.argmax(ff))  # first maximum, as the strict '>' of the MATLAB loop
        if ff[k] > best_f:
            best_t, best_r, best_p, best_f = float(tt[k]), float(rr[k]), float(pp[k]), float(ff[k])
    return best_t, best_r, best_p, best_f


def _average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """``collect_eval_bdry``'s AP: ``interp1`` of P over unique R at 0:0.01:1, NaN -> 0, sum*0.01."""
    # MATLAB (pre-R2013a) unique returns the last occurrence of each value
    order = np.argsort(r, kind="stable")
    rs = r[order]
    last = np.ones(rs.size, dtype=bool)
    last[:-1] = rs[1:] != rs[:-1]
    ru = rs[last]
    pu = p[order][last]
    if ru.size <= 1:
        return 0.0
    ri = np.arange(101) * 0.01
    p_int = np.interp(ri, ru, pu, left=np.nan, right=np.nan)
    return float(np.nansum(p_int) * 0.01)


def collect_boundary_scores(counts: Sequence[np.ndarray]) -> dict[str, Any]:
    """ODS / OIS / AP from per-image counts (the official ``collect_eval_bdry``).

    ``counts`` holds one ``(T, 5)`` array per image as returned by :func:`evaluate_boundaries_image`
    (all with the same thresholds).  Returns a dict with the scalar scores ``best_threshold, ods_r,
    ods_p, ods_f, ois_r, ois_p, ois_f, ap`` (the columns of ``eval_bdry.txt``) and the tables ``thr``
    (``eval_bdry_thr.txt``: threshold, R, P, F) and ``img`` (``eval_bdry_img.txt``: index, best
    threshold, R, P, F).
    """
    if len(counts) == 0:
        raise ValueError("no images to collect")
    arrs = [np.asarray(c, dtype=np.float64) for c in counts]
    thresh = arrs[0][:, 0]
    for a in arrs:
        if a.shape != arrs[0].shape:
            raise ValueError("all images must be evaluated with the same number of thresholds")
    total = np.zeros((thresh.size, 4))
    best_counts = np.zeros(4)
    img = np.zeros((len(arrs), 5))
    for i, a in enumerate(arrs):
        cnt = a[:, 1:5]
        r = ratio(cnt[:, 0], cnt[:, 1])
        p = ratio(cnt[:, 2], cnt[:, 3])
        f = _fmeasure(r, p)
        bt, br, bp, bf = _max_f(thresh, r, p)
        img[i] = (i + 1, bt, br, bp, bf)
        total += cnt
        best_counts += cnt[int(np.argmax(f))]  # ff(1) of find(F == max(F))
    r = ratio(total[:, 0], total[:, 1])
    p = ratio(total[:, 2], total[:, 3])
    f = _fmeasure(r, p)
    bt, br, bp, bf = _max_f(thresh, r, p)
    r_max = float(ratio(best_counts[0], best_counts[1]))
    p_max = float(ratio(best_counts[2], best_counts[3]))
    return {
        "best_threshold": bt,
        "ods_r": br,
        "ods_p": bp,
        "ods_f": bf,
        "ois_r": r_max,
        "ois_p": p_max,
        "ois_f": float(_fmeasure(r_max, p_max)),
        "ap": _average_precision(r, p),
        "thr": np.column_stack([thresh, r, p, f]),
        "img": img,
    }


class BoundaryBenchmark:
    """The BSDS500 boundary benchmark as an evaluator (``reset`` / ``process`` / ``evaluate``).

    Example::

        bench = BoundaryBenchmark(thresholds=99)
        for image_id, pb in predictions.items():
            bench.process(image_id, pb, gt_dir / f"{image_id}.mat")
        scores = bench.evaluate()   # {'ods_f': ..., 'ois_f': ..., 'ap': ..., ...}

    ``thresholds`` is a number of thresholds (official ``linspace(1/(n+1), 1-1/(n+1), n)``) or
    explicit values (they must suit the value range of the maps); it is ignored for lists of
    segmentations, which use one threshold per segmentation.  ``max_dist`` is the matching tolerance
    as a fraction of the image diagonal (0.0075), ``thin`` thins binarised maps first (official
    ``thinpb = true``); ``outlier_cost`` and ``exact`` are as for :func:`correspond_pixels`.
    """

    def __init__(
        self,
        thresholds: int | Sequence[float] | np.ndarray = 99,
        max_dist: float = DEFAULT_MAX_DIST,
        thin: bool = True,
        outlier_cost: float = DEFAULT_OUTLIER_COST,
        exact: bool = False,
    ) -> None:
        self.thresholds = thresholds
        self.exact = exact
        self.max_dist = max_dist
        self.thin = thin
        self.outlier_cost = outlier_cost
        self.reset()

    def reset(self) -> None:
        """Forget all processed images."""
        self.image_ids: list[Any] = []
        self.counts: list[np.ndarray] = []

    def process(self, image_id: Any, prediction: Prediction, ground_truth: GroundTruth) -> np.ndarray:
        """Evaluate one image and keep its counts; returns them, ``(T, 5)`` (threshold, cntR, sumR,
        cntP, sumP).

        ``image_id`` is any identifier (kept in :attr:`image_ids`, in processing order);
        ``prediction`` a soft boundary map / pixel UCM ``(H, W)``, ``ucm2`` ``(2H+1, 2W+1)`` or a
        list of label maps; ``ground_truth`` a BSDS ``.mat`` path, a ``(segmentations,
        boundaries)`` tuple of lists, a list of label maps (boundaries via :func:`seg2bdry`) or a
        list of dicts with ``Segmentation`` / ``Boundaries``.
        """
        _, bdrys = parse_ground_truth(ground_truth)
        counts = evaluate_boundaries_image(
            prediction, bdrys, self.thresholds, self.max_dist, self.thin, self.outlier_cost, self.exact
        )
        self.image_ids.append(image_id)
        self.counts.append(counts)
        return counts

    def evaluate(self) -> dict[str, float]:
        """ODS / OIS / AP over the processed images (``collect_eval_bdry``): ``{'ods_f', 'ods_r',
        'ods_p', 'ois_f', 'ois_r', 'ois_p', 'ap', 'best_threshold', 'n_images'}``; :meth:`tables`
        gives the per-threshold and per-image tables.
        """
        scores = collect_boundary_scores(self.counts)
        out = {k: float(v) for k, v in scores.items() if np.isscalar(v)}
        out["n_images"] = float(len(self.counts))
        return out

    def tables(self) -> dict[str, np.ndarray]:
        """``thr`` (threshold, R, P, F) and ``img`` (index, threshold, R, P, F) as the official
        ``eval_bdry_thr.txt`` / ``eval_bdry_img.txt`` (image ``i`` is :attr:`image_ids` ``[i-1]``)."""
        scores = collect_boundary_scores(self.counts)
        return {"thr": scores["thr"], "img": scores["img"]}
