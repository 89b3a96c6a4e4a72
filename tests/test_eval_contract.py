"""The evaluator contract: every registered protocol honours it, a protocol defined here runs through
`distseg evaluate`'s code path (real local Ray, real sqlite MLflow), bad arguments fail before any work,
and features from the Ray Data actor pool equal the driver-side ones."""

from __future__ import annotations

import inspect
import json

import cv2
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import Field

from distseg.config import load_config
from distseg.core.section import Section
from distseg.data import synthetic_video
from distseg.eval.protocols import (
    PROTOCOLS,
    EvalResult,
    Evaluator,
    FeatureSample,
    create_protocol,
    protocol_info,
    protocol_kwargs,
)
from distseg.tracking import tracking_uri

SMALL = [
    "data.num_images=4",
    "data.image_size=48",
    "model.head_channels=8",
    "model.embed_dim=8",
    "evaluate.image_size=null",
]
C, D = 3, 6


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray for the tests that extract features (evaluate's init_ray then attaches to it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems on a busy machine
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- every registered protocol


def semantic_samples(seed: int = 0) -> list[FeatureSample]:
    """2 train + 2 eval images of 2x2-cell class blocks; features one-hot in the first C channels."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(4):
        cells = np.kron(rng.integers(0, C, (4, 4)), np.ones((2, 2), dtype=np.int64))
        features = np.eye(D)[cells].transpose(2, 0, 1) + 0.05 * rng.standard_normal((D, 8, 8))
        label = np.kron(cells, np.ones((2, 2), dtype=np.int64))
        samples.append(FeatureSample(f"img{i}", features.astype(np.float32), label, "train" if i < 2 else "eval"))
    return samples


def video_samples() -> list[FeatureSample]:
    """A synthetic video (one sequence, ids "<sequence>/<frame>"); features: its object mask, one-hot, at 1/4."""
    samples = []
    for frame in synthetic_video(num_frames=5, image_size=32, seed=0, num_objects=2):
        mask = (frame.instances > 0).astype(np.int64)
        onehot = np.stack([mask == 0, mask == 1], axis=-1).astype(np.float32)
        features = cv2.resize(onehot, (8, 8), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
        samples.append(FeatureSample(frame.id, features, mask, "eval"))
    return samples


# protocols whose defaults are a GPU-sized training (the paper's recipe) run a few steps here
CHEAP = {"deeplab": {"iterations": 3, "batch_size": 2, "crop": 16}}


@pytest.mark.parametrize("name", PROTOCOLS.list())
def test_every_registered_protocol_keeps_the_contract(name):
    info = protocol_info(name)
    assert isinstance(info.headline, str) and info.headline, f"{name} declares no headline metric"
    params = info.params()  # every setting has a default
    kwargs = protocol_kwargs(name, {})
    assert kwargs == params.model_dump()
    # the constructor's keyword arguments are the params model's fields, with the same defaults
    signature = inspect.signature(PROTOCOLS.get(name))
    for field_name, value in kwargs.items():
        assert field_name in signature.parameters, f"{name}: params field {field_name!r} is no constructor argument"
        assert signature.parameters[field_name].default == value, (
            f"{name}.{field_name}: default differs from its params model"
        )

    extra = {"concepts": np.eye(4, D)} if info.needs_concepts else {}
    if info.needs_saliency:  # the object masks: the class-0 cells of each image's features
        extra["saliency"] = {s.image_id: (s.features.argmax(0) > 0).astype(np.float32) for s in semantic_samples()}
    num_classes = 2 if info.needs_video else C
    evaluator = create_protocol(name, num_classes, seed=0, **extra, **{**kwargs, **CHEAP.get(name, {})})
    assert isinstance(evaluator, Evaluator) and evaluator.name == name
    evaluator.reset()
    for sample in video_samples() if info.needs_video else semantic_samples():
        evaluator.process(sample)
    result = evaluator.evaluate()
    assert isinstance(result, EvalResult)
    assert all(key.startswith(f"{name}/") for key in result.metrics)
    assert np.isfinite(result.metrics[f"{name}/{info.headline}"])


def test_unknown_protocol_is_a_key_error_listing_the_known_names():
    with pytest.raises(KeyError, match="dataset_kmeans.*knn"):
        create_protocol("svm", C)


# ---------------------------------------------------------------- checks before any work


@pytest.fixture
def no_work(monkeypatch):
    """Make reading data, starting Ray or extracting features fail the test."""
    import distseg.cluster
    import distseg.eval.evaluate as ev
    import distseg.eval.extract as ex

    def started(*args, **kwargs):
        raise AssertionError("evaluate() started work before checking its settings")

    for module, attr in [
        (ev, "load_split"),
        (ev, "open_video_set"),
        (distseg.cluster, "init_ray"),
        (ex, "extract_features"),
        (ex, "extract_all"),
    ]:
        monkeypatch.setattr(module, attr, started)


def test_a_bad_protocol_argument_fails_before_extraction(tmp_path, no_work):
    from distseg.eval.evaluate import EvaluationError, evaluate

    cfg = load_config(
        "demo",
        [
            f"workdir={tmp_path}",
            *SMALL,
            "evaluate.baselines=[rgbxy]",
            "evaluate.protocols=[dataset_kmeans,linear]",
            "evaluate.protocol_args={linear: {epochs: 2, heads: aspp}}",
        ],
    )
    with pytest.raises(EvaluationError, match=r"linear.*unknown key 'heads'.*allowed keys: head, epochs") as info:
        evaluate(cfg, None, tmp_path / "eval")
    assert "'heads'" in str(info.value)
    cfg.evaluate.protocol_args = {"dataset_kmeans": {"overcluster": "many"}}
    with pytest.raises(EvaluationError, match="dataset_kmeans.*overcluster"):
        evaluate(cfg, None, tmp_path / "eval")
    cfg.evaluate.protocols = ["dataset_kmeans", "bogus"]  # assignment skips the config's own name check
    cfg.evaluate.protocol_args = {}
    with pytest.raises(EvaluationError, match="unknown protocol 'bogus'"):
        evaluate(cfg, None, tmp_path / "eval")
    cfg.evaluate.protocols = ["dataset_kmeans"]
    cfg.evaluate.protocol_args = {"position": {"grid": 1}}  # diagnostics' arguments are checked too
    with pytest.raises(EvaluationError, match="position.*grid"):
        evaluate(cfg, None, tmp_path / "eval")
    cfg.evaluate.protocol_args = {}
    cfg.evaluate.diagnostics = ["bogus_check"]
    with pytest.raises(EvaluationError, match="evaluate.diagnostics.*bogus_check"):
        evaluate(cfg, None, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_plan_resolves_the_old_kmeans_name_and_appends_the_diagnostics(tmp_path):
    from distseg.eval.evaluate import EvaluationError, plan_protocols

    cfg = load_config(
        "demo",
        [
            f"workdir={tmp_path}",
            "evaluate.protocols=[kmeans,linear]",
            "evaluate.protocol_args={kmeans: {overcluster: 6}}",
        ],
    )
    assert cfg.evaluate.diagnostics == ["position"]
    with pytest.warns(FutureWarning, match="'kmeans' is now called 'dataset_kmeans'"):
        plans = plan_protocols(cfg)
    assert [(p.name, p.diagnostic) for p in plans] == [
        ("dataset_kmeans", False),
        ("linear", False),
        ("position", True),
    ]
    assert plans[0].kwargs["overcluster"] == 6
    cfg.evaluate.protocol_args = {"dataset_kmeans": {"overcluster": 6}}  # the new name: no warning
    # a diagnostic also requested as a protocol runs once, as a protocol
    cfg.evaluate.protocols = ["position", "dataset_kmeans"]
    assert [(p.name, p.diagnostic) for p in plan_protocols(cfg)] == [("position", False), ("dataset_kmeans", False)]
    # diagnostics off; video-only runs have no image splits to run them on
    cfg.evaluate.diagnostics = []
    assert [p.name for p in plan_protocols(cfg)] == ["position", "dataset_kmeans"]
    cfg.evaluate.diagnostics = ["position"]
    cfg.evaluate.protocols = ["davis", "davis_zm"]
    assert [p.name for p in plan_protocols(cfg)] == ["davis", "davis_zm"]
    # old and new name both given arguments
    cfg.evaluate.protocols = ["dataset_kmeans"]
    cfg.evaluate.protocol_args = {"kmeans": {}, "dataset_kmeans": {}}
    with pytest.raises(EvaluationError, match="same protocol"), pytest.warns(FutureWarning):
        plan_protocols(cfg)


# ---------------------------------------------------------------- a protocol defined here, end to end


class ToyParams(Section):
    scale: float = Field(1.0, description="multiplies the score")


class ToyProtocol(Evaluator):
    """score = scale * the mean feature value over all eval pixels; also counts the images of each split."""

    def __init__(self, num_classes, class_names=None, seed=0, ignore_index=255, num_examples=4, *, scale: float = 1.0):
        self.scale = scale
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self):
        self.sums, self.pixels, self.train_images, self.eval_images = 0.0, 0, 0, 0

    def _process_train(self, sample):
        self.train_images += 1

    def _process_eval(self, sample):
        self.eval_images += 1
        self.sums += float(sample.features.astype(np.float64).sum())
        self.pixels += sample.features.size

    def evaluate(self):
        return EvalResult(
            metrics={
                "toy/score": self.scale * self.sums / self.pixels,
                "toy/train_images": self.train_images,
                "toy/eval_images": self.eval_images,
            }
        )


@pytest.fixture
def toy_protocol():
    PROTOCOLS.register("toy", ToyProtocol, headline="score", params=ToyParams, needs_train=True)
    yield
    PROTOCOLS.unregister("toy")


def test_a_new_protocol_runs_through_evaluate_into_metrics_json_and_mlflow(tmp_path, local_ray, toy_protocol):
    from distseg.eval.evaluate import evaluate, load_split
    from distseg.eval.features import create_features
    from distseg.eval.summary import summary_lines

    cfg = load_config(
        "demo",
        [
            f"workdir={tmp_path}",
            *SMALL,
            "evaluate.baselines=[rgbxy]",
            "evaluate.protocols=[toy]",
            "evaluate.diagnostics=[]",
            "evaluate.limit=3",
            "evaluate.num_examples=2",
            "evaluate.protocol_args={toy: {scale: 2.0}}",
        ],
    )
    results = evaluate(cfg, None, tmp_path / "eval")

    evals, _ = load_split(cfg, cfg.evaluate.eval_split)
    driver = create_features("rgbxy", image_size=None)
    feats = [driver(image).astype(np.float64) for image in evals.images]
    expected = 2.0 * sum(f.sum() for f in feats) / sum(f.size for f in feats)

    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    metrics = saved["sources"]["rgbxy"]["metrics"]
    assert metrics["toy/score"]["mean"] == pytest.approx(expected, rel=1e-6)
    assert metrics["toy/train_images"]["values"] == [3] and metrics["toy/eval_images"]["values"] == [3]
    assert summary_lines(saved) == [f"toy: score rgbxy {metrics['toy/score']['mean']:.3f}"]
    assert saved["protocols"] == ["toy"] and saved["diagnostics"] == []

    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert run.info.run_name == "eval-toy-rgbxy" and run.data.tags["protocol"] == "toy"
    assert run.data.metrics["toy/score"] == pytest.approx(expected, rel=1e-6)
    assert run.data.params["arg.scale"] == "2.0"
    assert "embedding_pca.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


# ---------------------------------------------------------------- the actor pool


def test_actor_pool_features_equal_the_driver_side_ones(local_ray):
    from distseg.data import open_dataset
    from distseg.eval.extract import DataSpec, extract_all, extract_features
    from distseg.eval.features import create_features
    from distseg.models import ModelConfig

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 64), (64, 40), (40, 64), (48, 48), (36, 52)]
    ]
    model = {"model_cfg": ModelConfig(head_channels=8, embed_dim=8), "image_size": None, "seed": 0}
    pooled = extract_all("random", model, images, progress=False, batch_size=2)
    driver = create_features("random", **model)
    assert len(pooled) == len(images)
    for image, feats in zip(images, pooled):
        expected = driver(image)
        assert feats.dtype == np.float32 and feats.shape == expected.shape  # ragged shapes survive
        np.testing.assert_array_equal(feats, expected)

    # items read by id in the actors: features and labels of the dataset's own samples, in order
    spec = DataSpec.resolve("synthetic", None, "val", num_images=3, image_size=32, seed=0)
    dataset = open_dataset("synthetic", split="val", num_images=3, image_size=32, seed=0)
    ids = dataset.ids()[::-1]
    rows = list(extract_features("rgbxy", {"image_size": None}, ids=ids, data=spec, progress=False))
    assert [r.index for r in rows] == list(range(len(ids)))
    rgbxy = create_features("rgbxy", image_size=None)
    for row, image_id in zip(rows, ids):
        sample = dataset[image_id]
        np.testing.assert_array_equal(row.features, rgbxy(sample.image))
        np.testing.assert_array_equal(row.label, sample.labels)
