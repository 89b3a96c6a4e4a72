"""The DAVIS benchmark loop on the driver: propagate each sequence's first mask and score it.

`distseg evaluate` runs the same computation as the ``davis`` protocol
(``distseg.eval.protocols.davis``), with the features extracted on a Ray actor pool; this loop is the
single-process reference (a feature function called frame by frame).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distseg.eval.davis.measures import DavisEvaluator
from distseg.eval.davis.propagation import FeatureMap, propagate_labels


def sequence_frame_ids(dataset: Any, max_frames: int | None = None) -> list[str]:
    """The frame ids of every sequence, sequence after sequence in listing order, each in temporal
    order and cut to its first `max_frames` (ids are "<sequence>/<frame>", as ``DAVIS2016``)."""
    by_sequence: dict[str, list[str]] = {seq: [] for seq in dataset.sequences()}
    for image_id in dataset.ids():
        frames = by_sequence.get(image_id.rsplit("/", 1)[0])
        if frames is not None and (max_frames is None or len(frames) < max_frames):
            frames.append(image_id)
    return [image_id for frames in by_sequence.values() for image_id in frames]


def _sequence_samples(dataset: Any, seq: str, max_frames: int | None) -> list[Any]:
    """A sequence's first `max_frames` frames, reading only those when the reader lists its frame ids."""
    if max_frames is not None and hasattr(dataset, "ids"):
        ids = [i for i in dataset.ids() if i.rsplit("/", 1)[0] == seq]
        if len(ids) >= max_frames:  # else the listing is cut short (a `limit`): read the sequence
            return [dataset[i] for i in ids[:max_frames]]
    return list(dataset.frames(seq))[:max_frames]


@torch.no_grad()
def evaluate_sequences(
    features_fn: Callable[[np.ndarray], FeatureMap],
    dataset: Any,
    sequences: Sequence[str] | None = None,
    *,
    max_frames: int | None = None,
    evaluator: DavisEvaluator | None = None,
    progress: bool = True,
    **propagation_kwargs: Any,
) -> dict[str, float]:
    """Propagate each sequence's first mask with `features_fn(image_rgb_uint8) -> (D, h, w)` and score it.

    dataset: a DAVIS reader (``distseg.data.davis.DAVIS2016``: ``sequences()``, ``frames(seq)``).
    max_frames limits the frames per sequence (quick runs; the numbers are then not the benchmark's).
    propagation_kwargs go to :func:`propagate_labels` (out_size is each frame's size). Pass an
    `evaluator` to keep its per-sequence ``table()``; returns ``evaluator.evaluate()``.
    """
    evaluator = evaluator if evaluator is not None else DavisEvaluator()
    for seq in sequences if sequences is not None else dataset.sequences():
        samples = _sequence_samples(dataset, seq, max_frames)
        frames = tqdm(samples, desc=f"davis {seq}", unit="frame", disable=not progress, leave=False)
        feats = (features_fn(s.image) for s in frames)
        kwargs = {"out_size": samples[0].image.shape[:2], **propagation_kwargs}
        predictions = propagate_labels(feats, samples[0].labels.astype(np.int64), **kwargs)
        evaluator.process(seq, predictions, [s.labels for s in samples])
    return evaluator.evaluate()
