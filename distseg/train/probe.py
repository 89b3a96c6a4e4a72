"""The in-loop probe: an evaluation protocol run inside training every `pretrain.probe_every` steps.

It is the metric `distseg tune` stops trials on (ASHA), and a learning curve in MLflow for any run.
The probe reads the first `pretrain.probe_images` images of `evaluate.data`'s *train* split (the
labels are used by the protocol only, never by the loss) and runs `pretrain.probe_protocol` (by
default `dataset_kmeans`, the k-means + Hungarian mIoU) on the network's embeddings, exactly as
`distseg evaluate` would on those images. A protocol that needs a train split (`linear`, `knn`) gets
the first half of the probe images as its train split and is scored on the second half.

Why the train split: a sweep that selects settings on the images its final evaluation scores would
report a selected, optimistic number. The eval split stays untouched until `distseg evaluate`.

Rank 0 runs the probe (the other workers wait at the next collective); it costs one forward pass
per probe image plus the protocol (a few seconds for 24 images at 320 px on a CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distseg.config import Config


class ProbeError(ValueError):
    """A probe that cannot run: unknown or unsuitable protocol, unlabelled or too small data."""


def check_probe(cfg: Config) -> Config:
    """Validate the probe settings on the driver (before Ray starts) and make the data root absolute."""
    from distseg.eval.extract import DataSpec
    from distseg.eval.protocols import PROTOCOLS, protocol_info, resolve_protocol_name

    pcfg = cfg.pretrain
    if not pcfg.probe_every:
        return cfg
    if resolve_protocol_name(pcfg.probe_protocol) not in PROTOCOLS:
        raise ProbeError(
            f"pretrain.probe_protocol={pcfg.probe_protocol!r} is not a protocol (known: {', '.join(PROTOCOLS.list())})"
        )
    info = protocol_info(resolve_protocol_name(pcfg.probe_protocol))
    if info.needs_video or info.needs_concepts:
        raise ProbeError(
            f"pretrain.probe_protocol={pcfg.probe_protocol!r} needs video or a concept dictionary; "
            "the probe runs image protocols only (dataset_kmeans, linear, knn, ...)"
        )
    if cfg.evaluate.data.split(":")[0] in ("bsds", "folder"):
        raise ProbeError(f"pretrain.probe_every needs labels: evaluate.data={cfg.evaluate.data!r} has no classes")
    cfg = cfg.model_copy(deep=True)
    spec = DataSpec.resolve(cfg.evaluate.data, cfg.evaluate.root, cfg.evaluate.train_split)
    cfg.evaluate.root = spec.root
    return cfg


class Probe:
    """`probe(model) -> {"probe_score": headline, "probe/<metric>": ...}` on the fixed probe images."""

    def __init__(self, cfg: Config):
        from distseg.eval.evaluate import LabeledSplit, load_split, plan_protocols

        self.cfg = cfg.model_copy(deep=True)
        pcfg = self.cfg.pretrain
        ecfg = self.cfg.evaluate
        ecfg.protocols, ecfg.diagnostics = [pcfg.probe_protocol], []
        ecfg.limit = pcfg.probe_images
        (self.plan,) = plan_protocols(self.cfg)
        split, self.class_names = load_split(self.cfg, ecfg.train_split)
        if len(split.ids) < 2:
            raise ProbeError(f"the probe needs at least 2 images; {ecfg.data}/{ecfg.train_split} has {len(split.ids)}")
        if self.plan.info.needs_train:
            half = len(split.ids) // 2
            self.train = LabeledSplit(split.ids[:half], split.images[:half], split.labels[:half])
            self.evals = LabeledSplit(split.ids[half:], split.images[half:], split.labels[half:])
        else:
            self.train, self.evals = None, split
        self.image_size = ecfg.image_size
        self.headline = f"{self.plan.name}/{self.plan.info.headline}"

    @torch.no_grad()
    def _features(self, model: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
        from distseg.eval.features import ModelFeatures

        extractor = ModelFeatures(model, self.image_size, str(device))
        return [extractor(image) for image in images]

    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        from distseg.eval.evaluate import run_protocol

        was_training = model.training
        try:
            train_feats = self._features(model, self.train.images, device) if self.train else None
            eval_feats = self._features(model, self.evals.images, device)
        finally:
            model.train(was_training)
        extra: dict[str, Any] = {}
        result = run_protocol(
            self.plan, self.class_names, self.cfg.seed, self.train, train_feats, self.evals, eval_feats, 0, extra
        )
        metrics = {f"probe/{k.split('/', 1)[-1]}": float(v) for k, v in result.metrics.items()}
        metrics["probe_score"] = float(result.metrics[self.headline])
        return metrics
