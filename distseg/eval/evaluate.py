"""`distseg evaluate`: every protocol on frozen features of a checkpoint and of baselines, into MLflow.

The protocols come from the registry (`distseg.eval.protocols.PROTOCOLS`); what each needs is its
registry metadata, not a list here: the train split (`needs_train`), several seeds (`stochastic`), the
checkpoint's concept dictionary (`needs_concepts`: the checkpoint only), object masks from the
checkpoint's saliency head (`needs_saliency`: computed once on the eval split, the same maps for the
checkpoint and every baseline), its own video data (`needs_video`), its `headline` metric and its
`params` model, which checks `evaluate.protocol_args`. Everything that can be checked before work
starts is, before any data is read or Ray starts: protocol names and arguments, baseline names, the
checkpoint folder, its concept dictionary and its saliency head. A retired protocol
name (`PROTOCOL_ALIASES`: `kmeans` -> `dataset_kmeans`) is replaced by its current one, with a warning.

Diagnostics (`evaluate.diagnostics`, default `[position]`: how much pixel position the embedding
carries) are protocols too; they run after `evaluate.protocols` for every feature source, appear in
metrics.json, MLflow (tag `diagnostic`) and the printed lines like the others, and are skipped when
`evaluate.protocols` holds only video protocols (there are no image splits to run them on).

For each feature source (the checkpoint, then each baseline) the features of the train and eval
splits are extracted once, on a Ray Data actor pool (`distseg.eval.extract`), and fed to each
protocol's evaluator (`reset/process/evaluate`); a video protocol gets its sequences' frames streamed
from the pool in temporal order instead. Stochastic protocols run once per seed and report mean +-
std. Each (source, protocol) is an MLflow run nested under the checkpoint's pretraining run when that
run is in the same store, with params, metrics, a per-class IoU table, a confusion-matrix picture and
example segmentations; the PCA picture of a source's embeddings is logged once, in its first protocol
run on the eval split. `metrics.json` in the output folder holds every number; it is rewritten after
each source, so a source that fails leaves the finished ones' numbers there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from distseg.config import Config
from distseg.core.constants import IGNORE_INDEX

if TYPE_CHECKING:
    from distseg.eval.protocols import ProtocolInfo


@dataclass
class LabeledSplit:
    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]  # 0..C-1, IGNORE_INDEX = void


@dataclass(frozen=True)
class ProtocolPlan:
    """A requested protocol: its registry metadata and its checked constructor arguments."""

    info: ProtocolInfo
    kwargs: dict[str, Any]  # validated against info.params, defaults filled in
    args: dict[str, Any]  # as given in evaluate.protocol_args (logged to MLflow)
    diagnostic: bool = False  # from evaluate.diagnostics

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class VideoSet:
    """The frames a video protocol is fed: ids sequence by sequence, read by the actors from `spec`."""

    spec: Any  # distseg.eval.extract.DataSpec
    ids: list[str]
    class_names: list[str]


class EvaluationError(ValueError):
    """Settings that cannot be evaluated (no labels, unknown protocol or argument, missing checkpoint)."""


def class_space(dataset) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """(class names, label map -> 0..C-1 with void = IGNORE_INDEX) for a labeled dataset."""
    names = list(dataset.class_names)
    void = dataset.ignore_index
    if void is None:
        return names, lambda lab: lab.astype(np.int64)
    keep = [i for i in range(len(names)) if i != void]

    def remap(lab: np.ndarray) -> np.ndarray:
        table = np.full(256, IGNORE_INDEX, np.int64)
        table[keep] = np.arange(len(keep))
        return table[lab.astype(np.int64).clip(0, 255)]

    return [names[i] for i in keep], remap


def _resolve_names(key: str, names: list[str]) -> list[str]:
    """Names with retired aliases replaced by the current ones (a warning per alias), duplicates dropped."""
    import warnings

    from distseg.eval.protocols import resolve_protocol_name

    out: list[str] = []
    for name in names:
        new = resolve_protocol_name(name)
        if new != name:
            warnings.warn(
                f"{key}: protocol {name!r} is now called {new!r} (reported as {new}/*)", FutureWarning, stacklevel=3
            )
        if new not in out:
            out.append(new)
    return out


def plan_protocols(cfg: Config) -> list[ProtocolPlan]:
    """Each of evaluate.protocols, then each of evaluate.diagnostics not among them, with its checked
    arguments; EvaluationError names the bad name or key. Diagnostics are dropped when the protocols
    are all video protocols."""
    from distseg.eval.protocols import PROTOCOLS, protocol_info, protocol_kwargs

    ecfg = cfg.evaluate
    protocol_args: dict[str, dict] = {}
    for name, args in ecfg.protocol_args.items():
        (new,) = _resolve_names("evaluate.protocol_args", [name])
        if new in protocol_args:
            raise EvaluationError(f"evaluate.protocol_args: {name!r} and {new!r} name the same protocol")
        protocol_args[new] = args
    unknown = [name for name in protocol_args if name not in PROTOCOLS]
    if unknown:
        raise EvaluationError(
            f"evaluate.protocol_args: unknown protocol(s) {unknown} (known: {', '.join(PROTOCOLS.list())})"
        )
    protocols = _resolve_names("evaluate.protocols", list(ecfg.protocols))
    diagnostics = [d for d in _resolve_names("evaluate.diagnostics", list(ecfg.diagnostics)) if d not in protocols]
    plans = []
    for key, names, diagnostic in [("protocols", protocols, False), ("diagnostics", diagnostics, True)]:
        for name in names:
            try:
                info = protocol_info(name)
            except (KeyError, ValueError) as e:
                raise EvaluationError(f"evaluate.{key}: {e}") from None
            args = dict(protocol_args.get(name) or {})
            try:
                kwargs = protocol_kwargs(name, args)
            except ValueError as e:
                raise EvaluationError(f"evaluate.protocol_args: {e}") from None
            plans.append(ProtocolPlan(info, kwargs, args, diagnostic))
    if all(p.info.needs_video for p in plans if not p.diagnostic):
        plans = [p for p in plans if not p.diagnostic]
    return plans


def feature_sources(cfg: Config, checkpoint: str | None, image_size: int | None) -> dict[str, dict]:
    """Feature source name -> its create_features arguments: the checkpoint, then each baseline."""
    from distseg.eval.features import FEATURES

    sources: dict[str, dict] = {}
    if checkpoint:
        ckpt = Path(checkpoint)
        if not (ckpt / "model.pt").is_file():
            raise EvaluationError(f"checkpoint {ckpt}: no model.pt (pass a folder from `distseg pretrain`)")
        sources["checkpoint"] = {"checkpoint": str(ckpt.resolve()), "image_size": image_size}
    baselines = [name for name in FEATURES.list() if not FEATURES.meta(name).get("needs_checkpoint")]
    for base in cfg.evaluate.baselines:
        if base not in baselines:
            raise EvaluationError(f"evaluate.baselines: unknown baseline {base!r} (known: {', '.join(baselines)})")
        sources[base] = {"model_cfg": cfg.model, "image_size": image_size, "seed": cfg.seed}
    if not sources:
        raise EvaluationError("nothing to evaluate: pass --checkpoint and/or --baseline")
    return sources


def open_eval_dataset(cfg: Config, split: str):
    from distseg.data import open_dataset
    from distseg.data.synthetic import scene_options

    source = cfg.evaluate.dataset
    if source.split(":")[0] == "bsds":
        raise EvaluationError("bsds has boundaries, not class labels: score the grouping with `distseg edges eval`")
    kwargs = scene_options(cfg) if source == "synthetic" else {}
    return open_dataset(source, root=cfg.evaluate.root, split=split, limit=cfg.evaluate.limit, **kwargs)


def load_split(cfg: Config, split: str) -> tuple[LabeledSplit, list[str]]:
    dataset = open_eval_dataset(cfg, split)
    names, remap = class_space(dataset)
    ids, images, labels = [], [], []
    for image_id in tqdm(dataset.ids(), desc=f"read {cfg.evaluate.dataset}/{split}", unit="img", leave=False):
        sample = dataset[image_id]
        if sample.labels is None:
            raise EvaluationError(f"{cfg.evaluate.dataset}: image {image_id} has no labels (the protocols need them)")
        ids.append(image_id)
        images.append(sample.image)
        labels.append(remap(sample.labels))
    if not ids:
        raise EvaluationError(f"{cfg.evaluate.dataset}: split {split!r} is empty")
    return LabeledSplit(ids, images, labels), names


def open_video_set(cfg: Config, plan: ProtocolPlan) -> VideoSet:
    """The sequences of a video protocol's dataset (`data` metadata): evaluate.root and eval_split when
    it is evaluate.dataset, else its default location and `val`; at most davis_max_frames per sequence."""
    from distseg.eval.davis import sequence_frame_ids
    from distseg.eval.extract import DataSpec

    ecfg = cfg.evaluate
    source = plan.info.data
    if not source:
        raise EvaluationError(f"protocol {plan.name!r} needs video but names no dataset (register it with data=...)")
    own = ecfg.dataset == source
    spec = DataSpec.resolve(source, ecfg.root if own else None, ecfg.eval_split if own else "val")
    dataset = spec.open()
    if not hasattr(dataset, "sequences"):
        raise EvaluationError(f"protocol {plan.name!r}: data source {source!r} has no video sequences")
    ids = sequence_frame_ids(dataset, ecfg.davis_max_frames)
    if not ids:
        raise EvaluationError(f"protocol {plan.name!r}: {source} split {spec.split!r} has no frames")
    return VideoSet(spec, ids, class_space(dataset)[0])


def concept_dictionary(checkpoint: str) -> np.ndarray:
    """The concepts loss's dictionary (K x D, normalised) saved beside the checkpoint's model."""
    import torch

    path = Path(checkpoint) / "loss.pt"
    if not path.is_file():
        raise EvaluationError(
            f"the concept protocols (purity, segment_purity) need {path} (a checkpoint trained with the concepts loss)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "dictionary" not in state:
        raise EvaluationError(
            f"{path} holds no concept dictionary (was the checkpoint trained with pretrain.method=concepts?)"
        )
    d = state["dictionary"].float()
    return torch.nn.functional.normalize(d, dim=1).numpy()


def mask_checkpoint(checkpoint: str | None, plans: list[ProtocolPlan]) -> str | None:
    """The checkpoint whose saliency head gives the object masks (a protocol's `masks_from`, else the
    evaluated one), checked before any work; None when no protocol needs masks."""
    from distseg.eval.features import load_saliency_head

    needing = [p for p in plans if p.info.needs_saliency]
    if not needing:
        return None
    names = ", ".join(p.name for p in needing)
    chosen = {p.kwargs.get("masks_from") or checkpoint for p in needing}
    if len(chosen) > 1:
        raise EvaluationError(f"{names}: masks_from names different checkpoints {sorted(map(str, chosen))}")
    source = chosen.pop()
    if not source:
        raise EvaluationError(
            f"{names} needs --checkpoint or protocol_args masks_from: the masks are a maskcontrast run's saliency"
        )
    try:
        load_saliency_head(source)
    except ValueError as e:
        raise EvaluationError(f"{names}: {e}") from None
    return str(Path(source).resolve())


def saliency_maps(checkpoint: str, image_size: int | None, evals: LabeledSplit, plugins: list[str]) -> dict:
    """Eval image id -> the checkpoint's saliency probability (1, h, w), one pass of the actor pool."""
    from distseg.eval.extract import extract_all

    maps = extract_all(
        "saliency", {"checkpoint": checkpoint, "image_size": image_size}, evals.images, name="saliency", plugins=plugins
    )
    return dict(zip(evals.ids, maps))


def _summary(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr)), "values": [float(v) for v in arr]}


def run_protocol(
    plan: ProtocolPlan,
    class_names: list[str],
    seed: int,
    train: LabeledSplit | None,
    train_feats,
    evals: LabeledSplit,
    eval_feats,
    num_examples: int,
    extra: dict,
):
    """One protocol on precomputed features: the train split (when it needs it), then the eval split."""
    from distseg.eval.protocols import FeatureSample, create_protocol

    protocol = create_protocol(
        plan.name,
        len(class_names),
        class_names=class_names,
        seed=seed,
        ignore_index=IGNORE_INDEX,
        num_examples=num_examples,
        **extra,
        **plan.kwargs,
    )
    protocol.reset()
    if plan.info.needs_train:
        for image_id, feats, lab in zip(train.ids, train_feats, train.labels):
            protocol.process(FeatureSample(image_id, feats, lab, "train"))
    for image_id, feats, lab in zip(evals.ids, eval_feats, evals.labels):
        protocol.process(FeatureSample(image_id, feats, lab, "eval"))
    return protocol.evaluate()


def run_video_protocol(
    plan: ProtocolPlan,
    video: VideoSet,
    seed: int,
    source: str,
    source_kwargs: dict,
    num_examples: int,
    plugins: list[str],
):
    """A video protocol on its frames, streamed from the actor pool in order: the driver holds no video."""
    from distseg.eval.extract import extract_features
    from distseg.eval.protocols import FeatureSample, create_protocol

    protocol = create_protocol(
        plan.name,
        len(video.class_names),
        class_names=video.class_names,
        seed=seed,
        ignore_index=IGNORE_INDEX,
        num_examples=num_examples,
        **plan.kwargs,
    )
    protocol.reset()
    rows = extract_features(
        source, source_kwargs, ids=video.ids, data=video.spec, name=f"{source} {plan.name} frames", plugins=plugins
    )
    for row in rows:
        protocol.process(FeatureSample(video.ids[row.index], row.features, row.label, "eval"))
    return protocol.evaluate()


def extract_splits(
    source: str, source_kwargs: dict, splits: list[LabeledSplit | None], plugins: list[str]
) -> list[list | None]:
    """The features of every image of the given splits, in one pass of the actor pool."""
    from distseg.eval.extract import extract_all

    images = [image for split in splits if split is not None for image in split.images]
    if not images:
        return [None] * len(splits)
    feats = extract_all(source, source_kwargs, images, name=f"{source} features", plugins=plugins)
    out, start = [], 0
    for split in splits:
        if split is None:
            out.append(None)
        else:
            out.append(feats[start : start + len(split.images)])
            start += len(split.images)
    return out


def evaluate(cfg: Config, checkpoint: str | None, out_dir: str | Path) -> dict:
    """Score the checkpoint (and cfg.evaluate.baselines) with cfg.evaluate.protocols; returns metrics.json's dict."""
    from distseg.cluster import init_ray
    from distseg.eval import report
    from distseg.eval.features import pca_rgb
    from distseg.tracking import start_run

    ecfg = cfg.evaluate
    plans = plan_protocols(cfg)
    # a 320-px DAVIS frame is an 80x45 feature grid on which small objects vanish: davis has its own size
    image_size = ecfg.davis_image_size if ecfg.dataset == "davis" else ecfg.image_size
    sources = feature_sources(cfg, checkpoint, image_size)
    parent, concepts = None, None
    if checkpoint:
        meta_path = Path(checkpoint) / "meta.json"
        parent = json.loads(meta_path.read_text()).get("mlflow_run_id") if meta_path.is_file() else None
        if any(p.info.needs_concepts for p in plans):
            concepts = concept_dictionary(checkpoint)
    masks_from = mask_checkpoint(checkpoint, plans)

    semantic = [p for p in plans if not p.info.needs_video]
    train = evals = None
    class_names: list[str] = []
    if semantic:
        evals, class_names = load_split(cfg, ecfg.eval_split)
        if any(p.info.needs_train for p in semantic):
            train, _ = load_split(cfg, ecfg.train_split)
    videos = {p.name: open_video_set(cfg, p) for p in plans if p.info.needs_video}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plugins = list(getattr(cfg, "plugins", []) or [])
    init_ray(cfg.ray)
    saliency = None
    if masks_from and semantic:
        saliency = saliency_maps(masks_from, image_size, evals, plugins)
    results: dict = {
        "dataset": ecfg.dataset,
        "protocols": [p.name for p in plans if not p.diagnostic],
        "diagnostics": [p.name for p in plans if p.diagnostic],
        "seeds": ecfg.seeds,
        "image_size": image_size,
        "sources": {},
    }
    for source, kwargs in sources.items():
        t0 = time.perf_counter()
        # a concepts protocol runs on the checkpoint only
        active = [p for p in plans if not (p.info.needs_concepts and (source != "checkpoint" or concepts is None))]
        train_feats = eval_feats = None
        if any(not p.info.needs_video for p in active):
            train_feats, eval_feats = extract_splits(source, kwargs, [train, evals], plugins)
        pca = None
        if eval_feats is not None and ecfg.num_examples:
            pca = report.pca_sheet(evals, eval_feats, ecfg.num_examples, pca_rgb)
            report.save_picture(pca, out / f"pca_{source}.png")
        source_metrics: dict[str, dict] = {}
        for plan in active:
            per_seed = []
            for seed in range(ecfg.seeds) if plan.info.stochastic else range(1):
                if plan.info.needs_video:
                    res = run_video_protocol(
                        plan, videos[plan.name], cfg.seed + seed, source, kwargs, ecfg.num_examples, plugins
                    )
                else:
                    extra = {"concepts": concepts} if plan.info.needs_concepts else {}
                    if plan.info.needs_saliency:
                        extra["saliency"] = saliency
                    res = run_protocol(
                        plan,
                        class_names,
                        cfg.seed + seed,
                        train,
                        train_feats,
                        evals,
                        eval_feats,
                        ecfg.num_examples,
                        extra,
                    )
                per_seed.append(res)
            first = per_seed[0]
            metrics = {k: _summary([r.metrics[k] for r in per_seed]) for k in first.metrics}
            source_metrics.update(metrics)
            with start_run(
                cfg,
                run_name=f"eval-{plan.name}-{source}",
                parent_run_id=parent,
                tags={
                    "stage": "evaluate",
                    "protocol": plan.name,
                    "source": source,
                    "diagnostic": str(plan.diagnostic).lower(),
                },
                log_config=False,
            ) as tracker:
                tracker.log_params(
                    {
                        "protocol": plan.name,
                        "source": source,
                        "dataset": ecfg.dataset,
                        "seeds": len(per_seed),
                        "diagnostic": plan.diagnostic,
                        "image_size": image_size,
                        "checkpoint": checkpoint or "",
                        **{f"arg.{k}": v for k, v in plan.args.items()},
                    }
                )
                tracker.log_metrics({k: v["mean"] for k, v in metrics.items()})
                tracker.log_metrics({f"{k}_std": v["std"] for k, v in metrics.items()})
                split = None if plan.info.needs_video else evals
                report.log_protocol(tracker, plan.name, first, split, class_names, ecfg.num_examples)
                if pca is not None and split is not None:
                    tracker.log_image(pca, "embedding_pca.png")  # once per source: its first run on the eval split
                    pca = None
        results["sources"][source] = {"metrics": source_metrics, "seconds": time.perf_counter() - t0}
        train_feats = eval_feats = None  # before the next source's features arrive
        # after every source: a later source's failure keeps the finished ones' numbers
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def headline(protocol: str, metrics: dict) -> tuple[str, dict | None]:
    """The number a protocol is judged by (its registered `headline`: mIoU, J&F for DAVIS, ...) from a
    source's metrics: (metric name, its {mean, std, values} or None)."""
    from distseg.eval.protocols import PROTOCOLS

    name = (PROTOCOLS.meta(protocol).get("headline") if protocol in PROTOCOLS else None) or "miou"
    return name, metrics.get(f"{protocol}/{name}")
