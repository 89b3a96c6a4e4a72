"""Conversions between boundary maps, UCMs and segmentations, as the official benchmark makes them.

``seg2bdry`` (:func:`seg2bdry`), ``bwmorph(.., 'thin', inf)`` (:func:`thin_boundaries`), the
annotators' ``Boundaries`` (:func:`gt_boundaries_from_segmentation`), and the pixels and
segmentations of a UCM at a threshold (:func:`ucm2_to_pixel`, :func:`ucm2_to_labels`,
:func:`pixel_ucm_to_labels`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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

    ``seg`` is an ``(H, W)`` label map; the result is a ``bool`` boundary map of ``(H, W)`` for
    ``fmt="imageSize"``, or of ``(2H+1, 2W+1)`` for ``fmt="doubleSize"``.
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
    bdry[2:-1:2, 2:-1:2] = (edgels_h[:-1, :-1] | edgels_h[1:, :-1]) | (edgels_v[:-1, :-1] | edgels_v[:-1, 1:])
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
