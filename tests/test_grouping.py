import itertools

import cv2
import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.grouping.edgenet import EdgeNet, LearnedEdges, edge_loss, export_weights, load_edgenet
from distseg.grouping.edges import EDGE_DETECTORS, create_edge_detector, non_maximum_suppression
from distseg.grouping.hierarchy import build_hierarchy
from distseg.grouping.types import EdgeMap


def step_image(width=40, height=30, split=20):
    image = np.full((height, width, 3), 40, np.uint8)
    image[:, split:] = 200
    return image


def test_registry_names_and_unknown():
    assert {"learned", "gradient", "sed"} <= set(EDGE_DETECTORS)
    with pytest.raises(ValueError, match="unknown edge detector 'canny'.*gradient"):
        create_edge_detector("canny")


def test_gradient_finds_a_vertical_step_with_horizontal_normal():
    edges = create_edge_detector("gradient")(step_image())
    assert edges.strength.shape == (30, 40) and edges.strength.dtype == np.float32
    assert 0 <= edges.strength.min() and edges.strength.max() <= 1
    column = int(np.argmax(edges.strength[15]))
    assert column in (19, 20)
    assert edges.strength[15, column] > 0.5 > edges.strength[15, 5]
    theta = edges.orientation[15, column]
    assert min(theta, np.pi - theta) < 0.1  # gradient along x: orientation ~ 0 (mod pi)
    thin = edges.thinned()
    assert (thin[15] > 0.3).sum() <= 2  # non-maximum suppression leaves a 1-2 px line


def test_nms_keeps_ridge_only():
    strength = np.zeros((9, 9), np.float32)
    strength[:, 3], strength[:, 4], strength[:, 5] = 0.5, 1.0, 0.5
    thin = non_maximum_suppression(strength, np.zeros_like(strength))
    assert thin[:, 4].min() == 1.0 and thin[:, 3].max() == 0 and thin[:, 5].max() == 0


def test_sed_without_model_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.yml.gz"):
        create_edge_detector("sed", weights=tmp_path / "missing.yml.gz")


def test_learned_detector_loads_exported_weights(tmp_path):
    torch.manual_seed(0)
    path = export_weights(EdgeNet(width=4), tmp_path / "w.pt")
    assert torch.load(path, weights_only=True)["_width"].item() == 4
    detector = LearnedEdges(weights=path, scales=(0.5, 1.0), device="cpu")
    edges = detector(step_image())
    assert edges.strength.shape == (30, 40)
    assert 0 <= edges.strength.min() and edges.strength.max() <= 1
    with pytest.raises(FileNotFoundError, match="distseg edges train"):
        load_edgenet(tmp_path / "nothing.pt")


def test_edge_loss_balances_and_ignores_uncertain_pixels():
    consensus = torch.zeros(1, 1, 4, 4)
    consensus[0, 0, 0, 0] = 1.0  # positive
    consensus[0, 0, 0, 1] = 0.1  # below the threshold: ignored
    perfect = torch.full((1, 1, 4, 4), -20.0)
    perfect[0, 0, 0, 0] = 20.0
    assert edge_loss([perfect], consensus).item() < 1e-6
    flipped = perfect.clone()
    flipped[0, 0, 0, 1] = 20.0  # wrong only on the ignored pixel: still no loss
    assert edge_loss([flipped], consensus).item() < 1e-6
    # class balance: missing the one positive costs as much as all 14 negatives wrong together
    miss_pos = torch.full((1, 1, 4, 4), -20.0)
    all_neg_wrong = torch.full((1, 1, 4, 4), 20.0)
    lp = edge_loss([miss_pos], consensus, balance=1.0).item()
    ln = edge_loss([all_neg_wrong], consensus, balance=1.0).item()
    assert lp == pytest.approx(ln, rel=1e-4)


def test_edge_loss_gradients_flow_and_no_nan_without_edges():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    loss = edge_loss([logits], torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def check_ultrametric(d):
    k = len(d)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    for a, b, c in itertools.product(range(k), repeat=3):
        assert d[a, c] <= max(d[a, b], d[b, c]) + 1e-6


def test_hierarchy_of_a_step_is_two_regions_split_at_the_step():
    edges = create_edge_detector("gradient")(step_image())
    h = build_hierarchy(edges, max_regions=2)
    assert h.num_regions == 2 and h.regions.dtype == np.uint8
    assert len(np.unique(h.regions[:, :18])) == 1 and len(np.unique(h.regions[:, 22:])) == 1
    assert h.regions[0, 0] != h.regions[0, 39]
    assert h.ucm2.shape == (61, 81) and h.ucm.shape == (30, 40)
    assert h.ucm[15, 19:21].max() > 0.5  # the strongest contour sits on the step
    assert h.ucm[:, :15].max() < h.ucm[15, 19:21].max()


def test_hierarchy_invariants_on_a_real_image(bsds_root):
    image = cv2.imread(str(sorted((bsds_root / "images" / "test").glob("*.jpg"))[0]))[:, :, ::-1]
    edges = create_edge_detector("gradient")(image)
    h = build_hierarchy(edges, max_regions=40)
    assert 2 <= h.num_regions <= 40
    assert set(np.unique(h.regions)) == set(range(h.num_regions))
    check_ultrametric(h.region_dist)
    assert 0 <= h.ucm.min() and h.ucm.max() <= 1
    assert np.array_equal(h.ucm, h.ucm2[2::2, 2::2])
    again = build_hierarchy(edges, max_regions=40)
    assert np.array_equal(again.ucm, h.ucm) and np.array_equal(again.regions, h.regions)
    coarse = build_hierarchy(edges, max_regions=5)
    assert coarse.num_regions <= 5
    # the UCM is a hierarchy: thresholding it higher can only merge regions
    from skimage.measure import label

    counts = [label(h.ucm2 <= t, connectivity=1).max() for t in (0.1, 0.3, 0.5)]
    assert counts[0] >= counts[1] >= counts[2]


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 7), (5, 1), (17, 23)])
def test_hierarchy_any_size_and_grey(shape):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, shape, dtype=np.uint8)
    h = build_hierarchy(create_edge_detector("gradient")(grey), max_regions=40)
    assert h.regions.shape == shape and h.ucm.shape == shape
    assert 1 <= h.num_regions <= 40
    check_ultrametric(h.region_dist)


def test_max_regions_out_of_range():
    with pytest.raises(ValueError, match="max_regions"):
        build_hierarchy(create_edge_detector("gradient")(step_image()), max_regions=256)


def test_shipped_learned_weights_load_and_find_a_step():
    from distseg.grouping.edgenet import shipped_weights_path

    assert shipped_weights_path().is_file() and shipped_weights_path().stat().st_size < 3_000_000
    detector = create_edge_detector("learned")  # the weights that ship in the package
    image = np.full((64, 64, 3), 40, np.uint8)
    image[:, 32:] = 220
    strength = detector(image).strength
    assert strength[:, 30:34].mean() > 3 * strength[:, 5:20].mean()


def test_edges_eval_cli_writes_ucms_and_metrics(bsds_root, tmp_path):
    import json

    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.cluster import shutdown_ray

    out = tmp_path / "eval"
    try:
        result = CliRunner().invoke(
            app,
            [
                "edges",
                "eval",
                "--detector",
                "gradient",
                "--root",
                str(bsds_root),
                "--limit",
                "2",
                "--thresholds",
                "9",
                "--out",
                str(out),
                "ray.num_cpus=2",
                f"workdir={tmp_path / 'work'}",
            ],
        )
    finally:
        shutdown_ray()
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("ODS=") and "OIS=" in last and "AP=" in last
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and 0.2 < metrics["ucm"]["ods_f"] < 1
    assert 0 < metrics["ucm"]["covering_ods"] <= 1 and "edges" in metrics
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    client = MlflowClient(tracking_uri(str(tmp_path / "work")))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'edges.eval'")
    assert len(runs) == 1 and runs[0].data.metrics["ucm.ods_f"] == metrics["ucm"]["ods_f"]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    ucm = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert ucm.dtype == np.uint16 and ucm.shape in ((321, 481), (481, 321)) and ucm.max() > 0


def square_outline(gap: int = 0, size: int = 64) -> np.ndarray:
    """Edge strength 1 on the outline of a centred square (a `gap`-pixel opening in its top side)."""
    strength = np.zeros((size, size), np.float32)
    a, b = size // 4, 3 * size // 4
    strength[a, a:b] = strength[b, a:b] = strength[a:b, a] = strength[a:b, b] = 1
    mid = size // 2
    strength[a, mid - gap // 2 : mid - gap // 2 + gap] = 0
    return strength


def test_intervening_contour_affinity_cuts_across_edges_only():
    from distseg.grouping.spectral import intervening_contour_affinity

    strength = square_outline()
    w = intervening_contour_affinity(strength, radius=5, rho=0.1)
    assert abs(w - w.T).max() == 0 and np.allclose(w.diagonal(), 1)
    # an interior pixel far from the outline has every pixel of the radius-5 disc as a neighbour
    row = w.getrow(32 * 64 + 32)
    assert row.nnz == sum(dy * dy + dx * dx <= 25 for dy in range(-5, 6) for dx in range(-5, 6))
    assert np.allclose(row.data, 1)
    inside, outside = 20 * 64 + 20, 12 * 64 + 12  # (20, 20) inside the outline at 16, (12, 12) outside
    assert w[20 * 64 + 17, 20 * 64 + 14] == pytest.approx(np.exp(-10))  # across the x = 16 line
    assert w[inside, inside + 2] == 1 and w[outside, outside + 2] == 1


def test_spectral_vectors_separate_what_the_edges_enclose():
    from distseg.grouping.spectral import intervening_contour_affinity, spectral_vectors

    lam, vectors = spectral_vectors(intervening_contour_affinity(square_outline(), 5, 0.1), num_vectors=4)
    assert lam.shape == (4,) and lam[0] < 1e-3 <= lam[1] + 1e-3 and (np.diff(lam) >= -1e-9).all()
    v = vectors[:, 0].reshape(64, 64)
    assert np.sign(v[32, 32]) != np.sign(v[4, 4])  # inside vs outside of the closed outline
    assert v[20:44, 20:44].std() < 0.05 * np.abs(v[20:44, 20:44]).mean()  # constant inside


def test_spectral_term_bridges_a_gap_in_the_local_edges():
    """gPb's reason for sPb: a contour the local edges leave open is partly closed by the eigenvectors."""
    from distseg.grouping.spectral import SpectralGlobalization, spectral_boundaries

    local = square_outline(gap=4)
    spb = spectral_boundaries(local, num_vectors=8)
    spb /= np.percentile(spb, 99)
    gap, inside, outside = spb[16, 31:33].mean(), spb[32, 24:40].mean(), spb[4, 24:40].mean()
    assert local[16, 31:33].max() == 0 and gap > 10 * max(inside, outside), (gap, inside, outside)
    edges = EdgeMap(local, np.full_like(local, 0.5))
    mixed = SpectralGlobalization(lambda image: edges, weight=0.5, num_vectors=8)(np.zeros((64, 64, 3), np.uint8))
    assert 0 <= mixed.strength.min() and mixed.strength.max() <= 1
    assert mixed.strength[16, 31:33].min() > 5 * mixed.strength[32, 24:40].mean()
    np.testing.assert_array_equal(mixed.orientation, edges.orientation)  # OWT reads the local orientation
    with pytest.raises(ValueError, match="edges.spectral"):
        SpectralGlobalization(lambda image: edges, weight=0.0)


def test_edges_spectral_wraps_any_detector():
    from distseg.grouping.edges import GradientEdges, edge_detector_from_config
    from distseg.grouping.spectral import SpectralGlobalization

    cfg = load_config("edges", ["edges.detector=gradient"])
    assert isinstance(edge_detector_from_config(cfg.edges), GradientEdges)
    cfg = load_config("edges", ["edges.detector=gradient", "edges.spectral=0.4"])
    detector = edge_detector_from_config(cfg.edges)
    assert isinstance(detector, SpectralGlobalization) and detector.weight == 0.4
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, 25:] = 200
    edges = detector(image)
    assert edges.strength.shape == (40, 50) and edges.strength[:, 23:27].mean() > 2 * edges.strength[:, :10].mean()


def test_edges_commands_name_a_bad_bsds_root_in_one_line_before_ray_starts(tmp_path):
    import ray
    from typer.testing import CliRunner

    from distseg.cli import app

    empty = tmp_path / "bsds"
    empty.mkdir()
    runner = CliRunner()
    for args in (  # --root, and --data: its old name
        ["edges", "eval", "--root", str(empty), "--limit", "1"],
        ["edges", "eval", "--data", str(empty), "--limit", "1"],
        ["edges", "train", "--root", str(empty), f"workdir={tmp_path / 'w'}", "edge_train.steps=1"],
        ["edges", "train", "--data", str(empty), f"workdir={tmp_path / 'w'}", "edge_train.steps=1"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert f"error: BSDS500 root {empty} has no images/ folder" in " ".join(result.output.split())
        assert "Traceback" not in result.output
        assert not ray.is_initialized()
    (empty / "images" / "train").mkdir(parents=True)  # the layout is there, the images are not
    result = runner.invoke(app, ["edges", "train", "--root", str(empty), f"workdir={tmp_path / 'w'}"])
    assert result.exit_code == 1 and "no BSDS images for split 'train' under" in " ".join(result.output.split())


@pytest.mark.slow  # two Ray Train runs of the edge network on BSDS500 val: ~2 min on the 2-core machine
def test_edges_train_exports_the_weights_and_a_rerun_resumes_in_the_same_mlflow_run(tmp_path, bsds_root):
    from mlflow.tracking import MlflowClient

    from distseg.cluster import shutdown_ray
    from distseg.config import load_config
    from distseg.tracking import tracking_uri
    from distseg.train.edges import train_edges

    over = [f"workdir={tmp_path}", f"edge_train.root={bsds_root}", "edge_train.splits=[val]",
            "edge_train.batch_size=2", "edge_train.crop=64", "edge_train.width=4", "edge_train.log_every=1",
            "edge_train.checkpoint_every=2", "edge_train.cpus_per_worker=1", "ray.num_cpus=2"]  # fmt: skip
    try:
        first = train_edges(load_config("edges", [*over, "edge_train.steps=2"]))
        again = train_edges(load_config("edges", [*over, "edge_train.steps=4"]))  # resumes from step 2
    finally:
        shutdown_ray()
    assert first == again == tmp_path / "edgenet.pt" and again.stat().st_size > 0
    assert len(list((tmp_path / "ray_results" / "edgenet").glob("checkpoint_2*"))) == 2  # steps 2 and 4
    client = MlflowClient(tracking_uri(tmp_path))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    [run] = [r for r in runs if r.data.tags.get("stage") == "edges.train"]  # one run across the rerun
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
