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
Here (see :func:`matching.solve_matching`) the default solver builds a greedy matching by increasing
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

Modules: :mod:`~distseg.eval.bsds.io` (ground-truth files, the accepted input forms, thresholds),
:mod:`~distseg.eval.bsds.maps` (``seg2bdry``, thinning, UCM -> pixels / labels),
:mod:`~distseg.eval.bsds.matching` (``correspondPixels``), :mod:`~distseg.eval.bsds.boundaries`
and :mod:`~distseg.eval.bsds.regions` (the two benchmarks, per image and per dataset).
"""

from distseg.eval.bsds.boundaries import BoundaryBenchmark, collect_boundary_scores, evaluate_boundaries_image
from distseg.eval.bsds.io import GroundTruth, PathLike, Prediction, default_thresholds, load_bsds_ground_truth
from distseg.eval.bsds.maps import (
    gt_boundaries_from_segmentation,
    pixel_ucm_to_labels,
    seg2bdry,
    thin_boundaries,
    ucm2_to_labels,
    ucm2_to_pixel,
)
from distseg.eval.bsds.matching import DEFAULT_MAX_DIST, DEFAULT_OUTLIER_COST, correspond_pixels
from distseg.eval.bsds.regions import RegionBenchmark, RegionImageCounts, collect_region_scores, evaluate_regions_image

__all__ = [
    "DEFAULT_MAX_DIST",
    "DEFAULT_OUTLIER_COST",
    "BoundaryBenchmark",
    "GroundTruth",
    "PathLike",
    "Prediction",
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
