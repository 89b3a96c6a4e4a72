"""``correspondPixels``: the minimum-cost correspondence between two boundary maps (``match.cc``).

The candidate pairs (machine pixel, annotator pixel within the matching radius), the assignment
problem on them (:func:`solve_matching`: greedy + augmenting paths + swaps by default, or exact) and
:func:`correspond_pixels`, the official function's equivalent.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, maximum_flow

#: Maximum matching distance, as a fraction of the image diagonal (``correspondPixels`` default).
DEFAULT_MAX_DIST = 0.0075
#: Cost of leaving a pixel unmatched, as a multiple of the maximum distance (official default).
DEFAULT_OUTLIER_COST = 100.0


def max_dist_pixels(shape: tuple[int, ...], max_dist: float) -> float:
    """``maxDist * sqrt(rows^2 + cols^2)``, the matching radius in pixels."""
    return float(max_dist) * float(np.hypot(shape[0], shape[1]))


def _offsets(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All integer displacements (dy, dx) with dy^2 + dx^2 <= radius^2 and their lengths."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = (dy * dy + dx * dx).ravel()
    keep = d2 <= radius * radius
    return dy.ravel()[keep], dx.ravel()[keep], np.sqrt(d2[keep].astype(np.float64))


class CandidatePairs:
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
    graph = csr_matrix((np.ones(a.size, dtype=np.int8), (a, m1 + b)), shape=(m1 + m2, m1 + m2))
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


def _improve_by_swaps(a: np.ndarray, b: np.ndarray, key: np.ndarray, inm: np.ndarray, m1: int, m2: int) -> np.ndarray:
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


def solve_matching(
    ei: np.ndarray,
    ej: np.ndarray,
    cost: np.ndarray,
    outlier_cost: float,
    n_right: int,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``match.cc``'s assignment problem on a candidate edge list; returns the matched pairs.

    The candidate pairs are ``(ei[k], ej[k])``: ``ei`` the left node ids (any non-negative
    integers), sorted ascending, ``ej`` the right node ids in ``[0, n_right)``, and ``cost`` their
    integer costs ``rint(100 * distance)`` (as float).  ``outlier_cost`` is the cost of an unmatched
    pixel in pixels; as in ``match.cc`` its integer cost is ``ceil(100 * outlier_cost)``.  A matching
    costs the sum of its pair costs plus the outlier cost of every unmatched node, i.e. every pair
    saves ``outlier - distance``.

    Two solvers, chosen by ``exact``:

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

    graph = coo_matrix((np.ones(li.size, dtype=np.int8), (li, n1 + lj)), shape=(n1 + n2, n1 + n2)).tocsr()
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
    unpaired costs ``outlier_cost * max_dist * diagonal``.  See :func:`solve_matching` for the
    solver (``exact=False``: maximum-cardinality greedy-and-improve, the default; ``exact=True``:
    the optimum of the assignment problem; slow for long contours).

    ``bmap1`` and ``bmap2`` are ``(H, W)`` boundary maps (non-zero = boundary), e.g. the thinned
    machine map and one annotator's ``Boundaries``.  Returns ``(match1, match2)``: ``int64`` arrays
    shaped like the inputs.  ``match1[y, x]`` is ``1 + (row-major flat index)`` of the ``bmap2``
    pixel paired with ``bmap1[y, x]``, or 0 when unpaired (the official arrays hold 1-based
    column-major MATLAB indices instead; both are ``> 0`` exactly where a pixel is matched).
    Likewise ``match2``.
    """
    b1 = np.asarray(bmap1) != 0
    b2 = np.asarray(bmap2) != 0
    if b1.shape != b2.shape or b1.ndim != 2:
        raise ValueError(f"bmap1 and bmap2 must be 2-D and the same size, got {b1.shape}, {b2.shape}")
    if max_dist < 0:
        raise ValueError("max_dist must be >= 0")
    if outlier_cost <= 1:
        raise ValueError("outlier_cost must be > 1")
    radius = max_dist_pixels(b1.shape, max_dist)
    pairs = CandidatePairs(b2, b1, radius)
    pix, node = solve_matching(pairs.pixel, pairs.node, pairs.cost, outlier_cost * radius, pairs.n_target, exact)
    match1 = np.zeros(b1.size, dtype=np.int64)
    match2 = np.zeros(b1.size, dtype=np.int64)
    match1[pix] = pairs.target_pixels[node] + 1
    match2[pairs.target_pixels[node]] = pix + 1
    return match1.reshape(b1.shape), match2.reshape(b1.shape)
