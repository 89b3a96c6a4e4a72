"""`distseg evaluate`: every protocol on frozen features of a checkpoint and of baselines, into MLflow.

For each feature source (the checkpoint, then each baseline) the features of the train and eval
splits are extracted once and fed to each protocol's evaluator (`reset/process/evaluate`); the
stochastic protocols run once per seed and report mean +- std. Each (source, protocol) is an MLflow
run nested under the checkpoint's pretraining run when that run is in the same store, with params,
metrics, a per-class IoU table, a confusion-matrix picture, PCA pictures of the embeddings and
example segmentations. `metrics.json` in the output folder holds every number.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distseg.config import Config
from distseg.eval.features import FeatureFn, create_features, pca_rgb

STOCHASTIC = {"linear", "kmeans", "knn", "retrieval"}
IGNORE = 255


@dataclass
class LabeledSplit:
    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]  # 0..C-1, IGNORE = void


@dataclass
class SourceResult:
    metrics: dict[str, dict] = field(default_factory=dict)  # "kmeans/miou" -> {mean, std, values}
    run_ids: dict[str, str] = field(default_factory=dict)


class EvaluationError(ValueError):
    """Settings that cannot be evaluated (no labels, unknown protocol, missing checkpoint)."""


def class_space(dataset) -> tuple[list[str], callable]:
    """(class names, label map -> 0..C-1 with void = IGNORE) for a labeled dataset."""
    names = list(dataset.class_names)
    void = dataset.ignore_index
    if void is None:
        return names, lambda lab: lab.astype(np.int64)
    keep = [i for i in range(len(names)) if i != void]

    def remap(lab: np.ndarray) -> np.ndarray:
        table = np.full(256, IGNORE, np.int64)
        table[keep] = np.arange(len(keep))
        return table[lab.astype(np.int64).clip(0, 255)]

    return [names[i] for i in keep], remap


def open_eval_dataset(cfg: Config, split: str):
    from distseg.data import open_dataset

    source = cfg.evaluate.data
    if source.split(":")[0] == "bsds":
        raise EvaluationError("bsds has boundaries, not class labels: score the grouping with `distseg edges eval`")
    kwargs = {"num_images": cfg.data.num_images, "image_size": cfg.data.image_size, "seed": cfg.seed} if source == "synthetic" else {}
    return open_dataset(source, root=cfg.evaluate.root, split=split, limit=cfg.evaluate.limit, **kwargs)


def load_split(cfg: Config, split: str) -> tuple[LabeledSplit, list[str]]:
    dataset = open_eval_dataset(cfg, split)
    names, remap = class_space(dataset)
    ids, images, labels = [], [], []
    for image_id in tqdm(dataset.ids(), desc=f"read {cfg.evaluate.data}/{split}", unit="img", leave=False):
        sample = dataset[image_id]
        if sample.labels is None:
            raise EvaluationError(f"{cfg.evaluate.data}: image {image_id} has no labels (the protocols need them)")
        ids.append(image_id), images.append(sample.image), labels.append(remap(sample.labels))
    if not ids:
        raise EvaluationError(f"{cfg.evaluate.data}: split {split!r} is empty")
    return LabeledSplit(ids, images, labels), names


def extract(fn: FeatureFn, split: LabeledSplit, desc: str) -> list[np.ndarray]:
    return [fn(img) for img in tqdm(split.images, desc=desc, unit="img", leave=False)]


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr)), "values": [float(v) for v in arr]}


def run_protocol(name: str, num_classes: int, class_names: list[str], seed: int, args: dict,
                 train: LabeledSplit | None, train_feats, evals: LabeledSplit, eval_feats, extra: dict):  # fmt: skip
    from distseg.eval.protocols import FeatureSample, create_protocol

    protocol = create_protocol(name, num_classes, class_names=class_names, seed=seed, ignore_index=IGNORE, **extra, **args)
    protocol.reset()
    if train is not None:
        for image_id, feats, lab in zip(train.ids, train_feats, train.labels):
            protocol.process(FeatureSample(image_id, feats, lab, "train"))
    for image_id, feats, lab in zip(evals.ids, eval_feats, evals.labels):
        protocol.process(FeatureSample(image_id, feats, lab, "eval"))
    return protocol.evaluate()


def evaluate(cfg: Config, checkpoint: str | None, out_dir: str | Path) -> dict:
    """Score the checkpoint (and cfg.evaluate.baselines) with cfg.evaluate.protocols; returns metrics.json's dict."""
    from distseg.eval import report
    from distseg.tracking import start_run

    ecfg = cfg.evaluate
    unknown = sorted(set(ecfg.protocols) - {"linear", "kmeans", "knn", "retrieval", "davis", "purity"})
    if unknown:
        raise EvaluationError(f"unknown protocol(s) {unknown} (known: linear, kmeans, knn, retrieval, davis, purity)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict] = {}
    parent = None
    # a 320-px DAVIS frame is an 80x45 feature grid on which small objects vanish: davis has its own size
    image_size = ecfg.davis_image_size if ecfg.data == "davis" else ecfg.image_size
    if checkpoint:
        ckpt = Path(checkpoint)
        if not (ckpt / "model.pt").is_file():
            raise EvaluationError(f"checkpoint {ckpt}: no model.pt (pass a folder from `distseg pretrain`)")
        meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
        parent = meta.get("mlflow_run_id")
        sources["checkpoint"] = {"checkpoint": str(ckpt), "image_size": image_size}
    for base in ecfg.baselines:
        sources[base] = {"model_cfg": cfg.model, "image_size": image_size, "seed": cfg.seed}
    if not sources:
        raise EvaluationError("nothing to evaluate: pass --checkpoint and/or --baseline")

    semantic = [p for p in ecfg.protocols if p != "davis"]
    train = evals = None
    class_names: list[str] = []
    if semantic:
        evals, class_names = load_split(cfg, ecfg.eval_split)
        if any(p in ("linear", "knn", "retrieval") for p in semantic):
            train, _ = load_split(cfg, ecfg.train_split)

    results: dict = {"data": ecfg.data, "protocols": ecfg.protocols, "seeds": ecfg.seeds, "image_size": image_size, "sources": {}}
    for source, kwargs in sources.items():
        t0 = time.perf_counter()
        fn = create_features(source, **kwargs)
        source_metrics: dict[str, dict] = {}
        train_feats = extract(fn, train, f"{source} features (train)") if train else None
        eval_feats = extract(fn, evals, f"{source} features (eval)") if evals else None
        for name in ecfg.protocols:
            if name == "purity" and source != "checkpoint":
                continue
            seeds = range(ecfg.seeds) if name in STOCHASTIC else range(1)
            per_seed, first = [], None
            for seed in seeds:
                if name == "davis":
                    res = run_davis(cfg, fn)
                else:
                    extra = {"concepts": concept_dictionary(kwargs["checkpoint"])} if name == "purity" else {}
                    res = run_protocol(name, len(class_names), class_names, cfg.seed + seed, ecfg.protocol_args.get(name, {}),
                                       train, train_feats, evals, eval_feats, extra)  # fmt: skip
                per_seed.append(res)
                first = first or res
            metrics = {k: _summary([r.metrics[k] for r in per_seed]) for k in first.metrics}
            source_metrics.update(metrics)
            with start_run(cfg, run_name=f"eval-{name}-{source}", parent_run_id=parent,
                           tags={"stage": "evaluate", "protocol": name, "source": source}, log_config=False) as tracker:  # fmt: skip
                tracker.log_params({"protocol": name, "source": source, "data": ecfg.data, "seeds": len(per_seed),
                                    "image_size": image_size, "checkpoint": checkpoint or "", **{f"arg.{k}": v for k, v in ecfg.protocol_args.get(name, {}).items()}})  # fmt: skip
                tracker.log_metrics({k: v["mean"] for k, v in metrics.items()})
                tracker.log_metrics({f"{k}_std": v["std"] for k, v in metrics.items()})
                report.log_protocol(tracker, name, first, evals, eval_feats, class_names, ecfg.num_examples)
        if eval_feats is not None and ecfg.num_examples:
            sheet = report.pca_sheet(evals, eval_feats, ecfg.num_examples, pca_rgb)
            report.save_picture(sheet, out / f"pca_{source}.png")
        results["sources"][source] = {"metrics": source_metrics, "seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def run_davis(cfg: Config, fn: FeatureFn):
    from distseg.data import open_dataset
    from distseg.eval.davis import evaluate_sequences
    from distseg.eval.protocols import EvalResult

    dataset = open_dataset("davis", root=cfg.evaluate.root if cfg.evaluate.data == "davis" else None, split="val")
    args = dict(cfg.evaluate.protocol_args.get("davis", {}))
    metrics = evaluate_sequences(fn, dataset, max_frames=cfg.evaluate.davis_max_frames, **args)
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
    return EvalResult(metrics=flat, per_class=[], confusion=None, predictions={})


def concept_dictionary(checkpoint: str) -> np.ndarray:
    """The concepts loss's dictionary (K x D, normalised) saved beside the checkpoint's model."""
    import torch

    path = Path(checkpoint) / "loss.pt"
    if not path.is_file():
        raise EvaluationError(f"purity needs {path} (a checkpoint trained with the concepts loss)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "dictionary" not in state:
        raise EvaluationError(f"{path} holds no concept dictionary (was the checkpoint trained with pretrain.method=concepts?)")
    d = state["dictionary"].float()
    return torch.nn.functional.normalize(d, dim=1).numpy()


HEADLINES = {"davis": "JF_mean", "purity": "purity"}


def headline(protocol: str, metrics: dict) -> tuple[str, dict | None]:
    """The number a protocol is judged by (mIoU, or J&F for DAVIS) from a source's metrics."""
    key = f"{protocol}/{HEADLINES.get(protocol, 'miou')}"
    return key.split("/", 1)[1], metrics.get(key)
