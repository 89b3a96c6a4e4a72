"""Pixel-pair contrast guided by a region hierarchy (Zhang & Maire, NeurIPS 2020).

The grouping prior is a tree over leaf regions with the ultrametric tree distance d_T(a, b) in [0, 1]
(the height at which a and b merge). For an anchor pixel i in leaf region a and a candidate pixel j
in leaf region b:

- Eq. 2, positive-pair probability: P(j in Pos(i)) = exp(-d_T(a, b) / sigma_p), with the anchor's
  own region cast to 1 (whatever the diagonal of `dist` holds).
- Eq. 3, negative-pair probability: P(j in Neg(i)) = 1 - P(j in Pos(i)), so the own region is never
  a negative and regions that merge late in the tree are the likeliest negatives.
- Eq. 1, objective per anchor: L(i) = -log( sum_{j in Pos(i)} exp(s_ij / tau) /
  (sum_{j in Pos(i)} exp(s_ij / tau) + sum_{k in Neg(i)} exp(s_ik / tau)) ), s = cosine similarity,
  averaged over anchors.

Sampling, per image: `regions_per_image` anchor regions present in view 1, up to `anchors_per_region`
anchor pixels in each (uniform, without replacement); for each anchor `num_pos` positives drawn i.i.d.
with probabilities proportional to Eq. 2 and `num_neg` negatives proportional to Eq. 3 among the valid
pixels of BOTH views of the same image (ids are consistent across views, so this is how the augmented
pair enters; the anchor pixel itself is excluded), plus `cns` cross-image negatives drawn uniformly
from the valid pixels (both views) of the other images of the batch. Draws are with replacement, so
a duplicate counts twice (a Monte-Carlo estimate of the expected loss under Eqs. 2-3).

Provenance: the paper's method section was not reachable from this workplace (only its abstract),
so the formulas above are not checked against its text. Eq. 2 is as the project specifies it (d_T
with temperature sigma_p, own region cast to 1); Eq. 3 as the complement of Eq. 2 and Eq. 1 as a
multi-positive InfoNCE are this module's reading. tau = 0.3 is the project default
(HiergroupParams), not confirmed from the paper. Without `dist` a flat partition is
assumed (d_T = 0 within a region, 1 across regions).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import info_nce, random_subset, zero_loss
from distseg.methods.base import Method, register_method


def positive_probability(d: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """Eq. 2: probability that a pixel pair at tree distance `d` is sampled as positive, exp(-d / sigma_p)."""
    return torch.exp(-d / sigma_p)


def pair_probabilities(
    dist: torch.Tensor | None, anchor_regions: torch.Tensor, cand_regions: torch.Tensor, sigma_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2 and 3 for every (anchor, candidate) pair: (P_pos, P_neg), each (M, C).

    `dist` (K, K) is one image's d_T (None: flat partition); the anchor's own region gets P_pos = 1.
    """
    same = anchor_regions[:, None] == cand_regions[None, :]
    if dist is None:
        d = (~same).to(torch.float32)
    else:
        d = dist[anchor_regions[:, None], cand_regions[None, :]]
    p = positive_probability(d, sigma_p).masked_fill(same, 1.0)
    return p, 1.0 - p


def pair_contrastive_loss(
    anchors: torch.Tensor,
    cands: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Eq. 1 per anchor: anchors (M, D), candidates (M, C, D), bool masks (M, C) -> losses (M',).

    Anchors without a positive are dropped (see `info_nce`).
    """
    logits = torch.einsum("md,mcd->mc", anchors, cands) / temperature
    return info_nce(logits, pos, neg)


def _draw(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k i.i.d. column draws per row with probability proportional to `weights`; rows summing to 0 draw nothing."""
    ok = weights.sum(dim=1) > 0
    if k == 0:
        return weights.new_zeros(len(weights), 0, dtype=torch.long), ok[:, None][:, :0]
    safe = torch.where(ok[:, None], weights, torch.ones_like(weights))
    idx = torch.multinomial(safe, k, replacement=True)
    return idx, ok[:, None].expand(-1, k)


class HierGroupLoss(nn.Module):
    """Zhang & Maire's hierarchical-grouping pixel-pair contrast (module docstring: Eqs. 1-3)."""

    uses_key_encoder = False

    def __init__(
        self,
        sigma_p: float = 0.8,
        temperature: float = 0.3,
        regions_per_image: int = 7,
        num_pos: int = 10,
        num_neg: int = 5,
        cns: int = 5,
        anchors_per_region: int = 10,
    ):
        super().__init__()
        if sigma_p <= 0 or temperature <= 0:
            raise ValueError("sigma_p and temperature must be positive")
        if min(regions_per_image, num_pos, anchors_per_region) < 1 or min(num_neg, cns) < 0:
            raise ValueError("regions_per_image, num_pos, anchors_per_region >= 1; num_neg, cns >= 0")
        self.sigma_p = sigma_p
        self.temperature = temperature
        self.regions_per_image = regions_per_image
        self.num_pos = num_pos
        self.num_neg = num_neg
        self.cns = cns
        self.anchors_per_region = anchors_per_region

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
        B, D, h, w = emb1.shape
        hw = h * w
        if dist is not None:
            dist = dist.to(device=emb1.device, dtype=torch.float32)
            top = max(int(seg1.max()), int(seg2.max()))
            if top >= dist.shape[-1]:
                raise ValueError(f"segment id {top} has no row in dist of shape {tuple(dist.shape)}")
        # one table of every pixel: row v*B*hw + b*hw + p is pixel p of image b in view v. The loop below
        # only picks rows; a single gather at the end keeps the backward to one scatter.
        table = torch.cat([emb1, emb2]).flatten(2).transpose(1, 2).reshape(2 * B * hw, D)
        labels = torch.cat([seg1, seg2]).reshape(2, B, hw)
        rows = torch.arange(2 * B * hw, device=emb1.device).reshape(2, B, hw)
        valid_rows = rows[labels >= 0]
        valid_img = (labels >= 0).nonzero()[:, 1]

        anchor_rows, cand_rows, pos_masks, neg_masks = [], [], [], []
        for b in range(B):
            v1 = labels[0, b] >= 0
            if not v1.any():
                continue
            v2 = labels[1, b] >= 0
            r1 = labels[0, b][v1]
            cand_reg = torch.cat([r1, labels[1, b][v2]])
            cands = torch.cat([rows[0, b][v1], rows[1, b][v2]])

            # anchor regions, then anchor pixels inside each (uniform, without replacement)
            present = r1.unique()
            regions = present[torch.randperm(len(present), device=r1.device)[: self.regions_per_image]]
            pix, ok = random_subset(r1[None, :] == regions[:, None], self.anchors_per_region)
            anchor_idx = pix[ok]  # positions among view-1 valid pixels, the first block of the candidates
            M = len(anchor_idx)

            p_pos, p_neg = pair_probabilities(None if dist is None else dist[b], r1[anchor_idx], cand_reg, self.sigma_p)
            p_pos[torch.arange(M, device=p_pos.device), anchor_idx] = 0.0  # not its own positive
            pos_idx, pos_ok = _draw(p_pos, self.num_pos)
            neg_idx, neg_ok = _draw(p_neg, self.num_neg)
            others = valid_rows[valid_img != b]
            if len(others):
                cross = others[torch.randint(len(others), (M, self.cns), device=others.device)]
            else:
                cross = cands[:1].expand(M, self.cns)
            cross_ok = torch.full(cross.shape, len(others) > 0, device=cross.device)

            anchor_rows.append(cands[anchor_idx])
            cand_rows.append(torch.cat([cands[pos_idx], cands[neg_idx], cross], dim=1))
            pos_masks.append(torch.cat([pos_ok, torch.zeros_like(neg_ok), torch.zeros_like(cross_ok)], dim=1))
            neg_masks.append(torch.cat([torch.zeros_like(pos_ok), neg_ok, cross_ok], dim=1))

        if not anchor_rows:
            zero = zero_loss(emb1, emb2)
            return {"loss": zero, "pos_sim": zero.detach(), "neg_sim": zero.detach()}
        anchors, cands = table[torch.cat(anchor_rows)], table[torch.cat(cand_rows)]
        pos, neg = torch.cat(pos_masks), torch.cat(neg_masks)
        per_anchor = pair_contrastive_loss(anchors, cands, pos, neg, self.temperature)
        loss = per_anchor.mean() if len(per_anchor) else zero_loss(emb1, emb2)
        with torch.no_grad():
            sims = torch.einsum("md,mcd->mc", anchors, cands)
        return {"loss": loss, "pos_sim": _mean(sims[pos], emb1), "neg_sim": _mean(sims[neg], emb1)}


def _mean(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.mean().detach() if len(values) else like.new_zeros(())


class HiergroupParams(Section):
    """`losses.hiergroup`: the sampling and contrast of Zhang & Maire's loss (Eqs. 1-3)."""

    sigma_p: float = Field(0.8, gt=0, description="temperature of the positive-sampling probability (Eq. 2)")
    temperature: float = Field(0.3, gt=0, description="contrastive temperature (Eq. 1)")
    regions_per_image: int = Field(7, ge=1, description="anchor regions sampled per image")
    num_pos: int = Field(10, ge=1, description="positives per anchor pixel")
    num_neg: int = Field(5, ge=1, description="negatives per anchor pixel (within the image)")
    cns: int = Field(5, ge=0, description="cross-image negatives per anchor pixel")


@register_method("hiergroup", params=HiergroupParams)
class HierGroup(Method):
    """Zhang & Maire: pixel pairs sampled from the UCM region tree (the `ucm` prior's d_T)."""

    loss_class = HierGroupLoss
    prior_yields = "regions"
    default_prior = "ucm"
