"""``purity``: concept purity of a learned concept dictionary (runs on the checkpoint only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distseg.core.constants import IGNORE_INDEX
from distseg.eval.metrics import ConfusionMatrix, contingency, majority_vote_match, remap
from distseg.eval.protocols.base import (
    EvalResult,
    Evaluator,
    FeatureSample,
    _l2_normalize,
    _mapped_confusion,
    _nearest,
    _pixels,
    register_protocol,
    resize_nearest,
)


@register_protocol("purity", headline="purity", needs_concepts=True)
class PurityProtocol(Evaluator):
    """Concept purity of a learned concept dictionary (He et al. 2022).

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
