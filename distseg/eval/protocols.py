"""Evaluation protocols that judge frozen pixel embeddings, all behind one evaluator interface.

Every protocol consumes precomputed :class:`FeatureSample` s (``features (D, h, w)`` from a frozen
network, a label map ``(H, W)`` usually at a higher resolution, and a ``train``/``eval`` split)
through ``reset()`` / ``process(sample)`` / ``evaluate() -> EvalResult``, as detectron2's
``DatasetEvaluator``; :func:`create_protocol` builds one by name from :data:`PROTOCOLS`.

==============  ==================================================================================
``linear``      1x1 conv probe (or ``head="aspp"``) trained with cross-entropy on the train split
``kmeans``      spherical k-means of the eval pixels into C clusters, Hungarian matching (or
                ``overcluster=k`` with majority vote)
``knn``         SegSort: per-image k-means segments, each eval segment takes the majority label of
                its 15 nearest train segment prototypes
``retrieval``   Zhang & Maire, Table 2: per-image k-means into 10 regions, each eval region takes
                the label of its nearest train region
``purity``      concept purity: each eval pixel -> nearest concept of a given dictionary
==============  ==================================================================================

Resolution.  Metrics are always computed at **label resolution**.  The clustering protocols
(``kmeans``, ``knn``, ``retrieval``, ``purity``) assign clusters / segments / concepts at feature
resolution and upsample those index maps to the label size with nearest-neighbour
(:func:`resize_nearest`, pixel-centre aligned).  The linear probe is trained at feature resolution
against labels downsampled with the same nearest-neighbour rule (cheap: the cached train set stays
small), and at evaluation its logits are upsampled **bilinearly** to label resolution before the
argmax (for the 1x1 probe this equals classifying bilinearly upsampled features).

Feature vectors are L2-normalised (cosine geometry) by all protocols except ``linear``, which
centres them with the train split's mean and divides by one global train RMS scale instead.

Samples whose ``label`` is ``None`` are skipped (counted in ``num_skipped``), except that
``kmeans`` still clusters them (its fit needs no labels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distseg.eval.metrics import (
    ConfusionMatrix,
    contingency,
    hungarian_match,
    majority_vote_match,
    remap,
)

__all__ = [
    "PROTOCOLS",
    "ASPPHead",
    "EvalResult",
    "Evaluator",
    "FeatureSample",
    "KMeansProtocol",
    "KNNProtocol",
    "LinearProbeProtocol",
    "PurityProtocol",
    "RetrievalProtocol",
    "create_protocol",
    "register_protocol",
    "resize_nearest",
]

Split = Literal["train", "eval"]


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

    ``metrics`` keys are prefixed with the protocol name (``kmeans/miou``); ``per_class`` has one
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


def _spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Unit-norm centroids ``(min(k, n), D)`` of the (unit-norm) rows of ``x``."""
    k = min(k, x.shape[0])
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
        # we subsample ourselves; these only silence faiss' warnings and its own subsampling
        min_points_per_centroid=1, max_points_per_centroid=x.shape[0],
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def _nearest(x: np.ndarray, keys: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product (cosine for unit vectors) top-``k`` of each row of ``x`` among ``keys``."""
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return sims, idx


def _subsample_rows(
    blocks: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator
) -> np.ndarray:
    """At most ``max_rows`` rows drawn uniformly from the stacked ``blocks``, without stacking
    them all first."""
    sizes = np.array([len(b) for b in blocks])
    if sizes.sum() <= max_rows:
        return np.concatenate(blocks)
    chosen = np.sort(rng.choice(int(sizes.sum()), size=max_rows, replace=False))
    bounds = np.searchsorted(chosen, np.concatenate([[0], np.cumsum(sizes)]))
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate(
        [b[chosen[bounds[i] : bounds[i + 1]] - offsets[i]] for i, b in enumerate(blocks)]
    )


def _mapped_confusion(cont: np.ndarray, mapping: np.ndarray, cm: ConfusionMatrix) -> ConfusionMatrix:
    """Fill ``cm`` from class-vs-cluster counts and a ``cluster -> class`` mapping (-1: dropped)."""
    onehot = np.zeros((cont.shape[1], cm.num_classes), dtype=np.int64)
    mapped = np.flatnonzero(mapping >= 0)
    onehot[mapped, mapping[mapped]] = 1
    cm.mat = cont @ onehot
    return cm


# --------------------------------------------------------------------------------------------
# interface and registry
# --------------------------------------------------------------------------------------------


class Evaluator(ABC):
    """Base of the protocols: caches what it needs in :meth:`process`, scores in :meth:`evaluate`.

    Args:
        num_classes: ground-truth classes ``0 .. num_classes - 1``; other label values are ignored.
        class_names: names for ``per_class`` (default ``"0"``, ``"1"``, ...).
        seed: makes the protocol deterministic.
        ignore_index: label value of unlabelled pixels.
        num_examples: how many predicted label maps to return.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
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

    def _process_train(self, sample: FeatureSample) -> None:
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

    def _result(
        self, cm: ConfusionMatrix, extra: dict[str, float], predictions: dict[str, np.ndarray]
    ) -> EvalResult:
        metrics = {"miou": cm.miou(), "pixel_acc": cm.pixel_accuracy(), "mean_acc": cm.mean_accuracy()}
        metrics.update(extra)
        return EvalResult(
            metrics={f"{self.name}/{k}": float(v) for k, v in metrics.items()},
            per_class=cm.per_class_table(self.class_names),
            confusion=cm.mat.copy(),
            predictions=predictions,
        )


PROTOCOLS: dict[str, type[Evaluator]] = {}


def register_protocol(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator adding an :class:`Evaluator` to :data:`PROTOCOLS` under ``name``."""

    def add(cls: type[Evaluator]) -> type[Evaluator]:
        cls.name = name
        PROTOCOLS[name] = cls
        return cls

    return add


def create_protocol(
    name: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    ignore_index: int = 255,
    **kwargs: Any,
) -> Evaluator:
    """Build the protocol registered as ``name``; ``kwargs`` go to its constructor."""
    if name not in PROTOCOLS:
        known = ", ".join(sorted(PROTOCOLS))
        raise KeyError(f"unknown evaluation protocol {name!r} (known: {known})")
    return PROTOCOLS[name](
        num_classes, class_names=class_names, seed=seed, ignore_index=ignore_index, **kwargs
    )


# --------------------------------------------------------------------------------------------
# k-means + Hungarian
# --------------------------------------------------------------------------------------------


@register_protocol("kmeans")
class KMeansProtocol(Evaluator):
    """Spherical k-means of all eval pixel embeddings, clusters matched to classes.

    With ``overcluster=None`` there are ``num_classes`` clusters matched one-to-one (Hungarian);
    with ``overcluster=k`` there are ``k`` clusters, each mapped to its majority class. The fit uses
    at most ``max_fit_pixels`` pixels drawn at random (seeded); every pixel is then assigned.
    Labels are used only for the matching. The eval features are cached (L2-normalised float32
    at feature resolution) until :meth:`evaluate`.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        num_examples: int = 4,
        *,
        overcluster: int | None = None,
        max_fit_pixels: int = 100_000,
        niter: int = 30,
    ) -> None:
        self.overcluster = overcluster
        self.max_fit_pixels = max_fit_pixels
        self.niter = niter
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._samples: list[tuple[str, np.ndarray, tuple[int, int], np.ndarray | None]] = []

    def _process_eval(self, sample: FeatureSample) -> None:
        label = None if sample.label is None else self._clean_label(sample.label)
        x = _l2_normalize(_pixels(sample.features))
        self._samples.append((sample.image_id, x, sample.features.shape[1:], label))

    def evaluate(self) -> EvalResult:
        if not self._samples:
            raise ValueError("kmeans: no eval-split samples were processed")
        rng = np.random.default_rng(self.seed)
        fit = _subsample_rows([s[1] for s in self._samples], self.max_fit_pixels, rng)
        centroids = _spherical_kmeans(fit, self.overcluster or self.num_classes, self.seed, self.niter)
        k = centroids.shape[0]
        cont = np.zeros((self.num_classes, k), dtype=np.int64)
        examples: dict[str, np.ndarray] = {}
        for image_id, x, shape, label in self._samples:
            if label is None:
                continue
            clusters = resize_nearest(_nearest(x, centroids)[1].reshape(shape), label.shape)
            cont += contingency(clusters, label, k, self.num_classes, self.ignore_index)
            if len(examples) < self.num_examples:
                examples[image_id] = clusters
        if self.overcluster:
            mapping = majority_vote_match(cont)
        else:
            mapping = hungarian_match(cont, majority=True)
        cm = _mapped_confusion(cont, mapping, ConfusionMatrix(self.num_classes, self.ignore_index))
        predictions = {i: self._example(remap(c, mapping)) for i, c in examples.items()}
        return self._result(cm, {"num_clusters": float(k)}, predictions)


# --------------------------------------------------------------------------------------------
# segment kNN (SegSort) and region retrieval (Zhang & Maire)
# --------------------------------------------------------------------------------------------


@register_protocol("knn")
class KNNProtocol(Evaluator):
    """SegSort-style segment kNN.

    Each image is cut into ``segments_per_image`` segments by spherical k-means of its pixel
    embeddings; a segment's prototype is its normalised mean embedding. Train prototypes are
    labelled with the majority ground-truth class of their segment (segments without labelled
    pixels are dropped); each eval segment takes the majority vote of its ``num_neighbors`` most
    cosine-similar train prototypes (ties: the class with the larger summed similarity), and all
    its pixels take that class.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        num_examples: int = 4,
        *,
        segments_per_image: int = 25,
        num_neighbors: int = 15,
        niter: int = 20,
    ) -> None:
        self.segments_per_image = segments_per_image
        self.num_neighbors = num_neighbors
        self.niter = niter
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._bank: list[np.ndarray] = []
        self._bank_labels: list[np.ndarray] = []
        self._eval_protos: list[np.ndarray] = []
        self._eval_hists: list[np.ndarray] = []
        self._examples: dict[str, tuple[int, int, np.ndarray]] = {}  # id -> (first, count, map)

    def _segment(self, sample: FeatureSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prototypes ``(S, D)``, class-vs-segment counts ``(C, S)``, segment map at label size."""
        x = _l2_normalize(_pixels(sample.features))
        centroids = _spherical_kmeans(x, self.segments_per_image, self.seed, self.niter)
        # renumber so that empty segments disappear
        _, seg = np.unique(_nearest(x, centroids)[1][:, 0], return_inverse=True)
        sums = np.zeros((seg.max() + 1, x.shape[1]), dtype=np.float64)
        np.add.at(sums, seg, x)
        protos = _l2_normalize(sums)
        label = self._clean_label(sample.label)
        seg_map = resize_nearest(seg.reshape(sample.features.shape[1:]), label.shape)
        hist = contingency(seg_map, label, len(protos), self.num_classes, self.ignore_index)
        return protos, hist, seg_map

    def _process_train(self, sample: FeatureSample) -> None:
        if not self._labelled(sample):
            return
        protos, hist, _ = self._segment(sample)
        keep = hist.sum(0) > 0
        self._bank.append(protos[keep])
        self._bank_labels.append(hist.argmax(0)[keep])

    def _process_eval(self, sample: FeatureSample) -> None:
        if not self._labelled(sample):
            return
        protos, hist, seg_map = self._segment(sample)
        if len(self._examples) < self.num_examples:
            first = sum(len(p) for p in self._eval_protos)
            self._examples[sample.image_id] = (first, len(protos), seg_map)
        self._eval_protos.append(protos)
        self._eval_hists.append(hist)

    def _vote(self, queries: np.ndarray) -> np.ndarray:
        bank = np.concatenate(self._bank)
        labels = np.concatenate(self._bank_labels)
        k = min(self.num_neighbors, len(bank))
        sims, nn_idx = _nearest(queries, bank, k)
        # each neighbour adds 1 + sim / (k + 1): the summed similarity only breaks ties of counts
        scores = np.zeros((len(queries), self.num_classes))
        rows = np.repeat(np.arange(len(queries)), k)
        np.add.at(scores, (rows, labels[nn_idx].ravel()), 1.0 + sims.ravel() / (k + 1))
        return scores.argmax(1)

    def evaluate(self) -> EvalResult:
        if not any(len(b) for b in self._bank):
            raise ValueError(f"{self.name}: no labelled train-split samples were processed")
        if not self._eval_protos:
            raise ValueError(f"{self.name}: no labelled eval-split samples were processed")
        segment_class = self._vote(np.concatenate(self._eval_protos))
        cont = np.concatenate(self._eval_hists, axis=1)
        cm = _mapped_confusion(cont, segment_class, ConfusionMatrix(self.num_classes, self.ignore_index))
        predictions = {
            image_id: self._example(remap(seg_map, segment_class[first : first + count]))
            for image_id, (first, count, seg_map) in self._examples.items()
        }
        num_train = float(sum(len(b) for b in self._bank))
        return self._result(cm, {"num_train_segments": num_train}, predictions)


@register_protocol("retrieval")
class RetrievalProtocol(KNNProtocol):
    """Region retrieval (Zhang & Maire 2020, Table 2): per-image k-means into
    ``segments_per_image`` (10) regions described by their mean embedding; each eval region takes
    the label of its single nearest train region."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        num_examples: int = 4,
        *,
        segments_per_image: int = 10,
        num_neighbors: int = 1,
        niter: int = 20,
    ) -> None:
        super().__init__(
            num_classes, class_names, seed, ignore_index, num_examples,
            segments_per_image=segments_per_image, num_neighbors=num_neighbors, niter=niter,
        )


# --------------------------------------------------------------------------------------------
# linear / ASPP probe
# --------------------------------------------------------------------------------------------


class ASPPHead(nn.Module):
    """DeepLab-v2 style ASPP: parallel 3x3 convolutions at several dilations (at feature
    resolution) whose class scores are summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (1, 6, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


@register_protocol("linear")
class LinearProbeProtocol(Evaluator):
    """A 1x1 conv (``head="linear"``) or ASPP (``head="aspp"``) probe on frozen features.

    Trained with Adam and cross-entropy (``ignore_index`` ignored) for ``epochs`` passes over the
    cached train-split features, ``batch_size`` images a step, against labels downsampled to
    feature resolution (nearest); features are centred with the train mean and divided by one
    train RMS scale. Weights start near zero (std 0.01, seeded). Eval logits are upsampled
    bilinearly to label resolution before the argmax. Train and eval features are cached.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        num_examples: int = 4,
        *,
        head: Literal["linear", "aspp"] = "linear",
        epochs: int = 30,
        lr: float = 1e-2,
        batch_size: int = 8,
        dilations: Sequence[int] = (1, 6, 12),
        device: str | None = None,
    ) -> None:
        if head not in ("linear", "aspp"):
            raise ValueError(f"head must be 'linear' or 'aspp', got {head!r}")
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.dilations = tuple(dilations)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._train: list[tuple[np.ndarray, np.ndarray]] = []
        self._eval: list[tuple[str, np.ndarray, np.ndarray]] = []

    def _process_train(self, sample: FeatureSample) -> None:
        if self._labelled(sample):
            label = resize_nearest(self._clean_label(sample.label), sample.features.shape[1:])
            self._train.append((sample.features, label))

    def _process_eval(self, sample: FeatureSample) -> None:
        if self._labelled(sample):
            self._eval.append((sample.image_id, sample.features, self._clean_label(sample.label)))

    def _make_head(self, in_channels: int) -> nn.Module:
        if self.head == "aspp":
            head: nn.Module = ASPPHead(in_channels, self.num_classes, self.dilations)
        else:
            head = nn.Conv2d(in_channels, self.num_classes, 1)
        # near-zero start (as MAE's linear probe): PyTorch's default init gives the ASPP's many
        # context taps logits of order 1 that a short probe training does not undo
        for module in head.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        return head

    def _standardizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel train mean and one global scale (the RMS of the centred features).

        A single scale keeps the embedding's geometry (per-channel standardisation would blow
        near-constant noise channels up to unit variance) while giving Adam unit-sized inputs.
        """
        pixels = np.concatenate([_pixels(f) for f, _ in self._train]).astype(np.float64)
        mean = pixels.mean(0)
        scale = max(float(np.sqrt(pixels.var(0).mean())), 1e-6)
        return (
            torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1),
            torch.tensor(scale, dtype=torch.float32, device=self.device),
        )

    def _batch_loss(
        self, head: nn.Module, batch: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over a batch whose images may differ in size (grouped by shape)."""
        groups: dict[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]] = {}
        for item in batch:
            groups.setdefault(item[0].shape, []).append(item)
        total, count = torch.zeros((), device=self.device), 0
        for items in groups.values():
            x = torch.from_numpy(np.stack([f for f, _ in items])).to(self.device)
            y = torch.from_numpy(np.stack([t for _, t in items])).to(self.device)
            logits = head((x - self._mean) / self._std)
            total = total + F.cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum")
            count += int((y != self.ignore_index).sum())
        return total, count

    def _fit(self, head: nn.Module) -> float:
        optimizer = torch.optim.Adam(head.parameters(), lr=self.lr)
        rng = np.random.default_rng(self.seed)
        epoch_loss = float("nan")
        for _ in range(self.epochs):
            order = rng.permutation(len(self._train))
            losses, pixels = 0.0, 0
            for start in range(0, len(order), self.batch_size):
                batch = [self._train[i] for i in order[start : start + self.batch_size]]
                total, count = self._batch_loss(head, batch)
                if count == 0:
                    continue
                optimizer.zero_grad()
                (total / count).backward()
                optimizer.step()
                losses, pixels = losses + float(total.detach()), pixels + count
            epoch_loss = losses / max(pixels, 1)
        return epoch_loss

    @torch.no_grad()
    def _predict(self, head: nn.Module, features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        x = torch.from_numpy(features[None]).to(self.device)
        logits = head((x - self._mean) / self._std)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].cpu().numpy().astype(np.int64)

    def evaluate(self) -> EvalResult:
        if not self._train:
            raise ValueError("linear: no labelled train-split samples were processed")
        if not self._eval:
            raise ValueError("linear: no labelled eval-split samples were processed")
        self._mean, self._std = self._standardizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = self._make_head(self._train[0][0].shape[0]).to(self.device)
            train_loss = self._fit(head)
        head.eval()
        cm = ConfusionMatrix(self.num_classes, self.ignore_index)
        predictions: dict[str, np.ndarray] = {}
        for image_id, features, label in self._eval:
            pred = self._predict(head, features, label.shape)
            cm.update(pred, label)
            if len(predictions) < self.num_examples:
                predictions[image_id] = pred
        return self._result(cm, {"train_loss": train_loss}, predictions)


# --------------------------------------------------------------------------------------------
# concept purity
# --------------------------------------------------------------------------------------------


@register_protocol("purity")
class PurityProtocol(Evaluator):
    """Concept purity of a learned concept dictionary (He et al. 2022).

    Each eval pixel goes to its most cosine-similar concept; ``purity`` = sum over concepts of
    the pixel count of their majority class / all labelled pixels (which is the pixel accuracy of
    mapping every concept to its majority class, so ``miou`` etc. of that mapping are reported
    too), and ``used_concepts`` counts the concepts that received at least one eval pixel.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = 255,
        num_examples: int = 4,
        *,
        concepts: np.ndarray,
    ) -> None:
        concepts = np.asarray(concepts, dtype=np.float32)
        if concepts.ndim != 2:
            raise ValueError(f"concepts must be (K, D), got shape {concepts.shape}")
        self.concepts = _l2_normalize(concepts)
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        k = len(self.concepts)
        self._cont = np.zeros((self.num_classes, k), dtype=np.int64)
        self._usage = np.zeros(k, dtype=np.int64)
        self._examples: dict[str, np.ndarray] = {}

    def _process_eval(self, sample: FeatureSample) -> None:
        if not self._labelled(sample):
            return
        if sample.features.shape[0] != self.concepts.shape[1]:
            raise ValueError(
                f"features have {sample.features.shape[0]} channels, concepts {self.concepts.shape[1]}"
            )
        x = _l2_normalize(_pixels(sample.features))
        assigned = _nearest(x, self.concepts)[1][:, 0]
        self._usage += np.bincount(assigned, minlength=len(self.concepts))
        label = self._clean_label(sample.label)
        concept_map = resize_nearest(assigned.reshape(sample.features.shape[1:]), label.shape)
        k = len(self.concepts)
        self._cont += contingency(concept_map, label, k, self.num_classes, self.ignore_index)
        if len(self._examples) < self.num_examples:
            self._examples[sample.image_id] = concept_map

    def evaluate(self) -> EvalResult:
        total = self._cont.sum()
        if total == 0:
            raise ValueError("purity: no labelled eval-split pixels were processed")
        mapping = majority_vote_match(self._cont)
        cm = _mapped_confusion(self._cont, mapping, ConfusionMatrix(self.num_classes, self.ignore_index))
        extra = {
            "purity": float(self._cont.max(0).sum() / total),
            "used_concepts": float((self._usage > 0).sum()),
            "num_concepts": float(len(self.concepts)),
        }
        predictions = {i: self._example(remap(c, mapping)) for i, c in self._examples.items()}
        return self._result(cm, extra, predictions)
