"""Affinity sources: the [CLS]-to-patch affinities A_cls and the patch-to-patch matrix A of a ViT's
last attention block (MaskDistill, Van Gansbeke et al. 2022, Sec. 3.2, Eqs. 1-2).

    source = AFFINITY_SOURCES.build("vit", model="vit_small_patch16_224", weights="dino_vits16.pth")
    aff = source.affinities(image)      # Affinity(a_cls (P,), A (P, P), cls_attention (P,), grid (h, w))
    feats = source.pooled(image, masks) # (M, D): one feature per masked image, for the clustering

Sources by name (`AFFINITY_SOURCES`): `vit` (any timm ViT by name, weights only from a local file the
user gives; never downloaded) and `checkpoint` (a distseg checkpoint whose `model.backbone` is a ViT
backbone, `vit_tiny` / `vit_small`: the project's own pretrained network, no outside weights).

A forward hook on the last block's `attn.qkv` captures queries and keys; `affinities_from_qkv` turns
them into A_cls_j = mean over heads of q_cls . k_j (the [CLS] row: the proposals and the source) and
the patch-to-patch matrix A whose sign the mask growth tests, chosen by `affinity` (AFFINITIES):

- `kk` (default): A_ij = mean over heads of k_i . k_j, key-key similarity. This is what the reference
  code computes although the paper's text reads as query-key: MaskDistill's `gen_masks.py`,
  `mask_generator` (G_i = sum over heads of K_i K_i^T over the patch keys, raw keys, no centring or
  normalisation; G_cls from Q @ K^T) and LOST's `main_lost.py` (`--which_features k`, default) with
  `object_discovery.py`, `lost` (A = feats @ feats^T). The mean over heads instead of their sum does
  not change any sign.
- `qk`: A_ij = mean over heads of q_i . k_j, the paper's text read literally (distseg's earlier rule).
  A_ij holds a per-query offset q_i . c for any vector c added to every key, which the softmax attention
  ignores (a constant added to a row of logits), so its sign is not something the network was trained
  to make meaningful. Measured with distseg's GPU-pretrained hiergroup ViT-S/16 on 39 DAVIS-2016
  frames (`distseg distill ap`, README, MaskDistill part 1): mean mask area 0.914 of the frame and
  best IoU 0.051 with `qk`, 0.507 / 0.082 with `kk`, 0.393 / 0.112 with `kk` plus the component step
  of distseg.distill.masks, 0.285 / 0.110 with `kk_centered` plus that step (AP ~0 for all).
  Centring the keys inside q . k does not rescue it (a one-off check on the same frames, not an
  option: with q_i . (k_j - m) the first mask covered 0.985 of the frame, with `qk` 0.978), so the
  sign of q . k is dominated by what all queries share, not only by the per-query offset.
- `kk_centered`: A_ij = mean over heads of (k_i - m) . (k_j - m), m the mean patch key of the image
  (per head). A departure from the reference code, offered because it is invariant to a shared key
  offset (as the attention is) where `kk` is not; neither LOST nor MaskDistill centre the keys.

The raw dot products are kept (no softmax): the mask growth tests their sign. A_cls's ranking does
not depend on a shared key offset (it adds the same q_cls . c to every patch). Departures from
`mask_generator` named here: A_cls averages all heads (the reference code averages the first
`--heads 5` of ViT-S's 6) and is not multiplied by DINO's 50 %-attention-mass threshold (its comment:
"for better visualization"). `cls_attention` is the softmax attention of [CLS] over the patches,
averaged over heads and renormalised over the patches: a distribution used only to score a mask
(the share of [CLS] attention it holds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from distseg.core.registry import Registry

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

AFFINITY_SOURCES: Registry[Callable[..., AffinitySource]] = Registry("affinity source")
AFFINITIES = ("kk", "qk", "kk_centered")  # the patch-to-patch matrix A (module docstring); first: default


def check_affinity(affinity: str) -> None:
    if affinity not in AFFINITIES:
        raise ValueError(f"priors.vit_masks.affinity: {affinity!r} is not one of {' | '.join(AFFINITIES)}")


@dataclass
class Affinity:
    a_cls: np.ndarray  # (P,) float32: [CLS]-to-patch affinities, mean over heads of q_cls . k_j
    A: np.ndarray  # (P, P) float32: patch-to-patch affinities (kk: mean over heads of k_i . k_j; see AFFINITIES)
    cls_attention: np.ndarray  # (P,) float32, sums to 1: softmax [CLS] attention over the patches
    grid: tuple[int, int]  # (h, w) patch grid, P = h * w


def affinities_from_qkv(
    qkv: torch.Tensor, num_heads: int, num_prefix: int = 1, q_norm=None, k_norm=None, affinity: str = "kk"
) -> Affinity:
    """One image's qkv projection output (N, 3 * C) -> A_cls, A and the [CLS] attention over patches.

    Token 0 is [CLS]; tokens 1..num_prefix-1 (register tokens, if any) are dropped; the rest are
    patches (grid set by the caller). `affinity` chooses A: kk | qk | kk_centered (module docstring)."""
    check_affinity(affinity)
    if qkv.ndim != 2 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(f"qkv must be (tokens, 3 * heads * head_dim) for {num_heads} heads, got {tuple(qkv.shape)}")
    if num_prefix < 1:
        raise ValueError("the ViT has no [CLS] token (num_prefix_tokens = 0): A_cls is undefined")
    n = qkv.shape[0]
    q, k, _ = qkv.float().reshape(n, 3, num_heads, -1).permute(1, 2, 0, 3)  # each (H, N, d)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    logits = q @ k.transpose(-1, -2)  # (H, N, N): q_i . k_j per head
    a_cls = logits[:, 0, num_prefix:].mean(0)
    keys = k[:, num_prefix:]  # (H, P, d) patch keys
    if affinity == "qk":
        A = logits[:, num_prefix:, num_prefix:].mean(0)
    else:
        if affinity == "kk_centered":
            keys = keys - keys.mean(1, keepdim=True)
        A = (keys @ keys.transpose(-1, -2)).mean(0)
    scale = q.shape[-1] ** -0.5
    attention = torch.softmax(logits[:, 0, :] * scale, dim=-1).mean(0)[num_prefix:]
    attention = attention / attention.sum().clamp_min(1e-12)
    return Affinity(a_cls=a_cls.cpu().numpy(), A=A.cpu().numpy(), cls_attention=attention.cpu().numpy(), grid=(0, 0))


def resize_to_patches(image: np.ndarray, short_side: int | None, patch: int) -> np.ndarray:
    """Resize so the shorter side is about `short_side` (None: keep) and both sides are multiples of the patch."""
    h, w = image.shape[:2]
    if min(h, w) < 2:
        raise ValueError(f"image of {h}x{w} pixels is too small for ViT affinities (need at least 2x2 pixels)")
    scale = 1.0 if short_side is None else short_side / min(h, w)
    th, tw = (max(patch, int(round(s * scale / patch)) * patch) for s in (h, w))
    if (th, tw) == (h, w):
        return image
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    batch = np.stack([(im.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for im in images])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)


def check_attention(vit: torch.nn.Module, name: str):
    """The last block's attention module, or a clear error for a model that has none."""
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise ValueError(
            f"{name}: no self-attention to read affinities from (need a ViT whose last block has attn.qkv, "
            f"e.g. vit_small_patch16_224; got {type(vit).__name__})"
        )
    if getattr(vit, "num_prefix_tokens", 0) < 1 or getattr(vit, "cls_token", None) is None:
        raise ValueError(f"{name}: the ViT has no [CLS] token, so A_cls is undefined")
    return attn


class AffinitySource:
    """Wraps a timm ViT: affinities of one image, and pooled features of masked images."""

    def __init__(
        self, vit: torch.nn.Module, name: str, short_side: int | None = 480, device: str = "cpu", affinity: str = "kk"
    ):
        check_affinity(affinity)
        self.name = name
        self.affinity = affinity
        self.device = torch.device(device)
        self.vit = vit.eval().to(self.device)
        self.attn = check_attention(vit, name)
        self.patch = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)
        self.short_side = short_side
        self._qkv: torch.Tensor | None = None
        self.attn.qkv.register_forward_hook(lambda _m, _i, out: setattr(self, "_qkv", out.detach()))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
        return resize_to_patches(image, self.short_side, self.patch)

    @torch.inference_mode()
    def affinities(self, image: np.ndarray) -> Affinity:
        resized = self.prepare(image)
        self.vit.forward_features(to_tensor([resized], self.device))
        grid = (resized.shape[0] // self.patch, resized.shape[1] // self.patch)
        aff = affinities_from_qkv(
            self._qkv[0], self.attn.num_heads, self.prefix, getattr(self.attn, "q_norm", None),
            getattr(self.attn, "k_norm", None), self.affinity,
        )  # fmt: skip
        if aff.a_cls.shape[0] != grid[0] * grid[1]:
            raise ValueError(f"{self.name}: {aff.a_cls.shape[0]} patch tokens for a {grid} grid")
        aff.grid = grid
        return aff

    def masked_inputs(self, image: np.ndarray, masks: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        resized = self.prepare(image)
        size = (resized.shape[1], resized.shape[0])
        small = [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool) for m in masks]
        return to_tensor([resized * m[..., None] for m in small], self.device), small

    @torch.inference_mode()
    def pooled(self, image: np.ndarray, masks: list[np.ndarray], features: str = "cls") -> np.ndarray:
        """One feature per mask, from the image with everything outside the mask zeroed (Sec. 3.2).

        `cls`: the output [CLS] token (the paper); `tokens`: the mean output patch token inside the mask."""
        if not masks:
            return np.zeros((0, int(self.vit.embed_dim)), np.float32)
        x, small = self.masked_inputs(image, masks)
        out = self.vit.forward_features(x)  # (M, N, C), after the final norm
        if features == "cls":
            feats = out[:, 0]
        elif features == "tokens":
            tokens = out[:, self.prefix :]
            weights = torch.stack([torch.from_numpy(self.patch_weights(m)) for m in small]).to(tokens)
            feats = (tokens * weights[..., None]).sum(1)
        else:
            raise ValueError(f"features: {features!r} is not available for the {self.name} source (cls | tokens)")
        return feats.float().cpu().numpy()

    def patch_weights(self, mask: np.ndarray) -> np.ndarray:
        """The fraction of each patch the mask covers, normalised to sum 1 (uniform when empty)."""
        h, w = mask.shape[0] // self.patch, mask.shape[1] // self.patch
        cover = mask[: h * self.patch, : w * self.patch].reshape(h, self.patch, w, self.patch).mean((1, 3)).ravel()
        total = cover.sum()
        return (cover / total if total > 0 else np.full_like(cover, 1 / cover.size)).astype(np.float32)


@AFFINITY_SOURCES.register("vit")
def vit_source(
    model: str = "vit_small_patch16_224",
    weights: str | None = None,
    short_side: int | None = 480,
    device="cpu",
    affinity: str = "kk",
    **_,
) -> AffinitySource:
    """Any timm ViT by name with weights from a local file (DINO's ViT-S/16 in the paper).

    `weights=None` is refused: a randomly initialised ViT gives meaningless masks; tests build an
    `AffinitySource` around a random ViT directly."""
    if not weights:
        raise FileNotFoundError(
            f"priors.vit_masks.weights: the vit source needs a local weights file for {model!r} (e.g. DINO's "
            "ViT-S/16 state dict); nothing is downloaded. Or use source=checkpoint with a distseg ViT checkpoint."
        )
    import timm

    from distseg.models.vit import create_vit

    if model not in timm.list_models():
        raise ValueError(f"priors.vit_masks.model: {model!r} is not a timm model")
    return AffinitySource(create_vit(model, weights), f"vit:{model}", short_side, device, affinity)


class CheckpointSource(AffinitySource):
    """A distseg checkpoint whose backbone is a ViT: affinities from its `backbone.vit`; its embedding
    (what hiergroup trained) is also available as the `embedding` feature for the clustering."""

    def __init__(self, net: torch.nn.Module, name: str, short_side: int | None, device: str, affinity: str = "kk"):
        self.net = net.eval().to(device)
        super().__init__(net.backbone.vit, name, short_side, device, affinity)

    @torch.inference_mode()
    def pooled(self, image: np.ndarray, masks: list[np.ndarray], features: str = "embedding") -> np.ndarray:
        if features != "embedding":
            return super().pooled(image, masks, features)
        if not masks:
            return np.zeros((0, self.net.embed_dim), np.float32)
        x, small = self.masked_inputs(image, masks)
        emb = self.net(x)  # (M, D, H/4, W/4) unit vectors
        size = (emb.shape[-1], emb.shape[-2])
        out = []
        for i, m in enumerate(small):
            w = cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA)
            w = torch.from_numpy(w / max(w.sum(), 1e-6)).to(emb)
            out.append((emb[i] * w).sum((1, 2)))
        return torch.nn.functional.normalize(torch.stack(out), dim=1).float().cpu().numpy()


@AFFINITY_SOURCES.register("checkpoint")
def checkpoint_source(
    checkpoint: str | None = None, short_side: int | None = 480, device="cpu", affinity: str = "kk", **_
) -> CheckpointSource:
    """A distseg checkpoint folder (model.pt + config.yaml) pretrained with a ViT backbone."""
    from distseg.checkpoint import load_embedding_model
    from distseg.models import VIT_MODELS

    if not checkpoint:
        raise FileNotFoundError("priors.vit_masks.checkpoint: the checkpoint source needs a distseg checkpoint folder")
    folder = Path(checkpoint)
    folder = folder.parent if folder.is_file() else folder
    try:
        net, cfg = load_embedding_model(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"priors.vit_masks.checkpoint: {e}") from None
    if cfg.model.backbone not in VIT_MODELS:
        raise ValueError(
            f"priors.vit_masks.checkpoint: {folder} has backbone {cfg.model.backbone!r}, which has no attention; "
            f"pretrain with model.backbone in {sorted(VIT_MODELS)}"
        )
    return CheckpointSource(net, f"checkpoint:{folder.name}", short_side, device, affinity)
