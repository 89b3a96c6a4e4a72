"""The evaluator contract every protocol implements, its registry, and the array helpers they share.

A protocol is a class registered in :data:`PROTOCOLS` whose instances follow detectron2's
``DatasetEvaluator``: ``reset()``, ``process(FeatureSample)`` for every sample, then
``evaluate() -> EvalResult``. Its registry entry declares what `distseg evaluate` must give it:

==================  ===========================================================================
``headline``        the metric it is judged by (``miou``, ``purity``, ``JF_mean``); required (the
                    ``register_protocol`` decorator defaults it to ``miou``)
``params``          pydantic model of its ``evaluate.protocol_args.<name>`` (extra keys refused)
``needs_train``     also feed it the train split (the eval split is always fed)
``stochastic``      rerun it with ``evaluate.seeds`` seeds and report mean +- std
``needs_concepts``  runs on the checkpoint only, built with ``concepts=`` (its concept dictionary)
``needs_saliency``  built with ``saliency=`` (image id -> object probability map, from the
                    checkpoint's saliency head), the same maps for the checkpoint and every baseline
``needs_video``     fed the frames of ``data``'s video sequences in temporal order, one sequence
                    after another, instead of the labelled eval split
``summary``         further metrics printed beside the headline in the summary lines (e.g.
                    ``position``'s ``cos_gap``)
==================  ===========================================================================

``EvalResult.metrics`` keys are ``<protocol name>/<metric>``; the headline is one of them.

:data:`PROTOCOL_ALIASES` maps retired protocol names to their new ones. Only configs and the command
line accept an alias (`distseg evaluate` resolves it, with a warning, and reports under the new name);
the registry, :func:`create_protocol` and the metric keys know only the new name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ValidationError

from distseg.core.constants import IGNORE_INDEX
from distseg.core.registry import Registry
from distseg.core.section import Section
from distseg.eval.metrics import ConfusionMatrix

Split = Literal["train", "eval"]

PROTOCOLS: Registry[type] = Registry("protocol")

# retired name -> current name; accepted in evaluate.protocols / diagnostics / protocol_args only
PROTOCOL_ALIASES: dict[str, str] = {
    # dataset-level pixel k-means + Hungarian was called "kmeans", which read as He et al.'s k-means
    # protocol (that one is `knn`); see distseg/eval/protocols/kmeans.py
    "kmeans": "dataset_kmeans",
}


def resolve_protocol_name(name: str) -> str:
    """``name``, or the current name of a retired one (:data:`PROTOCOL_ALIASES`)."""
    return PROTOCOL_ALIASES.get(name, name)


@dataclass
class FeatureSample:
    """Frozen features of one image: ``features (D, h, w)`` float32, ``label (H, W)`` int64 with
    ``ignore_index`` for unlabelled pixels (or ``None``), ``split`` ``"train"`` or ``"eval"``."""

    image_id: str
    features: np.ndarray
    label: np.ndarray | None
    split: Split = "eval"

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 3:
            raise ValueError(f"features must be (D, h, w), got shape {self.features.shape}")
        if self.label is not None:
            self.label = np.asarray(self.label, dtype=np.int64)
            if self.label.ndim != 2:
                raise ValueError(f"label must be (H, W), got shape {self.label.shape}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {self.split!r}")


@dataclass
class EvalResult:
    """What a protocol reports.

    ``metrics`` keys are prefixed with the protocol name (``dataset_kmeans/miou``); ``per_class`` has one
    dict per class (``class``, ``iou``, ``accuracy``, ``pixels``); ``confusion`` is the
    class-vs-class pixel matrix (rows ground truth); ``predictions`` holds a few predicted label
    maps at label resolution (``ignore_index`` where no class was predicted), keyed by image id.
    """

    metrics: dict[str, float]
    per_class: list[dict] = field(default_factory=list)
    confusion: np.ndarray | None = None
    predictions: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# array helpers
# --------------------------------------------------------------------------------------------


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map, pixel centres aligned (torch's ``nearest-exact``)."""
    h, w = arr.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def _pixels(features: np.ndarray) -> np.ndarray:
    """``(D, h, w)`` -> ``(h * w, D)`` float32, C-contiguous as faiss wants."""
    return np.ascontiguousarray(features.reshape(features.shape[0], -1).T, dtype=np.float32)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int, restarts: int = 1) -> np.ndarray:
    """Unit-norm centroids ``(min(k, n), D)`` of the (unit-norm) rows of ``x``; with ``restarts`` > 1,
    those of the best of that many seeded initialisations (highest summed cosine to the nearest
    centroid: k-means' own objective, no labels; faiss' ``nredo``)."""
    k = min(k, x.shape[0])
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=restarts,
        seed=seed,
        spherical=True,
        verbose=False,
        # we subsample ourselves; these only silence faiss' warnings and its own subsampling
        min_points_per_centroid=1,
        max_points_per_centroid=x.shape[0],
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def _nearest(x: np.ndarray, keys: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product (cosine for unit vectors) top-``k`` of each row of ``x`` among ``keys``."""
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return sims, idx


def _subsample_rows(blocks: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_rows`` rows drawn uniformly from the stacked ``blocks``, without stacking
    them all first."""
    sizes = np.array([len(b) for b in blocks])
    if sizes.sum() <= max_rows:
        return np.concatenate(blocks)
    chosen = np.sort(rng.choice(int(sizes.sum()), size=max_rows, replace=False))
    bounds = np.searchsorted(chosen, np.concatenate([[0], np.cumsum(sizes)]))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate([b[chosen[bounds[i] : bounds[i + 1]] - offsets[i]] for i, b in enumerate(blocks)])


def _mapped_confusion(cont: np.ndarray, mapping: np.ndarray, cm: ConfusionMatrix) -> ConfusionMatrix:
    """Fill ``cm`` from class-vs-cluster counts and a ``cluster -> class`` mapping (-1: dropped)."""
    onehot = np.zeros((cont.shape[1], cm.num_classes), dtype=np.int64)
    mapped = np.flatnonzero(mapping >= 0)
    onehot[mapped, mapping[mapped]] = 1
    cm.mat = cont @ onehot
    return cm


# --------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------


class Evaluator(ABC):
    """Base of the protocols: caches what it needs in :meth:`process`, scores in :meth:`evaluate`.

    Args:
        num_classes: ground-truth classes ``0 .. num_classes - 1``; other label values are ignored.
        class_names: names for ``per_class`` (default ``"0"``, ``"1"``, ...).
        seed: makes the protocol deterministic.
        ignore_index: label value of unlabelled pixels.
        num_examples: how many predicted label maps to return.

    A subclass takes its settings (the fields of its registered ``params`` model, same names and
    defaults) as keyword-only constructor arguments.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)
        self.num_examples = int(num_examples)
        self.reset()

    def reset(self) -> None:
        """Forget all processed samples."""
        self.num_skipped = 0
        self._reset()

    def process(self, sample: FeatureSample) -> None:
        """Take one sample (train or eval split)."""
        if sample.split == "train":
            self._process_train(sample)
        else:
            self._process_eval(sample)

    @abstractmethod
    def evaluate(self) -> EvalResult:
        """Score everything processed since the last :meth:`reset`."""

    @abstractmethod
    def _reset(self) -> None: ...

    def _process_train(self, sample: FeatureSample) -> None:  # noqa: B027 (optional hook, not abstract)
        """Protocols that need no training data ignore the train split."""

    @abstractmethod
    def _process_eval(self, sample: FeatureSample) -> None: ...

    def _labelled(self, sample: FeatureSample) -> bool:
        if sample.label is None:
            self.num_skipped += 1
            return False
        return True

    def _clean_label(self, label: np.ndarray) -> np.ndarray:
        """Label values outside ``[0, num_classes)`` become ``ignore_index``."""
        return np.where((label >= 0) & (label < self.num_classes), label, self.ignore_index)

    def _example(self, pred: np.ndarray) -> np.ndarray:
        return np.where(pred >= 0, pred, self.ignore_index).astype(np.int64)

    def _result(self, cm: ConfusionMatrix, extra: dict[str, float], predictions: dict[str, np.ndarray]) -> EvalResult:
        metrics = {"miou": cm.miou(), "pixel_acc": cm.pixel_accuracy(), "mean_acc": cm.mean_accuracy()}
        metrics.update(extra)
        return EvalResult(
            metrics={f"{self.name}/{k}": float(v) for k, v in metrics.items()},
            per_class=cm.per_class_table(self.class_names),
            confusion=cm.mat.copy(),
            predictions=predictions,
        )


class NoParams(Section):
    """A protocol without settings: ``evaluate.protocol_args.<name>`` must stay empty."""


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolInfo:
    """A registered protocol's metadata (see the module docstring), defaults filled in."""

    name: str
    headline: str
    params: type[BaseModel] = NoParams
    needs_train: bool = False
    stochastic: bool = False
    needs_concepts: bool = False
    needs_saliency: bool = False
    needs_video: bool = False
    data: str | None = None  # needs_video: the dataset source of the sequences
    summary: tuple[str, ...] = ()  # metrics printed beside the headline


def register_protocol(
    name: str,
    *,
    headline: str = "miou",
    params: type[BaseModel] = NoParams,
    needs_train: bool = False,
    stochastic: bool = False,
    needs_concepts: bool = False,
    needs_saliency: bool = False,
    needs_video: bool = False,
    summary: Sequence[str] = (),
    **meta: Any,
) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: register an :class:`Evaluator` in :data:`PROTOCOLS` under ``name`` (also its
    ``name`` attribute, the prefix of its metric keys) with the metadata `distseg evaluate` reads."""

    def add(cls: type[Evaluator]) -> type[Evaluator]:
        cls.name = name
        PROTOCOLS.register(
            name,
            cls,
            headline=headline,
            params=params,
            needs_train=needs_train,
            stochastic=stochastic,
            needs_concepts=needs_concepts,
            needs_saliency=needs_saliency,
            needs_video=needs_video,
            summary=tuple(summary),
            **meta,
        )
        return cls

    return add


def protocol_info(name: str) -> ProtocolInfo:
    """The metadata of protocol ``name`` (``UnknownNameError``, a KeyError, for an unknown name)."""
    meta = PROTOCOLS.meta(name)
    if not meta.get("headline"):
        raise ValueError(f"protocol {name!r} declares no headline metric (register it with headline=...)")
    known = {f.name for f in fields(ProtocolInfo)} - {"name"}
    values = {k: v for k, v in meta.items() if k in known and v is not None}
    return ProtocolInfo(name=name, **values)


def protocol_kwargs(name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """``args`` checked against protocol ``name``'s params model -> its keyword arguments, defaults
    filled in. Raises ValueError naming the protocol, the bad key and the allowed keys."""
    model = protocol_info(name).params
    allowed = ", ".join(model.model_fields) or "none"
    unknown = [key for key in (args or {}) if key not in model.model_fields]  # even if the model allows extras
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise ValueError(
            f"protocol {name!r}: unknown key{'s' if len(unknown) > 1 else ''} {keys} (allowed keys: {allowed})"
        )
    try:
        return model.model_validate(dict(args or {})).model_dump()
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(p) for p in err['loc'])!r}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()
        ]
        raise ValueError(f"protocol {name!r}: {'; '.join(problems)} (allowed keys: {allowed})") from None


def create_protocol(
    name: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    **kwargs: Any,
) -> Evaluator:
    """Build the protocol registered as ``name``; ``kwargs`` go to its constructor."""
    evaluator = PROTOCOLS.build(
        name, num_classes, class_names=class_names, seed=seed, ignore_index=ignore_index, **kwargs
    )
    if isinstance(evaluator, Evaluator) and not evaluator.name:  # registered with PROTOCOLS.register
        evaluator.name = name
    return evaluator
