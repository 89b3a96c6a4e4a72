"""Pixel embeddings grounded in visual concepts (He et al., IJCAI 2022).

Three relations between pixels and concepts, all on the unit sphere. Notation: z_i a pixel
embedding, u_s = normalise(mean of z over segment s) a segment (local concept) embedding, e_k the
k-th entry of a learnable dictionary of global concepts (normalised), kappa a concentration.

- L_s, pixel-to-segment contrast: -log( sum_{s in S+} exp(kappa z_i.u_s) / sum_{s in S+ u S-} exp(kappa z_i.u_s) ),
  S+ = the pixel's own segment in BOTH augmented views, S- = every other segment of the batch (both
  views) and the memory bank (segment embeddings of the last `bank_batches` batches, no gradient).
- L_v, vector quantisation of segments (He et al. Eq. 3, the VQ-VAE loss in cosine form): with
  k* = argmax_k u_s.e_k, L_v = (1 - sg[u_s].e_k*) + beta (1 - u_s.sg[e_k*]): the first term moves
  the dictionary, the commitment term (weight beta) moves the embeddings.
- L_c, concept co-occurrence contrast: same form as L_s, but S+ = the segments (batch and bank) whose
  concept occurs in the pixel's own image, i.e. co-occurs there with the pixel's concept; S- = the
  rest. Concept assignments use the current dictionary and carry no gradient.

Total = lambda_s L_s + lambda_v L_v + lambda_c L_c. lambda_s = 1, lambda_v = 2, lambda_c = 1 are among
the best settings of the paper's ablation (appendix Table 1, lambda_s fixed to 1); kappa 10, K 512,
beta 0.5 and a bank of 2 batches are the project defaults (DESIGN.md). Anchor pixels are a uniform
subsample of `pixels_per_image` per image and view (for cost); segment embeddings use every valid
pixel. The bank is updated after the loss is computed, and only in training mode.

Provenance: beyond its abstract and appendix, the paper's text was not reachable from this workplace,
so the three terms follow the project's description of the paper and are not checked against its
equations. Only Eq. 3 (L_v) is cited by number, a number also taken from the project's description.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import random_subset, zero_loss
from distseg.methods.base import Method, register_method


def segment_embeddings(emb: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised mean embedding of every (image, segment id) present: (S, D), image (S,), segment id (S,)."""
    D = emb.shape[1]
    flat, s = emb.flatten(2).transpose(1, 2), seg.flatten(1)
    valid = s >= 0
    if not valid.any():
        empty = torch.zeros(0, dtype=torch.long, device=emb.device)
        return emb.new_zeros(0, D), empty, empty
    img, ids = valid.nonzero()[:, 0], s[valid]
    n = int(ids.max()) + 1
    keys, inverse = (img * n + ids).unique(return_inverse=True)
    sums = torch.zeros(len(keys), D, dtype=emb.dtype, device=emb.device).index_add(0, inverse, flat[valid])
    return F.normalize(sums, dim=1), keys // n, keys % n


def vq_loss(segments: torch.Tensor, concepts: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """He et al. Eq. 3 in cosine form, per segment: (1 - sg[u].e*) + beta (1 - u.sg[e*]); also returns k*.

    `segments` (S, D) and `concepts` (K, D) are unit vectors; e* is each segment's nearest concept.
    """
    with torch.no_grad():
        assign = (segments @ concepts.T).argmax(dim=1)
    e = concepts[assign]
    codebook = 1 - (segments.detach() * e).sum(dim=1)
    commitment = 1 - (segments * e.detach()).sum(dim=1)
    return codebook + beta * commitment, assign


class ConceptsLoss(nn.Module):
    """He et al.'s L_s + L_v + L_c with a concept dictionary and a memory bank (module docstring)."""

    uses_key_encoder = False

    def __init__(
        self,
        kappa: float = 10.0,
        num_concepts: int = 512,
        dim: int = 32,
        beta: float = 0.5,
        lambda_s: float = 1.0,
        lambda_v: float = 2.0,
        lambda_c: float = 1.0,
        bank_batches: int = 2,
        pixels_per_image: int = 256,
        bank_capacity: int = 1024,
    ):
        super().__init__()
        if kappa <= 0 or num_concepts < 1 or dim < 1 or bank_batches < 0 or pixels_per_image < 1 or bank_capacity < 1:
            raise ValueError("kappa > 0, num_concepts, dim, pixels_per_image, bank_capacity >= 1, bank_batches >= 0")
        self.kappa, self.beta = kappa, beta
        self.lambda_s, self.lambda_v, self.lambda_c = lambda_s, lambda_v, lambda_c
        self.dim, self.bank_batches, self.pixels_per_image = dim, bank_batches, pixels_per_image
        self.dictionary = nn.Parameter(F.normalize(torch.randn(num_concepts, dim), dim=1))
        # bank slot j holds bank_count[j] segment embeddings of one past batch; bank_ptr is the oldest slot
        self.register_buffer("bank", torch.zeros(bank_batches, bank_capacity, dim))
        self.register_buffer("bank_count", torch.zeros(bank_batches, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    @property
    def concepts(self) -> torch.Tensor:
        """The global-concept dictionary, normalised: (num_concepts, dim)."""
        return F.normalize(self.dictionary, dim=1)

    def bank_segments(self) -> torch.Tensor:
        """The memory bank's segment embeddings, oldest batch first: (Q, dim)."""
        n, start = self.bank_batches, int(self.bank_ptr)
        slots = [(start + i) % n for i in range(n)]
        return torch.cat([self.bank.new_zeros(0, self.dim)] + [self.bank[j, : int(self.bank_count[j])] for j in slots])

    @torch.no_grad()
    def _push(self, segments: torch.Tensor) -> None:
        if not self.training or self.bank_batches == 0:
            return
        capacity = self.bank.shape[1]
        if len(segments) > capacity:
            segments = segments[torch.randperm(len(segments), device=segments.device)[:capacity]]
        j = int(self.bank_ptr)
        self.bank[j].zero_()
        self.bank[j, : len(segments)] = segments.detach().to(self.bank.dtype)
        self.bank_count[j] = len(segments)
        self.bank_ptr.fill_((j + 1) % self.bank_batches)

    def _anchors(self, emb: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat, s = emb.flatten(2).transpose(1, 2), seg.flatten(1)
        idx, ok = random_subset(s >= 0, self.pixels_per_image)
        img = torch.arange(len(s), device=s.device)[:, None].expand_as(idx)[ok]
        idx = idx[ok]
        return flat[img, idx], img, s[img, idx]

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
            raise ValueError(f"embedding dimension {emb1.shape[1]} != the concept dictionary's {self.dim}")
        parts = [segment_embeddings(e, s) for e, s in ((emb1, seg1), (emb2, seg2))]
        seg_emb, seg_img, seg_id = (torch.cat(t) for t in zip(*parts))
        bank = self.bank_segments().to(emb1.dtype)
        if len(seg_emb) == 0:
            self._push(seg_emb)
            zero = zero_loss(emb1, emb2, self.dictionary)
            return {"loss": zero, "loss_s": zero.detach(), "loss_v": zero.detach(), "loss_c": zero.detach()}

        anchors = [self._anchors(e, s) for e, s in ((emb1, seg1), (emb2, seg2))]
        z, a_img, a_id = (torch.cat(t) for t in zip(*anchors))
        logits = self.kappa * z @ torch.cat([seg_emb, bank]).T  # (M, S + Q)
        lowest = torch.finfo(logits.dtype).min
        # both contrasts share the logits and the denominator (every segment); neither can lack a
        # positive: a pixel's own segment is in the batch, and its concept occurs in its own image
        den = torch.logsumexp(logits, dim=1)

        own = (a_img[:, None] == seg_img[None, :]) & (a_id[:, None] == seg_id[None, :])  # bank: never positive
        loss_s = (den - torch.logsumexp(logits[:, : len(seg_emb)].masked_fill(~own, lowest), dim=1)).mean()

        concepts = self.concepts
        per_segment, assign = vq_loss(seg_emb, concepts, self.beta)
        loss_v = per_segment.mean()

        with torch.no_grad():
            bank_assign = (bank @ concepts.T).argmax(dim=1)
            in_image = torch.zeros(int(seg_img.max()) + 1, len(concepts), dtype=torch.bool, device=z.device)
            in_image[seg_img, assign] = True
            pos_c = in_image[:, torch.cat([assign, bank_assign])][a_img]
        loss_c = (den - torch.logsumexp(logits.masked_fill(~pos_c, lowest), dim=1)).mean()

        self._push(seg_emb)
        loss = self.lambda_s * loss_s + self.lambda_v * loss_v + self.lambda_c * loss_c
        return {"loss": loss, "loss_s": loss_s.detach(), "loss_v": loss_v.detach(), "loss_c": loss_c.detach()}


class ConceptsParams(Section):
    """`losses.concepts`: He et al.'s L_s, L_v, L_c and the memory bank (Eq. 5)."""

    kappa: float = Field(10.0, gt=0, description="concentration of the pixel-to-segment contrast L_s")
    num_concepts: int = Field(512, ge=2, description="concept dictionary size K")
    beta: float = Field(0.5, ge=0, description="VQ commitment weight")
    lambda_s: float = Field(1.0, ge=0, description="weight of L_s")
    lambda_v: float = Field(2.0, ge=0, description="weight of L_v")
    lambda_c: float = Field(1.0, ge=0, description="weight of L_c")
    bank_batches: int = Field(2, ge=0, description="memory bank: segment embeddings of this many past batches")


@register_method("concepts", params=ConceptsParams)
class Concepts(Method):
    """He et al.: pixel-to-segment contrast plus a VQ concept dictionary (a loss parameter)."""

    loss_class = ConceptsLoss
    prior_yields = "regions"
    default_prior = "ucm"

    def loss_kwargs(self) -> dict:
        return {**self.params.model_dump(), "dim": self.cfg.model.embed_dim}
