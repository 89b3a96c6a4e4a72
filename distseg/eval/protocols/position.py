"""``position``: how much pixel position the embedding carries (a diagnostic, no paper's protocol).

A network with zero padding and small crops can learn absolute position for free, and a contrastive
loss can reward it (fidelity audit, section 5: the demo checkpoint's k-means found top / left /
bottom / right bands). Position is then what dataset-level clustering finds, and the semantic scores
say little. `distseg evaluate` therefore runs this protocol for every feature source by default
(``evaluate.diagnostics``), beside the semantic scores; compare a checkpoint with the ``rgbxy``
baseline (which holds x and y, so it leaks position by construction) and ``random``.

Two measures, both on L2-normalised features (the cosine geometry of the clustering protocols):

* **Position regression.** Per pixel, three targets, each in [0, 1] relative to its own image:
  ``y`` and ``x`` (pixel centres, ``(row + 0.5) / h``, ``(col + 0.5) / w``) and ``border``, the
  distance to the nearest image border in those relative units (``2 * min(y, 1 - y, x, 1 - x)``).
  A closed-form ridge regression (bias unpenalised, penalty ``ridge`` times the pixel count) from the
  D-dim feature to the targets is fitted on the train split and scored on the eval split as R^2
  (``r2_y``, ``r2_x``, ``r2_border``; the headline ``r2`` is their mean). It is linear, so the
  border distance, which is not a linear function of x and y, scores low even for ``rgbxy``; a
  network with padding artefacts encodes it directly. Only sufficient statistics are kept (X^T X,
  X^T Y per split), so memory does not grow with the data.
* **Same-position cosine.** Every eval image's features are sampled at the same ``grid`` x ``grid``
  relative positions (nearest feature pixel to each cell centre). ``cos_same``: the mean cosine
  between features at the same relative position in two different images; ``cos_shuffled``: the
  mean cosine at different positions in two different images (every pair of images and positions,
  exactly, not a random shuffle); ``cos_gap = cos_same - cos_shuffled`` (about 0 when position is
  not encoded). ``cos_within``: the mean cosine between different positions of the same image (near
  1 means all pixels of an image look alike, an image-identity code). A feature map smaller than
  ``grid`` on a side repeats pixels in its samples, which raises ``cos_within`` and ``cos_shuffled``.
  ``cos_gap`` is in cosine units, so an embedding whose pixels all point one way (a random network:
  ``cos_shuffled`` 0.87-0.92 on the demo) reads a small gap whatever it encodes; ``cos_gap_rel =
  cos_gap / (1 - cos_shuffled)``, the share of the mean cosine distance between positions that the
  same position removes, compares embeddings of different spread (0 without position, 1 when
  position is all there is). The R^2 is scale-free already.

Content can carry position too: where things sit in a dataset's frames is not uniform
(photographers centre their subject, the sky is at the top: on MSRC-v2 val the labels alone read
R^2 0.113; on the synthetic scenes 0.014), so an embedding that holds only the classes can score
above 0 on both measures. Where the samples carry labels, the same two measures of the one-hot
labels at the feature grid (an embedding that is exactly the classes) are reported as ``label_r2``
(and per target, ``label_r2_y`` ...), ``label_cos_gap`` and ``label_cos_gap_rel``: the same for
every feature source, and the level that content alone explains. They are accumulated once per
feature source (cheap: one-hot vectors at the feature grid), so the protocol stays a self-contained
reset/process/evaluate. Labels are used for nothing else.
Non-stochastic. ``num_train_pixels`` / ``num_eval_pixels`` / ``num_images`` are reported too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.protocols.base import (
    EvalResult,
    Evaluator,
    FeatureSample,
    _l2_normalize,
    _pixels,
    register_protocol,
    resize_nearest,
)

TARGETS = ("y", "x", "border")


class PositionParams(Section):
    """``evaluate.protocol_args.position``."""

    ridge: float = Field(1e-3, ge=0, description="ridge penalty of the position regression, times the pixel count")
    grid: int = Field(8, ge=2, description="relative positions per side sampled for the same-position cosine")


def position_targets(h: int, w: int) -> np.ndarray:
    """``(h * w, 3)`` float64: y, x and border distance of every pixel (row-major), each in [0, 1]."""
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    y, x = np.meshgrid(ys, xs, indexing="ij")
    border = 2 * np.minimum(np.minimum(y, 1 - y), np.minimum(x, 1 - x))
    return np.stack([y.ravel(), x.ravel(), border.ravel()], axis=1)


def _grid_index(n: int, cells: int) -> np.ndarray:
    """Indices of the feature pixels nearest to ``cells`` equally spaced cell centres along ``n``."""
    return np.minimum(((np.arange(cells) + 0.5) * n / cells).astype(np.int64), n - 1)


class _PositionStats:
    """The sufficient statistics of both measures for one kind of per-pixel vector (module docstring)."""

    def __init__(self, grid: int, name: str) -> None:
        self.grid, self.name = grid, name
        self.dim: int | None = None
        # per split: X^T X and X^T Y of [features, 1] and targets; eval also sum Y, sum Y^2
        self.xtx: dict = {"train": None, "eval": None}
        self.xty: dict = {"train": None, "eval": None}
        self.n = {"train": 0, "eval": 0}
        self.y_sum = np.zeros(len(TARGETS))
        self.y_sq = np.zeros(len(TARGETS))
        # same-position cosine: per grid position the sum over images, and the per-image statistics
        self.pos_sum: np.ndarray | None = None  # (P, D) sum over images of f_i(p)
        self.pos_sq = np.zeros(grid * grid)  # (P,) sum over images of |f_i(p)|^2
        self.img_sum: np.ndarray | None = None  # (D,) sum over images of T_i = sum_p f_i(p)
        self.img_sq = 0.0  # sum over images of |T_i|^2
        self.within = 0.0  # sum over images of sum_{p != q} f_i(p) . f_i(q)
        self.images = 0

    def add(self, image_id: str, features: np.ndarray, split: str) -> None:
        """Add one image's ``(D, h, w)`` vectors (L2-normalised here) to the `split` statistics."""
        d, h, w = features.shape
        if self.dim is None:
            self.dim = d
        elif d != self.dim:
            raise ValueError(f"{self.name}: {image_id} has {d} channels, earlier images {self.dim}")
        x = _l2_normalize(_pixels(features)).astype(np.float64)
        x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        t = position_targets(h, w)
        if self.xtx[split] is None:
            self.xtx[split] = np.zeros((d + 1, d + 1))
            self.xty[split] = np.zeros((d + 1, len(TARGETS)))
        self.xtx[split] += x1.T @ x1
        self.xty[split] += x1.T @ t
        self.n[split] += len(x)
        if split != "eval":
            return
        self.y_sum += t.sum(0)
        self.y_sq += (t**2).sum(0)
        x = x.reshape(h, w, d)
        f = x[_grid_index(h, self.grid)][:, _grid_index(w, self.grid)].reshape(-1, d)  # (P, D)
        if self.pos_sum is None:
            self.pos_sum, self.img_sum = np.zeros_like(f), np.zeros(d)
        total = f.sum(0)
        sq = (f**2).sum(1)
        self.pos_sum += f
        self.pos_sq += sq
        self.img_sum += total
        self.img_sq += float(total @ total)
        self.within += float(total @ total - sq.sum())
        self.images += 1

    def r2(self, ridge: float) -> np.ndarray:
        """R^2 per target on the eval split of the ridge fit on the train split."""
        xtx, xty, n = self.xtx["train"], self.xty["train"], self.n["train"]
        penalty = ridge * n * np.eye(len(xtx))
        penalty[-1, -1] = 0.0  # the bias
        try:
            coef = np.linalg.solve(xtx + penalty, xty)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(xtx + penalty, xty, rcond=None)[0]
        a, b, n_eval = self.xtx["eval"], self.xty["eval"], self.n["eval"]
        # sum (y - X c)^2 = y.y - 2 c.X^T y + c^T X^T X c, per target column
        residual = self.y_sq - 2 * (coef * b).sum(0) + np.einsum("ij,ik,kj->j", coef, a, coef)
        total = self.y_sq - self.y_sum**2 / n_eval
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, 1 - np.maximum(residual, 0) / total, np.nan)

    def cosines(self) -> dict[str, float]:
        n, p = self.images, self.grid * self.grid
        if n < 2:
            nan = float("nan")
            return {"cos_same": nan, "cos_shuffled": nan, "cos_gap": nan, "cos_gap_rel": nan, "cos_within": nan}
        # pairs of different images at the same position: sum_p |S_p|^2 - sum_i |f_i(p)|^2
        same_sum = float((self.pos_sum**2).sum() - self.pos_sq.sum())
        # pairs of different images at any positions: |sum_i T_i|^2 - sum_i |T_i|^2
        cross_sum = float(self.img_sum @ self.img_sum - self.img_sq)
        same = same_sum / (n * (n - 1) * p)
        shuffled = (cross_sum - same_sum) / (n * (n - 1) * p * (p - 1))
        within = self.within / (n * p * (p - 1))
        gap = same - shuffled
        rel = gap / (1 - shuffled) if shuffled < 1 else float("nan")
        return {"cos_same": same, "cos_shuffled": shuffled, "cos_gap": gap, "cos_gap_rel": rel, "cos_within": within}


def label_vectors(label: np.ndarray, size: tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """``(num_classes + 1, h, w)`` one-hot of the class at each feature pixel (nearest label pixel);
    the last channel marks unlabelled pixels, so every pixel has a unit vector."""
    small = resize_nearest(label, size)
    index = np.where((small >= 0) & (small < num_classes) & (small != ignore_index), small, num_classes)
    return np.moveaxis(np.eye(num_classes + 1, dtype=np.float32)[index], -1, 0)


@register_protocol(
    "position",
    headline="r2",
    params=PositionParams,
    needs_train=True,
    stochastic=False,
    summary=("cos_gap", "cos_gap_rel"),
    reference=("label_r2", "label_cos_gap", "label_cos_gap_rel"),
)
class PositionProtocol(Evaluator):
    """The position-leak diagnostic (module docstring): R^2 of a linear read-out of (y, x, border
    distance) and the same-position cosine gap across images, beside the same two measures of the
    one-hot labels (what content alone reads)."""

    def __init__(
        self,
        num_classes: int = 1,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        ridge: float = 1e-3,
        grid: int = 8,
    ) -> None:
        self.ridge = float(ridge)
        self.grid = int(grid)
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        self._features = _PositionStats(self.grid, self.name)
        self._labels = _PositionStats(self.grid, f"{self.name} (labels)")
        self._labelled = {"train": 0, "eval": 0}  # images with a label, per split

    def _add(self, sample: FeatureSample, split: str) -> None:
        self._features.add(sample.image_id, sample.features, split)
        if sample.label is not None and self.num_classes > 1:
            size = sample.features.shape[1:]
            onehot = label_vectors(sample.label, size, self.num_classes, self.ignore_index)
            self._labels.add(sample.image_id, onehot, split)
            self._labelled[split] += 1

    def _process_train(self, sample: FeatureSample) -> None:
        self._add(sample, "train")

    def _process_eval(self, sample: FeatureSample) -> None:
        self._add(sample, "eval")

    def evaluate(self) -> EvalResult:
        stats = self._features
        if not stats.n["train"]:
            raise ValueError(f"{self.name}: no train-split samples were processed (the regression is fitted on them)")
        if not stats.n["eval"]:
            raise ValueError(f"{self.name}: no eval-split samples were processed")
        r2 = stats.r2(self.ridge)
        metrics = {f"r2_{t}": float(v) for t, v in zip(TARGETS, r2)}
        metrics["r2"] = float(np.mean(r2))
        metrics.update(stats.cosines())
        metrics.update(
            num_train_pixels=float(stats.n["train"]), num_eval_pixels=float(stats.n["eval"]), num_images=stats.images
        )
        # the reference: the same measures of the one-hot labels, only when every image had one
        if self._labelled["train"] and self._labelled["eval"] == stats.images and self._labels.images >= 2:
            label_r2 = self._labels.r2(self.ridge)
            metrics.update({f"label_r2_{t}": float(v) for t, v in zip(TARGETS, label_r2)})
            metrics["label_r2"] = float(np.mean(label_r2))
            cosines = self._labels.cosines()
            metrics["label_cos_gap"], metrics["label_cos_gap_rel"] = cosines["cos_gap"], cosines["cos_gap_rel"]
        return EvalResult(metrics={f"{self.name}/{k}": float(v) for k, v in metrics.items()})
