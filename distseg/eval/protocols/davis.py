"""``davis`` and ``davis_zm``: semi-supervised video object segmentation by label propagation, J&F.

Data: **DAVIS-2016** (``distseg.data.davis``: one object per sequence, masks binarised; J and F
score ``label > 0``), val split, frames resized to ``evaluate.davis_image_size`` (480 px) before
feature extraction. Both papers that report DAVIS (Zhang & Maire 2020 Table 3, He et al. 2022
Table 3) use **DAVIS-2017** val (several objects per sequence), so no number here is comparable
with theirs (47.1 / 48.9, 50.4 / 53.9 J / F).

* ``davis``: DINO / CRW label propagation (no paper of ours): context = frame 0 with its given mask
  plus the 2 previous frames, the top 5 context pixels over the whole context inside a square window
  of half-size 12 feature pixels, softmax weights at temperature 0.07, no position features.
* ``davis_zm``: Zhang & Maire's rule (seed 000, Sec. 5.3: "y_t(i) = sum_k sum_j sim(F_t(i),
  F_{t-k}(j)) y_{t-k}(j) ... features augmented with spatial coordinates ... k = 2 and j as the
  set of 10 nearest neighbors"): context = the 2 previous frames only (frame 0 only while it is one
  of them), their one-hot predicted labels, the 10 nearest pixels of each context frame, raw
  cosine-similarity weights, features augmented with xy, no spatial window. Our readings where the
  paper is silent: the 10 neighbours are taken per context frame (the inner sum over j runs inside
  the sum over frames); negative similarities are clipped to 0; the xy scale is ``xy_weight = 1``
  with (y, x) in units of the longer feature side, i.e. ``sim = cos - |dp|^2 / 2``; He et al. (Sec. 4.2)
  propagate "based on the similarity between pixel embeddings following the method proposed in
  [Zhao et al., 2017]" and give no settings, so they have no preset of their own.

The computation is :func:`distseg.eval.davis.evaluate_sequences` behind the evaluator contract:
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
    """``evaluate.protocol_args.davis``: label propagation (DINO / CRW defaults) and the J/F scoring."""

    num_prev: int = Field(2, ge=0, description="previous frames in the context besides the first")
    topk: int = Field(5, ge=1, description="context pixels kept per target pixel (over the whole context)")
    radius: int | None = Field(
        12, ge=1, description="window half-size in feature pixels (null: whole frame, O((hw)^2))"
    )
    temperature: float = Field(0.07, gt=0, description="softmax temperature over the top-k cosine similarities")
    use_first: bool = Field(True, description="keep frame 0 (with its given mask) in the context")
    queue: bool = Field(False, description="previous frames carry their soft predictions (DINO, CRW), not one-hot")
    window: Literal["square", "disk"] = Field("square", description="square (DINO) or disk (CRW) window")
    weighting: Literal["softmax", "raw"] = Field(
        "softmax", description="softmax of sim / temperature (DINO, CRW) or raw sim clipped at 0 (Zhang & Maire)"
    )
    topk_per_frame: bool = Field(False, description="top-k of each context frame, not of the whole context")
    xy_weight: float = Field(0.0, ge=0, description="augment the features with xy at this weight (0: no xy)")
    bound_th: float = Field(0.008, gt=0, description="F's boundary tolerance: fraction of the diagonal (>= 1: pixels)")
    skip_last: bool = Field(True, description="leave the last frame unscored, as the official evaluation")


class DavisZMParams(DavisParams):
    """``evaluate.protocol_args.davis_zm``: the same settings, Zhang & Maire's propagation as defaults."""

    num_prev: int = Field(2, ge=0, description="previous frames in the context (Zhang & Maire: k = 2)")
    topk: int = Field(10, ge=1, description="nearest context pixels kept per target pixel (Zhang & Maire: 10)")
    radius: int | None = Field(None, ge=1, description="window half-size in feature pixels (null: whole frame)")
    use_first: bool = Field(False, description="keep frame 0 in the context beyond the k previous frames")
    weighting: Literal["softmax", "raw"] = Field("raw", description="raw similarity weights (Zhang & Maire)")
    topk_per_frame: bool = Field(True, description="the nearest neighbours of each context frame")
    xy_weight: float = Field(1.0, ge=0, description="features augmented with xy (scale not given by the paper)")


@register_protocol("davis", headline="JF_mean", params=DavisParams, needs_video=True, data="davis")
class DavisProtocol(Evaluator):
    """J&F of propagating each sequence's first-frame mask with the frozen features: DINO / CRW
    propagation on DAVIS-2016 (module docstring).

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
        weighting: Literal["softmax", "raw"] = "softmax",
        topk_per_frame: bool = False,
        xy_weight: float = 0.0,
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
            weighting=weighting,
            topk_per_frame=topk_per_frame,
            xy_weight=xy_weight,
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
                    f"{self.name}: frame {sample.image_id} arrived after its sequence had ended "
                    "(frames must come sequence by sequence, in temporal order)"
                )
            if sample.label is None:
                raise ValueError(
                    f"{self.name}: the first frame of {sequence!r} ({sample.image_id}) has no mask to propagate"
                )
            self._sequence = sequence
            self._propagator = LabelPropagator(**self.propagation)
            pred = self._propagator.start(sample.features, sample.label)
        else:
            out_size = self._propagator.out_size
            pred = self._propagator.step(sample.features)
            if sample.label is not None and sample.label.shape != out_size:
                raise ValueError(
                    f"{self.name}: {sample.image_id}: mask shape {sample.label.shape} != frame 0's {out_size}"
                )
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
            raise ValueError(f"{self.name}: no frames were processed")
        metrics = {k: float(v) for k, v in self.scorer.evaluate().items()}
        return EvalResult(metrics={k.replace("davis/", f"{self.name}/", 1): v for k, v in metrics.items()})


@register_protocol("davis_zm", headline="JF_mean", params=DavisZMParams, needs_video=True, data="davis")
class DavisZMProtocol(DavisProtocol):
    """J&F with Zhang & Maire's propagation (2 previous frames, 10 nearest neighbours per frame, raw
    similarity weights, xy-augmented features, no window) on DAVIS-2016, not their DAVIS-2017
    (module docstring for the readings where the paper is silent). Metrics as ``davis``, prefixed
    ``davis_zm/``."""

    def __init__(
        self,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        num_prev: int = 2,
        topk: int = 10,
        radius: int | None = None,
        temperature: float = 0.07,
        use_first: bool = False,
        queue: bool = False,
        window: Literal["square", "disk"] = "square",
        weighting: Literal["softmax", "raw"] = "raw",
        topk_per_frame: bool = True,
        xy_weight: float = 1.0,
        bound_th: float = 0.008,
        skip_last: bool = True,
    ) -> None:
        super().__init__(
            num_classes,
            class_names,
            seed,
            ignore_index,
            num_examples,
            num_prev=num_prev,
            topk=topk,
            radius=radius,
            temperature=temperature,
            use_first=use_first,
            queue=queue,
            window=window,
            weighting=weighting,
            topk_per_frame=topk_per_frame,
            xy_weight=xy_weight,
            bound_th=bound_th,
            skip_last=skip_last,
        )
