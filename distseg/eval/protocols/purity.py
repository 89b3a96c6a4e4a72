"""``purity``: concept purity of a learned concept dictionary (runs on the checkpoint only).

He et al. 2022 (seed 001, Sec. 4.2, "Analysis of Visual Concepts") segment each image by clustering
its pixel embeddings, map each segment to its nearest concept, merge connected segments of the same
concept, label each segment with its ground-truth class, and define a concept's purity as the share
of its segments that belong to its majority class; they show the distribution over concepts
(Fig. 4: more than half above 80%). Departure here: the unit is the **pixel**, not the segment (each
eval pixel goes to its nearest concept), and one global, pixel-weighted purity is reported instead
of the per-concept distribution. The number is therefore not theirs.

``segment_purity`` is their measure: each eval image is cut into ``segments_per_image`` segments by
spherical k-means of its pixel embeddings (the paper does not give the count here; 25 segments and 50
iterations, as their k-means evaluation), each segment goes to the concept nearest its normalised mean
embedding, 4-connected segments of the same concept are merged, each merged segment takes the
majority ground-truth class of its labelled pixels (segments without any are dropped), and a
concept's purity is the share of its segments in its majority class. Reported: the mean and median
over the concepts that received a segment (headline ``purity``, the mean), ``above_80`` (the share
of those concepts above 80 %, the paper's Fig. 4 statistic: "more than half"), ``used_concepts`` and
``num_segments``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field
from scipy import ndimage

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.metrics import ConfusionMatrix, contingency, majority_vote_match, remap
from distseg.eval.protocols.base import (
    EvalResult,
    Evaluator,
    FeatureSample,
    _l2_normalize,
    _mapped_confusion,
    _nearest,
    _pixels,
    _spherical_kmeans,
    register_protocol,
    resize_nearest,
)


@register_protocol("purity", headline="purity", needs_concepts=True)
class PurityProtocol(Evaluator):
    """Pixel-level concept purity of a learned concept dictionary (after He et al. 2022's
    segment-level measure; module docstring).

    Each eval pixel goes to its most cosine-similar concept; ``purity`` = sum over concepts of
    the pixel count of their majority class / all labelled pixels (which is the pixel accuracy of
    mapping every concept to its majority class, so ``miou`` etc. of that mapping are reported
    too), and ``used_concepts`` counts the concepts that received at least one eval pixel.

    ``concepts`` (K, D) is the dictionary; `distseg evaluate` passes the checkpoint's (it has no
    ``protocol_args``).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        concepts: np.ndarray,
    ) -> None:
        concepts = np.asarray(concepts, dtype=np.float32)
        if concepts.ndim != 2:
            raise ValueError(f"concepts must be (K, D), got shape {concepts.shape}")
        self.concepts = _l2_normalize(concepts)
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        k = len(self.concepts)
        self._cont = np.zeros((self.num_classes, k), dtype=np.int64)
        self._usage = np.zeros(k, dtype=np.int64)
        self._examples: dict[str, np.ndarray] = {}

    def _process_eval(self, sample: FeatureSample) -> None:
        if not self._labelled(sample):
            return
        if sample.features.shape[0] != self.concepts.shape[1]:
            raise ValueError(f"features have {sample.features.shape[0]} channels, concepts {self.concepts.shape[1]}")
        x = _l2_normalize(_pixels(sample.features))
        assigned = _nearest(x, self.concepts)[1][:, 0]
        self._usage += np.bincount(assigned, minlength=len(self.concepts))
        label = self._clean_label(sample.label)
        concept_map = resize_nearest(assigned.reshape(sample.features.shape[1:]), label.shape)
        k = len(self.concepts)
        self._cont += contingency(concept_map, label, k, self.num_classes, self.ignore_index)
        if len(self._examples) < self.num_examples:
            self._examples[sample.image_id] = concept_map

    def evaluate(self) -> EvalResult:
        total = self._cont.sum()
        if total == 0:
            raise ValueError("purity: no labelled eval-split pixels were processed")
        mapping = majority_vote_match(self._cont)
        cm = _mapped_confusion(self._cont, mapping, ConfusionMatrix(self.num_classes, self.ignore_index))
        extra = {
            "purity": float(self._cont.max(0).sum() / total),
            "used_concepts": float((self._usage > 0).sum()),
            "num_concepts": float(len(self.concepts)),
        }
        predictions = {i: self._example(remap(c, mapping)) for i, c in self._examples.items()}
        return self._result(cm, extra, predictions)


class SegmentPurityParams(Section):
    """``evaluate.protocol_args.segment_purity``."""

    segments_per_image: int = Field(25, ge=1, description="k-means segments cut from each image")
    niter: int = Field(50, ge=1, description="k-means iterations per image")


@register_protocol("segment_purity", headline="purity", params=SegmentPurityParams, needs_concepts=True)
class SegmentPurityProtocol(Evaluator):
    """He et al. 2022's concept purity over image segments (module docstring); ``concepts`` (K, D)
    is the dictionary, passed by `distseg evaluate` from the checkpoint."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        concepts: np.ndarray,
        segments_per_image: int = 25,
        niter: int = 50,
    ) -> None:
        concepts = np.asarray(concepts, dtype=np.float32)
        if concepts.ndim != 2:
            raise ValueError(f"concepts must be (K, D), got shape {concepts.shape}")
        self.concepts = _l2_normalize(concepts)
        self.segments_per_image = segments_per_image
        self.niter = niter
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._counts = np.zeros((len(self.concepts), self.num_classes), dtype=np.int64)  # segments

    def _process_eval(self, sample: FeatureSample) -> None:
        if not self._labelled(sample):
            return
        if sample.features.shape[0] != self.concepts.shape[1]:
            raise ValueError(f"features have {sample.features.shape[0]} channels, concepts {self.concepts.shape[1]}")
        h, w = sample.features.shape[1:]
        x = _l2_normalize(_pixels(sample.features))
        centroids = _spherical_kmeans(x, self.segments_per_image, self.seed, self.niter)
        _, seg = np.unique(_nearest(x, centroids)[1][:, 0], return_inverse=True)
        sums = np.zeros((seg.max() + 1, x.shape[1]), dtype=np.float64)
        np.add.at(sums, seg, x)
        concept_of_segment = _nearest(_l2_normalize(sums), self.concepts)[1][:, 0]
        concept_map = concept_of_segment[seg].reshape(h, w)
        # merge: connected components of equal concept
        merged = np.zeros((h, w), dtype=np.int64)
        merged_concept: list[int] = []
        for concept in np.unique(concept_map):
            components, count = ndimage.label(concept_map == concept)
            merged[components > 0] = components[components > 0] - 1 + len(merged_concept)
            merged_concept += [int(concept)] * count
        label = self._clean_label(sample.label)
        cont = contingency(
            resize_nearest(merged, label.shape), label, len(merged_concept), self.num_classes, self.ignore_index
        )
        labelled = cont.sum(0) > 0
        np.add.at(self._counts, (np.asarray(merged_concept)[labelled], cont.argmax(0)[labelled]), 1)

    def evaluate(self) -> EvalResult:
        per_concept = self._counts.sum(1)
        used = per_concept > 0
        if not used.any():
            raise ValueError(f"{self.name}: no labelled eval-split segments were processed")
        purity = self._counts[used].max(1) / per_concept[used]
        metrics = {
            "purity": float(purity.mean()),
            "purity_median": float(np.median(purity)),
            "above_80": float((purity > 0.8).mean()),
            "used_concepts": float(used.sum()),
            "num_concepts": float(len(self.concepts)),
            "num_segments": float(per_concept.sum()),
        }
        return EvalResult(metrics={f"{self.name}/{k}": v for k, v in metrics.items()})
