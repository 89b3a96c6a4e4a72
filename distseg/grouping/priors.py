"""Grouping priors by name: the supervision that pretraining learns from.

    prior = create_prior("ucm", cfg)      # built once per Ray actor (models load once)
    out = prior(image)                    # PriorOutput(regions, region_dist, ucm, masks)

`ucm` (edges -> OWT-UCM tree, leaf regions with tree distances), `felzenszwalb` and `slic` (regions
only), `saliency` (one foreground mask, as MaskContrast uses; empty when the mask is almost empty),
`felzenszwalb_masks` (the largest Felzenszwalb regions as masks: a baseline proposal for MaskDistill's
clustering), `vit_masks` (MaskDistill's object masks, distseg.distill.prior).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pydantic import Field

from distseg.core.registry import Registry
from distseg.core.section import Section
from distseg.grouping.edges import as_rgb, edge_detector_from_config
from distseg.grouping.hierarchy import build_hierarchy
from distseg.grouping.types import Mask, PriorOutput  # re-exported: `from distseg.grouping.priors import Mask` works

MAX_REGIONS = 255  # leaf ids are stored as uint8
MIN_SIDE = 4  # below this OpenCV's segmenters crash (segfault on 1x1): such images are one region


if TYPE_CHECKING:
    from distseg.config import Config

Prior = Callable[[np.ndarray], PriorOutput]
# name -> factory(cfg: Config) -> Prior. Metadata: `params` (the pydantic model of the prior's config
# section `priors.<name>`, when it has settings) and `yields` ("regions": a leaf-label map, with tree
# distances for ucm; "masks": object masks whose union is the foreground).
PRIORS: Registry[Callable[[Config], Prior]] = Registry("prior")


def register_prior(name: str, *, yields: str = "regions", params: type[Section] | None = None):
    """Class or factory decorator: the prior `name`, built as `factory(cfg)` once per mining actor."""
    if yields not in ("regions", "masks"):
        raise ValueError(f"prior {name!r}: yields must be 'regions' or 'masks', got {yields!r}")
    return PRIORS.register(name, yields=yields, params=params)


def create_prior(name: str, cfg: Config) -> Prior:
    return PRIORS.build(name, cfg)


def prior_yields(name: str) -> str:
    """'regions' or 'masks': what the prior's shard column holds (ingest turns masks into fg/bg)."""
    return PRIORS.meta(name).get("yields", "regions")


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 0..K-1 in order of first appearance (row-major), as uint8."""
    _, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    out = order[inverse].reshape(labels.shape)
    if out.max() + 1 > MAX_REGIONS:
        raise ValueError(f"{out.max() + 1} regions exceed the {MAX_REGIONS} a shard can store")
    return out.astype(np.uint8)


@register_prior("ucm")
class UCMPrior:
    def __init__(self, cfg: Config):
        self.detector = edge_detector_from_config(cfg.edges)
        self.max_regions = cfg.hierarchy.max_regions

    def __call__(self, image: np.ndarray) -> PriorOutput:
        h = build_hierarchy(self.detector(image), self.max_regions)
        return PriorOutput(regions=h.regions, region_dist=h.region_dist, ucm=h.ucm)


class FelzenszwalbParams(Section):
    sigma: float = Field(0.8, ge=0, description="Gaussian smoothing before segmentation")
    k: float = Field(300.0, gt=0, description="scale: larger k -> larger segments")
    min_size: int = Field(50, ge=1, description="minimum segment size in pixels")
    max_regions: int = Field(200, ge=2, le=255, description="bound on segments: min_size >= area / max_regions")


@register_prior("felzenszwalb", params=FelzenszwalbParams)
class FelzenszwalbPrior:
    """Felzenszwalb-Huttenlocher graph segmentation; min_size bounds the region count."""

    def __init__(self, cfg: Config):
        self.params = cfg.priors.felzenszwalb

    def __call__(self, image: np.ndarray) -> PriorOutput:
        p = self.params
        if min(image.shape[:2]) < MIN_SIDE:
            return PriorOutput(regions=np.zeros(image.shape[:2], np.uint8))
        area = image.shape[0] * image.shape[1]
        min_size = max(p.min_size, int(np.ceil(area / p.max_regions)))
        segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=p.sigma, k=p.k, min_size=min_size)
        return PriorOutput(regions=relabel(segmenter.processImage(as_rgb(image)[:, :, ::-1])))


class FelzenszwalbMasksParams(Section):
    max_masks: int = Field(3, ge=1, description="the largest regions kept as mask proposals (vit_masks keeps 3)")
    min_area: float = Field(0.02, ge=0, lt=1, description="drop regions below this fraction of the image")


def largest_regions(regions: np.ndarray, max_masks: int, min_area: float) -> list[Mask]:
    """A region map's `max_masks` largest regions (each at least `min_area` of the image) as masks,
    largest first; a mask's score is its share of the image."""
    counts = np.bincount(regions.ravel())
    order = [int(r) for r in np.argsort(-counts, kind="stable") if counts[r] >= max(1, min_area * regions.size)]
    return [Mask(mask=regions == r, score=float(counts[r] / regions.size), label=1) for r in order[:max_masks]]


@register_prior("felzenszwalb_masks", yields="masks", params=FelzenszwalbMasksParams)
class FelzenszwalbMasksPrior:
    """Felzenszwalb regions as mask proposals: the comparison MaskDistill's Sec. 3.1 / Fig. 1 draws
    (a low-level prior over-segments, so its regions carry little semantic content). The segmentation is
    `felzenszwalb` with its own settings (priors.felzenszwalb); the `max_masks` largest regions become
    masks, as many as vit_masks proposes per image, so that only the kind of proposal differs."""

    def __init__(self, cfg: Config):
        self.params = cfg.priors.felzenszwalb_masks
        self.segment = FelzenszwalbPrior(cfg)

    def __call__(self, image: np.ndarray) -> PriorOutput:
        if min(image.shape[:2]) < MIN_SIDE:
            return PriorOutput(masks=[])
        p = self.params
        return PriorOutput(masks=largest_regions(self.segment(image).regions, p.max_masks, p.min_area))


class SlicParams(Section):
    num_regions: int = Field(100, ge=2, le=255, description="target number of superpixels")
    ruler: float = Field(10.0, gt=0, description="SLICO smoothness")
    iterations: int = Field(10, ge=1, description="SLIC iterations")


@register_prior("slic", params=SlicParams)
class SlicPrior:
    """SLICO superpixels in CIELAB, sized for about `num_regions` regions."""

    def __init__(self, cfg: Config):
        self.params = cfg.priors.slic

    def __call__(self, image: np.ndarray) -> PriorOutput:
        p = self.params
        if min(image.shape[:2]) < MIN_SIDE:
            return PriorOutput(regions=np.zeros(image.shape[:2], np.uint8))
        rgb = as_rgb(image)
        size = max(2, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / p.num_regions)))
        lab = cv2.cvtColor(cv2.GaussianBlur(rgb, (3, 3), 0), cv2.COLOR_RGB2LAB)
        slic = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=cv2.ximgproc.SLICO, region_size=size, ruler=p.ruler)
        slic.iterate(p.iterations)
        slic.enforceLabelConnectivity(min_element_size=25)
        return PriorOutput(regions=relabel(slic.getLabels()))


class SaliencyParams(Section):
    method: str = Field(
        "spectral_residual", pattern="^(spectral_residual|fine_grained)$", description="OpenCV static saliency"
    )
    min_component: float = Field(
        0.01, ge=0, lt=1, description="drop foreground components below this fraction of the image"
    )
    min_area: float = Field(0.02, ge=0, lt=1, description="no mask when the foreground covers less than this fraction")


@register_prior("saliency", yields="masks", params=SaliencyParams)
class SaliencyPrior:
    """Static saliency -> Otsu threshold -> cleaned foreground mask (MaskContrast's unsupervised prior).

    Components smaller than `min_component` of the image are dropped; if what is left covers less
    than `min_area`, the image gets no mask (MaskContrast drops such images from training).
    """

    def __init__(self, cfg: Config):
        self.params = cfg.priors.saliency
        self.model = (
            cv2.saliency.StaticSaliencyFineGrained.create()
            if self.params.method == "fine_grained"
            else cv2.saliency.StaticSaliencySpectralResidual.create()
        )

    def __call__(self, image: np.ndarray) -> PriorOutput:
        p = self.params
        if min(image.shape[:2]) < MIN_SIDE:
            return PriorOutput(masks=[])
        bgr = as_rgb(image)[:, :, ::-1]
        ok, saliency = self.model.computeSaliency(np.ascontiguousarray(bgr))
        if not ok:
            raise RuntimeError("OpenCV static saliency failed on this image")
        saliency = cv2.GaussianBlur(saliency.astype(np.float32), (0, 0), 2.0)
        saliency = cv2.normalize(saliency, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        _, mask = cv2.threshold(saliency, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        area = mask.size
        keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= p.min_component * area]
        foreground = np.isin(components, keep)
        if foreground.sum() < p.min_area * area:
            return PriorOutput(masks=[])
        return PriorOutput(masks=[Mask(mask=foreground, score=float(saliency[foreground].mean() / 255.0), label=1)])


from distseg.distill.prior import VitMasksParams, VitMasksPrior  # noqa: E402  MaskDistill; torch loads when built

register_prior("vit_masks", yields="masks", params=VitMasksParams)(VitMasksPrior)
