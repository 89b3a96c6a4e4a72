"""``davis``: DAVIS-2016 semi-supervised video object segmentation by label propagation.

The same computation as :func:`distseg.eval.davis.evaluate_sequences`, behind the evaluator contract:
frames arrive as eval :class:`FeatureSample` s, sequence after sequence and each in temporal order
(image ids ``"<sequence>/<frame>"``); a sequence's first frame brings the given mask, every later
frame is predicted from its features as it arrives (:class:`~distseg.eval.davis.LabelPropagator`,
which keeps only the context frames) and scored with J and F when its sequence ends
(:class:`~distseg.eval.davis.DavisEvaluator`: frames ``[1:-1]``, means over sequences,
``JF_mean = (J_mean + F_mean) / 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.davis import DavisEvaluator, LabelPropagator
from distseg.eval.protocols.base import EvalResult, Evaluator, FeatureSample, register_protocol


class DavisParams(Section):
    """``evaluate.protocol_args.davis``: label propagation (DINO / CRW) and the J/F scoring."""

    num_prev: int = Field(2, ge=0, description="previous frames in the context besides the first")
    topk: int = Field(5, ge=1, description="context pixels kept per target pixel (over the whole context)")
    radius: int | None = Field(
        12, ge=1, description="window half-size in feature pixels (null: whole frame, O((hw)^2))"
    )
    temperature: float = Field(0.07, gt=0, description="softmax temperature over the top-k cosine similarities")
    use_first: bool = Field(True, description="keep frame 0 (with its given mask) in the context")
    queue: bool = Field(False, description="previous frames carry their soft predictions (DINO, CRW), not one-hot")
    window: Literal["square", "disk"] = Field("square", description="square (DINO) or disk (CRW) window")
    bound_th: float = Field(0.008, gt=0, description="F's boundary tolerance: fraction of the diagonal (>= 1: pixels)")
    skip_last: bool = Field(True, description="leave the last frame unscored, as the official evaluation")


@register_protocol("davis", headline="JF_mean", params=DavisParams, needs_video=True, data="davis")
class DavisProtocol(Evaluator):
    """J&F of propagating each sequence's first-frame mask with the frozen features (module docstring).

    ``num_classes`` is the number of label values of the masks (2 for DAVIS-2016: background and
    one object); J and F score ``label > 0``. Metrics: ``davis/{J,F}_{mean,recall,decay}``,
    ``davis/JF_mean``, ``davis/num_sequences``, ``davis/num_frames`` and per sequence
    ``davis/<sequence>/{J,F,JF}_mean``. Samples of the train split are ignored.
    """

    def __init__(
        self,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        num_prev: int = 2,
        topk: int = 5,
        radius: int | None = 12,
        temperature: float = 0.07,
        use_first: bool = True,
        queue: bool = False,
        window: Literal["square", "disk"] = "square",
        bound_th: float = 0.008,
        skip_last: bool = True,
    ) -> None:
        self.propagation = dict(
            num_prev=num_prev,
            topk=topk,
            radius=radius,
            temperature=temperature,
            use_first=use_first,
            queue=queue,
            window=window,
        )
        LabelPropagator(**self.propagation)  # bad settings fail here, not at the first frame
        self.scorer = DavisEvaluator(bound_th=bound_th, skip_last=skip_last)
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self.scorer.reset()
        self._sequence: str | None = None
        self._done: set[str] = set()
        self._propagator: LabelPropagator | None = None
        self._predictions: list[np.ndarray] = []  # the current sequence's, as bool masks
        self._truth: list[np.ndarray | None] = []

    def _process_eval(self, sample: FeatureSample) -> None:
        sequence = sample.image_id.rsplit("/", 1)[0]
        if sequence != self._sequence:
            self._finish()
            if sequence in self._done:
                raise ValueError(
                    f"davis: frame {sample.image_id} arrived after its sequence had ended "
                    "(frames must come sequence by sequence, in temporal order)"
                )
            if sample.label is None:
                raise ValueError(f"davis: the first frame of {sequence!r} ({sample.image_id}) has no mask to propagate")
            self._sequence = sequence
            self._propagator = LabelPropagator(**self.propagation)
            pred = self._propagator.start(sample.features, sample.label)
        else:
            out_size = self._propagator.out_size
            pred = self._propagator.step(sample.features)
            if sample.label is not None and sample.label.shape != out_size:
                raise ValueError(f"davis: {sample.image_id}: mask shape {sample.label.shape} != frame 0's {out_size}")
        self._predictions.append(pred > 0)
        self._truth.append(None if sample.label is None else sample.label > 0)

    def _finish(self) -> None:
        """Score the current sequence (its last frame is known only now) and forget its frames."""
        if self._sequence is not None:
            self.scorer.process(self._sequence, self._predictions, self._truth)
            self._done.add(self._sequence)
        self._sequence, self._propagator, self._predictions, self._truth = None, None, [], []

    def evaluate(self) -> EvalResult:
        self._finish()
        if not self._done:
            raise ValueError("davis: no frames were processed")
        metrics = {k: float(v) for k, v in self.scorer.evaluate().items()}
        return EvalResult(metrics={k.replace("davis/", f"{self.name}/", 1): v for k, v in metrics.items()})
