"""DAVIS video object segmentation: the J and F measures, label propagation, and the benchmark loop.

* :mod:`distseg.eval.davis.measures`: J (region similarity), F (contour accuracy) as the official
  DAVIS code defines them, and :class:`DavisEvaluator` (per-sequence mean / recall / decay, ``JF_mean``).
* :mod:`distseg.eval.davis.propagation`: label propagation by windowed top-k feature affinity (DINO,
  CRW; or Zhang & Maire's per-frame top-k with raw weights and xy-augmented features):
  :func:`propagate_labels`, lazily :func:`iter_propagation`, one frame at a time
  :class:`LabelPropagator`.
* :mod:`distseg.eval.davis.benchmark`: :func:`evaluate_sequences`, the loop over a DAVIS reader.

The ``davis`` and ``davis_zm`` evaluation protocols (``distseg.eval.protocols.davis``) put these
behind the evaluator contract of `distseg evaluate`. The data is DAVIS-2016 (one object per
sequence), not the DAVIS-2017 of the papers' tables.
"""

from distseg.eval.davis.benchmark import evaluate_sequences, sequence_frame_ids
from distseg.eval.davis.measures import DavisEvaluator, boundary_map, boundary_radius, db_eval_boundary, db_eval_iou
from distseg.eval.davis.propagation import (
    FeatureMap,
    LabelPropagator,
    iter_propagation,
    propagate_frame,
    propagate_labels,
)

__all__ = [
    "DavisEvaluator",
    "FeatureMap",
    "LabelPropagator",
    "boundary_map",
    "boundary_radius",
    "db_eval_boundary",
    "db_eval_iou",
    "evaluate_sequences",
    "iter_propagation",
    "propagate_frame",
    "propagate_labels",
    "sequence_frame_ids",
]
