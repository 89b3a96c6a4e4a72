"""ConfusionMatrix, cluster matching, and the torch.distributed reduction."""

from __future__ import annotations

import datetime
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distseg.eval.metrics import (
    ConfusionMatrix,
    contingency,
    hungarian_match,
    iou_matrix,
    majority_vote_match,
    remap,
)

# 3 classes; 255 = ignore. Hand count of the (target, pred) pairs of the 11 counted pixels:
#   (0,0) x2, (0,1) x1, (1,1) x4, (1,2) x1, (2,2) x2, (2,0) x1
TARGET = np.array([[0, 0, 0, 1, 1], [1, 1, 1, 2, 2], [2, 255, 255, 0, 1]])
PRED = np.array([[0, 0, 1, 1, 1], [1, 2, 1, 2, 2], [0, 0, 2, 9, -1]])
# the last two labelled pixels have out-of-range predictions (9, -1): not counted
EXPECTED = np.array([[2, 1, 0], [0, 4, 1], [1, 0, 2]])


def test_hand_computed_three_class_example():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.mat.dtype == np.int64
    np.testing.assert_array_equal(cm.mat, EXPECTED)
    # IoU = tp / (row + col - tp): 2/(3+3-2), 4/(5+5-4), 2/(3+3-2)
    np.testing.assert_allclose(cm.iou(), [0.5, 4 / 6, 0.5])
    assert cm.miou() == pytest.approx((0.5 + 4 / 6 + 0.5) / 3)
    assert cm.pixel_accuracy() == pytest.approx(8 / 11)
    assert cm.mean_accuracy() == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)
    table = cm.per_class_table(["sky", "tree", "road"])
    assert [row["class"] for row in table] == ["sky", "tree", "road"]
    assert table[1]["iou"] == pytest.approx(4 / 6) and table[1]["pixels"] == 5


def test_torch_input_and_absent_class_is_nan():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    np.testing.assert_array_equal(cm.mat[:3, :3], EXPECTED)
    iou = cm.iou()
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx(np.mean(iou[:3]))


def test_ignore_index_pixels_are_not_counted():
    cm = ConfusionMatrix(2, ignore_index=7)
    cm.update(np.array([0, 1, 1, 0]), np.array([7, 7, 1, 0]))
    np.testing.assert_array_equal(cm.mat, [[1, 0], [0, 1]])
    with pytest.raises(ValueError):
        cm.update(np.array([0, 1]), np.array([0, 1, 1]))


def test_merge_equals_matrix_of_concatenation():
    rng = np.random.default_rng(0)
    p1, t1 = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    p2, t2 = rng.integers(0, 4, 30), rng.integers(0, 4, 30)
    a, b, whole = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(p1, t1)
    b.update(p2, t2)
    whole.update(np.concatenate([p1, p2]), np.concatenate([t1, t2]))
    np.testing.assert_array_equal((a + b).mat, whole.mat)
    np.testing.assert_array_equal(a.merge(b).mat, whole.mat)


def test_hungarian_on_permuted_labelling_gives_miou_one():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, (20, 20))
    perm = np.array([3, 0, 4, 1, 2])
    clusters = perm[target]
    mapping = hungarian_match(contingency(clusters, target, 5, 5))
    np.testing.assert_array_equal(mapping[perm], np.arange(5))
    cm = ConfusionMatrix(5)
    cm.update(remap(clusters, mapping), target)
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0


def test_hungarian_with_more_clusters_than_classes():
    # 3 clusters, 2 classes: cluster 2 is a small piece of class 0
    cont = np.array([[10, 0, 3], [1, 8, 0]])
    np.testing.assert_array_equal(hungarian_match(cont), [0, 1, -1])
    np.testing.assert_array_equal(hungarian_match(cont, majority=True), [0, 1, 0])
    # fewer clusters than classes: one class stays unmatched
    np.testing.assert_array_equal(hungarian_match(np.array([[5], [9]])), [1])


def test_hungarian_on_iou_prefers_the_exclusive_small_cluster():
    """MaskContrast matches on IoU: here pixel counts keep the identity (0 + 17 > 7 + 7), IoU swaps
    the pair (0.292 + 0.292 > 0 + 0.548)."""
    cont = np.array([[0, 7], [7, 17]])
    np.testing.assert_allclose(iou_matrix(cont), [[0, 7 / 24], [7 / 24, 17 / 31]])
    np.testing.assert_array_equal(hungarian_match(cont), [0, 1])
    np.testing.assert_array_equal(hungarian_match(cont, score="iou"), [1, 0])
    assert iou_matrix(np.zeros((2, 2))).sum() == 0  # empty classes and clusters: 0, not NaN
    with pytest.raises(ValueError, match="score"):
        hungarian_match(cont, score="dice")


def test_majority_vote_with_overclustering():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 3, (16, 16))
    # 9 clusters: each class split into 3 arbitrary sub-clusters
    clusters = target * 3 + rng.integers(0, 3, target.shape)
    cont = contingency(clusters, target, 9, 3)
    mapping = majority_vote_match(cont)
    np.testing.assert_array_equal(mapping, np.repeat(np.arange(3), 3))
    cm = ConfusionMatrix(3)
    cm.update(remap(clusters, mapping), target)
    assert cm.miou() == 1.0
    # an empty cluster maps to -1
    assert majority_vote_match(np.array([[1, 0], [0, 0]]))[1] == -1


def test_remap_fills_out_of_range():
    np.testing.assert_array_equal(remap(np.array([0, 1, 2, -1]), np.array([5, 6])), [5, 6, -1, -1])


def test_reduce_is_a_noop_without_process_group():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1]), np.array([0, 0]))
    before = cm.mat.copy()
    cm.reduce_from_all_processes()
    np.testing.assert_array_equal(cm.mat, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        cm = ConfusionMatrix(3)
        if rank == 0:
            cm.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
        else:
            cm.update(np.array([2, 2, 0, 0]), np.array([2, 2, 2, 0]))
        cm.reduce_from_all_processes()
        np.save(f"{out_dir}/rank{rank}.npy", cm.mat)
    finally:
        dist.destroy_process_group()


def test_reduce_sums_over_two_gloo_processes(tmp_path):
    # fork, not spawn: the children inherit the imported torch instead of importing it again
    # (seconds each on a busy 2-core machine)
    mp.start_processes(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = np.array([[2, 0, 0], [0, 1, 1], [1, 0, 2]])
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected)
