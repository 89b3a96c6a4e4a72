"""Typed configs for every stage, loaded from shipped YAML by name or from a path, with dotted overrides.

    cfg = load_config("demo", ["pretrain.steps=200", "hierarchy.max_regions=30"])

Unknown keys and bad values raise `ConfigError` naming the dotted key, the value and what is allowed.
A YAML file may start from another with `_base_: NAME_OR_PATH` (relative paths resolve beside it).

The stage sections (data, mine, pretrain, evaluate, ...) are defined here. Components contribute their
own sections: each registered method's params model is `losses.<method>`, each prior with settings
has `priors.<prior>` (see `config_model`), and the model's section is `distseg.models.ModelConfig`. A
config may name `plugins`: Python modules or .py files imported before validation (here and in every
Ray worker), so a user's own method, prior, protocol or dataset registers without editing distseg.
The registry names of the training side (method, priors, edge detector, backbone) are checked when the
config is built, before any stage starts Ray; evaluation protocols, their arguments and baselines are
checked by `distseg.eval.evaluate` before it reads data or starts Ray.
"""

from __future__ import annotations

import types
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from distseg.core.constants import IMAGE_EXTENSIONS
from distseg.core.registry import Registry
from distseg.core.section import Section
from distseg.distill.config import DistillConfig
from distseg.models.config import ModelConfig


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


class DataConfig(Section):
    source: str = Field(
        "synthetic",
        description="synthetic | bsds | msrc | davis | folder:PATH | labeled:PATH | voc:PATH | coco:PATH",
    )
    root: str | None = Field(
        None,
        description="root of the source `mine --input SOURCE` and the demo read; default: $DISTSEG_DATA_ROOT "
        "or ../shared/data/<name>",
    )
    split: str = Field("train", description="split `mine --input SOURCE` reads (train, val, test, all; per dataset)")
    num_images: int = Field(64, ge=1, description="synthetic only: number of scenes")
    image_size: int = Field(128, ge=16, le=4096, description="synthetic only: side of the square scenes")
    palette: str = Field(
        "class",
        pattern="^(class|shared)$",
        description="synthetic only: class (each class its own hue range) | shared (one colour distribution "
        "for all classes: only shape and texture tell them apart)",
    )
    limit: int | None = Field(None, ge=1, description="mine only the first N images of the input (sorted by id)")


class EdgesConfig(Section):
    detector: str = Field("learned", description="edge detector by registry name: learned | gradient | sed")
    weights: str | None = Field(
        None, description="learned: weights file (default: the shipped ones); sed: model.yml.gz"
    )
    scales: list[float] = Field([1.0], min_length=1, description="multi-scale inference: image scale factors")
    spectral: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of gPb's spectral globalisation mixed into the edges (0: local edges only; "
        "Zhang & Maire's regions use SE edges plus the spectral signal; distseg.grouping.spectral)",
    )


class HierarchyConfig(Section):
    max_regions: int = Field(40, ge=1, le=255, description="cut the region tree to at most this many leaf regions")


class EdgeTrainConfig(Section):
    """`distseg edges train`: the learned edge network on BSDS500 (human boundaries as supervision)."""

    root: str | None = Field(
        None,
        description="BSDS500 root (images/, groundTruth/); default: $DISTSEG_DATA_ROOT/bsds500",
    )
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
    max_failures: int = Field(
        2, ge=0, description="worker failures to recover from (restarts from the last checkpoint)"
    )


class MineConfig(Section):
    """`distseg mine`: which priors run and how shards are written."""

    priors: list[str] = Field(
        ["ucm"], description="priors by registry name: ucm, felzenszwalb, slic, saliency, felzenszwalb_masks, vit_masks"
    )
    max_side: int | None = Field(512, ge=8, description="resize images so the longer side is at most this (null: keep)")
    image_format: str = Field("jpeg", pattern="^(jpeg|png)$", description="how the image is stored in the shard")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the stored image")
    batch_size: int = Field(8, ge=1, description="images per actor call")
    num_actors: int | None = Field(
        None,
        ge=1,
        description="actor pool size (default: the cluster's available CPUs, at most one actor per 8 images)",
    )
    rows_per_shard: int = Field(256, ge=1, description="images per Parquet shard (at least; the last may be smaller)")
    retry_errors: bool = Field(False, description="on a rerun, retry images in the errors table")
    max_restarts: int = Field(10, ge=0, description="restarts of a worker whose process dies (native crash); bounded")
    crash_limit: int = Field(
        2, ge=1, description="an image that killed its worker this many times goes to the errors table"
    )
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), min_length=1, description="image file extensions")


class PretrainConfig(Section):
    """`distseg pretrain`: pixel embeddings from grouping shards with Ray Train."""

    method: str = Field(
        "hiergroup", description="method by registry name (distseg.methods): hiergroup | concepts | maskcontrast"
    )
    prior: str = Field("ucm", description="the shard prior column giving the segments (saliency for maskcontrast)")
    shards: str | None = Field(
        None,
        description="shards folder (mine's output): a path or an s3:// gs:// file:// URI; none: mine the synthetic set",
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train's run folders and checkpoints: a path or an s3:// gs:// file:// URI that every node "
        "can reach (default <workdir>/ray_results)",
    )
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="images per step per worker (two views each)")
    crop: int = Field(224, ge=32, description="side of the square random-resized crops")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="area range of the random resized crop")
    color_jitter: float = Field(
        0.4,
        ge=0,
        description="brightness/contrast/saturation jitter (hue: a quarter of it), applied with p 0.8 and followed "
        "by RandomGrayscale p 0.2 (MoCo v2's photometric set; 0 turns both off; SimCLR's strength: 0.8)",
    )
    blur: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability of SimCLR's Gaussian blur on each view's image (kernel a tenth of the crop, "
        "sigma 0.1-2; He et al. use SimCLR's augmentations, blur included: concepts.yaml sets 0.5, SimCLR's, "
        "with its crops and jitter)",
    )
    vertical_flip: bool = Field(
        False,
        description="also flip each view upside down at random (for data with no up, as the synthetic scenes; "
        "without it a network can learn the row, as the horizontal flip keeps it from learning the column)",
    )
    max_regions: int = Field(64, ge=1, le=256, description="d_T padding size; images with more regions are an error")
    optimizer: str = Field("adam", pattern="^(adam|sgd)$", description="adam | sgd")
    lr: float = Field(1e-2, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    schedule: str = Field("step", pattern="^(step|poly|cosine|constant)$", description="learning-rate schedule")
    step_milestones: list[float] = Field(
        [0.6, 0.85], description="step schedule: fractions of the run where lr *= gamma"
    )
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    poly_power: float = Field(0.9, gt=0, description="poly schedule: lr * (1 - t/T)^power")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and torch threads) per worker")
    use_gpu: bool = Field(False, description="one GPU per worker (AMP and channels_last on)")
    deterministic: bool | None = Field(
        None,
        description="torch's deterministic algorithms (a rerun with the same seed trains the same weights; on "
        "CPU the backward of the losses' pixel gathers otherwise sums in thread order); null: on for CPU "
        "workers, off on GPU (its cost there is not measured)",
    )
    fit_cluster: bool = Field(
        True,
        description="lower cpus_per_worker when the cluster cannot give workers + 1 ingest CPU (false: stop instead)",
    )
    shuffle_buffer: int = Field(
        256,
        ge=0,
        description="rows mixed by each worker's local shuffle buffer (0: shard order; files are always shuffled)",
    )
    ingest: str = Field(
        "ray_data",
        pattern="^(ray_data|memory)$",
        description="ray_data streaming | memory: cache the first memory_batches batches and cycle them "
        "(the ingest-free baseline of jobs/benchmark_training.py, not for training)",
    )
    memory_batches: int = Field(8, ge=1, description="batches cached and cycled when ingest=memory")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    num_to_keep: int | None = Field(3, ge=1, description="checkpoints kept (null: all)")
    max_failures: int = Field(3, ge=0, description="worker failures to recover from (resume from the last checkpoint)")
    probe_every: int = Field(
        0,
        ge=0,
        description="steps between in-loop probes on held-out images (0: off; `distseg tune` stops on it)",
    )
    probe_protocol: str = Field(
        "dataset_kmeans",
        description="the evaluation protocol the probe runs (its headline is reported as probe_score), or "
        "prior_agreement: label-free, ARI of per-image embedding clusters vs pretrain.prior's regions on probe_data",
    )
    probe_images: int = Field(
        24,
        ge=2,
        description="probe images, the first N of evaluate.dataset's evaluate.train_split (never the eval split); "
        "prior_agreement: the first N of probe_data not in the training shards",
    )
    probe_data: str | None = Field(
        None,
        description="prior_agreement only: held-out images the training does not see, folder:PATH (or labeled:PATH, "
        "voc:PATH, coco:PATH; labels never read); images in the training shards are dropped",
    )
    probe_segments: int | None = Field(
        None, ge=2, description="prior_agreement only: k-means clusters per image (null: the image's prior regions)"
    )


class EvaluateConfig(Section):
    """`distseg evaluate`: protocols on frozen embeddings of a checkpoint and of baselines."""

    dataset: str = Field(
        "synthetic", description="msrc | davis | synthetic | labeled:PATH | voc:PATH | coco:PATH (labels needed)"
    )
    root: str | None = Field(None, description="dataset root (default: $DISTSEG_DATA_ROOT or ../shared/data/<name>)")
    protocols: list[str] = Field(
        ["linear", "dataset_kmeans", "knn", "retrieval"],
        min_length=1,
        description="linear, deeplab, dataset_kmeans (old name kmeans), object_kmeans, knn, retrieval, davis, "
        "davis_zm, purity, segment_purity, position",
    )
    diagnostics: list[str] = Field(
        ["position"],
        description="protocols also run for every source (position: the position-leak check); [] turns them off",
    )
    train_split: str = Field("train", description="split whose features train the probe / give kNN prototypes")
    eval_split: str = Field("val", description="split that is scored")
    limit: int | None = Field(None, ge=1, description="only the first N images of each split (quick runs)")
    image_size: int | None = Field(
        320, ge=16, description="resize so the longer side is this before extracting features"
    )
    seeds: int = Field(1, ge=1, description="rerun the stochastic protocols with this many seeds (mean +- std)")
    baselines: list[str] = Field([], description="also score these feature sources: random, rgbxy")
    num_examples: int = Field(4, ge=0, description="example pictures (PCA, segmentations) logged per source")
    protocol_args: dict[str, dict] = Field(
        {}, description="extra keyword arguments per protocol, e.g. {linear: {head: aspp}}"
    )
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
    """The whole config. `priors` and `losses` are filled in by `config_model()` from the registries."""

    plugins: list[str] = Field([], description="modules or .py files to import first (they register components)")
    name: str = Field("run", description="run name (MLflow run, output subfolders)")
    workdir: str = Field("outputs", description="where outputs, mlflow.db and mlartifacts go")
    seed: int = Field(0, description="global random seed")
    data: DataConfig = DataConfig()
    edges: EdgesConfig = EdgesConfig()
    hierarchy: HierarchyConfig = HierarchyConfig()
    priors: Section = Section()
    mine: MineConfig = MineConfig()
    edge_train: EdgeTrainConfig = EdgeTrainConfig()
    model: ModelConfig = ModelConfig()
    losses: Section = Section()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distill: DistillConfig = DistillConfig()  # MaskDistill part 2 (distseg.distill.config)
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_names(self) -> Config:
        """Every component name the config uses exists (a typo fails here, before Ray or mining starts).

        Evaluation protocols, their arguments and baselines are checked by `distseg.eval.evaluate`
        first thing, before it reads data or starts Ray (the eval registries are heavy to import)."""
        checks = [
            ("pretrain.method", [self.pretrain.method], _registry("methods")),
            ("pretrain.prior", [self.pretrain.prior], _registry("priors")),
            ("mine.priors", self.mine.priors, _registry("priors")),
            ("edges.detector", [self.edges.detector], _registry("edges")),
        ]
        if not self.model.backbone.startswith("timm:"):
            checks.append(("model.backbone", [self.model.backbone], _registry("backbones")))
        for key, names, registry in checks:
            for name in names:
                if name not in registry:
                    known = ", ".join(sorted(registry))
                    raise ValueError(f"{key}: unknown name {name!r} (known: {known})")
        return self


CONFIG_PACKAGE = "distseg.configs"

# keys renamed since they were first released: "data" meant four things (a shards folder, a dataset name,
# the BSDS root, the built-in source). Configs, checkpoints and overrides with the old names still load,
# with a warning that names the new key.
RENAMED_KEYS = {
    "pretrain.data": "pretrain.shards",
    "evaluate.data": "evaluate.dataset",
    "edge_train.data": "edge_train.root",
}


def migrate_keys(data: dict, where: str) -> dict:
    """`data` with the keys of RENAMED_KEYS moved to their new names, and one warning naming them (a key
    given under both names is an error)."""
    moved = []
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        node = data.get(section)
        if not isinstance(node, dict) or old_key not in node:
            continue
        new_key = new.split(".")[1]
        if new_key in node:
            raise ConfigError(f"config {where}: {old!r} and {new!r} are the same key (renamed); keep {new!r}")
        moved.append(f"{old} -> {new}")
        data = {**data, section: {(new_key if k == old_key else k): v for k, v in node.items()}}
    if moved:
        warnings.warn(
            f"config {where}: renamed keys read under their new names ({', '.join(moved)})", FutureWarning, stacklevel=2
        )
    return data


# registry name -> (module, attribute); imported on first use so `distseg --help` stays fast. None of
# these modules imports distseg.config, so the import graph has no cycle.
_REGISTRIES = {
    "methods": ("distseg.methods", "METHODS"),
    "priors": ("distseg.grouping.priors", "PRIORS"),
    "edges": ("distseg.grouping.edges", "EDGE_DETECTORS"),
    "backbones": ("distseg.models", "BACKBONES"),  # the package's name: every backbone registered, ViTs included
}
_MODELS: dict[tuple, type[Config]] = {}


def _registry(kind: str) -> Registry:
    import importlib

    module, attr = _REGISTRIES[kind]
    return getattr(importlib.import_module(module), attr)


def _params_section(title: str, registry: Registry, doc: str) -> type[Section]:
    fields = {}
    for name in registry.list():
        params = registry.params(name)
        if params is not None:
            fields[name] = (
                params,
                Field(default_factory=params, description=f"settings of the {registry.kind} {name!r}"),
            )
    return create_model(title, __base__=Section, __doc__=doc, **fields)


def config_model() -> type[Config]:
    """The Config class for the components registered now: `priors.<name>` and `losses.<method>` come
    from the params models of the registered priors and methods (rebuilt when a registration changes)."""
    priors, methods = _registry("priors"), _registry("methods")
    key = tuple((r.kind, n, id(r.params(n))) for r in (priors, methods) for n in r.list())
    if key not in _MODELS:
        _MODELS[key] = create_model(
            "Config",
            __base__=Config,
            priors=(
                section := _params_section("PriorsConfig", priors, "Settings per prior."),
                Field(default_factory=section),
            ),
            losses=(
                section := _params_section("LossesConfig", methods, "Settings per method."),
                Field(default_factory=section),
            ),
        )
    return _MODELS[key]


def import_plugins(plugins: list[str]) -> list[str]:
    """Import each plugin (a module name, or a .py file path) once, so its registrations take effect.

    Returns the list with file paths made absolute: Ray workers run in another working directory."""
    import hashlib
    import importlib
    import importlib.util
    import sys

    resolved = []
    for plugin in plugins:
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(f"plugins: each entry is a module name or a .py path, got {plugin!r}")
        if plugin.endswith(".py"):
            path = Path(plugin).resolve()
            resolved.append(str(path))
            digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
            name = f"distseg_plugin_{path.stem}_{digest}"  # the same in every process
            if name in sys.modules:
                continue
            if not path.is_file():
                raise ConfigError(f"plugins: file not found: {plugin}")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ConfigError(f"plugins: importing {plugin} failed: {type(e).__name__}: {e}") from e
        else:
            resolved.append(plugin)
            try:
                importlib.import_module(plugin)
            except ImportError as e:
                raise ConfigError(f"plugins: cannot import module {plugin!r}: {e}") from e
    return resolved


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
    data = migrate_keys(data, where)
    base = data.pop("_base_", None)
    if isinstance(data.get("plugins"), list) and Path(where).exists():  # plugin files resolve beside the YAML
        here = Path(where).parent
        data["plugins"] = [
            str(here / p)
            if isinstance(p, str) and p.endswith(".py") and not Path(p).is_absolute() and (here / p).is_file()
            else p
            for p in data["plugins"]
        ]
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {where}: _base_ must be a config name or path, got {base!r}")
    if Path(where).exists() and not Path(base).is_absolute() and (Path(where).parent / base).exists():
        base = str(Path(where).parent / base)
    return _merge(_read_yaml(base, seen + (where,)), data)


def _locate(name_or_path: str | Path) -> tuple[str, str]:
    """A config's text and where it came from: a YAML file (a .yaml/.yml path, or any existing file), else
    the shipped config of that name. A folder of the same name (`distseg demo workdir=demo` leaves a
    `demo/` in the working directory) does not hide a shipped config."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.read_text(), str(path)
    shipped = resources.files(CONFIG_PACKAGE) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text(), f"{name_or_path} (shipped)"
    if path.is_dir():
        raise ConfigError(f"config {str(name_or_path)!r} is a folder, not a YAML file or a shipped config")
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
                f"unknown config key {dotted!r}: {part!r} is not a key of {where} (allowed: {', '.join(fields)})"
            )
        inner = _section_type(fields[part].annotation)
        if inner is None:
            if i != len(parts) - 1:
                raise ConfigError(
                    f"unknown config key {dotted!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section"
                )
            return
        model = inner
    raise ConfigError(f"config key {dotted!r} is a section; set one of its keys ({', '.join(model.model_fields)})")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', value parsed as YAML: 1 -> int, [1,2] -> list, null -> None, abc -> str)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (for example pretrain.steps=200)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str], model: type[BaseModel] | None = None) -> dict:
    data = _merge({}, data)
    for text in overrides:  # plugins first: they may add the sections other overrides name
        key, value = parse_override(text)
        if key == "plugins":
            import_plugins(value if isinstance(value, list) else [value])
    model = model or config_model()
    for text in overrides:
        key, value = parse_override(text)
        if key in RENAMED_KEYS:
            warnings.warn(
                f"override {text!r}: config key {key!r} is now {RENAMED_KEYS[key]!r}", FutureWarning, stacklevel=2
            )
            key = RENAMED_KEYS[key]
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
        if not key:  # a whole-config check (registry names): its message names the key
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        elif e["type"] == "extra_forbidden":
            parent = config_model()
            for part in e["loc"][:-1]:
                parent = _section_type(parent.model_fields[str(part)].annotation) or parent
            lines.append(f"unknown config key {key!r} (allowed: {', '.join(parent.model_fields)})")
        else:
            lines.append(f"bad value for config key {key!r}: {e.get('input')!r}: {e['msg']}")
    return f"config {source}: " + "; ".join(lines)


def build_config(data: dict, source: str = "<dict>") -> Config:
    if isinstance(data, dict):
        data = migrate_keys(data, source)
    if isinstance(data, dict) and data.get("plugins"):
        plugins = data["plugins"]
        data = {**data, "plugins": import_plugins(plugins if isinstance(plugins, list) else [plugins])}
    try:
        return config_model().model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def load_config(name_or_path: str | Path = "demo", overrides: list[str] | None = None) -> Config:
    """Load a shipped config by name or a YAML file by path, then apply dotted overrides."""
    data = _read_yaml(name_or_path)
    if isinstance(data.get("plugins"), list):
        data["plugins"] = import_plugins(data["plugins"])
    data = apply_overrides(data, list(overrides or []))
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
