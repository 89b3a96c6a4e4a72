"""The Python BSDS500 benchmark (distseg.eval.bsds) against the official code's outputs.

The fixture tests reproduce every file the official MATLAB/C++ benchmark wrote for its 5-image
example (``../shared/data/bsds500/bench_fixtures/test_{1..5}``) within 0.005; they skip when the
data is absent.  The other tests are self-contained.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from skimage.morphology import thin as skimage_thin

from distseg.eval.bsds import (
    BoundaryBenchmark,
    RegionBenchmark,
    collect_boundary_scores,
    correspond_pixels,
    default_thresholds,
    evaluate_boundaries_image,
    evaluate_regions_image,
    gt_boundaries_from_segmentation,
    load_bsds_ground_truth,
    seg2bdry,
    thin_boundaries,
    ucm2_to_labels,
    ucm2_to_pixel,
)

TOL = 0.005
IDS = ("2018", "3063", "5096", "6046", "8068")  # the official example, in its file order
BDRY_KEYS = ("best_threshold", "ods_r", "ods_p", "ods_f", "ois_r", "ois_p", "ois_f", "ap")
COVER_KEYS = ("covering_threshold", "covering_ods", "covering_ois", "covering_best")
RIVOI_KEYS = ("pri_threshold", "pri_ods", "pri_ois", "voi_threshold", "voi_ods", "voi_ois")


# --------------------------------------------------------------------------------------------
# Official example (bench_fixtures)
# --------------------------------------------------------------------------------------------


def _load_prediction(fixtures: Path, kind: str, image_id: str):
    if kind == "ucm2":
        return scipy.io.loadmat(fixtures / "ucm2" / f"{image_id}.mat")["ucm2"]
    if kind == "png":
        from PIL import Image

        return np.asarray(Image.open(fixtures / "png" / f"{image_id}.png"))
    if kind == "segs":
        return list(scipy.io.loadmat(fixtures / "segs" / f"{image_id}.mat")["segs"].ravel())
    raise ValueError(kind)


@cache
def _boundary_results(fixtures: Path, kind: str) -> tuple[dict, dict]:
    bench = BoundaryBenchmark(thresholds=5)
    for image_id in IDS:
        bench.process(
            image_id,
            _load_prediction(fixtures, kind, image_id),
            fixtures / "groundTruth" / f"{image_id}.mat",
        )
    return bench.evaluate(), bench.tables()


@cache
def _region_results(fixtures: Path, kind: str) -> tuple[dict, dict]:
    bench = RegionBenchmark(thresholds=5)
    for image_id in IDS:
        gt = load_bsds_ground_truth(fixtures / "groundTruth" / f"{image_id}.mat")
        bench.process(image_id, _load_prediction(fixtures, kind, image_id), gt)
    return bench.evaluate(), bench.tables()


@pytest.fixture(scope="module")
def fixtures(bsds_root: Path) -> Path:
    path = bsds_root / "bench_fixtures"
    if not path.exists():
        pytest.skip(f"official benchmark example not available: {path} is absent")
    return path


def _official(fixtures: Path, test: str, name: str) -> np.ndarray:
    return np.atleast_2d(np.loadtxt(fixtures / test / name))


def _check_boundary(fixtures: Path, test: str, kind: str) -> None:
    scores, tables = _boundary_results(fixtures, kind)
    ours = np.array([[scores[k] for k in BDRY_KEYS]])
    np.testing.assert_allclose(ours, _official(fixtures, test, "eval_bdry.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(tables["thr"], _official(fixtures, test, "eval_bdry_thr.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(tables["img"], _official(fixtures, test, "eval_bdry_img.txt"), atol=TOL, rtol=0)


def _check_region(fixtures: Path, test: str, kind: str) -> None:
    scores, tables = _region_results(fixtures, kind)
    cover = np.array([[scores[k] for k in COVER_KEYS]])
    rivoi = np.array([[scores[k] for k in RIVOI_KEYS]])
    np.testing.assert_allclose(cover, _official(fixtures, test, "eval_cover.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(rivoi, _official(fixtures, test, "eval_RI_VOI.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(tables["cover_th"], _official(fixtures, test, "eval_cover_th.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(tables["cover_img"], _official(fixtures, test, "eval_cover_img.txt"), atol=TOL, rtol=0)
    np.testing.assert_allclose(tables["ri_voi_thr"], _official(fixtures, test, "eval_RI_VOI_thr.txt"), atol=TOL, rtol=0)


def test_official_test_1_ucm2_all_benchmarks(fixtures: Path) -> None:
    """test_1: boundary + region benchmarks on ucm2 (double resolution), 5 thresholds."""
    _check_boundary(fixtures, "test_1", "ucm2")
    _check_region(fixtures, "test_1", "ucm2")


def test_official_test_2_png_boundaries(fixtures: Path) -> None:
    """test_2: boundary benchmark on soft boundary maps (PNG, /255), 5 thresholds."""
    _check_boundary(fixtures, "test_2", "png")


def test_official_test_3_segs_boundaries(fixtures: Path) -> None:
    """test_3: boundary benchmark on a cell of segmentations (one threshold per segmentation)."""
    _check_boundary(fixtures, "test_3", "segs")


def test_official_test_4_segs_all_benchmarks(fixtures: Path) -> None:
    """test_4: boundary + region benchmarks on a cell of segmentations."""
    _check_boundary(fixtures, "test_4", "segs")
    _check_region(fixtures, "test_4", "segs")


def test_official_test_5_segs_regions(fixtures: Path) -> None:
    """test_5: region benchmarks (covering, PRI, VOI) on a cell of segmentations."""
    _check_region(fixtures, "test_5", "segs")


@pytest.mark.slow
def test_official_test_1_exact_solver(fixtures: Path) -> None:
    """The exact assignment solver also reproduces test_1 (and has the same recall)."""
    bench = BoundaryBenchmark(thresholds=5, exact=True)
    for image_id in IDS:
        bench.process(
            image_id,
            _load_prediction(fixtures, "ucm2", image_id),
            fixtures / "groundTruth" / f"{image_id}.mat",
        )
    scores = bench.evaluate()
    ours = np.array([[scores[k] for k in BDRY_KEYS]])
    np.testing.assert_allclose(ours, _official(fixtures, "test_1", "eval_bdry.txt"), atol=TOL, rtol=0)
    fast, _ = _boundary_results(fixtures, "ucm2")
    assert scores["ods_r"] == pytest.approx(fast["ods_r"], abs=1e-12)
    assert scores["ois_r"] == pytest.approx(fast["ois_r"], abs=1e-12)


def test_ground_truth_boundaries_are_thinned_seg2bdry(fixtures: Path) -> None:
    """BSDS500's ``Boundaries`` = bwmorph(seg2bdry(Segmentation), 'thin', inf), pixel for pixel."""
    for image_id in IDS:
        segs, bdrys = load_bsds_ground_truth(fixtures / "groundTruth" / f"{image_id}.mat")
        assert len(segs) == len(bdrys) >= 4
        for seg, bdry in zip(segs, bdrys):
            np.testing.assert_array_equal(gt_boundaries_from_segmentation(seg), bdry)


def test_ucm2_inputs_and_pixel_resolution_ucm(fixtures: Path) -> None:
    """A pixel-resolution UCM gives the ucm2's boundary counts, and nearly its region scores."""
    image_id = IDS[0]
    ucm2 = _load_prediction(fixtures, "ucm2", image_id)
    segs, bdrys = load_bsds_ground_truth(fixtures / "groundTruth" / f"{image_id}.mat")
    pixel = ucm2_to_pixel(ucm2)
    assert pixel.shape == segs[0].shape
    np.testing.assert_array_equal(evaluate_boundaries_image(ucm2, bdrys, 5), evaluate_boundaries_image(pixel, bdrys, 5))
    labels = ucm2_to_labels(ucm2, 0.5)
    assert labels.shape == segs[0].shape and labels.min() >= 1
    double = evaluate_regions_image(ucm2, segs, 5)
    single = evaluate_regions_image(pixel, segs, 5)
    np.testing.assert_allclose(single.cnt_r / single.sum_r, double.cnt_r / double.sum_r, atol=0.01)
    np.testing.assert_allclose(single.ri, double.ri, atol=0.01)
    np.testing.assert_allclose(single.voi, double.voi, atol=0.05)


# --------------------------------------------------------------------------------------------
# Hand-made cases
# --------------------------------------------------------------------------------------------


def _blocks(h: int = 60, w: int = 90) -> np.ndarray:
    seg = np.ones((h, w), dtype=np.int32)
    seg[:, w // 3 :] = 2
    seg[h // 2 :, 2 * w // 3 :] = 3
    return seg


def _line(h: int = 60, w: int = 90, col: int = 40) -> np.ndarray:
    bmap = np.zeros((h, w), dtype=bool)
    bmap[5:-5, col] = True
    return bmap


def _pr(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    recall = counts[:, 1] / np.maximum(counts[:, 2], 1)
    precision = counts[:, 3] / np.maximum(counts[:, 4], 1)
    return recall, precision


def test_identical_maps_give_perfect_scores() -> None:
    gt = gt_boundaries_from_segmentation(_blocks())
    counts = evaluate_boundaries_image(gt.astype(float), [gt, gt], thresholds=[0.5])
    assert counts[0, 2] == 2 * gt.sum() and counts[0, 4] == gt.sum()
    recall, precision = _pr(counts)
    assert recall[0] == 1.0 and precision[0] == 1.0
    # the same through the evaluator, with the ground truth as label maps
    bench = BoundaryBenchmark(thresholds=3)
    bench.process("a", gt.astype(float), [_blocks(), _blocks()])
    scores = bench.evaluate()
    for key in ("ods_r", "ods_p", "ods_f", "ois_r", "ois_p", "ois_f"):
        assert scores[key] == pytest.approx(1.0)


def test_shift_within_tolerance_matches_and_far_shift_does_not() -> None:
    gt = _line()
    assert 0.0075 * np.hypot(*gt.shape) < 1  # 0.81 px for 60x90: use 0.02 (2.2 px) below
    near = np.roll(gt, 1, axis=1)
    far = np.roll(gt, 10, axis=1)
    counts = evaluate_boundaries_image(near.astype(float), [gt], [0.5], max_dist=0.02)
    assert _pr(counts) == (pytest.approx([1.0]), pytest.approx([1.0]))
    counts = evaluate_boundaries_image(far.astype(float), [gt], [0.5], max_dist=0.02)
    assert _pr(counts) == (pytest.approx([0.0]), pytest.approx([0.0]))
    # with the default tolerance (0.81 px here) even the 1-px shift is out of reach
    counts = evaluate_boundaries_image(near.astype(float), [gt], [0.5])
    assert counts[0, 1] == 0


def test_empty_prediction_has_zero_recall() -> None:
    gt = gt_boundaries_from_segmentation(_blocks())
    counts = evaluate_boundaries_image(np.zeros(gt.shape), [gt, gt], thresholds=5)
    assert np.all(counts[:, 1] == 0) and np.all(counts[:, 3] == 0) and np.all(counts[:, 4] == 0)
    assert np.all(counts[:, 2] == 2 * gt.sum())
    scores = collect_boundary_scores([counts])
    assert scores["ods_r"] == 0 and scores["ods_f"] == 0 and scores["ap"] == 0
    # and an empty ground truth: nothing to recall, all machine pixels unmatched
    counts = evaluate_boundaries_image(gt.astype(float), [np.zeros_like(gt)], [0.5])
    assert counts[0, 1] == counts[0, 2] == counts[0, 3] == 0 and counts[0, 4] == gt.sum()


def test_segmentation_against_itself() -> None:
    seg = _blocks()
    res = evaluate_regions_image([seg], [seg, seg])
    assert res.cnt_r[0] / res.sum_r[0] == pytest.approx(1.0)
    assert res.cnt_p[0] / res.sum_p[0] == pytest.approx(1.0)
    assert res.ri[0] == pytest.approx(1.0)
    assert res.voi[0] == pytest.approx(0.0, abs=1e-12)
    bench = RegionBenchmark()
    bench.process(0, [seg, np.ones_like(seg)], [seg])
    scores = bench.evaluate()
    assert scores["covering_ods"] == pytest.approx(1.0)
    assert scores["covering_ois"] == pytest.approx(1.0)
    assert scores["covering_best"] == pytest.approx(1.0)
    assert scores["pri_ods"] == pytest.approx(1.0) and scores["pri_ois"] == pytest.approx(1.0)
    assert scores["voi_ods"] == pytest.approx(0.0, abs=1e-12)
    assert scores["covering_threshold"] == 1.0


def test_region_scores_by_hand() -> None:
    """Covering / RI / VOI of a tiny case against the definitions."""
    gt = np.array([[1, 1, 2, 2]])
    seg = np.array([[1, 1, 1, 2]])
    res = evaluate_regions_image([seg], [gt])
    # covering of gt by seg: region {0,1}: IoU 2/3, region {2,3}: IoU 1/2
    assert res.cnt_r[0] / res.sum_r[0] == pytest.approx((2 * 2 / 3 + 2 * 1 / 2) / 4)
    # pairs: 6, disagreements: (0,2), (1,2), (2,3) -> RI = 3/6
    assert res.ri[0] == pytest.approx(0.5)
    h = lambda p: -sum(x * np.log2(x) for x in p if x > 0)  # noqa: E731
    joint = np.array([0.5, 0.25, 0.25])
    assert res.voi[0] == pytest.approx(2 * h(joint) - h([0.5, 0.5]) - h([0.75, 0.25]))


def test_correspond_pixels_invariants() -> None:
    rng = np.random.default_rng(0)
    b1 = rng.random((50, 70)) < 0.08
    b2 = rng.random((50, 70)) < 0.08
    radius = 0.03 * np.hypot(50, 70)
    for exact in (False, True):
        m1, m2 = correspond_pixels(b1, b2, max_dist=0.03, exact=exact)
        assert np.all(m1[~b1] == 0) and np.all(m2[~b2] == 0)
        y1, x1 = np.nonzero(m1)
        target = m1[y1, x1] - 1
        y2, x2 = np.divmod(target, b1.shape[1])
        assert np.all(b2[y2, x2])
        assert np.unique(target).size == target.size  # one-to-one
        np.testing.assert_array_equal(m2[y2, x2] - 1, y1 * b1.shape[1] + x1)
        assert np.all(np.hypot(y1 - y2, x1 - x2) <= radius + 1e-9)
    # the number of pairs is the maximum-cardinality matching of the candidate graph
    ys1, xs1 = np.nonzero(b1)
    ys2, xs2 = np.nonzero(b2)
    d = np.hypot(ys1[:, None] - ys2[None, :], xs1[:, None] - xs2[None, :])
    best = (maximum_bipartite_matching(csr_matrix(d <= radius), perm_type="column") >= 0).sum()
    fast = (correspond_pixels(b1, b2, max_dist=0.03)[0] > 0).sum()
    exact = (correspond_pixels(b1, b2, max_dist=0.03, exact=True)[0] > 0).sum()
    assert fast == exact == best


def test_fast_and_exact_solvers_agree_on_recall() -> None:
    rng = np.random.default_rng(1)
    gt = gt_boundaries_from_segmentation(_blocks(80, 120))
    noisy = gt.astype(float) * rng.uniform(0.3, 1.0, gt.shape)
    noisy = np.maximum(noisy, np.roll(gt, 1, axis=0) * rng.uniform(0.0, 0.8, gt.shape))
    noisy = np.maximum(noisy, (rng.random(gt.shape) < 0.02) * rng.random(gt.shape))
    fast = evaluate_boundaries_image(noisy, [gt, np.roll(gt, 1, axis=1)], 9)
    exact = evaluate_boundaries_image(noisy, [gt, np.roll(gt, 1, axis=1)], 9, exact=True)
    np.testing.assert_array_equal(fast[:, [0, 1, 2, 4]], exact[:, [0, 1, 2, 4]])
    assert np.all(np.abs(fast[:, 3] - exact[:, 3]) <= 0.01 * np.maximum(exact[:, 4], 1))


def test_thinning_is_bwmorph_thin() -> None:
    rng = np.random.default_rng(2)
    masks = [rng.random((40, 60)) < q for q in (0.2, 0.5, 0.8, 1.0)]
    cross = np.zeros((50, 50), dtype=bool)
    cross[10:30, 5:45] = True
    cross[0:50, 20:24] = True
    masks.append(cross)
    smooth = np.cumsum(np.cumsum(rng.random((60, 80)), 0), 1)
    masks += [(np.sin(smooth / 50.0) > t) for t in (-0.5, 0.0, 0.5)]
    for mask in masks:
        np.testing.assert_array_equal(thin_boundaries(mask), skimage_thin(mask))
    assert not thin_boundaries(np.zeros((5, 5), dtype=bool)).any()


def test_seg2bdry_and_thresholds() -> None:
    seg = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    b = seg2bdry(seg)
    assert b.shape == seg.shape and b.dtype == bool
    # boundary pixels are those with a different label below or to the right
    np.testing.assert_array_equal(b, np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool))
    assert seg2bdry(seg, "doubleSize").shape == (7, 7)
    np.testing.assert_allclose(default_thresholds(5), [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])


def test_collect_scores_interpolation_and_ap() -> None:
    """ODS is searched along the interpolated P/R curve; AP samples it at R = 0:0.01:1."""
    # one image, two thresholds: (R, P) = (1, 0) then (0, 1) -> best F on the segment is ~0.5
    counts = np.array([[0.25, 10, 10, 0, 10], [0.75, 0, 10, 10, 10]], dtype=float)
    scores = collect_boundary_scores([counts])
    assert scores["ods_f"] == pytest.approx(0.5, abs=1e-3)
    assert scores["best_threshold"] == pytest.approx(0.5, abs=0.01)
    assert scores["ois_f"] == 0.0  # OIS only looks at the thresholds themselves
    # AP: P linear from 1 at R=0.25 to 0.5 at R=0.75, zero outside
    counts = np.array([[0.3, 75, 100, 50, 100], [0.6, 25, 100, 100, 100]], dtype=float)
    ri = np.arange(101) * 0.01
    inside = (ri >= 0.25 - 1e-12) & (ri <= 0.75 + 1e-12)
    expected = np.sum(np.where(inside, 1.0 - (ri - 0.25), 0.0)) * 0.01
    assert collect_boundary_scores([counts])["ap"] == pytest.approx(expected, abs=1e-9)


def test_evaluator_interface() -> None:
    seg = _blocks(200, 300)  # matching radius 2.7 px: the 1-px shifted annotator is matched
    shifted = seg.copy()
    shifted[:, 1:] = seg[:, :-1]
    gt = [seg, shifted]
    pb = gt_boundaries_from_segmentation(seg).astype(float) * 0.7
    bench = BoundaryBenchmark(thresholds=9)
    bench.process("x", pb, gt)
    bdrys = [gt_boundaries_from_segmentation(s) for s in gt]
    bench.process("y", (pb * 255).astype(np.uint8), (gt, bdrys))
    scores = bench.evaluate()
    assert set(BDRY_KEYS) <= set(scores) and scores["n_images"] == 2
    assert 0.9 < scores["ods_f"] <= 1.0
    assert bench.tables()["thr"].shape == (9, 4) and bench.tables()["img"].shape == (2, 5)
    bench.reset()
    assert bench.counts == [] and bench.image_ids == []
    with pytest.raises(ValueError):
        bench.evaluate()
    region = RegionBenchmark(thresholds=9)
    ucm2 = seg2bdry(seg, "doubleSize").astype(float) * 0.7
    region.process("x", ucm2, [{"Segmentation": s} for s in gt])
    scores = region.evaluate()
    assert set(COVER_KEYS + RIVOI_KEYS) <= set(scores)
    assert scores["covering_ods"] > 0.9 and scores["pri_ods"] > 0.9
    with pytest.raises(ValueError):
        region.process("bad", np.zeros((3, 3)), gt)
