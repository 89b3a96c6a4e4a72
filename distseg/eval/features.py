"""Frozen dense features for the evaluation protocols: a checkpoint, or a baseline by name.

    extract = create_features("checkpoint", checkpoint="outputs/checkpoints/demo", image_size=320)
    feats = extract(image)  # (D, h, w) float32, h ~ H/4

Baselines, computed by the same command for an honest comparison: `random` (the checkpoint's
architecture with random init) and `rgbxy` (Lab colour and pixel position, at the same 1/4 grid).
`saliency` is no embedding: a maskcontrast checkpoint's saliency probability, the object masks of the
`object_kmeans` protocol.

A baseline factory is called with `model_cfg`, `image_size`, `seed` (and `device` for a `gpu` source)
and takes the ones it needs (`**_` for the rest); a checkpoint source with `checkpoint`, `image_size`
(and `device`).

Sources are registered in `FEATURES`; distseg.eval.extract runs them on a Ray actor pool.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.core.registry import Registry
from distseg.models import create_model

FeatureFn = Callable[[np.ndarray], np.ndarray]
# name -> factory(**kwargs) -> FeatureFn. Metadata: `gpu` (a network: worth a GPU when the cluster has
# one); `needs_checkpoint` (built from `distseg evaluate --checkpoint`, so not a baseline)
FEATURES: Registry[Callable[..., FeatureFn]] = Registry("feature source")

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def register_features(name: str, *, gpu: bool = False, needs_checkpoint: bool = False):
    """Factory decorator: the feature source `name` (see FEATURES for the metadata)."""
    return FEATURES.register(name, gpu=gpu, needs_checkpoint=needs_checkpoint)


def create_features(name: str, **kwargs) -> FeatureFn:
    """Build a feature source (`UnknownNameError`, a KeyError, lists the known names)."""
    return FEATURES.build(name, **kwargs)


def resize_longer(image: np.ndarray, side: int | None) -> np.ndarray:
    if not side or max(image.shape[:2]) == side:
        return image
    scale = side / max(image.shape[:2])
    size = (max(8, round(image.shape[1] * scale)), max(8, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class ModelFeatures:
    """Embeddings of a network (eval mode, no grad); images resized so the longer side is `image_size`."""

    def __init__(self, model: torch.nn.Module, image_size: int | None = 320, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.image_size = image_size
        self.device = device

    def _input(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, h, w) network input: resized to `image_size`, ImageNet-normalised, on the device."""
        x = (resize_longer(image, self.image_size).astype(np.float32) / 255 - MEAN) / STD
        return torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.model(self._input(image))[0].float().cpu().numpy()


@register_features("checkpoint", gpu=True, needs_checkpoint=True)
def _checkpoint(checkpoint: str, image_size: int | None = 320, device: str = "cpu", **_) -> FeatureFn:
    from distseg.checkpoint import load_embedding_model  # it imports distseg.config, which imports this module

    model, _cfg = load_embedding_model(checkpoint, device)
    return ModelFeatures(model, image_size, device)


@register_features("random", gpu=True)
def _random(model_cfg, image_size: int | None = 320, device: str = "cpu", seed: int = 0, **_) -> FeatureFn:
    torch.manual_seed(seed)
    # neither pretrained weights nor init_from (a maskcontrast / concepts config starts from a hiergroup
    # checkpoint): the baseline is the architecture untrained
    untrained = model_cfg.model_copy(update={"weights": None, "init_from": None})
    return ModelFeatures(create_model(untrained), image_size, device)


def load_saliency_head(checkpoint: str | Path) -> torch.Tensor:
    """The (1, F, 1, 1) weight of the saliency head a maskcontrast run saved in ``<checkpoint>/loss.pt``.

    Raises ValueError naming the file when the checkpoint has none (not a maskcontrast run)."""
    path = Path(checkpoint) / "loss.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the object masks come from a maskcontrast checkpoint's saliency head")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "saliency_head.weight" not in state:
        raise ValueError(
            f"{path} holds no saliency head (was the checkpoint trained with pretrain.method=maskcontrast?)"
        )
    return state["saliency_head.weight"].float()


class SaliencyMaps(ModelFeatures):
    """A maskcontrast checkpoint's saliency probability, sigmoid(head(decoder features)), as (1, h, w)
    on the embedding's grid; the head is the 1x1 conv the method trained beside the embedding head."""

    def __init__(self, model: torch.nn.Module, head: torch.Tensor, image_size: int | None = 320, device: str = "cpu"):
        super().__init__(model, image_size, device)
        self.head = head.to(device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        _, feats = self.model(self._input(image), return_features=True)
        if feats.shape[1] != self.head.shape[1]:
            raise ValueError(f"decoder features have {feats.shape[1]} channels, the saliency head {self.head.shape[1]}")
        return torch.sigmoid(F.conv2d(feats.float(), self.head))[0].cpu().numpy()


@register_features("saliency", gpu=True, needs_checkpoint=True)
def _saliency(checkpoint: str, image_size: int | None = 320, device: str = "cpu") -> FeatureFn:
    """Not embeddings: the object masks of ``object_kmeans`` (MaskContrast's k-means protocol)."""
    from distseg.checkpoint import load_embedding_model

    head = load_saliency_head(checkpoint)
    model, _cfg = load_embedding_model(checkpoint, device)
    return SaliencyMaps(model, head, image_size, device)


class RGBXYFeatures:
    """Lab colour (scaled to about [-1, 1]) and x, y position (x `xy_weight`) on the 1/4 grid."""

    def __init__(self, image_size: int | None = 320, xy_weight: float = 1.0):
        self.image_size = image_size
        self.xy_weight = xy_weight

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = resize_longer(image, self.image_size)
        h, w = max(1, image.shape[0] // 4), max(1, image.shape[1] // 4)
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(small.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
        lab = (lab - np.array([50.0, 0.0, 0.0], np.float32)) / np.array([50.0, 100.0, 100.0], np.float32)
        ys, xs = np.meshgrid(
            np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32), indexing="ij"
        )
        return np.concatenate([lab.transpose(2, 0, 1), self.xy_weight * np.stack([xs, ys])]).astype(np.float32)


@register_features("rgbxy")
def _rgbxy(image_size: int | None = 320, **_) -> FeatureFn:
    return RGBXYFeatures(image_size)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(D, h, w) features -> (h, w, 3) uint8 picture of their first three principal components."""
    d, h, w = features.shape
    x = features.reshape(d, -1).T
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    proj = np.clip((proj - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return (proj.reshape(h, w, 3) * 255).astype(np.uint8)
