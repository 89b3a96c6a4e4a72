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
- **Eq. 1, objective.** One term per (anchor i, positive m in Pos+(i) = Pos(i) U Pos(i)_aug):
  -log( e^{s_im} / (e^{s_im} + sum_{n in Neg+(i)} e^{s_in}) ), s the cosine similarity, Neg+(i) =
  Neg(i) U Neg(i)_aug U Neg(i)_cns; averaged over all terms. The paper maximises the sum of the ratios
  (no log) and has no temperature: `temperature` defaults to 1 (plain cosine), the log is the usual
  likelihood form of the same ratio.

Readings and departures, each deliberate:
- Option, not the default: `same_view_positives=False` scores tau(Pos(i)) only, leaving out the
  positives drawn in the anchor's own view. With them a pure crop-position code beats chance in the
  loss: own-region positives lie next to the anchor in the same view, negatives farther away. Measured
  on 8 synthetic scenes with their ucm regions, 64-px views, 20 draws each, 3 scene sets
  (tests/test_hiergroup.py): loss(position code) - loss(chance) = -0.007, -0.028, -0.017 nats with them
  and +0.010, -0.007, -0.001 without; a code that knows the regions gains -0.14, -0.14, -0.13 vs -0.13,
  -0.15, -0.12, so the grouping signal is kept either way. Same-view negatives stay in both forms.
  Trained networks do not show that argument, so the default is the paper's form (since 2026-12-01):
  on MSRC-v2 at CPU scale (hiergroup_msrc, 1200 steps of 8, training seeds 0, 1, 2, docs/RESULTS.md)
  the paper's form scores dataset k-means 0.130 / 0.134 / 0.156 against 0.098 / 0.108 / 0.114 and
  linear 0.194 / 0.217 / 0.229 against 0.129 / 0.138 / 0.147, with a lower relative cosine position gap
  (0.049 / 0.059 / 0.059 against 0.095 / 0.103 / 0.102) and a slightly higher position R^2 (0.303 /
  0.362 / 0.363 against 0.280 / 0.313 / 0.311; the random network 0.558). On the demo (3 seeds, 300
  steps) it halves the position measures (R^2 0.028 vs 0.064, relative gap 0.022 vs 0.054) at about
  the same mIoU (k-means 0.142 vs 0.164, linear 0.259 vs 0.268, each within about one standard
  deviation over seeds). The MSRC H200 checkpoints of docs/RESULTS.md
  and maskdistill_demo were trained with `false`.
- M in Eqs. 2-3 is the set of sampled regions, not all leaf regions. With all 40 leaves, our d_T
  (median 0.88 between MSRC leaves) gives the anchor's own region only 8-10 % of the positives, so most
  "positives" are arbitrary pixels of the same image and the task becomes image identity (the fidelity
  audit's B1); the paper adds the cast-to-1 "to further concentrate positive sampling within the anchor
  regions". Over the 7 sampled regions the own region gets 1/7 to 1/3 of the positives (logged per
  step as `own_region_share`).
- Several anchors per region (10; the paper's text does not say how many): more terms per step.
- Draws are with replacement (a Monte-Carlo estimate of the expectation under Eqs. 2-3).
- The batch is sampled at once (padded slots of M regions x anchors per image), not image by image:
  the same distributions (checked against the loop over 200 seeds: loss, own_region_share,
  twin_share and neg_sim agree within their standard errors), 10x faster on a GPU. One corner differs:
  with coordinates, an image whose view 2 has no labelled pixel has no twins, so none of its
  positives is scored (the loop scored them in view 1).
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


def region_probabilities(
    dist: torch.Tensor, sigma_p: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2 and 3 among M regions: (P_pos, P_neg), each (..., M, M); row a is anchor region a's distribution.

    Eq. 2: P_pos[a, b] = exp(-d_T(a, b) / sigma_p) / (sum_{m != a} exp(-d_T(a, m) / sigma_p) + 1), the own
    region's term cast to 1 (whatever the diagonal of `dist` holds), so each row sums to 1.
    Eq. 3: P_neg[a, b] = exp(+d_T(a, b) / sigma_p) / sum_{m != a} exp(+d_T(a, m) / sigma_p) for b != a, and
    0 for the own region: not the complement of Eq. 2 (the paper says so), so the regions that merge
    with the anchor's late in the tree are the likeliest negatives and the vague ones are rarely drawn.
    A single region has no negative (its row of P_neg is 0). `valid` (..., M) marks the regions that
    exist (a batch pads images with fewer than M regions): the others are never drawn.
    """
    M = dist.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=dist.device)
    col = torch.ones(dist.shape[:-1], dtype=torch.bool, device=dist.device) if valid is None else valid
    col = col[..., None, :].expand(dist.shape)
    # as softmaxes of the log-weights: exp(+d / sigma_p) overflows for a small sigma_p
    log_pos = (-dist / sigma_p).masked_fill(eye, 0.0).masked_fill(~col, float("-inf"))
    p_pos = torch.softmax(log_pos.masked_fill(~col.any(-1, keepdim=True), 0.0), dim=-1)
    other = col & ~eye
    has_other = other.any(dim=-1, keepdim=True)
    log_neg = (dist / sigma_p).masked_fill(~other, float("-inf")).masked_fill(~has_other, 0.0)
    p_neg = torch.where(has_other, torch.softmax(log_neg, dim=-1), 0.0)
    return p_pos, p_neg.masked_fill(~other, 0.0)


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


def twins(
    coord1: torch.Tensor, coord2: torch.Tensor, radius: torch.Tensor, valid2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented twin tau(j) of view-1 cells: the view-2 cell showing the same source pixel.

    coord1 (..., Q, 2): source (y, x) of the query cells; coord2 (..., N2, 2): of view 2's cells, of
    which `valid2` (..., N2) are usable (default: all); leading dims are a batch of images. Returns
    (index into view 2's cells, found): found where the nearest usable view-2 cell lies within `radius`
    (per image: the spacing of the two grids) source pixels, i.e. the views overlap there."""
    if coord2.shape[-2] == 0 or coord1.shape[-2] == 0:
        shape = coord1.shape[:-1]
        return coord1.new_zeros(shape, dtype=torch.long), coord1.new_zeros(shape, dtype=torch.bool)
    d = torch.cdist(coord1, coord2)
    if valid2 is not None:
        d = d.masked_fill(~valid2[..., None, :], float("inf"))
    d, j = d.min(dim=-1)
    radius = torch.as_tensor(radius, dtype=d.dtype, device=d.device)
    return j, d <= (radius[..., None] if radius.ndim else radius)


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
        same_view_positives: bool = True,
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
        """The whole batch at once: every image's sampling is a slice of batched tensors (anchor slots
        (B, M * A): up to A anchors in each of up to M sampled regions), so a step costs a fixed number
        of kernels whatever the batch size (a per-image loop made the loss, not the network, the
        bottleneck on a GPU: 300 ms per step of 64 images on an H200, jobs/benchmark_device.py)."""
        B, D, h, w = emb1.shape
        hw, device = h * w, emb1.device
        top = int(torch.maximum(seg1.max(), seg2.max())) if seg1.numel() else -1
        if dist is not None:
            dist = dist.to(device=device, dtype=torch.float32)
            if top >= dist.shape[-1]:
                raise ValueError(f"segment id {top} has no row in dist of shape {tuple(dist.shape)}")
        K = max(top + 1, 1)  # region ids 0..K-1 (-1 = ignore)
        ids = torch.arange(B, device=device) if image_ids is None else image_ids.to(device)
        # one table of every pixel: row v*B*hw + b*hw + p is pixel p of image b in view v; everything
        # below picks rows, and a single gather at the end keeps the backward to one scatter.
        table = torch.cat([emb1, emb2]).flatten(2).transpose(1, 2).reshape(2 * B * hw, D)
        lab1, lab2 = seg1.reshape(B, hw), seg2.reshape(B, hw)
        v1, v2 = lab1 >= 0, lab2 >= 0
        image = torch.arange(B, device=device)

        # the M regions of each image's sample (Eqs. 2-3 normalise over them): uniform among those present
        present = torch.zeros(B, K, dtype=torch.long, device=device).scatter_add_(1, lab1.clamp_min(0), v1.long())
        regions, reg_ok = random_subset(present > 0, self.regions_per_image)  # (B, M)
        M = regions.shape[1]
        slot = torch.where(reg_ok, torch.arange(M, device=device), -1)
        local = torch.full((B, K), -1, dtype=torch.long, device=device).scatter_(1, regions, slot)
        pix_local = torch.where(v1, local.gather(1, lab1.clamp_min(0)), -1)  # (B, hw): index among the M, or -1
        # view-1 pixels sorted by (image, sampled region): region key b*M + m runs from starts[key], counts[key] long
        key = torch.where(pix_local >= 0, image[:, None] * M + pix_local, -1).reshape(-1)
        members = (key >= 0).nonzero()[:, 0]
        members = members[torch.argsort(key[members], stable=True)]  # flat b*hw + p = the view-1 table row
        if len(members) == 0:  # no labelled pixel in any image: nothing to contrast
            zero = zero_loss(emb1, emb2)
            return {"loss": zero, "pos_sim": zero.detach(), "neg_sim": zero.detach()}
        counts = torch.bincount(key[members], minlength=B * M)
        starts = torch.cumsum(counts, 0) - counts

        # anchors: up to A pixels of each sampled region, uniform without replacement; slots (B, S = M * A)
        in_region = pix_local[:, None, :] == torch.arange(M, device=device)[None, :, None]
        pix, a_ok = random_subset(in_region.reshape(B * M, hw), self.anchors_per_region)
        S = M * pix.shape[1]
        a_pix, a_ok = pix.reshape(B, S), a_ok.reshape(B, S)
        a_reg = torch.arange(M, device=device).repeat_interleave(pix.shape[1])[None].expand(B, S)
        anchor_rows = image[:, None] * hw + a_pix

        # Eqs. 2-3 among each image's sampled regions, then a region per draw and a pixel of it
        if dist is None:
            d = (regions[:, :, None] != regions[:, None, :]).float()  # a flat partition
        else:
            d = dist[image[:, None, None], regions[:, :, None], regions[:, None, :]]
        p_pos, p_neg = region_probabilities(d, self.sigma_p, valid=reg_ok)  # (B, M, M)
        rows_of = lambda p: p[image[:, None], a_reg].reshape(B * S, M)  # noqa: E731
        pos_reg, pos_ok = _draw(rows_of(p_pos), self.num_pos)
        neg_reg, neg_ok = _draw(rows_of(p_neg), self.num_neg)
        pos_reg, neg_reg = pos_reg.reshape(B, S, -1), neg_reg.reshape(B, S, -1)
        pos_ok = pos_ok.reshape(B, S, -1) & a_ok[..., None]
        neg_ok = neg_ok.reshape(B, S, -1) & a_ok[..., None]
        base = image[:, None, None] * M
        pos_rows = _pixel_of(base + pos_reg, members, starts, counts)
        neg_rows = _pixel_of(base + neg_reg, members, starts, counts)
        pos_ok = pos_ok & (pos_rows != anchor_rows[..., None])  # a pixel is not its own positive
        own = (pos_reg == a_reg[..., None])[pos_ok].float()

        # augmented reference sampling: tau(Pos(i)) and tau(Neg(i)) in view 2
        P = pos_rows.shape[-1]
        found = None
        if coord1 is not None and coord2 is not None:
            c1 = coord1.float().flatten(2).transpose(1, 2)  # (B, hw, 2) source (y, x) of each cell
            c2 = coord2.float().flatten(2).transpose(1, 2)
            spacing = (_spacing(c1, h, w) + _spacing(c2, h, w)) / 2  # (B,)
            ref = torch.cat([pos_rows, neg_rows], dim=2) - image[:, None, None] * hw  # pixel within the image
            ref = ref.clamp(0, hw - 1)  # draws that are not ok (an image without regions) point anywhere
            j, hit = twins(
                c1.gather(1, ref.reshape(B, -1, 1).expand(-1, -1, 2)), c2, spacing, valid2=v2
            )  # (B, S * (P + N))
            j, hit = j.reshape(ref.shape), hit.reshape(ref.shape)
            twin_rows = B * hw + image[:, None, None] * hw + j
            ref_ok = torch.cat([pos_ok, neg_ok], dim=2)
            found = hit[ref_ok].float()
            same_view_ok = pos_ok if self.same_view_positives else torch.zeros_like(pos_ok)
            pos_rows = torch.cat([pos_rows, twin_rows[..., :P]], dim=2)
            pos_ok = torch.cat([same_view_ok, pos_ok & hit[..., :P]], dim=2)
            neg_rows = torch.cat([neg_rows, twin_rows[..., P:]], dim=2)
            neg_ok = torch.cat([neg_ok, neg_ok & hit[..., P:]], dim=2)

        # cross-image negatives, uniform over the valid pixels (both views) of the batch's other images:
        # never from another view or copy of the same image
        cross, cross_ok = _cross_image(torch.cat([v1, v2]), ids, (B, S, self.cns), hw)

        keep = a_ok.reshape(-1)
        if not bool(keep.any()):
            zero = zero_loss(emb1, emb2)
            return {"loss": zero, "pos_sim": zero.detach(), "neg_sim": zero.detach()}
        flat = lambda t: t.reshape(B * S, *t.shape[2:])[keep]  # noqa: E731
        anchors = table[flat(anchor_rows)]
        positives = table[flat(pos_rows)]
        negatives = table[torch.cat([flat(neg_rows), flat(cross)], dim=1)]
        pos_ok = flat(pos_ok)
        neg_ok = torch.cat([flat(neg_ok), flat(cross_ok)], dim=1)
        per_pair = pair_contrastive_loss(anchors, positives, pos_ok, negatives, neg_ok, self.temperature)
        loss = per_pair.mean() if len(per_pair) else zero_loss(emb1, emb2)
        with torch.no_grad():
            s_pos = torch.einsum("ad,apd->ap", anchors, positives)[pos_ok]
            s_neg = torch.einsum("ad,and->an", anchors, negatives)[neg_ok]
        out = {
            "loss": loss,
            "pos_sim": _mean(s_pos, emb1),
            "neg_sim": _mean(s_neg, emb1),
            "own_region_share": _mean(own, emb1),
        }
        if found is not None:
            out["twin_share"] = _mean(found, emb1)
        return out


def _cross_image(
    valid: torch.Tensor, ids: torch.Tensor, shape: tuple[int, int, int], hw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shape` = (B, S, n) draws per image b, each uniform over the valid table rows (`valid` (2B, hw):
    view 1 then view 2) whose image id differs from ids[b]. The valid rows are sorted by image id, so
    the rows to avoid are one contiguous block: draw among the others and step over the block."""
    B, S, n = shape
    device = valid.device
    rows = valid.reshape(-1).nonzero()[:, 0]  # table rows v*B*hw + b*hw + p
    row_ids = ids[(rows // hw) % B]
    order = torch.argsort(row_ids, stable=True)
    rows, row_ids = rows[order], row_ids[order]
    block = torch.searchsorted(row_ids, ids)  # where image b's id starts among the sorted rows
    same = torch.searchsorted(row_ids, ids, right=True) - block
    others = len(rows) - same  # (B,)
    ok = (others > 0)[:, None, None].expand(B, S, n)
    if n == 0 or len(rows) == 0:
        return torch.zeros(shape, dtype=torch.long, device=device), ok & False
    r = (
        (torch.rand(shape, device=device) * others[:, None, None])
        .long()
        .clamp_max((others - 1).clamp_min(0)[:, None, None])
    )
    r = r + (r >= block[:, None, None]) * same[:, None, None]
    return rows[r.clamp_max(len(rows) - 1)], ok


def _pixel_of(region: torch.Tensor, members: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A uniform pixel of each (local) region: `members` lists the pixels sorted by region, each region's
    run starting at `starts` with `counts` pixels."""
    offset = (torch.rand(region.shape, device=region.device) * counts[region]).long()
    return members[starts[region] + offset.clamp_max(counts[region] - 1)]


def _spacing(coord: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Distance in source pixels between neighbouring cells of each view's grid (its crop's scale):
    coord (B, h * w, 2) -> (B,)."""
    grid = coord.reshape(-1, h, w, 2)
    zero = grid.new_zeros(len(grid))
    dy = (grid[:, 1:, :, 0] - grid[:, :-1, :, 0]).abs().amax((1, 2)) if h > 1 else zero
    dx = (grid[:, :, 1:, 1] - grid[:, :, :-1, 1]).abs().amax((1, 2)) if w > 1 else zero
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
        True,
        description="score Pos(i) in the anchor's own view beside tau(Pos(i)), the paper's Pos+(i) (false: tau(Pos(i)) "
        "only, which a pure position code cannot exploit)",
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
    """(B, 2, S, S) source coordinates -> (B, 2, h, w) at the embedding grid (each cell's centre pixel,
    as the segments: `nearest-exact`)."""
    return torch.nn.functional.interpolate(coord.float(), size=size, mode="nearest-exact")
