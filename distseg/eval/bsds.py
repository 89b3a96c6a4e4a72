"""The BSDS500 boundary and region benchmarks, re-implemented faithfully in Python.

This module reproduces the official benchmark code distributed with BSDS500 (Arbelaez, Maire,
Fowlkes, Malik, "Contour Detection and Hierarchical Image Segmentation", TPAMI 2011; the MATLAB/C++
files ``bench/benchmarks/*.m`` and ``bench/source/correspondPixels.cc``/``match.cc``):

=============================  ===============================================================
official                       here
=============================  ===============================================================
``correspondPixels``           :func:`correspond_pixels`
``evaluation_bdry_image``      :func:`evaluate_boundaries_image`
``collect_eval_bdry``          :func:`collect_boundary_scores` / :class:`BoundaryBenchmark`
``evaluation_reg_image``       :func:`evaluate_regions_image`
``collect_eval_reg``           :func:`collect_region_scores` / :class:`RegionBenchmark`
``seg2bdry``                   :func:`seg2bdry`
``bwmorph(.., 'thin', inf)``   :func:`thin_boundaries` (= ``skimage.morphology.thin``)
=============================  ===============================================================

Boundary benchmark.  For every threshold the machine boundary map is binarised (``pb >= t`` for a
soft map, the boundaries of the t-th segmentation for a list of segmentations), thinned to
one-pixel width and matched against each annotator's boundary map by a minimum-cost bipartite
correspondence in which two pixels may only be paired when they lie within ``max_dist`` (a fraction,
0.0075, of the image diagonal) and an unpaired pixel costs ``outlier_cost * max_dist``.  Recall
accumulates over annotators (``cntR`` matched ground-truth pixels out of ``sumR``); precision counts
the machine pixels matched to at least one annotator (``cntP`` out of ``sumP``).  ODS, OIS and AP
are then computed exactly as ``collect_eval_bdry`` does (including its linear interpolation between
thresholds for the ODS point and its 101-sample "area" for AP).

The official matcher runs Goldberg's CSA on a graph whose outlier connections are drawn at random,
so it only approximates the optimum of its assignment problem (two runs differ in the 4th digit).
Here (see :func:`_solve_matching`) the default solver builds a greedy matching by increasing
distance, grows it to maximum cardinality along augmenting paths (one
:func:`scipy.sparse.csgraph.maximum_flow` call) and shortens it by swaps; as the outlier cost is 100
times the largest distance, the optimum has maximum cardinality, so recall is the optimum's and
precision differs from it by a few pixels in ten thousand.  ``exact=True`` solves the assignment
problem exactly instead (:func:`scipy.optimize.linear_sum_assignment` per connected component of
the candidate graph; slow on long contours).  On the official 5-image example both land within
3e-4 of the official numbers, inside the spread of the official code's own runs.

Speed: the candidate pairs (pixel, annotator pixel within the radius) are generated once per image
and annotator for the union of the thresholded maps; each threshold then selects its pairs, and an
annotator whose nearby machine pixels did not change since the previous threshold is not matched
again.  For a 481x321 image, 99 thresholds and 5-6 annotators this takes about 1-1.5 s of one CPU
core for a UCM and 2-6 s (mean 3.3 s) for a dense Sobel-magnitude edge map; about two thirds of
it is the max-flow augmentation, which a compiled assignment solver would remove.

Region benchmark.  For every threshold a segmentation is produced (connected components of
``ucm2 <= t`` at double resolution, subsampled to pixels, exactly as ``bwlabel`` + ``(2:2:end,
2:2:end)``; or the t-th segmentation of a list) and compared with all annotators: segmentation
covering (ODS / OIS / best), Probabilistic Rand Index and Variation of Information (ODS / OIS), as
``evaluation_reg_image`` + ``collect_eval_reg`` compute them (label 0 is ignored, as there).

Inputs accepted as ``prediction``:

* a soft boundary map at pixel resolution ``(H, W)`` (float in [0, 1]; ``uint8`` is divided by 255
  as the official code does for PNG files) -- also a *pixel-resolution UCM* (boundary strength per
  pixel, interior 0); thresholds are taken over its values;
* a UCM at double resolution ``(2H+1, 2W+1)`` (the official ``ucm2``);
* a list (or tuple) of label maps ``(H, W)``: one "threshold" per segmentation.

Indices: the official code is MATLAB (1-based, column-major); here everything is 0-based and
row-major, e.g. ``ucm2(3:2:end, 3:2:end)`` is ``ucm2[2::2, 2::2]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import scipy.io
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, maximum_flow

__all__ = [
    "DEFAULT_MAX_DIST",
    "DEFAULT_OUTLIER_COST",
    "BoundaryBenchmark",
    "RegionBenchmark",
    "RegionImageCounts",
    "collect_boundary_scores",
    "collect_region_scores",
    "correspond_pixels",
    "default_thresholds",
    "evaluate_boundaries_image",
    "evaluate_regions_image",
    "gt_boundaries_from_segmentation",
    "load_bsds_ground_truth",
    "pixel_ucm_to_labels",
    "seg2bdry",
    "thin_boundaries",
    "ucm2_to_labels",
    "ucm2_to_pixel",
]

#: Maximum matching distance, as a fraction of the image diagonal (``correspondPixels`` default).
DEFAULT_MAX_DIST = 0.0075
#: Cost of leaving a pixel unmatched, as a multiple of the maximum distance (official default).
DEFAULT_OUTLIER_COST = 100.0

Prediction = Union[np.ndarray, Sequence[np.ndarray]]
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------


def load_bsds_ground_truth(mat_path: PathLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Load a BSDS500 ``groundTruth/*.mat`` file.

    Args:
        mat_path: path of the ``.mat`` file (a ``1xN`` cell ``groundTruth`` whose entries have the
            fields ``Segmentation`` (uint16 labels, 1-based) and ``Boundaries`` (uint8 0/1)).

    Returns:
        ``(segmentations, boundaries)``: two lists with one ``(H, W)`` array per annotator
        (``int32`` labels and ``bool`` boundary maps).
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


def ucm2_to_pixel(ucm2: np.ndarray) -> np.ndarray:
    """The pixel-resolution boundary map of a double-resolution UCM, ``ucm2(3:2:end, 3:2:end)``.

    This is what ``evaluation_bdry_image`` thresholds: each pixel takes the contour strength of the
    boundary element to its lower right, so an ``(2H+1, 2W+1)`` map becomes ``(H, W)``.
    """
    ucm2 = np.asarray(ucm2)
    if ucm2.ndim != 2 or ucm2.shape[0] % 2 == 0 or ucm2.shape[1] % 2 == 0:
        raise ValueError(f"a ucm2 has odd shape (2H+1, 2W+1), got {ucm2.shape}")
    return np.asarray(ucm2[2::2, 2::2], dtype=np.float64)


_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def ucm2_to_labels(ucm2: np.ndarray, threshold: float) -> np.ndarray:
    """The segmentation of a double-resolution UCM at ``threshold``.

    As ``evaluation_reg_image``: ``labels2 = bwlabel(ucm <= thresh)`` (8-connectivity) at double
    resolution, then ``seg = labels2(2:2:end, 2:2:end)``.  Returns ``(H, W)`` int32 labels >= 1.
    """
    labels, _ = ndimage.label(np.asarray(ucm2) <= threshold, structure=_EIGHT)
    return labels[1::2, 1::2].astype(np.int32, copy=False)


def pixel_ucm_to_labels(ucm: np.ndarray, threshold: float) -> np.ndarray:
    """The segmentation of a pixel-resolution UCM (or soft boundary map) at ``threshold``.

    Not part of the official benchmark (which needs a double-resolution ``ucm2``); the natural
    analogue: regions are the 4-connected components of ``ucm <= threshold`` (a one-pixel, 8-connected
    contour separates 4-connected regions) and each remaining contour pixel joins its nearest region.
    Returns ``(H, W)`` int32 labels >= 1.
    """
    ucm = np.asarray(ucm, dtype=np.float64)
    inside = ucm <= threshold
    labels, n = ndimage.label(inside, structure=_FOUR)
    if n == 0:  # everything is contour: one region
        return np.ones(ucm.shape, dtype=np.int32)
    if not inside.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~inside, return_indices=True)
        labels = labels[iy, ix]
    return labels.astype(np.int32, copy=False)


def seg2bdry(seg: np.ndarray, fmt: str = "imageSize") -> np.ndarray:
    """Boundaries of a segmentation, exactly as the official ``seg2bdry``.

    Args:
        seg: ``(H, W)`` label map.
        fmt: ``"imageSize"`` for an ``(H, W)`` map, ``"doubleSize"`` for ``(2H+1, 2W+1)``.

    Returns:
        A ``bool`` boundary map.
    """
    if fmt not in ("imageSize", "doubleSize"):
        raise ValueError("possible values for fmt are: imageSize and doubleSize")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError("seg must be a scalar image")
    tx, ty = seg.shape
    bdry = np.zeros((2 * tx + 1, 2 * ty + 1), dtype=bool)
    edgels_v = np.zeros((tx, ty), dtype=bool)
    edgels_v[:-1, :] = seg[:-1, :] != seg[1:, :]
    edgels_h = np.zeros((tx, ty), dtype=bool)
    edgels_h[:, :-1] = seg[:, :-1] != seg[:, 1:]
    bdry[2::2, 1::2] = edgels_v
    bdry[1::2, 2::2] = edgels_h
    bdry[2:-1:2, 2:-1:2] = (edgels_h[:-1, :-1] | edgels_h[1:, :-1]) | (
        edgels_v[:-1, :-1] | edgels_v[:-1, 1:]
    )
    bdry[0, :] = bdry[1, :]
    bdry[:, 0] = bdry[:, 1]
    bdry[-1, :] = bdry[-2, :]
    bdry[:, -1] = bdry[:, -2]
    if fmt == "imageSize":
        return bdry[2::2, 2::2].copy()
    return bdry


def gt_boundaries_from_segmentation(seg: np.ndarray) -> np.ndarray:
    """An annotator's boundary map from its segmentation, as stored in BSDS500's ``Boundaries``.

    ``bwmorph(seg2bdry(seg, 'imageSize'), 'thin', inf)``; this reproduces the ``Boundaries`` field
    of the BSDS500 ground-truth files exactly.
    """
    return thin_boundaries(seg2bdry(seg, "imageSize"))


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """The two lookup tables of the Guo-Hall thinning used by ``bwmorph(.., 'thin')``.

    Neighbourhood code bits 0..7 = E, NE, N, NW, W, SW, S, SE (the weights ``[[8, 4, 2], [16, 0,
    1], [32, 64, 128]]``, as in :func:`skimage.morphology.thin`, which builds the same tables).
    """
    n = np.arange(256)
    bits = [((n >> i) & 1) == 1 for i in range(8)]
    g1 = np.zeros(256, dtype=int)
    for i in (0, 2, 4, 6):
        g1 += (~bits[i]) & (bits[i + 1] | bits[(i + 2) % 8])
    n1 = np.zeros(256, dtype=int)
    n2 = np.zeros(256, dtype=int)
    for k in (1, 3, 5, 7):
        n1 += bits[k] | bits[k - 1]
        n2 += bits[k] | bits[(k + 1) % 8]
    nmin = np.minimum(n1, n2)
    g12 = (g1 == 1) & ((nmin == 2) | (nmin == 3))
    g3 = ~((bits[1] | bits[2] | ~bits[7]) & bits[0])
    g3p = ~((bits[5] | bits[6] | ~bits[3]) & bits[4])
    return g12 & g3, g12 & g3p


_THIN_LUTS = _thin_luts()


def _unique_small(values: np.ndarray, mark: np.ndarray) -> np.ndarray:
    """Unique entries of ``values`` (indices into ``mark``, an int scratch array of -1s)."""
    pos = np.arange(values.size)
    mark[values] = pos
    out = values[mark[values] == pos]
    mark[values] = -1
    return out


def thin_boundaries(bmap: np.ndarray) -> np.ndarray:
    """``bwmorph(bmap, 'thin', inf)``: thin a binary map to one-pixel-wide curves.

    The two-subiteration Guo-Hall algorithm with MATLAB's lookup tables -- the same result as
    :func:`skimage.morphology.thin` (checked pixel for pixel in the tests), computed faster: each
    subiteration only re-examines the pixels whose neighbourhood changed, instead of the whole
    image.  (The ``Boundaries`` of the BSDS500 ground truth are exactly
    ``thin_boundaries(seg2bdry(Segmentation))``.)
    """
    bmap = np.asarray(bmap, dtype=bool)
    if bmap.ndim != 2:
        raise ValueError("thin_boundaries expects a 2-D map")
    out = np.zeros(bmap.shape, dtype=bool)
    rows = np.flatnonzero(bmap.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(bmap.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # zero padding outside the image, as MATLAB's applylut and skimage's correlate(mode='constant')
    pad = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=np.uint8)
    pad[1:-1, 1:-1] = bmap[r0:r1, c0:c1]
    flat = pad.ravel()
    w = pad.shape[1]
    offs = np.array([1, -w + 1, -w, -w - 1, -1, w - 1, w, w + 1], dtype=np.intp)
    mark = np.full(flat.size, -1, dtype=np.intp)
    fg = np.flatnonzero(flat)
    border = fg[(flat[fg + 1] == 0) | (flat[fg - 1] == 0) | (flat[fg + w] == 0) | (flat[fg - w] == 0)]
    empty = np.zeros(0, dtype=np.intp)
    # A pixel examined with one table at subiteration k is examined with it again at k + 2 only if
    # a neighbour was deleted at k or k + 1 (interior pixels are never deletable).
    changed = [border, border]  # neighbours of the deletions of the last two subiterations
    k = 0
    quiet = 0
    while quiet < 2 or k < 2:
        if k == 0:
            cand = border
        else:
            cand = _unique_small(np.concatenate(changed), mark)
            if k == 1:
                cand = _unique_small(np.concatenate([cand, border]), mark)
        cand = cand[flat[cand] == 1]
        dele = empty
        if cand.size:
            code = np.zeros(cand.size, dtype=np.uint8)
            for bit, off in enumerate(offs):
                code |= flat[cand + off] << bit
            dele = cand[_THIN_LUTS[k % 2][code]]
        if dele.size:
            flat[dele] = 0
            nb = (dele[:, None] + offs[None, :]).ravel()
            nb = _unique_small(nb[flat[nb] == 1], mark)
            quiet = 0
        else:
            nb = empty
            quiet += 1
        changed = [nb, changed[0]]
        k += 1
    out[r0:r1, c0:c1] = pad[1:-1, 1:-1] == 1
    return out


# --------------------------------------------------------------------------------------------
# correspondPixels
# --------------------------------------------------------------------------------------------


def _max_dist_pixels(shape: tuple[int, ...], max_dist: float) -> float:
    """``maxDist * sqrt(rows^2 + cols^2)``, the matching radius in pixels."""
    return float(max_dist) * float(np.hypot(shape[0], shape[1]))


def _offsets(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All integer displacements (dy, dx) with dy^2 + dx^2 <= radius^2 and their lengths."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = (dy * dy + dx * dx).ravel()
    keep = d2 <= radius * radius
    return dy.ravel()[keep], dx.ravel()[keep], np.sqrt(d2[keep].astype(np.float64))


class _CandidatePairs:
    """All pairs (pixel of a domain, annotator boundary pixel) within the matching radius.

    Built once per annotator and image; the candidate graph of any machine map inside the domain
    is then a selection of these pairs.  Pairs are sorted by machine pixel (row-major index);
    ``cost`` is ``rint(100 * distance)`` as in ``match.cc``.
    """

    def __init__(self, target: np.ndarray, domain: np.ndarray, radius: float) -> None:
        target = np.asarray(target, dtype=bool)
        h, w = target.shape
        ty, tx = np.nonzero(target)
        self.n_target = ty.size
        self.target_pixels = ty.astype(np.intp) * w + tx
        dy, dx, dist = _offsets(radius)
        py = ty[:, None] + dy[None, :]
        px = tx[:, None] + dx[None, :]
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        pix = np.where(ok, py * w + px, 0)
        ok &= np.asarray(domain, dtype=bool).ravel()[pix]
        node, k = np.nonzero(ok)
        pix = pix[node, k]
        order = np.argsort(pix, kind="stable")
        self.pixel = pix[order]
        self.node = node[order].astype(np.intp)
        self.cost = np.rint(dist[k[order]] * 100.0)

    def select(self, machine_flat: np.ndarray) -> np.ndarray:
        """Mask of the pairs whose machine pixel is set in the flat boolean map."""
        return machine_flat[self.pixel]


def _greedy_matching(a: np.ndarray, b: np.ndarray, key: np.ndarray, m1: int, m2: int) -> np.ndarray:
    """Greedy matching in increasing ``key`` order (``key`` must be a strict total order).

    Computed in vectorised rounds: every edge that is the best remaining edge of both its end
    nodes ("locally dominant") is taken, its nodes removed, and so on -- the same matching as the
    sequential greedy algorithm over the sorted edges.  Returns the in-matching mask of the edges.
    """
    inm = np.zeros(a.size, dtype=bool)
    alive = np.arange(a.size)
    best_l = np.empty(m1)
    best_r = np.empty(m2)
    used_l = np.zeros(m1, dtype=bool)
    used_r = np.zeros(m2, dtype=bool)
    while alive.size:
        k = key[alive]
        aa, bb = a[alive], b[alive]
        best_l[aa] = np.inf
        np.minimum.at(best_l, aa, k)
        best_r[bb] = np.inf
        np.minimum.at(best_r, bb, k)
        won = (k == best_l[aa]) & (k == best_r[bb])
        inm[alive[won]] = True
        used_l[aa[won]] = True
        used_r[bb[won]] = True
        keep = ~(used_l[aa] | used_r[bb])
        alive = alive[keep]
    return inm


def _augment_to_maximum(a: np.ndarray, b: np.ndarray, inm: np.ndarray, m1: int, m2: int) -> np.ndarray:
    """Grow a matching to maximum cardinality along augmenting paths (one max-flow call).

    Only connected components of the candidate graph with free nodes on both sides can hold an
    augmenting path.  Their residual network (source -> free left nodes, unmatched edges left ->
    right, matched edges right -> left, free right nodes -> sink, unit capacities) is given to
    :func:`scipy.sparse.csgraph.maximum_flow`; its flow is a set of vertex-disjoint augmenting
    paths, and flipping their edges gives a maximum matching that keeps every matched node matched.
    """
    matched_l = np.zeros(m1, dtype=bool)
    matched_l[a[inm]] = True
    matched_r = np.zeros(m2, dtype=bool)
    matched_r[b[inm]] = True
    if matched_l.all() or matched_r.all():
        return inm
    graph = csr_matrix(
        (np.ones(a.size, dtype=np.int8), (a, m1 + b)), shape=(m1 + m2, m1 + m2)
    )
    ncomp, comp = connected_components(graph, directed=False)
    free_l = np.zeros(ncomp, dtype=bool)
    free_l[comp[:m1][~matched_l]] = True
    free_r = np.zeros(ncomp, dtype=bool)
    free_r[comp[m1:][~matched_r]] = True
    open_comp = free_l & free_r
    if not open_comp.any():
        return inm
    edges = np.flatnonzero(open_comp[comp[a]])
    ea, eb, em = a[edges], b[edges], inm[edges]
    n = m1 + m2 + 2
    src, snk = m1 + m2, m1 + m2 + 1
    su = np.flatnonzero(~matched_l & open_comp[comp[:m1]])
    tv = m1 + np.flatnonzero(~matched_r & open_comp[comp[m1:]])
    u = np.where(em, m1 + eb, ea)
    v = np.where(em, ea, m1 + eb)
    rows = np.concatenate([u, np.full(su.size, src), tv])
    cols = np.concatenate([v, su, np.full(tv.size, snk)])
    cap = csr_matrix((np.ones(rows.size, dtype=np.int32), (rows, cols)), shape=(n, n))
    res = maximum_flow(cap, src, snk, method="dinic")
    if res.flow_value == 0:
        return inm
    flipped = np.asarray(res.flow[u, v]).ravel() > 0
    out = inm.copy()
    out[edges[flipped]] ^= True
    return out


def _improve_by_swaps(
    a: np.ndarray, b: np.ndarray, key: np.ndarray, inm: np.ndarray, m1: int, m2: int
) -> np.ndarray:
    """Cheaper matching of the same size: re-pair matched right nodes with closer free left nodes.

    Applies, in vectorised rounds, improving alternating paths of length two: a matched pair
    (i, j) and a free left node i' with key(i', j) < key(i, j) become (i', j); each node takes part
    in at most one swap per round.  (Only the left, machine, side matters for the benchmark.)
    """
    cur = np.full(m2, np.inf)
    best = np.empty(m2)
    best_l = np.empty(m1)
    for _ in range(64):
        matched_l = np.zeros(m1, dtype=bool)
        matched_l[a[inm]] = True
        cur[:] = np.inf
        cur[b[inm]] = key[inm]
        cand = np.flatnonzero(~matched_l[a] & (key < cur[b]))
        if cand.size == 0:
            break
        ca, cb, ck = a[cand], b[cand], key[cand]
        best[cb] = np.inf
        np.minimum.at(best, cb, ck)
        win = ck == best[cb]
        cand, ca, cb, ck = cand[win], ca[win], cb[win], ck[win]
        best_l[ca] = np.inf
        np.minimum.at(best_l, ca, ck)
        take = cand[ck == best_l[ca]]
        drop = np.zeros(m2, dtype=bool)
        drop[b[take]] = True
        inm = inm & ~drop[b]
        inm[take] = True
    return inm


def _solve_matching(
    ei: np.ndarray,
    ej: np.ndarray,
    cost: np.ndarray,
    outlier_cost: float,
    n_right: int,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``match.cc``'s assignment problem on a candidate edge list; returns the matched pairs.

    Args:
        ei: left node ids (any non-negative integers) of the candidate pairs, sorted ascending.
        ej: right node ids, in ``[0, n_right)``.
        cost: integer pair costs ``rint(100 * distance)`` (as float).
        outlier_cost: cost of an unmatched pixel in pixels; as in ``match.cc`` its integer cost is
            ``ceil(100 * outlier_cost)``.  A matching costs the sum of its pair costs plus the
            outlier cost of every unmatched node, i.e. every pair saves ``outlier - distance``.
        n_right: number of right nodes.
        exact: see below.

    Two solvers:

    * ``exact=True``: the optimum, by :func:`scipy.optimize.linear_sum_assignment` on the dense
      cost matrix of each connected component of the candidate graph (pair cost - outlier cost,
      0 for "unpaired"); a component with a single node on one side takes its cheapest edge.
      Slow when a component has thousands of pixels (long parallel contours).
    * ``exact=False`` (default): a greedy matching by increasing distance, grown to maximum
      cardinality along augmenting paths (one max-flow call), then shortened by swapping matched
      annotator pixels to closer free machine pixels.  Because the outlier cost is 100 times the
      largest distance, the optimum has maximum cardinality in practice, so the number of matched
      pixels -- recall -- is the optimum's; which machine pixels are matched can differ by a few
      in ten thousand, about as much as two runs of the official randomised solver differ.
    """
    if ei.size == 0:
        return ei[:0], ej[:0]
    # compress node ids
    new_l = np.ones(ei.size, dtype=bool)
    new_l[1:] = ei[1:] != ei[:-1]
    ui = ei[new_l]
    li = np.cumsum(new_l) - 1
    present = np.zeros(n_right, dtype=bool)
    present[ej] = True
    uj = np.flatnonzero(present)
    remap = np.cumsum(present) - 1
    lj = remap[ej]
    n1, n2 = ui.size, uj.size
    ow_int = float(np.ceil(outlier_cost * 100.0))
    key = cost * float(ei.size) + np.arange(ei.size)  # strict order: cost, then edge order

    if not exact:
        inm = _greedy_matching(li, lj, key, n1, n2)
        inm = _augment_to_maximum(li, lj, inm, n1, n2)
        inm = _improve_by_swaps(li, lj, key, inm, n1, n2)
        return ui[li[inm]], uj[lj[inm]]

    graph = coo_matrix(
        (np.ones(li.size, dtype=np.int8), (li, n1 + lj)), shape=(n1 + n2, n1 + n2)
    ).tocsr()
    ncomp, comp = connected_components(graph, directed=False)
    ecomp = comp[li]
    left_size = np.bincount(comp[:n1], minlength=ncomp)
    right_size = np.bincount(comp[n1:], minlength=ncomp)
    trivial_edge = ((left_size == 1) | (right_size == 1))[ecomp]
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    if trivial_edge.any():  # a single node on one side: the cheapest edge is optimal
        idx = np.flatnonzero(trivial_edge)
        best = np.full(ncomp, np.inf)
        np.minimum.at(best, ecomp[idx], key[idx])
        win = idx[key[idx] == best[ecomp[idx]]]
        out_i.append(li[win])
        out_j.append(lj[win])
    hard = np.flatnonzero(~trivial_edge)
    if hard.size:
        order = hard[np.argsort(ecomp[hard], kind="stable")]
        bounds = np.flatnonzero(np.diff(ecomp[order])) + 1
        for part in np.split(order, bounds):
            hi, hli = np.unique(li[part], return_inverse=True)
            hj, hlj = np.unique(lj[part], return_inverse=True)
            mat = np.zeros((hi.size, hj.size))
            mat[hli, hlj] = cost[part] - ow_int
            r_ind, c_ind = linear_sum_assignment(mat)
            keep = mat[r_ind, c_ind] < 0
            out_i.append(hi[r_ind[keep]])
            out_j.append(hj[c_ind[keep]])
    pi = np.concatenate(out_i)
    pj = np.concatenate(out_j)
    return ui[pi], uj[pj]


def correspond_pixels(
    bmap1: np.ndarray,
    bmap2: np.ndarray,
    max_dist: float = DEFAULT_MAX_DIST,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost correspondence between two boundary maps (the official ``correspondPixels``).

    Pixels are paired one-to-one; two pixels may only be paired when their Euclidean distance is at
    most ``max_dist`` times the image diagonal; pairing costs the distance and leaving a pixel
    unpaired costs ``outlier_cost * max_dist * diagonal``.  See :func:`_solve_matching` for the
    solver (``exact=False``: maximum-cardinality greedy-and-improve, the default; ``exact=True``:
    the optimum of the assignment problem).

    Args:
        bmap1: ``(H, W)`` boundary map (non-zero = boundary), e.g. the thinned machine map.
        bmap2: ``(H, W)`` boundary map, e.g. one annotator's ``Boundaries``.
        max_dist: maximum pairing distance as a fraction of the image diagonal.
        outlier_cost: cost of an unpaired pixel, as a multiple of the maximum distance.
        exact: solve the assignment problem exactly (slow for long contours).

    Returns:
        ``(match1, match2)``: ``int64`` arrays shaped like the inputs.  ``match1[y, x]`` is
        ``1 + (row-major flat index)`` of the ``bmap2`` pixel paired with ``bmap1[y, x]``, or 0 when
        unpaired (the official arrays hold 1-based column-major MATLAB indices instead; both are
        ``> 0`` exactly where a pixel is matched).  Likewise ``match2``.
    """
    b1 = np.asarray(bmap1) != 0
    b2 = np.asarray(bmap2) != 0
    if b1.shape != b2.shape or b1.ndim != 2:
        raise ValueError(f"bmap1 and bmap2 must be 2-D and the same size, got {b1.shape}, {b2.shape}")
    if max_dist < 0:
        raise ValueError("max_dist must be >= 0")
    if outlier_cost <= 1:
        raise ValueError("outlier_cost must be > 1")
    radius = _max_dist_pixels(b1.shape, max_dist)
    pairs = _CandidatePairs(b2, b1, radius)
    pix, node = _solve_matching(
        pairs.pixel, pairs.node, pairs.cost, outlier_cost * radius, pairs.n_target, exact
    )
    match1 = np.zeros(b1.size, dtype=np.int64)
    match2 = np.zeros(b1.size, dtype=np.int64)
    match1[pix] = pairs.target_pixels[node] + 1
    match2[pairs.target_pixels[node]] = pix + 1
    return match1.reshape(b1.shape), match2.reshape(b1.shape)


# --------------------------------------------------------------------------------------------
# Per-image evaluation
# --------------------------------------------------------------------------------------------


def _is_segmentation_list(prediction: Any) -> bool:
    return isinstance(prediction, (list, tuple))


def _segmentation_list(items: Sequence[np.ndarray], shape: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Validated label maps and their thresholds 1..N (one "threshold" per segmentation)."""
    segs = [np.asarray(s) for s in items]
    if not segs:
        raise ValueError("empty list of segmentations")
    for s in segs:
        if s.shape != shape:
            raise ValueError(f"segmentation shape {s.shape} != image shape {shape}")
    return segs, np.arange(1, len(segs) + 1, dtype=np.float64)


def _as_boundary_strength(pb: np.ndarray) -> np.ndarray:
    pb = np.asarray(pb)
    if pb.dtype == np.uint8:  # a PNG boundary map, read as in the official code: imread / 255
        return pb.astype(np.float64) / 255.0
    return pb.astype(np.float64, copy=False)


def _resolve_thresholds(thresholds: int | Sequence[float] | np.ndarray) -> np.ndarray:
    if np.isscalar(thresholds):
        return default_thresholds(int(thresholds))  # type: ignore[arg-type]
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if t.size == 0:
        raise ValueError("empty threshold list")
    return t


def _pixel_map(prediction: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D prediction as a pixel-resolution boundary-strength map (ucm2 is subsampled)."""
    pred = np.asarray(prediction)
    if pred.ndim != 2:
        raise ValueError(f"a boundary map must be 2-D, got shape {pred.shape}")
    h, w = shape
    if pred.shape == (2 * h + 1, 2 * w + 1):
        return ucm2_to_pixel(_as_boundary_strength(pred))
    if pred.shape == (h, w):
        return _as_boundary_strength(pred)
    raise ValueError(
        f"prediction of shape {pred.shape} fits neither the image {shape} nor its ucm2 "
        f"{(2 * h + 1, 2 * w + 1)}"
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

    Args:
        pb_or_segs: a soft boundary map or pixel-resolution UCM ``(H, W)`` (``uint8`` is divided
            by 255), a double-resolution ``ucm2`` ``(2H+1, 2W+1)`` (its ``[2::2, 2::2]`` pixels
            are thresholded), or a list of label maps (one threshold per segmentation).
        gt_boundaries: the annotators' ``(H, W)`` boundary maps (``Boundaries``).
        thresholds: number of thresholds (``linspace(1/(n+1), 1-1/(n+1), n)``) or explicit
            threshold values (``pb >= t`` is a boundary); ignored for a list of segmentations
            (thresholds ``1..len(segs)``).
        max_dist: matching tolerance as a fraction of the image diagonal.
        thin: thin the binarised map with ``bwmorph(.., 'thin', inf)`` first (official default).
        outlier_cost: see :func:`correspond_pixels`.
        exact: solve each correspondence exactly (slow; see :func:`correspond_pixels`).

    Returns:
        ``(T, 5)`` array with columns ``threshold, cntR, sumR, cntP, sumP`` (the ``*_ev1.txt``
        file of the official code): ``cntR`` matched annotator pixels summed over annotators out of
        ``sumR`` annotator pixels, ``cntP`` machine pixels matched to at least one annotator out
        of ``sumP`` machine pixels.
    """
    gts = [np.asarray(b) != 0 for b in gt_boundaries]
    if not gts:
        raise ValueError("no ground-truth boundary maps")
    shape = gts[0].shape
    if len(shape) != 2 or any(g.shape != shape for g in gts):
        raise ValueError("ground-truth boundary maps must be 2-D and of one size")

    if _is_segmentation_list(pb_or_segs):
        segs, thresh = _segmentation_list(pb_or_segs, shape)  # type: ignore[arg-type]
        maps = (seg2bdry(s, "imageSize") for s in segs)
    else:
        pb = _pixel_map(pb_or_segs, shape)  # type: ignore[arg-type]
        thresh = _resolve_thresholds(thresholds)
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

    radius = _max_dist_pixels(shape, max_dist)
    outlier = outlier_cost * radius
    pairs = [_CandidatePairs(g, domain, radius) for g in gts]
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
                matched_pix, matched_node = _solve_matching(
                    cand.pixel[idx], cand.node[idx], cand.cost[idx], outlier, cand.n_target, exact
                )
                n_matched = int(matched_node.size)
                last[a] = (sel, matched_pix, n_matched)
            acc_p[matched_pix] = True
            cnt_r += n_matched
        counts[t, 1:] = (cnt_r, sum_r, float(acc_p.sum()), float(pixels.size))
        flat[pixels] = False
    return counts


@dataclass
class RegionImageCounts:
    """Per-image region-benchmark counts (the official ``*_ev2/3/4.txt`` files).

    Attributes:
        thresholds: ``(T,)`` thresholds (or ``1..T`` for a list of segmentations).
        cnt_r, sum_r: covering of the ground truth by the segmentation: area-weighted best overlap
            of every annotator region, summed over annotators, and the total annotator area.
        cnt_p, sum_p: covering of the segmentation by the ground truth.
        cnt_r_best: ``cnt_r`` with each annotator region taking its best overlap over all
            thresholds (``*_ev3.txt``).
        ri, voi: ``(T,)`` Rand index and variation of information averaged over annotators
            (``*_ev4.txt``).
    """

    thresholds: np.ndarray
    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray
    sum_p: np.ndarray
    cnt_r_best: float
    ri: np.ndarray
    voi: np.ndarray


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
    """Region-benchmark counts of one image (the official ``evaluation_reg_image``).

    Args:
        prediction: a double-resolution ``ucm2`` ``(2H+1, 2W+1)`` (segmentation at ``t`` =
            :func:`ucm2_to_labels`), a pixel-resolution UCM / boundary map ``(H, W)``
            (:func:`pixel_ucm_to_labels`, an extension of the official code), or a list of label
            maps (one threshold per segmentation; label 0 is ignored, as officially).
        gt_segmentations: the annotators' ``(H, W)`` label maps (``Segmentation``, labels >= 1).
        thresholds: number of thresholds or explicit values (ignored for a list of segmentations).

    Returns:
        A :class:`RegionImageCounts`.
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
    gt_areas = np.concatenate(
        [np.bincount(g, minlength=m + 1)[1:] for g, m in zip(gt_flat, gt_max)]
    ).astype(np.float64)

    if _is_segmentation_list(prediction):
        segs, thresh = _segmentation_list(prediction, shape)  # type: ignore[arg-type]

        def segment(t: int) -> np.ndarray:
            return segs[t]

    else:
        pred = np.asarray(prediction)
        h, w = shape
        thresh = _resolve_thresholds(thresholds)
        if pred.shape == (2 * h + 1, 2 * w + 1):
            ucm = _as_boundary_strength(pred)

            def segment(t: int) -> np.ndarray:
                return ucm2_to_labels(ucm, thresh[t])

        elif pred.shape == (h, w):
            ucm = _as_boundary_strength(pred)

            def segment(t: int) -> np.ndarray:
                return pixel_ucm_to_labels(ucm, thresh[t])

        else:
            raise ValueError(
                f"prediction of shape {pred.shape} fits neither the image {shape} nor its ucm2"
            )

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


# --------------------------------------------------------------------------------------------
# Dataset-level scores (collect_eval_bdry / collect_eval_reg)
# --------------------------------------------------------------------------------------------


def _fmeasure(r: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    s = p + r
    return 2.0 * p * r / (s + (s == 0))


def _ratio(cnt: np.ndarray, tot: np.ndarray) -> np.ndarray:
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

    Args:
        counts: one ``(T, 5)`` array per image as returned by :func:`evaluate_boundaries_image`
            (all with the same thresholds).

    Returns:
        A dict with the scalar scores ``best_threshold, ods_r, ods_p, ods_f, ois_r, ois_p, ois_f,
        ap`` (the columns of ``eval_bdry.txt``) and the tables ``thr`` (``eval_bdry_thr.txt``:
        threshold, R, P, F) and ``img`` (``eval_bdry_img.txt``: index, best threshold, R, P, F).
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
        r = _ratio(cnt[:, 0], cnt[:, 1])
        p = _ratio(cnt[:, 2], cnt[:, 3])
        f = _fmeasure(r, p)
        bt, br, bp, bf = _max_f(thresh, r, p)
        img[i] = (i + 1, bt, br, bp, bf)
        total += cnt
        best_counts += cnt[int(np.argmax(f))]  # ff(1) of find(F == max(F))
    r = _ratio(total[:, 0], total[:, 1])
    p = _ratio(total[:, 2], total[:, 3])
    f = _fmeasure(r, p)
    bt, br, bp, bf = _max_f(thresh, r, p)
    r_max = float(_ratio(best_counts[0], best_counts[1]))
    p_max = float(_ratio(best_counts[2], best_counts[3]))
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


def collect_region_scores(per_image: Sequence[RegionImageCounts]) -> dict[str, Any]:
    """Covering, PRI and VOI from per-image counts (the official ``collect_eval_reg``).

    Returns:
        A dict with the scalar scores ``covering_threshold, covering_ods, covering_ois,
        covering_best`` (``eval_cover.txt``), ``pri_threshold, pri_ods, pri_ois, voi_threshold,
        voi_ods, voi_ois`` (``eval_RI_VOI.txt``) and the tables ``cover_th`` (threshold, covering),
        ``cover_img`` (index, best threshold, covering R, covering P) and ``ri_voi_thr``
        (threshold, PRI, VOI).
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
        r = _ratio(c.cnt_r, c.sum_r)
        p = _ratio(c.cnt_p, c.sum_p)
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
    r = _ratio(cnt_r_total, sum_r_total)
    k = int(np.argmax(r))
    global_ri /= n
    global_voi /= n
    k_ri = int(np.argmax(global_ri))
    k_voi = int(np.argmin(global_voi))
    return {
        "covering_threshold": float(thresh[k]),
        "covering_ods": float(r[k]),
        "covering_ois": float(_ratio(best[0], best[1])),
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


# --------------------------------------------------------------------------------------------
# detectron2-style evaluators
# --------------------------------------------------------------------------------------------

GroundTruth = Union[
    PathLike,
    Sequence[np.ndarray],
    Sequence[dict],
    tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
]


def _parse_ground_truth(
    ground_truth: Any, need_boundaries: bool = True
) -> tuple[list[Any], list[Any]]:
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


class BoundaryBenchmark:
    """The BSDS500 boundary benchmark as an evaluator (``reset`` / ``process`` / ``evaluate``).

    Example::

        bench = BoundaryBenchmark(thresholds=99)
        for image_id, pb in predictions.items():
            bench.process(image_id, pb, gt_dir / f"{image_id}.mat")
        scores = bench.evaluate()   # {'ods_f': ..., 'ois_f': ..., 'ap': ..., ...}

    Args:
        thresholds: number of thresholds (official ``linspace(1/(n+1), 1-1/(n+1), n)``) or
            explicit values (they must suit the value range of the maps).  Ignored for lists of
            segmentations, which use one threshold per segmentation.
        max_dist: matching tolerance as a fraction of the image diagonal (0.0075).
        thin: thin binarised maps first (official ``thinpb = true``).
        outlier_cost: see :func:`correspond_pixels`.
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
        """Evaluate one image and keep its counts.

        Args:
            image_id: any identifier (kept in :attr:`image_ids`, in processing order).
            prediction: soft boundary map / pixel UCM ``(H, W)``, ``ucm2`` ``(2H+1, 2W+1)`` or a
                list of label maps.
            ground_truth: a BSDS ``.mat`` path, a ``(segmentations, boundaries)`` tuple of lists,
                a list of label maps (boundaries via :func:`seg2bdry`) or a list of dicts with
                ``Segmentation`` / ``Boundaries``.

        Returns:
            The image's ``(T, 5)`` counts (threshold, cntR, sumR, cntP, sumP).
        """
        _, bdrys = _parse_ground_truth(ground_truth)
        counts = evaluate_boundaries_image(
            prediction, bdrys, self.thresholds, self.max_dist, self.thin, self.outlier_cost, self.exact
        )
        self.image_ids.append(image_id)
        self.counts.append(counts)
        return counts

    def evaluate(self) -> dict[str, float]:
        """ODS / OIS / AP over the processed images (``collect_eval_bdry``).

        Returns:
            ``{'ods_f', 'ods_r', 'ods_p', 'ois_f', 'ois_r', 'ois_p', 'ap', 'best_threshold',
            'n_images'}``; :meth:`tables` gives the per-threshold and per-image tables.
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


class RegionBenchmark:
    """The BSDS500 region benchmarks (covering, PRI, VOI) as an evaluator.

    Args:
        thresholds: number of thresholds (official linspace) or explicit values; ignored for
            lists of segmentations.
    """

    def __init__(self, thresholds: int | Sequence[float] | np.ndarray = 99) -> None:
        self.thresholds = thresholds
        self.reset()

    def reset(self) -> None:
        """Forget all processed images."""
        self.image_ids: list[Any] = []
        self.counts: list[RegionImageCounts] = []

    def process(
        self, image_id: Any, prediction: Prediction, ground_truth: GroundTruth
    ) -> RegionImageCounts:
        """Evaluate one image and keep its counts.

        Args:
            image_id: any identifier.
            prediction: ``ucm2`` ``(2H+1, 2W+1)``, pixel-resolution UCM ``(H, W)`` or a list of
                label maps.
            ground_truth: as for :meth:`BoundaryBenchmark.process` (segmentations are used).
        """
        segs, _ = _parse_ground_truth(ground_truth, need_boundaries=False)
        if any(s is None for s in segs):
            raise ValueError("the region benchmark needs the annotators' segmentations")
        counts = evaluate_regions_image(prediction, segs, self.thresholds)
        self.image_ids.append(image_id)
        self.counts.append(counts)
        return counts

    def evaluate(self) -> dict[str, float]:
        """Covering / PRI / VOI over the processed images (``collect_eval_reg``).

        Returns:
            ``{'covering_ods', 'covering_ois', 'covering_best', 'covering_threshold', 'pri_ods',
            'pri_ois', 'pri_threshold', 'voi_ods', 'voi_ois', 'voi_threshold', 'n_images'}``.
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
