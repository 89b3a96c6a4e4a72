"""Pixel-pair contrast guided by a region hierarchy (Zhang & Maire, NeurIPS 2020; seed 000, Sec. 3).

The grouping prior is a tree over leaf regions; d_T(a, b) is the height at which regions a and b merge
(the `ucm` prior's `region_dist`, in [0, 1]). Per image and step:

- **Regions.** `regions_per_image` (7) leaf regions present in view 1 are drawn uniformly: the M
  regions of Eqs. 2-3 (Sec. 4.2: "for one image, we randomly sample 7 regions").
- **Anchors.** `anchors_per_region` pixels of each sampled region, uniform, without replacement.
- **Eq. 2, positives.** For an anchor i in region a, a region b among the M is drawn with
  P(b) = exp(-d_T(a, b) / sigma_p) / (sum_{m != a} exp(-d_T(a, m) / sigma_p) + 1), the own region's
  term cast to 1; then a pixel of b (view 1), uniformly. `num_pos` (10) i.i.d. draws; the anchor pixel
  itself is dropped if drawn.
- **Eq. 3, negatives.** A region b != a with P(b) = exp(+d_T(a, b) / sigma_p) / sum_{m != a}
  exp(+d_T(a, m) / sigma_p) (not the complement of Eq. 2: the paper says so, "for the purpose of
  excluding the pixels whose assignments are vague"); then a pixel of b. `num_neg` (5) draws.
- **Augmented reference sampling.** Pos(i)_aug = tau(Pos(i)) and Neg(i)_aug = tau(Neg(i)): each drawn
  pixel's twin in view 2, the cell showing the same source pixel (the ingest carries each view's
  source coordinates, `coord1`/`coord2`); pixels outside view 2's crop have no twin.
- **cns.** `cns` (5) cross-image negatives per anchor, uniform over the valid pixels (both views) of
  the batch's OTHER images: rows with the anchor's `image_ids` (a copy of the same image drawn twice)
  are never negatives.
- **Eq. 1, objective.** One term per (anchor i, positive m in Pos+(i) = Pos(i)_aug, see below):
  -log( e^{s_im} / (e^{s_im} + sum_{n in Neg+(i)} e^{s_in}) ), s the cosine similarity, Neg+(i) =
  Neg(i) U Neg(i)_aug U Neg(i)_cns; averaged over all terms. The paper maximises the sum of the ratios
  (no log) and has no temperature: `temperature` defaults to 1 (plain cosine), the log is the usual
  likelihood form of the same ratio.

Readings and departures, each deliberate:
- Pos+(i) is tau(Pos(i)) only: the positives drawn in the anchor's own view are not scored
  (`same_view_positives=False`). With them, a pure crop-position code beats chance: own-region
  positives lie next to the anchor in the same view, negatives farther away. Measured on 8 synthetic
  scenes with their ucm regions, 64-px views, 20 draws each, 3 scene sets (tests/test_hiergroup.py):
  loss(position code) - loss(chance) = -0.007, -0.027, -0.016 nats with them and +0.015, -0.006, +0.000
  without; a code that knows the regions gains -0.13, -0.14, -0.11 vs -0.13, -0.13, -0.11, so the
  grouping signal is kept. Same-view negatives stay. `same_view_positives=True` restores the paper's
  Pos(i) U tau(Pos(i)). Open question, measured once: in a trained network the departure did not pay
  off on `make demo` (one seed, 150 steps): with the paper's form dataset k-means 0.187 vs 0.143,
  linear 0.340 vs 0.336, kNN 0.320 vs 0.308, position R^2 0.656 vs 0.634, same-position cosine gap
  0.145 vs 0.241. Three seeds and MSRC are needed before the default changes.
- M in Eqs. 2-3 is the set of sampled regions, not all leaf regions. With all 40 leaves, our d_T
  (median 0.88 between MSRC leaves) gives the anchor's own region only 8-10 % of the positives, so most
  "positives" are arbitrary pixels of the same image and the task becomes image identity (the fidelity
  audit's B1); the paper adds the cast-to-1 "to further concentrate positive sampling within the anchor
  regions". Over the 7 sampled regions the own region gets 1/7 to 1/3 of the positives (logged per
  step as `own_region_share`).
- Several anchors per region (10; the paper's text does not say how many): more terms per step.
- Draws are with replacement (a Monte-Carlo estimate of the expectation under Eqs. 2-3).
- Without `dist` a flat partition is assumed (d_T = 0 within a region, 1 across regions); without
  coordinates there is no augmented twin, and the positives are scored in the anchor's view
  (tensors made by hand; training always has coordinates).

Logged per step: `pos_sim`, `neg_sim` (mean cosine of the scored pairs), `own_region_share` (share of
view-1 positives inside the anchor's region) and `twin_share` (share of drawn pixels with a twin).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import random_subset, zero_loss
from distseg.methods.base import Method, Views, register_method, resize_segments


def positive_probability(d: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """The numerator of Eq. 2 for a pair of distinct regions at tree distance `d`: exp(-d / sigma_p)."""
    return torch.exp(-d / sigma_p)


def region_probabilities(dist: torch.Tensor, sigma_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2 and 3 among M regions: (P_pos, P_neg), each (M, M); row a is anchor region a's distribution.

    Eq. 2: P_pos[a, b] = exp(-d_T(a, b) / sigma_p) / (sum_{m != a} exp(-d_T(a, m) / sigma_p) + 1), the own
    region's term cast to 1 (whatever the diagonal of `dist` holds), so each row sums to 1.
    Eq. 3: P_neg[a, b] = exp(+d_T(a, b) / sigma_p) / sum_{m != a} exp(+d_T(a, m) / sigma_p) for b != a, and
    0 for the own region: not the complement of Eq. 2 (the paper says so), so the regions that merge
    with the anchor's late in the tree are the likeliest negatives and the vague ones are rarely drawn.
    A single region has no negative (its row of P_neg is 0).
    """
    eye = torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)
    # as softmaxes of the log-weights: exp(+d / sigma_p) overflows for a small sigma_p
    p_pos = torch.softmax((-dist / sigma_p).masked_fill(eye, 0.0), dim=1)
    log_neg = (dist / sigma_p).masked_fill(eye, float("-inf"))
    has_other = ~eye.all(dim=1, keepdim=True)
    p_neg = torch.where(has_other, torch.softmax(log_neg.masked_fill(~has_other, 0.0), dim=1), 0.0)
    return p_pos, p_neg.masked_fill(eye, 0.0)


def pair_contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    pos_ok: torch.Tensor,
    negatives: torch.Tensor,
    neg_ok: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Eq. 1: one term per (anchor, positive), each positive against all of the anchor's negatives.

    anchors (A, D); positives (A, P, D) with pos_ok (A, P); negatives (A, N, D) with neg_ok (A, N).
    Returns -log( e^{s_im/t} / (e^{s_im/t} + sum_{n in Neg(i)} e^{s_in/t}) ) for every valid (i, m), as a
    flat vector (the paper maximises the sum of the ratios; the log is the usual likelihood form, and
    the paper has no temperature: t = 1). An anchor without negatives gives 0 for each positive.
    """
    s_pos = torch.einsum("ad,apd->ap", anchors, positives) / temperature
    s_neg = torch.einsum("ad,and->an", anchors, negatives) / temperature
    lowest = torch.finfo(s_neg.dtype).min
    lse_neg = torch.logsumexp(s_neg.masked_fill(~neg_ok, lowest), dim=1)
    lse_neg = torch.where(neg_ok.any(dim=1), lse_neg, torch.full_like(lse_neg, lowest))
    per_pair = torch.logaddexp(s_pos, lse_neg[:, None]) - s_pos
    return per_pair[pos_ok]


def _draw(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k i.i.d. column draws per row with probability proportional to `weights`; rows summing to 0 draw nothing."""
    ok = weights.sum(dim=1) > 0
    if k == 0 or weights.shape[1] == 0:
        return weights.new_zeros(len(weights), k, dtype=torch.long), ok[:, None].expand(-1, k) & False
    safe = torch.where(ok[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(safe, k, replacement=True), ok[:, None].expand(-1, k)


def twins(coord1: torch.Tensor, coord2: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented twin tau(j) of view-1 cells: the view-2 cell showing the same source pixel.

    coord1 (Q, 2): source (y, x) of the query cells; coord2 (N2, 2): of view 2's valid cells. Returns
    (index into view 2's valid cells, found): found where the nearest view-2 cell lies within `radius`
    source pixels (the spacing of the two grids: the views overlap there)."""
    if len(coord2) == 0 or len(coord1) == 0:
        return coord1.new_zeros(len(coord1), dtype=torch.long), coord1.new_zeros(len(coord1), dtype=torch.bool)
    d, j = torch.cdist(coord1, coord2).min(dim=1)
    return j, d <= radius


class HierGroupLoss(nn.Module):
    """Zhang & Maire's hierarchical-grouping pixel-pair contrast (module docstring: Eqs. 1-3)."""

    uses_key_encoder = False

    def __init__(
        self,
        sigma_p: float = 0.8,
        temperature: float = 1.0,
        regions_per_image: int = 7,
        num_pos: int = 10,
        num_neg: int = 5,
        cns: int = 5,
        anchors_per_region: int = 10,
        same_view_positives: bool = False,
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
        self.same_view_positives = same_view_positives

    def forward(
        self,
        emb1: torch.Tensor,
        emb2: torch.Tensor,
        seg1: torch.Tensor,
        seg2: torch.Tensor,
        *,
        dist: torch.Tensor | None = None,
        coord1: torch.Tensor | None = None,
        coord2: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        B, D, h, w = emb1.shape
        hw, device = h * w, emb1.device
        if dist is not None:
            dist = dist.to(device=device, dtype=torch.float32)
            top = max(int(seg1.max()), int(seg2.max()))
            if top >= dist.shape[-1]:
                raise ValueError(f"segment id {top} has no row in dist of shape {tuple(dist.shape)}")
        ids = torch.arange(B, device=device) if image_ids is None else image_ids.to(device)
        # one table of every pixel: row v*B*hw + b*hw + p is pixel p of image b in view v. The loop below
        # only picks rows; a single gather at the end keeps the backward to one scatter.
        table = torch.cat([emb1, emb2]).flatten(2).transpose(1, 2).reshape(2 * B * hw, D)
        labels = torch.cat([seg1, seg2]).reshape(2, B, hw)
        rows = torch.arange(2 * B * hw, device=device).reshape(2, B, hw)
        valid_rows = rows[labels >= 0]
        valid_img = (labels >= 0).nonzero()[:, 1]
        if coord1 is not None and coord2 is not None:
            coords = torch.stack([coord1, coord2]).float().flatten(3).transpose(2, 3)  # (2, B, hw, 2)
        else:
            coords = None

        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("anchor", "pos", "pos_ok", "neg", "neg_ok")}
        own, found = [], []
        for b in range(B):
            v1, v2 = labels[0, b] >= 0, labels[1, b] >= 0
            if not v1.any():
                continue
            r1, rows1, rows2 = labels[0, b][v1], rows[0, b][v1], rows[1, b][v2]

            # the M regions of this image's sample (Eqs. 2-3 normalise over them), anchors inside each
            present = r1.unique()
            regions = present[torch.randperm(len(present), device=device)[: self.regions_per_image]]
            local = torch.full((int(r1.max()) + 1,), -1, dtype=torch.long, device=device)
            local[regions] = torch.arange(len(regions), device=device)
            pix_local = local[r1]  # each view-1 pixel's index among the sampled regions, -1 if none
            members = (pix_local >= 0).nonzero()[:, 0]
            members = members[torch.argsort(pix_local[members], stable=True)]
            counts = torch.bincount(pix_local[members], minlength=len(regions))
            starts = torch.cumsum(counts, 0) - counts

            pix, ok = random_subset(
                pix_local[None, :] == torch.arange(len(regions), device=device)[:, None], self.anchors_per_region
            )
            anchor_idx = pix[ok]
            anchor_reg = pix_local[anchor_idx]
            if dist is None:
                d = (regions[:, None] != regions[None, :]).float()  # a flat partition
            else:
                d = dist[b][regions[:, None], regions[None, :]]
            p_pos, p_neg = region_probabilities(d, self.sigma_p)
            pos_reg, pos_ok = _draw(p_pos[anchor_reg], self.num_pos)
            neg_reg, neg_ok = _draw(p_neg[anchor_reg], self.num_neg)
            pos_idx = _pixel_of(pos_reg, members, starts, counts)
            neg_idx = _pixel_of(neg_reg, members, starts, counts) if neg_reg.numel() else pos_idx[:, :0]
            pos_ok = pos_ok & (pos_idx != anchor_idx[:, None])  # a pixel is not its own positive
            own.append((pos_reg == anchor_reg[:, None])[pos_ok].float())

            # augmented reference sampling: tau(Pos(i)) and tau(Neg(i)) in view 2
            if coords is not None and v2.any():
                c1, c2 = coords[0, b][v1], coords[1, b][v2]
                spacing = (_spacing(coords[0, b], h, w) + _spacing(coords[1, b], h, w)) / 2
                ref = torch.cat([pos_idx, neg_idx], dim=1)
                j, hit = twins(c1[ref.reshape(-1)], c2, spacing)
                j, hit = j.reshape(ref.shape), hit.reshape(ref.shape)
                twin_rows = rows2[j]
                ref_ok = torch.cat([pos_ok, neg_ok], dim=1)
                found.append(hit[ref_ok].float())
                P = pos_idx.shape[1]
                pos_rows = torch.cat([rows1[pos_idx], twin_rows[:, :P]], dim=1)
                same_view_ok = pos_ok if self.same_view_positives else torch.zeros_like(pos_ok)
                pos_ok = torch.cat([same_view_ok, pos_ok & hit[:, :P]], dim=1)
                neg_rows = torch.cat([rows1[neg_idx], twin_rows[:, P:]], dim=1)
                neg_ok = torch.cat([neg_ok, neg_ok & hit[:, P:]], dim=1)
            else:
                pos_rows, neg_rows = rows1[pos_idx], rows1[neg_idx]

            # cross-image negatives, never from another view or copy of the same image
            others = valid_rows[ids[valid_img] != ids[b]]
            M = len(anchor_idx)
            if len(others) and self.cns:
                cross = others[torch.randint(len(others), (M, self.cns), device=device)]
                cross_ok = torch.ones(cross.shape, dtype=torch.bool, device=device)
            else:
                cross = rows1[:1].expand(M, self.cns)
                cross_ok = torch.zeros(cross.shape, dtype=torch.bool, device=device)
            parts["anchor"].append(rows1[anchor_idx])
            parts["pos"].append(pos_rows)
            parts["pos_ok"].append(pos_ok)
            parts["neg"].append(torch.cat([neg_rows, cross], dim=1))
            parts["neg_ok"].append(torch.cat([neg_ok, cross_ok], dim=1))

        if not parts["anchor"]:
            zero = zero_loss(emb1, emb2)
            return {"loss": zero, "pos_sim": zero.detach(), "neg_sim": zero.detach()}
        anchors = table[torch.cat(parts["anchor"])]
        positives, negatives = table[torch.cat(parts["pos"])], table[torch.cat(parts["neg"])]
        pos_ok, neg_ok = torch.cat(parts["pos_ok"]), torch.cat(parts["neg_ok"])
        per_pair = pair_contrastive_loss(anchors, positives, pos_ok, negatives, neg_ok, self.temperature)
        loss = per_pair.mean() if len(per_pair) else zero_loss(emb1, emb2)
        with torch.no_grad():
            s_pos = torch.einsum("ad,apd->ap", anchors, positives)[pos_ok]
            s_neg = torch.einsum("ad,and->an", anchors, negatives)[neg_ok]
        out = {
            "loss": loss,
            "pos_sim": _mean(s_pos, emb1),
            "neg_sim": _mean(s_neg, emb1),
            "own_region_share": _mean(torch.cat(own), emb1),
        }
        if found:
            out["twin_share"] = _mean(torch.cat(found), emb1)
        return out


def _pixel_of(region: torch.Tensor, members: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A uniform pixel of each (local) region: `members` lists the pixels sorted by region, each region's
    run starting at `starts` with `counts` pixels."""
    offset = (torch.rand(region.shape, device=region.device) * counts[region]).long()
    return members[starts[region] + offset.clamp_max(counts[region] - 1)]


def _spacing(coord: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Distance in source pixels between neighbouring cells of a view's grid (its crop's scale)."""
    grid = coord.reshape(h, w, 2)
    dy = (grid[1:, :, 0] - grid[:-1, :, 0]).abs().max() if h > 1 else grid.new_zeros(())
    dx = (grid[:, 1:, 1] - grid[:, :-1, 1]).abs().max() if w > 1 else grid.new_zeros(())
    return torch.sqrt(dy**2 + dx**2).clamp_min(1.0)


def _mean(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.mean().detach() if len(values) else like.new_zeros(())


class HiergroupParams(Section):
    """`losses.hiergroup`: the sampling and contrast of Zhang & Maire's loss (Eqs. 1-3)."""

    sigma_p: float = Field(0.8, gt=0, description="temperature of the positive-sampling probability (Eq. 2)")
    temperature: float = Field(1.0, gt=0, description="divides the cosine in Eq. 1 (the paper: none, i.e. 1)")
    regions_per_image: int = Field(7, ge=1, description="regions sampled per image: the M of Eqs. 2-3")
    num_pos: int = Field(10, ge=1, description="positives per anchor pixel")
    num_neg: int = Field(5, ge=1, description="negatives per anchor pixel (within the image)")
    cns: int = Field(5, ge=0, description="cross-image negatives per anchor pixel")
    anchors_per_region: int = Field(10, ge=1, description="anchor pixels per sampled region")
    same_view_positives: bool = Field(
        False, description="also score Pos(i) in the anchor's own view, beside tau(Pos(i)) (rewards position)"
    )


@register_method("hiergroup", params=HiergroupParams)
class HierGroup(Method):
    """Zhang & Maire: pixel pairs sampled from the UCM region tree (the `ucm` prior's d_T)."""

    loss_class = HierGroupLoss
    prior_yields = "regions"
    default_prior = "ucm"

    def forward(self, model: nn.Module, views: Views, amp: bool = False) -> dict[str, torch.Tensor]:
        emb1, emb2 = self.embed(model, views.images, amp).chunk(2)
        size = tuple(emb1.shape[-2:])
        seg1, seg2 = resize_segments(views.seg1, size), resize_segments(views.seg2, size)
        coords = {}
        if views.coord1 is not None and views.coord2 is not None:
            coords = {"coord1": resize_coords(views.coord1, size), "coord2": resize_coords(views.coord2, size)}
        return self.loss(emb1, emb2, seg1, seg2, dist=views.dist, image_ids=views.image_ids, **coords)


def resize_coords(coord: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, S, S) source coordinates -> (B, 2, h, w) at the embedding grid (nearest, as the segments)."""
    return torch.nn.functional.interpolate(coord.float(), size=size, mode="nearest")
