"""The `vit_masks` prior: MaskDistill's object masks from ViT affinities, as a mining prior.

    mine.priors: [vit_masks]
    priors.vit_masks: {source: checkpoint, checkpoint: outputs/.../checkpoints/vit, top_k: 0.4, ...}

Registered as `vit_masks` at the end of distseg.grouping.priors (so this module imports no prior
module and the import graph keeps no cycle). Built once per mining actor (the network loads once);
maps an RGB image to up to `max_masks` object masks (distseg.distill.masks) stored in the shard's
`masks` column as COCO RLE with a score and label 1 (class-agnostic until `distseg distill cluster`
writes each mask's pseudo class into a new shard version). A mask's box is its RLE's bounding box
(`pycocotools.mask.toBbox`), not a column.
The same section holds the clustering settings (`clusters`, `features`, ...), since the clustering
reads its features from the same affinity source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from distseg.core.section import Section
from distseg.grouping.types import Mask, PriorOutput

if TYPE_CHECKING:
    from distseg.config import Config


class VitMasksParams(Section):
    source: str = Field("vit", pattern="^(vit|checkpoint)$", description="affinity source: vit | checkpoint")
    model: str = Field("vit_small_patch16_224", description="vit source: the timm model name (ViT-S/16 in the paper)")
    weights: str | None = Field(None, description="vit source: a local weights file (e.g. DINO ViT-S/16); required")
    checkpoint: str | None = Field(None, description="checkpoint source: a distseg checkpoint with a ViT backbone")
    short_side: int | None = Field(480, ge=16, description="resize the shorter side to this before the ViT")
    affinity: str = Field(
        "kk",
        pattern="^(kk|qk|kk_centered)$",
        description="patch affinity A whose sign grows the mask: kk (reference code) | qk (paper text) | kk_centered",
    )
    component: bool = Field(True, description="keep only the source's 4-connected component of the mask (ref. code)")
    top_k: float = Field(0.4, gt=0, le=1, description="fraction of patches kept as proposals by [CLS] affinity")
    max_masks: int = Field(3, ge=1, description="mask candidates per image (the paper: 1, then Mask R-CNN)")
    max_iou: float = Field(0.5, gt=0, le=1, description="drop a candidate overlapping an earlier one above this IoU")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto: cuda when the actor has a GPU")
    num_gpus: float = Field(0, ge=0, description="GPUs per mining / clustering actor (0: CPU actors)")
    clusters: int = Field(20, ge=2, description="distill cluster: K of k-means (over-clustering: K > classes)")
    features: str = Field(
        "cls", pattern="^(cls|tokens|embedding)$", description="distill cluster: cls | tokens | embedding (checkpoint)"
    )
    kmeans_iters: int = Field(50, ge=1, description="distill cluster: k-means iterations")
    kmeans_redo: int = Field(3, ge=1, description="distill cluster: k-means restarts (the best objective is kept)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("priors.vit_masks.device=cuda but this worker sees no GPU (set num_gpus > 0)")
    return device


def build_source(params: VitMasksParams):
    from distseg.distill.affinity import AFFINITY_SOURCES

    return AFFINITY_SOURCES.build(
        params.source,
        model=params.model,
        weights=params.weights,
        checkpoint=params.checkpoint,
        short_side=params.short_side,
        device=resolve_device(params.device),
        affinity=params.affinity,
    )


class VitMasksPrior:
    """Image -> MaskDistill object mask candidates (score: share of [CLS] attention, label 1)."""

    def __init__(self, cfg: Config, source=None):
        self.params = cfg.priors.vit_masks
        self.source = source if source is not None else build_source(self.params)

    def __call__(self, image: np.ndarray) -> PriorOutput:
        from distseg.distill.masks import propose_masks, upsample

        p = self.params
        aff = self.source.affinities(image)
        height, width = image.shape[:2]
        masks = []
        for m in propose_masks(aff, p.top_k, p.max_masks, p.max_iou, p.component):
            full = upsample(m.mask, height, width)
            if full.any():
                masks.append(Mask(mask=full, score=min(1.0, max(0.0, m.score)), label=1))
        return PriorOutput(masks=masks)
