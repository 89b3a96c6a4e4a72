"""Pixel-to-mask-prototype contrast with a momentum encoder (Van Gansbeke et al., ICCV 2021, MaskContrast).

Each image has one salient-object mask M (segment value 1; 0 = background, -1 = ignore). Its prototype
is the normalised mean of the KEY (momentum-encoder) embeddings over the mask, z_M = normalise(mean_{j in M} k_j).
Every foreground query pixel i of an image is pulled to its own image's prototype and pushed from the
prototypes of the other images of the batch and from a FIFO queue of past prototypes:

    L_contrast = mean_i w_i * -log( exp(z_i.z_M / tau) / (exp(z_i.z_M / tau) + sum_{n in N} exp(z_i.z_n / tau)) )

with tau = 0.5, a queue of 128 prototypes and key-encoder momentum m = 0.999 (the project defaults,
DESIGN.md). As in the authors' code:
- the queue starts as random unit vectors (not empty), so the number of candidates is constant;
- pixels are weighted per target prototype with the E-Net weights w = 1 / ln(1.02 + share of the
  batch's foreground pixels on that prototype), so images with small masks count as much as large ones;
- a saliency head (here a 1x1 conv on the embedding) predicts the mask, trained with a class-balanced
  binary cross-entropy, L = L_contrast + saliency_weight * L_saliency.

Like the authors, start from a self-supervised network (`model.init_from`): from random init the
prototypes of different images are almost parallel and the contrast stays at chance (README).

The contrast is symmetric: view-1 pixels use the prototypes of key view 2 and vice versa. `proto_acc`
(the share of foreground pixels whose most similar prototype is their own) and `chance_loss`
(ln of the number of candidates) show whether the contrast learns. Images without foreground in
either view are skipped. After the loss, both views' prototypes enter the queue (training mode only).
Without key1/key2 the detached query embeddings stand in for the keys (momentum 0). The training
loop owns the EMA copy and reads `momentum`.

Provenance: the paper's text was not reachable from this workplace beyond its abstract; the queue
initialisation, E-Net weighting and saliency head follow the public description of the authors'
training code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import zero_loss
from distseg.methods.base import Method, Views, register_method


def mask_prototypes(keys: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean key embedding over each image's foreground (seg == 1): (B, D), and which images have one (B,)."""
    fg = (seg == 1).unsqueeze(1).to(keys.dtype)
    protos = F.normalize((keys.detach() * fg).sum(dim=(2, 3)), dim=1)
    return protos, fg.flatten(1).sum(dim=1) > 0


def enet_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample E-Net class weights 1 / ln(1.02 + p_class) of each sample's target (p: its share of samples)."""
    share = torch.bincount(target, minlength=num_classes).float() / max(len(target), 1)
    return (1.0 / torch.log(1.02 + share))[target]


def prototype_contrast(
    emb: torch.Tensor,
    seg: torch.Tensor,
    protos: torch.Tensor,
    has: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """E-Net-weighted cross-entropy of each foreground pixel of `emb` (B, D, h, w): its similarities / tau to
    the batch prototypes `protos[has]` and the `queue`, the target being its own image's prototype.
    Returns the loss (None without foreground pixels) and whether each pixel's most similar prototype is
    its own (M,) bool."""
    fg = (seg == 1) & has[:, None, None]
    z = emb.permute(0, 2, 3, 1)[fg]
    if len(z) == 0:
        return None, torch.zeros(0, dtype=torch.bool, device=emb.device)
    target = (has.long().cumsum(0) - 1)[fg.nonzero()[:, 0]]
    logits = z @ torch.cat([protos[has], queue]).T / temperature
    hit = logits.detach().argmax(1) == target
    weight = enet_weights(target, logits.shape[1])
    loss = (weight * F.cross_entropy(logits, target, reduction="none")).sum() / weight.sum()
    return loss, hit


def balanced_bce(logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor | None:
    """Binary cross-entropy of saliency `logits` (B, h, w) against seg == 1 over the non-ignored pixels,
    each class weighted by the other's share so that a small mask is not drowned by the background."""
    valid = seg >= 0
    if not valid.any():
        return None
    target = (seg[valid] == 1).float()
    pos = target.mean()
    weight = torch.where(target > 0, 1 - pos, pos)
    return F.binary_cross_entropy_with_logits(logits[valid], target, weight=weight)


class MaskContrastLoss(nn.Module):
    """MaskContrast's pixel-to-mask-prototype contrast with a prototype queue and a saliency head (module docstring)."""

    uses_key_encoder = True

    def __init__(
        self,
        temperature: float = 0.5,
        queue_size: int = 128,
        momentum: float = 0.999,
        saliency_weight: float = 1.0,
        dim: int = 32,
    ):
        super().__init__()
        if temperature <= 0 or queue_size < 1 or dim < 1 or not 0 <= momentum < 1 or saliency_weight < 0:
            raise ValueError("temperature > 0, queue_size >= 1, dim >= 1, 0 <= momentum < 1, saliency_weight >= 0")
        self.temperature, self.momentum, self.saliency_weight, self.dim = temperature, momentum, saliency_weight, dim
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite
        self.saliency_head = nn.Conv2d(dim, 1, kernel_size=1)

    @torch.no_grad()
    def _enqueue(self, protos: torch.Tensor) -> None:
        size = len(self.queue)
        if not self.training or len(protos) == 0:
            return
        protos = protos[-size:]
        ptr = int(self.queue_ptr)
        self.queue[(ptr + torch.arange(len(protos), device=protos.device)) % size] = protos.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(protos)) % size)

    def forward(
        self,
        emb1: torch.Tensor,
        emb2: torch.Tensor,
        seg1: torch.Tensor,
        seg2: torch.Tensor,
        *,
        dist: torch.Tensor | None = None,
        key1: torch.Tensor | None = None,
        key2: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if emb1.shape[1] != self.dim:
            raise ValueError(f"embedding dimension {emb1.shape[1]} != the prototype queue's {self.dim}")
        p1, has1 = mask_prototypes(emb1 if key1 is None else key1, seg1)
        p2, has2 = mask_prototypes(emb2 if key2 is None else key2, seg2)
        queue = self.queue.to(emb1.dtype)

        contrast, saliency, hits = [], [], []
        for emb, seg, protos, has in ((emb1, seg1, p2, has2), (emb2, seg2, p1, has1)):
            term, hit = prototype_contrast(emb, seg, protos, has, queue, self.temperature)
            contrast += [term] if term is not None else []
            hits.append(hit)
            bce = balanced_bce(self.saliency_head(emb)[:, 0], seg)
            saliency += [bce] if bce is not None else []
        zero = emb1.new_zeros(())
        loss_contrast = torch.stack(contrast).mean() if contrast else zero
        loss_saliency = torch.stack(saliency).mean() if saliency else zero
        if contrast or saliency:
            loss = loss_contrast + self.saliency_weight * loss_saliency
        else:
            loss = zero_loss(emb1, emb2)
        self._enqueue(torch.cat([p2[has2], p1[has1]]))
        hit = torch.cat(hits)
        candidates = int(has1.sum() + has2.sum()) / 2 + len(queue)
        return {
            "loss": loss,
            "contrast": loss_contrast.detach(),
            "saliency": loss_saliency.detach(),
            "proto_acc": hit.float().mean() if len(hit) else zero,
            "chance_loss": emb1.new_tensor(math.log(max(candidates, 1.0))),
        }


class MaskContrastParams(Section):
    """`losses.maskcontrast`: the prototype contrast, its queue and the momentum encoder."""

    temperature: float = Field(0.5, gt=0, description="contrastive temperature tau")
    queue_size: int = Field(128, ge=1, description="queue of past mask prototypes K")
    momentum: float = Field(0.999, ge=0, lt=1, description="momentum m of the key encoder")
    saliency_weight: float = Field(
        1.0, ge=0, description="weight of the saliency head's balanced BCE (0: contrast only)"
    )


@register_method("maskcontrast", params=MaskContrastParams)
class MaskContrast(Method):
    """MaskContrast: pixels against mask prototypes of a momentum (key) encoder, with a queue.

    The key encoder is an EMA copy of the network kept in train mode (batch statistics), as MoCo's:
    in eval mode its BN would use running statistics that lag far behind the query's (an EMA of an
    EMA) and put the keys on another scale."""

    loss_class = MaskContrastLoss
    prior_yields = "masks"
    default_prior = "saliency"

    def loss_kwargs(self) -> dict:
        return {**self.params.model_dump(), "dim": self.cfg.model.embed_dim}

    def setup(self, net: nn.Module, loss: nn.Module, device: torch.device) -> None:
        super().setup(net, loss, device)
        self.key_encoder = copy.deepcopy(net).to(device).train()
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)

    def extra_inputs(self, views: Views, amp: bool) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            k1, k2 = self.embed(self.key_encoder, views.images, amp).chunk(2)
        return {"key1": k1, "key2": k2}

    @torch.no_grad()
    def after_step(self) -> None:
        m = float(self.params.momentum)
        for pk, pq in zip(self.key_encoder.state_dict().values(), self.net.state_dict().values()):
            if pk.dtype.is_floating_point:
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
            else:
                pk.copy_(pq)

    def extra_state(self) -> dict[str, dict]:
        return {"key_encoder": self.key_encoder.state_dict()}

    def load_extra_state(self, states: dict[str, dict]) -> None:
        if "key_encoder" in states:
            self.key_encoder.load_state_dict(states["key_encoder"])
