"""Pixel-to-mask-prototype contrast with a momentum encoder (Van Gansbeke et al., ICCV 2021, MaskContrast).

Each image has one salient-object mask M (segment value 1; 0 = background, -1 = ignore). Its prototype
is the normalised mean of the KEY (momentum-encoder) embeddings over the mask, z_M = normalise(mean_{j in M} k_j).
Every foreground query pixel i of an image is pulled to its own image's prototype and pushed from the
prototypes of the other images of the batch and from a FIFO queue of past prototypes:

    L = mean_i -log( exp(z_i.z_M / tau) / (exp(z_i.z_M / tau) + sum_{n in N} exp(z_i.z_n / tau)) )

with tau = 0.5, a queue of 128 prototypes and key-encoder momentum m = 0.999 (the project defaults,
DESIGN.md). The loss is symmetric: view-1 pixels use the prototypes of key view 2 and
vice versa (`loss_view1`, `loss_view2`; "loss" is their mean). Because the queue fills during the
first steps, the raw loss climbs towards its chance level ln(#prototypes) (`chance_loss`) before it
can fall; `proto_acc` (the share of foreground pixels whose most similar prototype is their own) is
the number to watch. Images without foreground in either
view are skipped. After the loss, both views' prototypes enter the queue (training mode only); the
queue only contributes the entries filled so far. Without key1/key2 the detached query embeddings
stand in for the keys (momentum 0). The training loop owns the EMA copy and reads `momentum`.

Provenance: the paper's text was not reachable from this workplace beyond its abstract; the objective
is the pixel-to-prototype cross-entropy the brief describes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distseg.losses import register_loss, zero_loss


def mask_prototypes(keys: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean key embedding over each image's foreground (seg == 1): (B, D), and which images have one (B,)."""
    fg = (seg == 1).unsqueeze(1).to(keys.dtype)
    protos = F.normalize((keys.detach() * fg).sum(dim=(2, 3)), dim=1)
    return protos, fg.flatten(1).sum(dim=1) > 0


def prototype_contrast(
    emb: torch.Tensor,
    seg: torch.Tensor,
    protos: torch.Tensor,
    has: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per foreground pixel of `emb` (B, D, h, w): cross-entropy of its similarities / tau to the batch
    prototypes `protos[has]` and the `queue`, the target being its own image's prototype. Returns the
    (M,) losses and whether each pixel's most similar prototype is its own (M,) bool."""
    fg = (seg == 1) & has[:, None, None]
    z = emb.permute(0, 2, 3, 1)[fg]
    target = (has.long().cumsum(0) - 1)[fg.nonzero()[:, 0]]
    logits = z @ torch.cat([protos[has], queue]).T / temperature
    hit = logits.detach().argmax(1) == target if logits.shape[1] else target.new_zeros(len(target), dtype=torch.bool)
    return F.cross_entropy(logits, target, reduction="none"), hit


@register_loss("maskcontrast")
class MaskContrastLoss(nn.Module):
    """MaskContrast's pixel-to-mask-prototype contrast with a prototype queue (module docstring)."""

    uses_key_encoder = True

    def __init__(self, temperature: float = 0.5, queue_size: int = 128, momentum: float = 0.999, dim: int = 32):
        super().__init__()
        if temperature <= 0 or queue_size < 1 or dim < 1 or not 0 <= momentum < 1:
            raise ValueError("temperature > 0, queue_size >= 1, dim >= 1, 0 <= momentum < 1")
        self.temperature, self.momentum, self.dim = temperature, momentum, dim
        self.register_buffer("queue", torch.zeros(queue_size, dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))  # slots filled so far

    @torch.no_grad()
    def _enqueue(self, protos: torch.Tensor) -> None:
        size = len(self.queue)
        if not self.training or len(protos) == 0:
            return
        protos = protos[-size:]
        ptr = int(self.queue_ptr)
        self.queue[(ptr + torch.arange(len(protos), device=protos.device)) % size] = protos.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(protos)) % size)
        self.queue_len.fill_(min(size, int(self.queue_len) + len(protos)))

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
        queue = self.queue[: int(self.queue_len)].to(emb1.dtype)

        terms, hits = [], []
        for emb, seg, protos, has in ((emb1, seg1, p2, has2), (emb2, seg2, p1, has1)):
            per_pixel, hit = prototype_contrast(emb, seg, protos, has, queue, self.temperature)
            terms.append(per_pixel.mean() if len(per_pixel) else None)
            hits.append(hit)
        present = [t for t in terms if t is not None]
        loss = torch.stack(present).mean() if present else zero_loss(emb1, emb2)
        zero = emb1.new_zeros(())
        self._enqueue(torch.cat([p2[has2], p1[has1]]))
        hit = torch.cat(hits)
        candidates = int(has1.sum() + has2.sum()) / 2 + len(queue)
        return {
            "loss": loss,
            "loss_view1": zero if terms[0] is None else terms[0].detach(),
            "loss_view2": zero if terms[1] is None else terms[1].detach(),
            # the loss rises towards ln(candidates) while the queue fills; the retrieval accuracy
            # (own prototype ranked first) and the chance level show whether anything is learned
            "proto_acc": hit.float().mean() if len(hit) else zero,
            "chance_loss": emb1.new_tensor(math.log(max(candidates, 1.0))),
        }
