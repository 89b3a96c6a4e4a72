"""Zhang & Maire's loss (distseg.methods.hiergroup) against the paper's formulas (seed 000, Eqs. 1-3):
hand-computed values, the sampling it implies, augmented twins, same-image masking, and that a
position-only embedding cannot beat chance under it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.methods.base import resize_segments
from distseg.methods.hiergroup import (
    HierGroupLoss,
    pair_contrastive_loss,
    positive_probability,
    region_probabilities,
    resize_coords,
    twins,
)


def test_eq2_numerator_decays_with_distance():
    d = torch.tensor([0.0, 0.2, 0.5, 1.0])
    p = positive_probability(d, 0.8)
    assert torch.allclose(p, torch.exp(-d / 0.8)) and torch.all(p[1:] < p[:-1])


def test_eq2_eq3_by_hand():
    """Eq. 2 normalises over the M regions with the own term cast to 1; Eq. 3 is exp(+d) over m != a."""
    d = torch.tensor([[0.4, 0.3, 0.9], [0.3, 0.4, 0.9], [0.9, 0.9, 0.4]])  # a non-zero diagonal on purpose
    p_pos, p_neg = region_probabilities(d, sigma_p=0.8)
    z0 = 1 + math.exp(-0.3 / 0.8) + math.exp(-0.9 / 0.8)
    assert p_pos[0].tolist() == pytest.approx([1 / z0, math.exp(-0.3 / 0.8) / z0, math.exp(-0.9 / 0.8) / z0])
    n0 = math.exp(0.3 / 0.8) + math.exp(0.9 / 0.8)
    assert p_neg[0].tolist() == pytest.approx([0.0, math.exp(0.3 / 0.8) / n0, math.exp(0.9 / 0.8) / n0])
    assert torch.allclose(p_pos.sum(1), torch.ones(3)) and torch.allclose(p_neg.sum(1), torch.ones(3))
    # not the complement: the early-merging neighbour keeps a real chance to be a negative
    assert p_neg[0, 1] / p_neg[0, 2] == pytest.approx(math.exp(-0.6 / 0.8))
    single_pos, single_neg = region_probabilities(torch.zeros(1, 1), 0.8)
    assert single_pos.tolist() == [[1.0]] and single_neg.tolist() == [[0.0]]


def test_eq1_one_term_per_positive_by_hand():
    anchors = torch.tensor([[1.0, 0.0]])
    positives = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # similarities 1 and 0
    negatives = torch.tensor([[[-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]])  # -1, 0, and one that is masked out
    pos_ok, neg_ok = torch.tensor([[True, True]]), torch.tensor([[True, True, False]])
    terms = pair_contrastive_loss(anchors, positives, pos_ok, negatives, neg_ok)
    neg = math.exp(-1) + math.exp(0)
    want = [-math.log(math.e / (math.e + neg)), -math.log(1 / (1 + neg))]
    assert terms.tolist() == pytest.approx(want, rel=1e-6)
    half = pair_contrastive_loss(anchors, positives, pos_ok, negatives, neg_ok, temperature=0.5)
    assert half[0].item() == pytest.approx(math.log(1 + (math.exp(-2) + math.exp(0)) / math.exp(2)), rel=1e-6)
    # no negatives: nothing to contrast, each term is 0 (finite, no NaN)
    none = pair_contrastive_loss(anchors, positives, pos_ok, negatives, torch.zeros(1, 3, dtype=torch.bool))
    assert none.tolist() == [0.0, 0.0]


def test_forward_matches_the_formula_on_a_hand_made_image():
    """Two regions of one pixel-column each; sigma_p tiny so positives are own-region only; views equal,
    coordinates equal, so every drawn pixel's twin is itself in view 2 (cos 1)."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 2)  # columns = regions
    seg = torch.tensor([[[0, 1], [0, 1]]])
    dist = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    ys, xs = torch.meshgrid(torch.arange(2.0), torch.arange(2.0), indexing="ij")
    coord = torch.stack([ys, xs])[None]
    loss_fn = HierGroupLoss(sigma_p=1e-3, num_pos=4, num_neg=3, cns=0, anchors_per_region=2)
    torch.manual_seed(0)
    out = loss_fn(emb, emb.clone(), seg, seg.clone(), dist=dist, coord1=coord, coord2=coord.clone())
    # each positive (cos 1, own region, twin included) against 3 negatives + 3 twins, all cos 0
    assert out["loss"].item() == pytest.approx(math.log(1 + 6 * math.exp(-1)), rel=1e-5)
    assert out["own_region_share"].item() == 1.0 and out["twin_share"].item() == 1.0
    assert out["pos_sim"].item() == pytest.approx(1.0) and out["neg_sim"].item() == pytest.approx(0.0)


def test_own_region_share_follows_eq2_over_the_sampled_regions():
    """A flat partition (d = 1 across regions) of 7 regions: P(own) = 1 / (1 + 6 exp(-1 / sigma_p))."""
    torch.manual_seed(0)
    seg = (torch.arange(28) // 4).reshape(1, 1, 28).expand(2, 4, 28).clone()  # 7 regions of 4x4 pixels
    emb = F.normalize(torch.randn(2, 8, 4, 28), dim=1)
    loss_fn = HierGroupLoss(sigma_p=0.8, num_pos=50, anchors_per_region=10, cns=2)
    shares = [loss_fn(emb, emb, seg, seg)["own_region_share"].item() for _ in range(5)]
    want = 1 / (1 + 6 * math.exp(-1 / 0.8))
    # the anchor itself is dropped when drawn, so slightly below
    assert np.mean(shares) == pytest.approx(want * (1 - 1 / 16) / (1 - want / 16), abs=0.02)


def test_twins_are_found_where_the_views_overlap_and_only_there():
    c1 = torch.tensor([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0]])
    c2 = torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 20.0]])
    j, hit = twins(c1, c2, torch.tensor(2.0))
    assert j[:2].tolist() == [0, 1] and hit.tolist() == [True, True, False]


def test_copies_of_one_image_are_never_cross_image_negatives():
    """Rows 0 and 1 are the same image (ids 5, 5), row 2 another: cns for rows 0/1 come only from row 2."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    emb = torch.stack([e1, e1, e2])[:, :, None, None].expand(3, 2, 3, 3).contiguous()
    seg = torch.zeros(3, 3, 3, dtype=torch.long)  # one region: no within-image negatives at all
    loss_fn = HierGroupLoss(cns=20)
    torch.manual_seed(0)
    masked = loss_fn(emb, emb, seg, seg, image_ids=torch.tensor([5, 5, 7]))
    assert masked["neg_sim"].item() == pytest.approx(0.0)  # every negative is the other image's (cos 0)
    unmasked = loss_fn(emb, emb, seg, seg)  # default ids: every row its own image
    assert unmasked["neg_sim"].item() > 0.1  # the copy sneaks in as a negative


def _scene_views(n: int, size: int = 96, crop: int = 64, seed: int = 0):
    """Real synthetic scenes, their ucm regions (gradient edges), two paired views each, as the ingest makes them."""
    from distseg.config import load_config
    from distseg.data import open_dataset
    from distseg.grouping.priors import create_prior
    from distseg.train.ingest import PairedViews

    cfg = load_config("demo", ["edges.detector=gradient", "hierarchy.max_regions=12"])
    prior = create_prior("ucm", cfg)
    data = open_dataset("synthetic", num_images=n, image_size=size, seed=seed)
    torch.manual_seed(seed)
    views = PairedViews(crop, (0.3, 1.0), 0.0)
    out = {"seg1": [], "coord1": [], "seg2": [], "coord2": [], "dist": []}
    for image_id in data.ids():
        image = data[image_id].image
        p = prior(image)
        _, s1, c1, _, s2, c2 = views(image, p.regions.astype(np.int16))
        k = p.region_dist.shape[0]
        d = np.ones((12, 12), np.float32)
        d[:k, :k] = p.region_dist
        for key, v in zip(out, (s1, c1, s2, c2, d)):
            out[key].append(torch.from_numpy(np.asarray(v)))
    batch = {k: torch.stack(v) for k, v in out.items()}
    size_e = (crop // 4, crop // 4)
    return (
        resize_segments(batch["seg1"].long(), size_e),
        resize_segments(batch["seg2"].long(), size_e),
        resize_coords(batch["coord1"], size_e),
        resize_coords(batch["coord2"], size_e),
        batch["dist"],
    )


def _position_code(B: int, h: int, w: int, dim: int = 8) -> torch.Tensor:
    """A pure crop-position embedding: what zero padding gives a network for free."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    freqs = torch.arange(1, dim // 4 + 1, dtype=torch.float32)
    parts = [torch.cos(math.pi * f * xs / 2) for f in freqs] + [torch.sin(math.pi * f * xs / 2) for f in freqs]
    parts += [torch.cos(math.pi * f * ys / 2) for f in freqs] + [torch.sin(math.pi * f * ys / 2) for f in freqs]
    return F.normalize(torch.stack(parts), dim=0)[None].expand(B, -1, -1, -1).contiguous()


@pytest.mark.parametrize("same_view_positives", [False, True])
def test_a_position_only_embedding_scores_no_better_than_chance(same_view_positives):
    """Chance: every similarity equal (a constant embedding), so each term is log(1 + |Neg+|). With
    tau(Pos(i)) only (`same_view_positives=False`) a crop-position code must not beat it (it would be a
    shortcut the loss rewards); with the paper's Pos(i) U tau(Pos(i)) (the default) it may gain, but
    less than a tenth of what an embedding that knows the regions (one code per image and region)
    gains, which must beat chance by far, so the test can tell."""
    seg1, seg2, coord1, coord2, dist = _scene_views(8)
    B, h, w = seg1.shape
    loss_fn = HierGroupLoss(same_view_positives=same_view_positives)

    def mean_loss(emb1, emb2):
        values = []
        for seed in range(5):
            torch.manual_seed(seed)
            values.append(loss_fn(emb1, emb2, seg1, seg2, dist=dist, coord1=coord1, coord2=coord2)["loss"].item())
        return float(np.mean(values))

    constant = F.normalize(torch.ones(B, 8, h, w), dim=1)
    chance = mean_loss(constant, constant)
    position = mean_loss(_position_code(B, h, w), _position_code(B, h, w))
    codes = F.normalize(torch.randn(B, 64, 8), dim=2)  # a random unit vector per (image, region)
    region = lambda seg: codes[torch.arange(B)[:, None, None], seg.clamp_min(0)].permute(0, 3, 1, 2)  # noqa: E731
    oracle = mean_loss(region(seg1), region(seg2))
    print(f"chance {chance:.4f}, position code {position:.4f}, region code {oracle:.4f}")
    assert oracle < chance - 0.1, (oracle, chance)
    if same_view_positives:
        assert chance - position < 0.1 * (chance - oracle), (position, chance, oracle)
    else:
        assert position >= chance - 0.01, (position, chance)


def test_cross_image_negatives_are_uniform_over_the_other_images_valid_pixels():
    """The batched draw (distseg.methods.hiergroup._cross_image) steps over the block of rows that share
    the anchor image's id: never a copy of the same image, and every other valid row equally likely."""
    from distseg.methods.hiergroup import _cross_image

    B, hw = 4, 6
    valid = torch.ones(2 * B, hw, dtype=torch.bool)
    valid[1, :3] = False  # view 1 of image 1: half its pixels ignored
    valid[B + 3] = False  # view 2 of image 3: no valid pixel
    ids = torch.tensor([9, 2, 9, 5])  # images 0 and 2 are copies of one image
    torch.manual_seed(0)
    rows, ok = _cross_image(valid, ids, (B, 1, 20000), hw)
    assert ok.all()
    table_valid = valid.reshape(-1)
    for b in range(B):
        drawn = rows[b].reshape(-1)
        assert table_valid[drawn].all()  # only valid rows
        drawn_ids = ids[(drawn // hw) % B]
        assert (drawn_ids != ids[b]).all()  # never the image itself or its copy
        allowed = [r for r in range(2 * B * hw) if table_valid[r] and ids[(r // hw) % B] != ids[b]]
        freq = torch.bincount(drawn, minlength=2 * B * hw)[allowed].float() / len(drawn)
        assert len(set(drawn.tolist())) == len(allowed)
        assert (freq - 1 / len(allowed)).abs().max() < 0.25 / len(allowed), freq  # uniform within 25 %
    # a batch of one image (or of copies only) has no cross-image negative
    _, none_ok = _cross_image(valid[:2], torch.tensor([3]), (1, 2, 5), hw)
    assert not none_ok.any()


def test_a_batch_of_unequal_images_gives_a_finite_loss_and_gradient():
    """Images with 2 and 9 regions, one image entirely ignored, one whose view 2 has no labelled pixel
    (no twins there): all in one batched step, the loss and its gradient stay finite."""
    torch.manual_seed(0)
    B, h, w = 3, 12, 12
    seg = torch.zeros(B, h, w, dtype=torch.long)
    seg[0, :, 6:] = 1
    seg[2] = torch.arange(h * w).reshape(h, w) % 9
    seg[1] = -1
    seg2 = seg.clone()
    seg2[2] = -1
    ys, xs = torch.meshgrid(torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij")
    coord = torch.stack([ys, xs])[None].expand(B, -1, -1, -1)
    emb1 = torch.randn(B, 8, h, w, requires_grad=True)
    out = HierGroupLoss()(F.normalize(emb1, dim=1), F.normalize(emb1, dim=1), seg, seg2, coord1=coord, coord2=coord)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(emb1.grad).all() and emb1.grad.abs().sum() > 0
    assert emb1.grad[1].abs().sum() == 0  # the ignored image takes no part
    assert 0 < out["twin_share"].item() < 1  # image 2's draws have no twin, image 0's do
