"""DAVIS J/F measures, label propagation and the benchmark loop (distseg.eval.davis).

Hand-made masks check J, F and the boundary extraction against numbers worked out by hand or by an
independent distance-transform computation; a synthetic moving square checks propagation; the real
DAVIS-2016 test (skipped without ../shared/data/davis2016) runs the loop with oracle features.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from distseg.eval.davis import (
    DavisEvaluator,
    LabelPropagator,
    boundary_map,
    db_eval_boundary,
    db_eval_iou,
    evaluate_sequences,
    propagate_frame,
    propagate_labels,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # these tensors are tiny: with 2 threads on a busy 2-core machine, each op's thread sync costs more
    # than the op itself (4.7 s instead of 0.3 s for one propagation test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def onehot_features(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """'Perfect' features: the one-hot label of each pixel, area-averaged to `size` (h, w)."""
    onehot = np.stack([mask == 0, mask == 1], axis=-1).astype(np.float32)
    small = cv2.resize(onehot, size[::-1], interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------
# J and F


def test_iou_hand_made():
    a = square((40, 40), 10, 10, 10)
    assert db_eval_iou(a, a) == 1.0
    assert db_eval_iou(a, square((40, 40), 25, 25, 10)) == 0.0
    # shifted by one column: 90 pixels shared, 110 in the union
    assert db_eval_iou(a, square((40, 40), 10, 11, 10)) == pytest.approx(90 / 110)
    empty = np.zeros((40, 40), bool)
    assert db_eval_iou(empty, empty) == 1.0
    assert db_eval_iou(empty, a) == 0.0
    with pytest.raises(ValueError):
        db_eval_iou(a, a[:-1])


def test_boundary_map_of_rectangle_is_its_outline():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 4:12] = 255  # 5 rows x 8 columns
    # seg2bmap's outline sits half a pixel towards the origin: rows 4..9, columns 3..11
    expected = np.zeros((20, 30), bool)
    expected[4:10, 3:12] = True
    expected[5:9, 4:11] = False
    got = boundary_map(mask)
    assert got.dtype == bool
    assert np.array_equal(got, expected)
    assert got.sum() == 2 * (5 + 8) == 26
    # the image border is not a boundary
    assert not boundary_map(np.ones((6, 7), bool)).any()
    assert not boundary_map(np.zeros((6, 7), bool)).any()


def test_boundary_f_tolerance_and_conventions():
    shape = (100, 100)  # tolerance ceil(0.008 * 141.4) = 2 px
    gt = square(shape, 30, 30, 30)
    assert db_eval_boundary(gt, gt) == 1.0
    assert db_eval_boundary(square(shape, 30, 32, 30), gt) == 1.0  # 2 px: within the tolerance
    assert db_eval_boundary(square(shape, 32, 32, 30), gt) < 1.0  # diagonal 2.8 px: corners fail
    assert db_eval_boundary(square(shape, 70, 70, 20), square(shape, 5, 5, 20)) == 0.0
    # bound_th >= 1 is a radius in pixels
    shifted = square(shape, 30, 33, 30)
    assert db_eval_boundary(shifted, gt, bound_th=3) == 1.0
    assert db_eval_boundary(shifted, gt, bound_th=2) < 0.9
    empty = np.zeros(shape, bool)
    assert db_eval_boundary(empty, empty) == 1.0
    assert db_eval_boundary(empty, gt) == 0.0
    assert db_eval_boundary(gt, empty) == 0.0


def test_boundary_f_matches_a_distance_transform_reference():
    rng = np.random.default_rng(0)
    for _ in range(3):
        gt = ndimage.gaussian_filter(rng.standard_normal((60, 80)), 4) > 0
        pred = ndimage.gaussian_filter(rng.standard_normal((60, 80)), 4) > 0.05
        radius = math.ceil(0.008 * math.hypot(60, 80))
        pb, gb = boundary_map(pred), boundary_map(gt)
        # matched = within Euclidean distance `radius` of the other boundary (a disk footprint)
        precision = (ndimage.distance_transform_edt(~gb)[pb] <= radius).mean()
        recall = (ndimage.distance_transform_edt(~pb)[gb] <= radius).mean()
        expected = 2 * precision * recall / (precision + recall)
        assert db_eval_boundary(pred, gt) == pytest.approx(expected, abs=1e-12)
        assert 0.0 < expected < 1.0


# ----------------------------------------------------------------------------------------------------
# propagation


def moving_square_video(frames: int = 8, shape: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """Masks of a 16 x 16 square moving 2 px right and 2 px down per frame."""
    return [square(shape, 8 + 2 * t, 8 + 2 * t, 16).astype(np.int64) for t in range(frames)]


# Features at stride 2, so that the 2 px steps stay on the feature grid: with one-hot features a
# half-covered feature pixel is equally similar to pure object and pure background keys, a tie that
# top-k breaks arbitrarily (real features carry more than the label and do not tie like this).
FEATURE_SIZE = (24, 32)


@pytest.mark.parametrize("queue", [False, True])
def test_propagation_with_perfect_features_recovers_the_masks(queue):
    masks = moving_square_video()
    feats = [onehot_features(m, FEATURE_SIZE) for m in masks]
    preds = propagate_labels(feats, masks[0], num_prev=2, topk=5, radius=12, queue=queue)
    assert len(preds) == len(masks)
    assert np.array_equal(preds[0], masks[0])
    for pred, gt in zip(preds[1:], masks[1:]):
        assert pred.shape == gt.shape and pred.dtype == np.int64
        assert db_eval_iou(pred > 0, gt > 0) > 0.9


def test_propagation_with_random_features_is_clearly_worse():
    masks = moving_square_video()
    gen = torch.Generator().manual_seed(0)
    good = [onehot_features(m, FEATURE_SIZE) for m in masks]
    noise = [torch.randn(16, *FEATURE_SIZE, generator=gen) for _ in masks]
    j_good = np.mean([db_eval_iou(p > 0, m > 0) for p, m in zip(propagate_labels(good, masks[0])[1:], masks[1:])])
    j_rand = np.mean([db_eval_iou(p > 0, m > 0) for p, m in zip(propagate_labels(noise, masks[0])[1:], masks[1:])])
    assert j_good > 0.9
    assert j_rand < 0.5
    assert j_good - j_rand > 0.4


@pytest.mark.parametrize("window", ["square", "disk"])
def test_labels_do_not_travel_beyond_the_window(window):
    shape = (8, 40)
    first, target = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    first[2:6, 28:32] = 1
    target[2:6, 36:40] = 1  # the same object, 8 px further: its nearest look-alike is 5 px away
    feats = [onehot_features(first, shape), onehot_features(target, shape)]
    far = propagate_labels(feats, first, radius=3, window=window, num_prev=1)[1]
    assert not (far == 1).any()
    unrestricted = propagate_labels(feats, first, radius=None, num_prev=1)[1]
    assert db_eval_iou(unrestricted > 0, target > 0) == 1.0


def reference_propagation(query, keys, labels, topk, temperature, radius, window):
    """Brute force: the full (target pixel x context pixel) affinity with an explicit window mask."""
    ctx, d, h, w = keys.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None]
    dx = xs.flatten()[:, None] - xs.flatten()[None]
    if radius is None:
        allowed = torch.ones_like(dy, dtype=torch.bool)
    elif window == "square":
        allowed = (dy.abs() <= radius) & (dx.abs() <= radius)
    else:
        allowed = dy**2 + dx**2 < radius**2
    aff = torch.einsum("dq,cdk->qck", query.reshape(d, -1), keys.reshape(ctx, d, -1))
    aff = aff.masked_fill(~allowed[:, None, :], -1e9).reshape(h * w, -1)
    values, index = aff.topk(topk, dim=1)
    weights = torch.softmax(values / temperature, dim=1)
    flat_labels = labels.permute(0, 2, 3, 1).reshape(-1, labels.shape[1])
    return (weights[..., None] * flat_labels[index]).sum(1).T.reshape(-1, h, w)


@pytest.mark.parametrize(
    "h, w, radius, window",
    [
        (13, 17, 3, "square"),
        (13, 17, 3, "disk"),
        (9, 30, 5, "square"),
        (10, 7, 0, "square"),
        (12, 12, 20, "square"),
        (11, 14, None, "square"),
    ],
)
def test_propagate_frame_matches_brute_force(h, w, radius, window):
    gen = torch.Generator().manual_seed(h * w)
    query = torch.nn.functional.normalize(torch.randn(6, h, w, generator=gen), dim=0)
    keys = torch.nn.functional.normalize(torch.randn(3, 6, h, w, generator=gen), dim=1)
    labels = torch.softmax(torch.randn(3, 3, h, w, generator=gen), dim=1)
    got = propagate_frame(query, list(keys), list(labels), topk=5, radius=radius, temperature=0.1, window=window)
    expected = reference_propagation(query, keys, labels, 5, 0.1, radius, window)
    assert got.shape == (3, h, w)
    assert torch.allclose(got, expected, atol=1e-5)


def reference_per_frame_raw(query, keys, labels, topk, radius, window):
    """Brute force of Zhang & Maire's rule: top-k of each context frame, raw similarity weights (>= 0)."""
    ctx, d, h, w = keys.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None]
    dx = xs.flatten()[:, None] - xs.flatten()[None]
    if radius is None:
        allowed = torch.ones_like(dy, dtype=torch.bool)
    elif window == "square":
        allowed = (dy.abs() <= radius) & (dx.abs() <= radius)
    else:
        allowed = dy**2 + dx**2 < radius**2
    out = torch.zeros(labels.shape[1], h * w)
    for c in range(ctx):
        aff = query.reshape(d, -1).T @ keys[c].reshape(d, -1)
        aff = aff.masked_fill(~allowed, -1e9)
        values, index = aff.topk(topk, dim=1)
        flat = labels[c].reshape(labels.shape[1], -1).T
        out += (values.clamp(min=0)[..., None] * flat[index]).sum(1).T
    return out.reshape(-1, h, w)


@pytest.mark.parametrize(
    "h, w, radius, window", [(11, 14, None, "square"), (13, 17, 3, "square"), (13, 17, 4, "disk"), (9, 30, 5, "square")]
)
def test_per_frame_topk_with_raw_weights_matches_brute_force(h, w, radius, window):
    gen = torch.Generator().manual_seed(h * w + 1)
    query = torch.nn.functional.normalize(torch.randn(6, h, w, generator=gen), dim=0)
    keys = torch.nn.functional.normalize(torch.randn(2, 6, h, w, generator=gen), dim=1)
    labels = torch.softmax(torch.randn(2, 3, h, w, generator=gen), dim=1)
    got = propagate_frame(
        query, list(keys), list(labels), topk=4, radius=radius, window=window, weighting="raw", topk_per_frame=True
    )
    expected = reference_per_frame_raw(query, keys, labels, 4, radius, window)
    assert torch.allclose(got, expected, atol=1e-5)


def test_xy_augmentation_is_a_position_penalty_on_the_cosine():
    from distseg.eval.davis.propagation import _xy_channels

    gen = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(5, 4, 6, generator=gen), dim=0)
    g = torch.nn.functional.normalize(torch.randn(5, 4, 6, generator=gen), dim=0)
    q, k = _xy_channels(f, 2.0, "query"), _xy_channels(g, 2.0, "key")
    got = q.reshape(q.shape[0], -1).T @ k.reshape(k.shape[0], -1)
    ys, xs = torch.meshgrid((torch.arange(4) + 0.5) / 6, (torch.arange(6) + 0.5) / 6, indexing="ij")
    p = torch.stack([ys.flatten(), xs.flatten()], 1)
    expected = f.reshape(5, -1).T @ g.reshape(5, -1) - 2.0**2 / 2 * torch.cdist(p, p) ** 2
    assert torch.allclose(got, expected, atol=1e-5)
    # features that say nothing: with xy each pixel's nearest neighbour is itself, so the mask stays put
    mask = square((16, 16), 4, 4, 6).astype(np.int64)
    flat = [torch.ones(3, 16, 16)] * 3
    preds = propagate_labels(flat, mask, num_prev=1, use_first=False, topk=1, radius=None, xy_weight=1.0)
    assert all(np.array_equal(p, mask) for p in preds)


def test_zhang_maire_propagation_recovers_the_moving_square():
    masks = moving_square_video()
    feats = [onehot_features(m, FEATURE_SIZE) for m in masks]
    kwargs = dict(num_prev=2, use_first=False, topk=10, topk_per_frame=True, weighting="raw", radius=None)
    for xy_weight in (0.0, 1.0):
        preds = propagate_labels(feats, masks[0], xy_weight=xy_weight, **kwargs)
        for pred, gt in zip(preds[1:], masks[1:]):
            assert db_eval_iou(pred > 0, gt > 0) > 0.85
    # the protocol: the same computation behind the evaluator contract, metrics prefixed davis_zm/
    from distseg.eval.protocols import FeatureSample, create_protocol, protocol_kwargs

    defaults = protocol_kwargs("davis_zm", {})
    assert {k: defaults[k] for k in kwargs} == kwargs and defaults["xy_weight"] == 1.0
    protocol = create_protocol("davis_zm", 2, **defaults)
    for t, (feat, mask) in enumerate(zip(feats, masks)):
        protocol.process(FeatureSample(f"square/{t:05d}", feat.numpy(), mask, "eval"))
    metrics = protocol.evaluate().metrics
    assert metrics["davis_zm/J_mean"] > 0.85 and metrics["davis_zm/num_sequences"] == 1
    assert all(key.startswith("davis_zm/") for key in metrics)


def test_propagator_checks_the_new_arguments():
    with pytest.raises(ValueError, match="weighting"):
        LabelPropagator(weighting="linear")
    with pytest.raises(ValueError, match="xy_weight"):
        LabelPropagator(xy_weight=-1.0)


def test_propagation_multiple_labels_and_argument_checks():
    masks = [np.zeros((16, 16), np.int64) for _ in range(3)]
    for m in masks:
        m[2:7, 2:7], m[9:14, 9:14] = 1, 2
    feats = [torch.from_numpy(np.eye(3, dtype=np.float32)[m]).permute(2, 0, 1) for m in masks]
    preds = propagate_labels(feats, masks[0], radius=2, use_first=False, num_prev=1)
    assert all(np.array_equal(p, m) for p, m in zip(preds, masks))
    with pytest.raises(ValueError):
        propagate_labels(feats, masks[0], use_first=False, num_prev=0)
    with pytest.raises(ValueError):
        propagate_labels([feats[0], feats[1][:, :8]], masks[0])


# ----------------------------------------------------------------------------------------------------
# the evaluator


def test_evaluator_means_over_sequences_skip_the_first_and_last_frame():
    shape = (64, 64)  # tolerance ceil(0.008 * 90.5) = 1 px
    gt = square(shape, 20, 20, 10).astype(np.uint8)
    empty = np.zeros(shape, np.uint8)
    shifted = square(shape, 20, 21, 10).astype(np.uint8) * 3  # any label > 0 is the object
    # sequence a: J per frame [-, 1, 9/11, 0, -], F [-, 1, 1, 0, -]; first/last would score 0
    ev = DavisEvaluator()
    ev.process("a", [empty, gt, shifted, empty, empty], [gt] * 5)
    # sequence b: frame 1 empty/empty -> J = F = 1; an unannotated frame is skipped
    ev.process("b", [gt, empty, gt, empty], [empty, empty, None, gt])
    out = ev.evaluate()
    j_a, j_b, f_a, f_b = (1 + 9 / 11 + 0) / 3, 1.0, 2 / 3, 1.0
    assert out["davis/a/J_mean"] == pytest.approx(j_a)
    assert out["davis/b/F_mean"] == pytest.approx(f_b)
    assert out["davis/J_mean"] == pytest.approx((j_a + j_b) / 2)
    assert out["davis/F_mean"] == pytest.approx((f_a + f_b) / 2)
    assert out["davis/JF_mean"] == pytest.approx(((j_a + j_b) / 2 + (f_a + f_b) / 2) / 2)
    assert out["davis/J_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["davis/F_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["davis/num_frames"] == 4
    rows = {r["sequence"]: r for r in ev.table()}
    assert rows["a"]["frames"] == 3 and rows["b"]["frames"] == 1
    # keeping the last frame adds a's J = 0 frame
    ev = DavisEvaluator(skip_last=False)
    ev.process("a", [empty, gt, shifted, empty, empty], [gt] * 5)
    assert ev.evaluate()["davis/J_mean"] == pytest.approx((1 + 9 / 11) / 4)
    ev.reset()
    with pytest.raises(RuntimeError):
        ev.evaluate()


# ----------------------------------------------------------------------------------------------------
# real data


def test_evaluate_sequences_on_davis_with_oracle_features(davis_root):
    from distseg.data.davis import DAVIS2016

    dataset = DAVIS2016(davis_root, split="val")
    seq = "blackswan" if "blackswan" in dataset.sequences() else dataset.sequences()[0]
    ids = [i for i in dataset.ids() if i.startswith(f"{seq}/")][:5]
    masks = {}
    for i in ids:
        sample = dataset[i]
        masks[hash(sample.image.tobytes())] = sample.labels
    size = (60, 107)  # 1/8 of 480 x 854

    def oracle(image: np.ndarray) -> torch.Tensor:
        return onehot_features(masks[hash(image.tobytes())], size)

    evaluator = DavisEvaluator()
    out = evaluate_sequences(
        oracle, dataset, [seq], max_frames=5, evaluator=evaluator, progress=False, radius=4, num_prev=1
    )
    assert evaluator.table()[0]["frames"] == 3  # frames 1..3 of 0..4
    assert 0.0 <= out["davis/JF_mean"] <= 1.0
    assert out["davis/J_mean"] > 0.85
    assert out["davis/F_mean"] > 0.5
