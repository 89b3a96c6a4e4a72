"""The evaluation protocols end to end on tiny synthetic features whose answer is known."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from distseg.eval.protocols import PROTOCOLS, EvalResult, FeatureSample, create_protocol, resize_nearest

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


def run(name: str, samples: list[FeatureSample], **kwargs) -> EvalResult:
    evaluator = create_protocol(name, C, class_names=["a", "b", "c"], seed=0, **kwargs)
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
    ("kmeans", {}, {}),
    ("kmeans", {"overcluster": 6}, {}),
    ("knn", {}, {}),
    ("retrieval", {}, {}),
    ("linear", {}, {}),
    ("linear", {"head": "aspp"}, BIG_BLOCKS),
]


def test_registry_lists_protocols_and_rejects_unknown_names():
    assert {"linear", "kmeans", "knn", "retrieval", "purity"} <= set(PROTOCOLS)
    with pytest.raises(KeyError, match="kmeans.*knn"):
        create_protocol("svm", C)


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


@pytest.mark.parametrize("name, kwargs", [("kmeans", {}), ("knn", {}), ("linear", {"head": "aspp"})])
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


def test_unlabelled_samples_are_skipped_but_clustered_by_kmeans():
    unlabelled = FeatureSample("u", SEPARABLE[-1].features, None, "eval")
    knn = create_protocol("knn", C)
    for sample in SEPARABLE + [unlabelled]:
        knn.process(sample)
    assert knn.num_skipped == 1 and knn.evaluate().metrics["knn/miou"] > 0.95
    assert run("kmeans", SEPARABLE + [unlabelled]).metrics["kmeans/miou"] > 0.95


def test_protocols_without_train_data_say_so():
    with pytest.raises(ValueError, match="train"):
        run("linear", SEPARABLE[4:])


def test_resize_nearest_is_centre_aligned():
    small = np.arange(4).reshape(2, 2)
    np.testing.assert_array_equal(resize_nearest(small, (4, 4)), np.kron(small, np.ones((2, 2), int)))
    np.testing.assert_array_equal(resize_nearest(np.kron(small, np.ones((2, 2), int)), (2, 2)), small)
