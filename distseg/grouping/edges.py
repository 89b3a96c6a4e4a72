"""Edge detectors by name: each maps an RGB image to an edge-strength map in [0, 1] and an orientation.

    detector = create_edge_detector("gradient")
    edges = detector(image)          # EdgeMap(strength, orientation)
    thin = edges.thinned()           # non-maximum suppressed, as structured edges / OWT use them

Registry: `learned` (the default; a network distseg trains on BSDS500 and ships, see edgenet.py; it
is registered by distseg/grouping/__init__.py so torch loads only when it is built), `gradient`
(learning-free multi-scale colour gradient), `sed` (OpenCV structured edges; needs a model file).
Each entry's `takes` metadata names the `EdgesConfig` keys its factory accepts as keyword arguments,
so `edge_detector_from_config` needs no per-detector branches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from distseg.core.registry import Registry
from distseg.grouping.nms import non_maximum_suppression
from distseg.grouping.types import EdgeMap

__all__ = [
    "EDGE_DETECTORS",
    "EdgeDetector",
    "EdgeMap",
    "GradientEdges",
    "StructuredEdges",
    "as_rgb",
    "create_edge_detector",
    "edge_detector_from_config",
    "non_maximum_suppression",
    "orientation_of",
    "register_edge_detector",
    "structure_orientation",
]

EdgeDetector = Callable[[np.ndarray], EdgeMap]
# name -> factory(**kwargs) -> EdgeDetector. Metadata: `takes`, the EdgesConfig keys (e.g. "weights",
# "scales") the factory accepts; edge_detector_from_config passes exactly those.
EDGE_DETECTORS: Registry[Callable[..., EdgeDetector]] = Registry("edge detector")


def register_edge_detector(name: str, *, takes: tuple[str, ...] = ()):
    """Class or factory decorator: the edge detector `name`, taking the config keys `takes`."""
    return EDGE_DETECTORS.register(name, takes=tuple(takes))


def create_edge_detector(name: str, **kwargs) -> EdgeDetector:
    """An edge detector by registry name, like timm's create_model (unknown: ValueError listing the names)."""
    return EDGE_DETECTORS.build(name, **kwargs)


def edge_detector_from_config(edges_cfg) -> EdgeDetector:
    """The detector an `EdgesConfig` names, given the config keys it registered as taking; with
    `edges.spectral` > 0, wrapped in gPb's spectral globalisation (distseg.grouping.spectral)."""
    takes = EDGE_DETECTORS.meta(edges_cfg.detector).get("takes", ())
    kwargs = {key: getattr(edges_cfg, key) for key in takes}
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    detector = create_edge_detector(edges_cfg.detector, **kwargs)
    if getattr(edges_cfg, "spectral", 0):  # gPb's globalisation on top of any detector
        from distseg.grouping.spectral import SpectralGlobalization

        detector = SpectralGlobalization(detector, edges_cfg.spectral)
    return detector


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 from grey (H x W or H x W x 1) or RGB input."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an H x W grey or H x W x 3 RGB image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image.astype(np.uint8))


def structure_orientation(gx: np.ndarray, gy: np.ndarray, sigma: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Dominant gradient energy and orientation from a (multi-channel) structure tensor (Di Zenzo)."""
    if gx.ndim == 3:
        jxx, jyy, jxy = (gx * gx).sum(2), (gy * gy).sum(2), (gx * gy).sum(2)
    else:
        jxx, jyy, jxy = gx * gx, gy * gy, gx * gy
    if sigma > 0:
        jxx, jyy, jxy = (cv2.GaussianBlur(j, (0, 0), sigma) for j in (jxx, jyy, jxy))
    energy = 0.5 * (jxx + jyy + np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2))
    orientation = np.mod(0.5 * np.arctan2(2 * jxy, jxx - jyy), np.pi)
    return energy.astype(np.float32), orientation.astype(np.float32)


def orientation_of(strength: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Edge-normal orientation of a soft edge map (as structured edges derive it from the map itself)."""
    smooth = cv2.GaussianBlur(strength.astype(np.float32), (0, 0), 1.0)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    return structure_orientation(gx, gy, sigma)[1]


@register_edge_detector("gradient")
class GradientEdges:
    """Learning-free multi-scale colour gradient in CIELAB; no weights.

    The gradient energy of the Lab image's structure tensor is summed over Gaussian scales and mapped
    to [0, 1] by m / (m + median-of-the-strong-half), so the map is comparable across images.
    """

    def __init__(self, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)):
        self.sigmas = sigmas

    def __call__(self, image: np.ndarray) -> EdgeMap:
        lab = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2LAB).astype(np.float32)
        energy = np.zeros(lab.shape[:2], np.float32)
        jx, jy = [], []
        for sigma in self.sigmas:
            blurred = cv2.GaussianBlur(lab, (0, 0), sigma)
            gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3) * sigma  # scale-normalised
            gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3) * sigma
            jx.append(gx)
            jy.append(gy)
        energy, orientation = structure_orientation(np.concatenate(jx, 2), np.concatenate(jy, 2), sigma=1.0)
        magnitude = np.sqrt(energy)
        scale = float(np.percentile(magnitude, 90)) + 1e-6
        return EdgeMap(strength=(magnitude / (magnitude + scale)).astype(np.float32), orientation=orientation)


@register_edge_detector("sed", takes=("weights",))
class StructuredEdges:
    """OpenCV structured edges (Dollar & Zitnick). The model file (model.yml.gz) is the user's to supply."""

    def __init__(self, weights: str | Path | None = None):
        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"edge detector 'sed' needs OpenCV's structured-edge model file (model.yml.gz); "
                f"got {str(weights)!r}. Pass edges.weights=PATH, or use edges.detector=learned|gradient."
            )
        self.model = cv2.ximgproc.createStructuredEdgeDetection(str(weights))

    def __call__(self, image: np.ndarray) -> EdgeMap:
        strength = self.model.detectEdges(as_rgb(image).astype(np.float32) / 255.0)
        return EdgeMap(strength=strength, orientation=np.mod(self.model.computeOrientation(strength), np.pi))
