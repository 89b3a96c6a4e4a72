"""Typed configs for every stage, loaded from shipped YAML by name or from a path, with dotted overrides.

    cfg = load_config("demo", ["train.steps=200", "hierarchy.max_regions=30"])

Unknown keys and bad values raise `ConfigError` naming the dotted key, the value and what is allowed.
A YAML file may start from another with `_base_: NAME_OR_PATH` (relative paths resolve beside it).
"""

from __future__ import annotations

import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = Field(
        "synthetic",
        description="synthetic | bsds | msrc | davis | folder:PATH (an image folder, recursive)",
    )
    root: str | None = Field(None, description="dataset root; default: $DISTSEG_DATA_ROOT or ../shared/data/<name>")
    split: str = Field("train", description="dataset split (train, val, test, all; per dataset)")
    num_images: int = Field(64, ge=1, description="synthetic only: number of scenes")
    image_size: int = Field(128, ge=16, le=4096, description="synthetic only: side of the square scenes")
    limit: int | None = Field(None, ge=1, description="use only the first N images")


class EdgesConfig(Section):
    detector: str = Field("learned", description="edge detector by registry name: learned | gradient | sed")
    weights: str | None = Field(None, description="learned: weights file (default: the shipped ones); sed: model.yml.gz")
    scales: list[float] = Field([1.0], min_length=1, description="multi-scale inference: image scale factors")


class HierarchyConfig(Section):
    max_regions: int = Field(40, ge=1, le=255, description="cut the region tree to at most this many leaf regions")


class EdgeTrainConfig(Section):
    """`distseg edges train`: the learned edge network on BSDS500 (human boundaries as supervision)."""

    data: str = Field("../shared/data/bsds500", description="BSDS500 root (images/, groundTruth/)")
    splits: list[str] = Field(["train", "val"], min_length=1, description="BSDS splits to train on")
    steps: int = Field(6000, ge=1, description="optimizer steps (all workers together)")
    batch_size: int = Field(8, ge=1, description="crops per step per worker")
    crop: int = Field(160, ge=32, description="side of the square training crops")
    scale_range: tuple[float, float] = Field((0.7, 1.3), description="random rescaling range (augmentation)")
    width: int = Field(16, ge=4, description="channels of the first stage (x2 per stage)")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate (cosine decay to 1% over the run)")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay")
    consensus_threshold: float = Field(0.3, gt=0, le=1, description="fraction of annotators that makes a positive")
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    cpus_per_worker: int = Field(2, ge=1, description="CPUs (and torch threads) per worker")
    use_gpu: bool = Field(False, description="one GPU per worker (AMP on)")
    log_every: int = Field(50, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (all kept: an ODS-vs-time curve)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (restarts from the last checkpoint)")


class FelzenszwalbConfig(Section):
    sigma: float = Field(0.8, ge=0, description="Gaussian smoothing before segmentation")
    k: float = Field(300.0, gt=0, description="scale: larger k -> larger segments")
    min_size: int = Field(50, ge=1, description="minimum segment size in pixels")
    max_regions: int = Field(200, ge=2, le=255, description="bound on segments: min_size >= area / max_regions")


class SlicConfig(Section):
    num_regions: int = Field(100, ge=2, le=255, description="target number of superpixels")
    ruler: float = Field(10.0, gt=0, description="SLICO smoothness")
    iterations: int = Field(10, ge=1, description="SLIC iterations")


class SaliencyConfig(Section):
    method: str = Field("spectral_residual", pattern="^(spectral_residual|fine_grained)$", description="OpenCV static saliency")
    min_component: float = Field(0.01, ge=0, lt=1, description="drop foreground components below this fraction of the image")
    min_area: float = Field(0.02, ge=0, lt=1, description="no mask when the foreground covers less than this fraction")


class PriorsConfig(Section):
    felzenszwalb: FelzenszwalbConfig = FelzenszwalbConfig()
    slic: SlicConfig = SlicConfig()
    saliency: SaliencyConfig = SaliencyConfig()


class MineConfig(Section):
    """`distseg mine`: which priors run and how shards are written."""

    priors: list[str] = Field(["ucm"], description="priors by registry name: ucm, felzenszwalb, slic, saliency")
    max_side: int | None = Field(512, ge=8, description="resize images so the longer side is at most this (null: keep)")
    image_format: str = Field("jpeg", pattern="^(jpeg|png)$", description="how the image is stored in the shard")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the stored image")
    batch_size: int = Field(8, ge=1, description="images per actor call")
    num_actors: int | None = Field(None, ge=1, description="actor pool size (default: the cluster's CPUs)")
    rows_per_shard: int = Field(256, ge=1, description="images per Parquet shard (at least; the last may be smaller)")
    retry_errors: bool = Field(False, description="on a rerun, retry images in the errors table")
    max_restarts: int = Field(10, ge=0, description="restarts of a worker whose process dies (native crash); bounded")
    crash_limit: int = Field(2, ge=1, description="an image that killed its worker this many times goes to the errors table")
    extensions: list[str] = Field(
        ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"], min_length=1, description="image file extensions"
    )


class ModelConfig(Section):
    """The hypercolumn embedding network (Zhang & Maire): backbone Res3 + Res4 -> D-dim unit vectors."""

    backbone: str = Field("resnet18", description="resnet18 | resnet34 | resnet50 | resnet101 | timm:<model name>")
    embed_dim: int = Field(32, ge=2, description="embedding dimension D")
    head_channels: int = Field(256, ge=8, description="channels of each Res3/Res4 projection")
    weights: str | None = Field(None, description="backbone init: a local state-dict file (default: random init)")
    init_from: str | None = Field(
        None, description="whole-network init: a distseg checkpoint folder (or its model.pt) of the same architecture"
    )


class HiergroupLoss(Section):
    sigma_p: float = Field(0.8, gt=0, description="temperature of the positive-sampling probability (Eq. 2)")
    temperature: float = Field(0.3, gt=0, description="contrastive temperature (Eq. 1)")
    regions_per_image: int = Field(7, ge=1, description="anchor regions sampled per image")
    num_pos: int = Field(10, ge=1, description="positives per anchor pixel")
    num_neg: int = Field(5, ge=1, description="negatives per anchor pixel (within the image)")
    cns: int = Field(5, ge=0, description="cross-image negatives per anchor pixel")


class ConceptsLoss(Section):
    kappa: float = Field(10.0, gt=0, description="concentration of the pixel-to-segment contrast L_s")
    num_concepts: int = Field(512, ge=2, description="concept dictionary size K")
    beta: float = Field(0.5, ge=0, description="VQ commitment weight")
    lambda_s: float = Field(1.0, ge=0, description="weight of L_s")
    lambda_v: float = Field(2.0, ge=0, description="weight of L_v")
    lambda_c: float = Field(1.0, ge=0, description="weight of L_c")
    bank_batches: int = Field(2, ge=0, description="memory bank: segment embeddings of this many past batches")


class MaskContrastLoss(Section):
    temperature: float = Field(0.5, gt=0, description="contrastive temperature tau")
    queue_size: int = Field(128, ge=1, description="queue of past mask prototypes K")
    momentum: float = Field(0.999, ge=0, lt=1, description="momentum m of the key encoder")
    saliency_weight: float = Field(1.0, ge=0, description="weight of the saliency head's balanced BCE (0: contrast only)")


class LossesConfig(Section):
    hiergroup: HiergroupLoss = HiergroupLoss()
    concepts: ConceptsLoss = ConceptsLoss()
    maskcontrast: MaskContrastLoss = MaskContrastLoss()


class PretrainConfig(Section):
    """`distseg pretrain`: pixel embeddings from grouping shards with Ray Train."""

    method: str = Field("hiergroup", description="loss by registry name: hiergroup | concepts | maskcontrast")
    prior: str = Field("ucm", description="the shard prior column giving the segments (saliency for maskcontrast)")
    data: str | None = Field(None, description="shards folder (mine's output); none: mine the synthetic set first")
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="images per step per worker (two views each)")
    crop: int = Field(224, ge=32, description="side of the square random-resized crops")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="area range of the random resized crop")
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation jitter (hue: a quarter of it)")
    max_regions: int = Field(64, ge=1, le=256, description="d_T padding size; images with more regions are an error")
    optimizer: str = Field("adam", pattern="^(adam|sgd)$", description="adam | sgd")
    lr: float = Field(1e-2, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    schedule: str = Field("step", pattern="^(step|poly|cosine|constant)$", description="learning-rate schedule")
    step_milestones: list[float] = Field([0.6, 0.85], description="step schedule: fractions of the run where lr *= gamma")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    poly_power: float = Field(0.9, gt=0, description="poly schedule: lr * (1 - t/T)^power")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker")
    use_gpu: bool = Field(False, description="one GPU per worker (AMP and channels_last on)")
    shuffle_buffer: int = Field(
        256, ge=0, description="rows mixed by each worker's local shuffle buffer (0: shard order; files are always shuffled)"
    )
    ingest: str = Field("ray_data", pattern="^(ray_data|memory)$", description="ray_data streaming | memory (benchmark baseline)")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    num_to_keep: int | None = Field(3, ge=1, description="checkpoints kept (null: all)")
    max_failures: int = Field(3, ge=0, description="worker failures to recover from (resume from the last checkpoint)")


class EvaluateConfig(Section):
    """`distseg evaluate`: protocols on frozen embeddings of a checkpoint and of baselines."""

    data: str = Field("synthetic", description="msrc | davis | synthetic | folder:PATH (labels needed except for davis)")
    root: str | None = Field(None, description="dataset root (default: $DISTSEG_DATA_ROOT or ../shared/data/<name>)")
    protocols: list[str] = Field(["linear", "kmeans", "knn", "retrieval"], min_length=1,
                                 description="linear, kmeans, knn, retrieval, davis, purity")  # fmt: skip
    train_split: str = Field("train", description="split whose features train the probe / give kNN prototypes")
    eval_split: str = Field("val", description="split that is scored")
    limit: int | None = Field(None, ge=1, description="only the first N images of each split (quick runs)")
    image_size: int | None = Field(320, ge=16, description="resize so the longer side is this before extracting features")
    seeds: int = Field(1, ge=1, description="rerun the stochastic protocols with this many seeds (mean +- std)")
    baselines: list[str] = Field([], description="also score these feature sources: random, rgbxy")
    num_examples: int = Field(4, ge=0, description="example pictures (PCA, segmentations) logged per source")
    protocol_args: dict[str, dict] = Field({}, description="extra keyword arguments per protocol, e.g. {linear: {head: aspp}}")
    davis_max_frames: int | None = Field(None, ge=2, description="davis: only the first N frames of each sequence")
    davis_image_size: int | None = Field(
        480, ge=16, description="davis: longer side of the frames before extracting features (null: native 854)"
    )


class TrackingConfig(Section):
    experiment: str = Field("distseg", description="MLflow experiment name")
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite in workdir")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; default $RAY_ADDRESS or a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (ignored with an address)")


class Config(Section):
    name: str = Field("run", description="run name (MLflow run, output subfolders)")
    workdir: str = Field("outputs", description="where outputs, mlflow.db and mlartifacts go")
    seed: int = Field(0, description="global random seed")
    data: DataConfig = DataConfig()
    edges: EdgesConfig = EdgesConfig()
    hierarchy: HierarchyConfig = HierarchyConfig()
    priors: PriorsConfig = PriorsConfig()
    mine: MineConfig = MineConfig()
    edge_train: EdgeTrainConfig = EdgeTrainConfig()
    model: ModelConfig = ModelConfig()
    losses: LossesConfig = LossesConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()


CONFIG_PACKAGE = "distseg.configs"


def shipped_configs() -> list[str]:
    """Names of the configs that ship inside the package."""
    folder = resources.files(CONFIG_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    text, where = _locate(name_or_path)
    if where in seen:
        raise ConfigError(f"config {where}: _base_ cycle ({' -> '.join(seen + (where,))})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {where}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {where}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {where}: _base_ must be a config name or path, got {base!r}")
    if Path(where).exists() and not Path(base).is_absolute() and (Path(where).parent / base).exists():
        base = str(Path(where).parent / base)
    return _merge(_read_yaml(base, seen + (where,)), data)


def _locate(name_or_path: str | Path) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.read_text(), str(path)
    shipped = resources.files(CONFIG_PACKAGE) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text(), f"{name_or_path} (shipped)"
    raise ConfigError(
        f"unknown config {str(name_or_path)!r}: not a file and not a shipped config "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (X, X | None), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _check_key(model: type[BaseModel], dotted: str) -> None:
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown config key {dotted!r}: {part!r} is not a key of {where} "
                f"(allowed: {', '.join(fields)})"
            )
        inner = _section_type(fields[part].annotation)
        if inner is None:
            if i != len(parts) - 1:
                raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            return
        model = inner
    raise ConfigError(f"config key {dotted!r} is a section; set one of its keys ({', '.join(model.model_fields)})")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', value parsed as YAML: 1 -> int, [1,2] -> list, null -> None, abc -> str)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (for example train.steps=200)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str], model: type[BaseModel] = Config) -> dict:
    data = _merge({}, data)
    for text in overrides:
        key, value = parse_override(text)
        _check_key(model, key)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return data


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = Config
            for part in e["loc"][:-1]:
                parent = _section_type(parent.model_fields[str(part)].annotation) or parent
            lines.append(f"unknown config key {key!r} (allowed: {', '.join(parent.model_fields)})")
        else:
            lines.append(f"bad value for config key {key!r}: {e.get('input')!r}: {e['msg']}")
    return f"config {source}: " + "; ".join(lines)


def build_config(data: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def load_config(name_or_path: str | Path = "demo", overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name or a YAML file by path, then apply dotted overrides."""
    data = apply_overrides(_read_yaml(name_or_path), list(overrides or []))
    return build_config(data, str(name_or_path))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the shape MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out

