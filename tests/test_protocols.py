"""The evaluation protocols end to end on tiny synthetic features whose answer is known."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from distseg.core.constants import IGNORE_INDEX
from distseg.eval.features import RGBXYFeatures
from distseg.eval.protocols import (
    PROTOCOL_ALIASES,
    PROTOCOLS,
    EvalResult,
    FeatureSample,
    create_protocol,
    protocol_info,
    protocol_kwargs,
    resize_nearest,
    resolve_protocol_name,
)
from distseg.eval.protocols.position import position_targets

C, D = 3, 6  # classes, feature channels
H, W, SCALE = 16, 16, 2  # label size; features are (D, H / SCALE, W / SCALE)


def make_samples(
    seed: int, random_features: bool = False, n_train: int = 4, n_eval: int = 4, block: int = 2
) -> list[FeatureSample]:
    """Layouts of block x block-cell class blocks; features one-hot in the first C channels plus
    noise (or pure noise); labels at SCALE times the feature resolution."""
    rng = np.random.default_rng(seed)
    h, w = H // SCALE, W // SCALE
    samples = []
    for i in range(n_train + n_eval):
        cells = np.kron(rng.integers(0, C, (h // block, w // block)), np.ones((block, block), dtype=np.int64))
        if random_features:
            features = rng.standard_normal((D, h, w))
        else:
            features = np.eye(D)[cells].transpose(2, 0, 1) + 0.05 * rng.standard_normal((D, h, w))
        label = np.kron(cells, np.ones((SCALE, SCALE), dtype=np.int64))
        label[0, :3] = 255  # a few unlabelled pixels
        split = "train" if i < n_train else "eval"
        samples.append(FeatureSample(f"img{i}", features.astype(np.float32), label, split))
    return samples


def run(name: str, samples: list[FeatureSample], seed: int = 0, **kwargs) -> EvalResult:
    evaluator = create_protocol(name, C, class_names=["a", "b", "c"], seed=seed, **kwargs)
    for sample in samples:
        evaluator.process(sample)
    return evaluator.evaluate()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: OpenMP thread pools only add synchronisation (seconds on a busy machine)."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


SEPARABLE = make_samples(0)
RANDOM = make_samples(0, random_features=True)
# context heads need more (and less chaotic) training scenes than a per-pixel probe
BIG_BLOCKS = {"n_train": 16, "block": 4}
CASES = [
    ("dataset_kmeans", {}, {}),
    ("dataset_kmeans", {"overcluster": 6}, {}),
    ("knn", {}, {}),
    ("retrieval", {}, {}),
    ("linear", {}, {}),
    ("linear", {"head": "aspp"}, BIG_BLOCKS),
    # Zhang & Maire's DeepLab-v3 head, its recipe shrunk to the toy maps (8x8 cells = 32-px crops)
    ("deeplab", {"iterations": 60, "batch_size": 4, "crop": 32, "rates": (1, 2, 3)}, BIG_BLOCKS),
]


def test_registry_lists_protocols_and_rejects_unknown_names():
    assert {"linear", "dataset_kmeans", "knn", "retrieval", "purity", "position", "davis", "davis_zm"} <= set(PROTOCOLS)
    assert "kmeans" not in PROTOCOLS  # a config-level alias only (PROTOCOL_ALIASES)
    assert PROTOCOL_ALIASES == {"kmeans": "dataset_kmeans"}
    assert resolve_protocol_name("kmeans") == "dataset_kmeans" and resolve_protocol_name("knn") == "knn"
    with pytest.raises(KeyError, match="dataset_kmeans.*knn"):
        create_protocol("svm", C)


def test_paper_protocol_defaults():
    """The papers' settings: He et al.'s k-means (= knn) 25 segments, 50 iterations, 15 neighbours;
    Zhang & Maire's Table 2 retrieval K = 15 with one neighbour and their DeepLab-v3 recipe;
    MaskContrast's k-means 32 whitened components, 1000-prototype batches."""
    deeplab = protocol_kwargs("deeplab", {})
    assert (deeplab["iterations"], deeplab["batch_size"], deeplab["crop"], deeplab["lr"]) == (20_000, 20, 384, 0.03)
    assert (deeplab["momentum"], deeplab["weight_decay"], deeplab["milestones"]) == (0.9, 5e-4, (0.5, 0.75))
    objects = protocol_kwargs("object_kmeans", {})
    assert (objects["threshold"], objects["pca_dim"], objects["batch_size"], objects["clusters"]) == (
        0.5,
        32,
        1000,
        None,
    )
    assert protocol_kwargs("knn", {}) == {"segments_per_image": 25, "num_neighbors": 15, "niter": 50}
    retrieval = protocol_kwargs("retrieval", {})
    assert retrieval["segments_per_image"] == 15 and retrieval["num_neighbors"] == 1
    assert protocol_info("position").headline == "r2" and protocol_info("position").needs_train
    assert not protocol_info("position").stochastic and protocol_info("position").summary == ("cos_gap", "cos_gap_rel")


@pytest.mark.parametrize("name, kwargs, data", CASES)
def test_separable_features_score_high_and_random_ones_low(name, kwargs, data):
    good = run(name, make_samples(0, **data) if data else SEPARABLE, **kwargs)
    bad = run(name, make_samples(0, random_features=True, **data) if data else RANDOM, **kwargs)
    assert good.metrics[f"{name}/miou"] > 0.95, good.metrics
    assert good.metrics[f"{name}/pixel_acc"] > 0.95
    assert bad.metrics[f"{name}/miou"] < 0.6, bad.metrics
    assert bad.metrics[f"{name}/miou"] < good.metrics[f"{name}/miou"] - 0.3


@pytest.mark.parametrize("name, kwargs", [case[:2] for case in CASES[:5]])
def test_result_layout(name, kwargs):
    result = run(name, SEPARABLE, num_examples=2, **kwargs)
    assert {f"{name}/miou", f"{name}/pixel_acc", f"{name}/mean_acc"} <= set(result.metrics)
    assert all(key.startswith(f"{name}/") for key in result.metrics)
    assert [row["class"] for row in result.per_class] == ["a", "b", "c"]
    assert result.confusion.shape == (C, C)
    labelled = sum(int((s.label != 255).sum()) for s in SEPARABLE if s.split == "eval")
    assert result.confusion.sum() == labelled
    assert list(result.predictions) == ["img4", "img5"]  # the first eval images
    for sample in SEPARABLE[4:6]:
        pred = result.predictions[sample.image_id]
        assert pred.shape == sample.label.shape and pred.dtype == np.int64
        known = sample.label != 255
        assert (pred[known] == sample.label[known]).mean() > 0.95


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("dataset_kmeans", {}),
        ("knn", {}),
        ("linear", {"head": "aspp"}),
        ("deeplab", {"iterations": 5, "batch_size": 2, "crop": 16, "rates": (1, 2)}),
    ],
)
def test_same_seed_same_result(name, kwargs):
    noisy = make_samples(3, random_features=True)
    a, b = run(name, noisy, **kwargs), run(name, noisy, **kwargs)
    assert a.metrics == b.metrics
    for key in a.predictions:
        np.testing.assert_array_equal(a.predictions[key], b.predictions[key])


def test_purity_is_one_when_concepts_align_with_classes():
    concepts = np.eye(5, D)  # 3 concepts on the class directions, 2 never used
    result = run("purity", SEPARABLE, concepts=concepts)
    assert result.metrics["purity/purity"] == 1.0
    assert result.metrics["purity/used_concepts"] == 3
    assert result.metrics["purity/miou"] == 1.0
    # one concept for everything: purity is the majority class share
    single = run("purity", SEPARABLE, concepts=np.ones((1, D)))
    counts = np.bincount(np.concatenate([s.label[s.label != 255] for s in SEPARABLE[4:]]), minlength=C)
    assert single.metrics["purity/purity"] == pytest.approx(counts.max() / counts.sum())
    assert single.metrics["purity/used_concepts"] == 1


def test_segment_purity_is_one_when_concepts_align_with_classes():
    """He et al.'s measure: segments (merged when connected and of one concept) voted per concept."""
    result = run("segment_purity", SEPARABLE, concepts=np.eye(5, D)).metrics
    assert result["segment_purity/purity"] == 1.0 and result["segment_purity/above_80"] == 1.0
    assert result["segment_purity/used_concepts"] == 3
    # merged: at most one segment per connected class region, so far fewer than 25 per image
    assert 4 <= result["segment_purity/num_segments"] < 4 * 25
    # one concept for everything: an image is one merged segment, labelled with its majority class
    single = run("segment_purity", SEPARABLE, concepts=np.ones((1, D))).metrics
    assert single["segment_purity/num_segments"] == 4 and single["segment_purity/used_concepts"] == 1
    majority = [np.bincount(s.label[s.label != 255], minlength=C).argmax() for s in SEPARABLE[4:]]
    assert single["segment_purity/purity"] == pytest.approx(np.bincount(majority).max() / 4)


def test_unlabelled_samples_are_skipped_but_clustered_by_dataset_kmeans():
    unlabelled = FeatureSample("u", SEPARABLE[-1].features, None, "eval")
    knn = create_protocol("knn", C)
    for sample in SEPARABLE + [unlabelled]:
        knn.process(sample)
    assert knn.num_skipped == 1 and knn.evaluate().metrics["knn/miou"] > 0.95
    assert run("dataset_kmeans", SEPARABLE + [unlabelled]).metrics["dataset_kmeans/miou"] > 0.95


def test_dataset_kmeans_keeps_the_best_of_its_restarts():
    """One k-means initialisation often stops in a local minimum (two centroids in one class, one
    centroid across two): the restarts keep the initialisation with the best k-means objective, which
    here is the one that finds all 8 classes, whatever the seed. The objective never gets worse."""
    from distseg.eval.protocols.base import _l2_normalize, _spherical_kmeans

    k = 8
    rng = np.random.default_rng(0)
    centres = _l2_normalize(rng.normal(size=(k, 16)))
    classes = np.repeat(np.arange(k), 200)
    x = _l2_normalize(centres[classes] + 0.15 * rng.normal(size=(len(classes), 16))).astype(np.float32)
    objective = lambda c: (x @ c.T).max(1).sum()  # noqa: E731
    once = [objective(_spherical_kmeans(x, k, seed, 30, restarts=1)) for seed in range(6)]
    best = [objective(_spherical_kmeans(x, k, seed, 30, restarts=10)) for seed in range(6)]
    assert all(b >= o - 1e-3 for o, b in zip(once, best))
    assert sum(o < max(best) - 10 for o in once) >= 3  # most single starts land in a local minimum

    def miou(restarts, seed):
        evaluator = create_protocol("dataset_kmeans", k, seed=seed, restarts=restarts)
        for i in range(4):  # 4 "images" of 16 x 25 pixels, classes mixed across them
            part = slice(i * 400, (i + 1) * 400)
            evaluator.process(
                FeatureSample(f"img{i}", x[part].T.reshape(16, 16, 25), classes[part].reshape(16, 25), "eval")
            )
        return evaluator.evaluate().metrics["dataset_kmeans/miou"]

    assert [miou(10, seed) for seed in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    assert min(miou(1, seed) for seed in range(3)) < 0.9


def test_protocols_without_train_data_say_so():
    with pytest.raises(ValueError, match="train"):
        run("linear", SEPARABLE[4:])


def test_resize_nearest_is_centre_aligned():
    small = np.arange(4).reshape(2, 2)
    np.testing.assert_array_equal(resize_nearest(small, (4, 4)), np.kron(small, np.ones((2, 2), int)))
    np.testing.assert_array_equal(resize_nearest(np.kron(small, np.ones((2, 2), int)), (2, 2)), small)


# ---------------------------------------------------------------- the position-leak diagnostic


def position_samples(kind: str, seed: int = 0, n_train: int = 6, n_eval: int = 6) -> list[FeatureSample]:
    """Images of different sizes (random colours); features: rgbxy (holds x and y) or pure noise."""
    rng = np.random.default_rng(seed)
    rgbxy = RGBXYFeatures(image_size=None)
    samples = []
    for i in range(n_train + n_eval):
        h, w = (int(v) for v in rng.integers(10, 20, 2) * 4)
        if kind == "rgbxy":
            features = rgbxy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:
            features = rng.standard_normal((8, h // 4, w // 4)).astype(np.float32)
        samples.append(FeatureSample(f"img{i}", features, None, "train" if i < n_train else "eval"))
    return samples


def test_position_leak_is_high_for_rgbxy_and_near_zero_for_noise():
    xy = run("position", position_samples("rgbxy")).metrics
    noise = run("position", position_samples("noise")).metrics
    # x and y are in the rgbxy features; the border distance is not linear in them
    assert xy["position/r2_y"] > 0.8 and xy["position/r2_x"] > 0.8, xy
    assert xy["position/r2"] > 0.5, xy
    assert xy["position/cos_gap"] > 0.1, xy
    assert abs(noise["position/r2"]) < 0.05 and max(noise[f"position/r2_{t}"] for t in ("y", "x", "border")) < 0.05
    assert abs(noise["position/cos_gap"]) < 0.05, noise
    assert abs(noise["position/cos_within"]) < 0.05
    assert xy["position/num_images"] == 6 and noise["position/num_train_pixels"] > 0


def test_position_features_score_r2_one_and_the_cosines_match_brute_force():
    rng = np.random.default_rng(1)
    samples = []
    for i, (h, w) in enumerate([(6, 9), (8, 8), (7, 5), (9, 6), (5, 7)]):
        # one-hot-ish code of (y, x, border) in separate channels: after L2-normalisation still linear
        # up to the norm, so use features whose norm is constant: [t, sqrt(3 - |t|^2)]
        t = position_targets(h, w)
        rest = np.sqrt(3.0 - (t**2).sum(1, keepdims=True))
        noise = 0.01 * rng.standard_normal((h * w, 2))
        features = np.concatenate([t, rest, noise], axis=1).T.reshape(-1, h, w)
        samples.append(FeatureSample(f"img{i}", features, None, "train" if i < 2 else "eval"))
    result = run("position", samples, grid=3, ridge=0.0).metrics
    for target in ("y", "x", "border"):
        assert result[f"position/r2_{target}"] > 0.999, result
    # the cosines by brute force over the 3 eval images on the 3 x 3 grid
    grids = []
    for s in samples[2:]:
        d, h, w = s.features.shape
        x = s.features / np.linalg.norm(s.features, axis=0, keepdims=True)
        rows = np.minimum(((np.arange(3) + 0.5) * h / 3).astype(int), h - 1)
        cols = np.minimum(((np.arange(3) + 0.5) * w / 3).astype(int), w - 1)
        grids.append(x[:, rows][:, :, cols].reshape(d, -1).T)
    same, shuffled, within = [], [], []
    for i, a in enumerate(grids):
        for j, b in enumerate(grids):
            cos = a @ b.T
            if i == j:
                within += list(cos[~np.eye(9, dtype=bool)])
            else:
                same += list(np.diag(cos))
                shuffled += list(cos[~np.eye(9, dtype=bool)])
    assert result["position/cos_same"] == pytest.approx(np.mean(same), abs=1e-6)
    assert result["position/cos_shuffled"] == pytest.approx(np.mean(shuffled), abs=1e-6)
    assert result["position/cos_gap"] == pytest.approx(np.mean(same) - np.mean(shuffled), abs=1e-6)
    assert result["position/cos_within"] == pytest.approx(np.mean(within), abs=1e-6)
    gap_rel = (np.mean(same) - np.mean(shuffled)) / (1 - np.mean(shuffled))
    assert result["position/cos_gap_rel"] == pytest.approx(gap_rel, abs=1e-5)  # float32 features


def test_the_relative_gap_does_not_depend_on_how_alike_all_pixels_are():
    """A channel shared by every pixel (a random network's features mostly point one way) shrinks
    cos_gap in cosine units but leaves cos_gap_rel exactly where it was: with unit codes c and a
    shared channel k, every cosine is (k^2 + c.c') / (k^2 + 1)."""
    rng = np.random.default_rng(2)
    codes = []
    for _ in range(6):
        code = 0.3 * rng.standard_normal((4, 6, 6)) + np.sin(np.arange(6))[None, :, None]  # a row code
        codes.append(code / np.linalg.norm(code, axis=0, keepdims=True))

    def measure(k):
        samples = [
            FeatureSample(f"img{i}", np.concatenate([np.full((1, 6, 6), k), c]), None, "train" if i < 2 else "eval")
            for i, c in enumerate(codes)
        ]
        return run("position", samples, grid=3).metrics

    plain, shared = measure(0.0), measure(3.0)
    assert plain["position/cos_gap"] > 0.1
    assert shared["position/cos_gap"] == pytest.approx(plain["position/cos_gap"] / 10, rel=1e-4)
    assert shared["position/cos_gap_rel"] == pytest.approx(plain["position/cos_gap_rel"], rel=1e-4)


def test_position_reports_what_the_labels_alone_read():
    """label_r2 / label_cos_gap: the same measures of the one-hot labels. Objects that sit in the centre
    of every frame give content a position signal; an embedding that is exactly the labels reads the
    same as the reference, and labels with no layout (one class per image) read no gap."""
    rng = np.random.default_rng(3)

    def centred(i: int, split: str) -> FeatureSample:
        h, w = (int(v) for v in rng.integers(12, 20, 2) * 4)
        label = np.zeros((h, w), np.int64)
        label[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1 + i % 2  # an object of class 1 or 2 in the centre
        label[0, :] = IGNORE_INDEX
        onehot = np.eye(C + 1, dtype=np.float32)[np.where(label == IGNORE_INDEX, C, label)]
        features = np.moveaxis(onehot, -1, 0)[:, 2::4, 2::4]  # the feature grid: every 4th pixel, centred
        return FeatureSample(f"img{i}", features, label, split)

    samples = [centred(i, "train" if i < 6 else "eval") for i in range(12)]
    result = run("position", samples).metrics
    assert result["position/label_r2"] > 0.2 and result["position/label_cos_gap"] > 0.2, result
    assert result["position/r2"] == pytest.approx(result["position/label_r2"], abs=0.02)
    assert result["position/cos_gap"] == pytest.approx(result["position/label_cos_gap"], abs=0.02)

    flat = [FeatureSample(s.image_id, s.features, np.full_like(s.label, i % C), s.split) for i, s in enumerate(samples)]
    flat_result = run("position", flat).metrics
    assert abs(flat_result["position/label_cos_gap"]) < 1e-9 and abs(flat_result["position/label_r2"]) < 0.05
    # without labels there is no reference, and the features' measures are unchanged
    unlabelled = run("position", [FeatureSample(s.image_id, s.features, None, s.split) for s in samples]).metrics
    assert "position/label_r2" not in unlabelled and unlabelled["position/r2"] == result["position/r2"]


def test_position_needs_both_splits():
    with pytest.raises(ValueError, match="train"):
        run("position", position_samples("noise")[6:])
    with pytest.raises(ValueError, match="eval"):
        run("position", position_samples("noise")[:6])


def object_scenes(seed: int, n: int = 12, noise: float = 0.05, random_features: bool = False):
    """MaskContrast's setting: each image one object of class 1..C-1 (a 2x2-cell square on an 8x8
    grid) on background 0. Features: the class's one-hot direction plus noise (or noise); saliency:
    1 on the object, 0 elsewhere. Returns (samples, saliency maps)."""
    rng = np.random.default_rng(seed)
    h, w = H // SCALE, W // SCALE
    samples, saliency = [], {}
    for i in range(n):
        cells = np.zeros((h, w), dtype=np.int64)
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        cells[y : y + 3, x : x + 3] = 1 + i % (C - 1)
        if random_features:
            features = rng.standard_normal((D, h, w))
        else:
            features = np.eye(D)[cells].transpose(2, 0, 1) + noise * rng.standard_normal((D, h, w))
        label = np.kron(cells, np.ones((SCALE, SCALE), dtype=np.int64))
        samples.append(FeatureSample(f"img{i}", features.astype(np.float32), label, "eval"))
        saliency[f"img{i}"] = (cells > 0).astype(np.float32)[None]
    return samples, saliency


def test_object_kmeans_paints_each_object_with_its_class_cluster():
    samples, saliency = object_scenes(0, noise=0.0)
    good = run("object_kmeans", samples, saliency=saliency)
    assert good.metrics["object_kmeans/miou"] == 1.0, good.metrics
    # whitening gives every PCA component unit variance, so noise weighs as much as the class
    # direction; without the PCA the same noisy prototypes separate
    noisy, _ = object_scenes(0)
    assert run("object_kmeans", noisy, saliency=saliency, pca_dim=None).metrics["object_kmeans/miou"] == 1.0
    assert good.metrics["object_kmeans/num_clusters"] == C - 1
    assert good.metrics["object_kmeans/images_without_object"] == 0
    object_share = sum(int((s.label > 0).sum()) for s in samples) / sum(s.label.size for s in samples)
    assert good.metrics["object_kmeans/object_share"] == pytest.approx(object_share)
    # random embeddings under the same masks: the background is still right, the object classes a draw
    noise, _ = object_scenes(0, random_features=True)
    bad = [run("object_kmeans", noise, saliency=saliency, seed=s) for s in range(3)]
    assert max(r.metrics["object_kmeans/miou"] for r in bad) < 0.8
    assert all(r.per_class[0]["iou"] > 0.7 for r in bad)  # background: the masks alone


def test_object_kmeans_reads_only_what_the_mask_covers():
    """The prototype pools the salient pixels only: background features may be anything."""
    samples, saliency = object_scenes(1, noise=0.0)
    rng = np.random.default_rng(5)
    scrambled = []
    for s in samples:
        features = s.features.copy()
        background = s.label[::SCALE, ::SCALE] == 0
        features[:, background] = rng.standard_normal((D, int(background.sum())))
        scrambled.append(FeatureSample(s.image_id, features, s.label, "eval"))
    assert run("object_kmeans", scrambled, saliency=saliency).metrics["object_kmeans/miou"] == 1.0
    # below the threshold nothing is object: every pixel predicted background, no prototype fitted
    faint = {k: 0.4 * v for k, v in saliency.items()}
    none = run("object_kmeans", samples, saliency=faint)
    assert none.metrics["object_kmeans/images_without_object"] == len(samples)
    assert none.metrics["object_kmeans/object_share"] == 0
    assert run("object_kmeans", samples, saliency=faint, threshold=0.3).metrics["object_kmeans/miou"] == 1.0


def test_object_kmeans_needs_a_map_for_every_image():
    samples, saliency = object_scenes(0, n=3)
    with pytest.raises(ValueError, match="needs saliency="):
        create_protocol("object_kmeans", C)
    evaluator = create_protocol("object_kmeans", C, saliency={"img0": saliency["img0"]})
    evaluator.process(samples[0])
    with pytest.raises(ValueError, match="no saliency map for image 'img1'"):
        evaluator.process(samples[1])


def test_deeplab_is_torchvisions_head_on_padded_flipped_crops():
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

    proto = create_protocol("deeplab", C, crop=48, rates=(1, 2, 3))
    head = proto._make_head(D)
    assert isinstance(head, DeepLabHead) and isinstance(head[0], ASPP)
    assert [m.dilation[0] for m in head[0].convs[1:4].modules() if isinstance(m, torch.nn.Conv2d)] == [1, 2, 3]
    # a 12-cell crop of an 8x8 map: the map is inside, the rest ignored labels and zero features
    features = np.ones((D, 8, 8), np.float32)
    label = np.zeros((8, 8), np.int64)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        x, y = proto._crop(rng, features, label)
        assert x.shape == (D, 12, 12) and y.shape == (12, 12)
        assert (y == 0).sum() == 64 and (y == IGNORE_INDEX).sum() == 144 - 64
        np.testing.assert_array_equal(x[0] == 1, y == 0)
        flips += int(y[0, -1] == 0)  # the map sits top-left: after a flip it touches the right edge
    assert 3 <= flips <= 17
    with pytest.raises(ValueError, match="milestones"):
        create_protocol("deeplab", C, milestones=(0.5, 10_000))
