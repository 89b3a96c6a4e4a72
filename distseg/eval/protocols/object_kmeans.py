"""``object_kmeans``: MaskContrast's k-means protocol, one salient-object prototype per image.

Whose protocol: Van Gansbeke et al. 2021 (seed 002: "K-means" 35.0 / 38.9 mIoU on VOC; the slides
give no procedure, so this follows the authors' ``segmentation/utils/kmeans_utils.py``,
``save_embeddings_to_disk`` and ``eval_kmeans``):

1. every eval image's object mask is its saliency probability ``s`` above 0.5, from the saliency head
   the maskcontrast checkpoint trained beside its embedding head (``evaluate`` computes the maps once
   with the ``saliency`` feature source and gives the same maps to the checkpoint and to every
   baseline, so the comparison is between embeddings under the same masks; ``masks_from`` takes them
   from another maskcontrast checkpoint than the evaluated one);
2. the image's prototype is ``normalise(sum_i s_i [s_i > 0.5] z_i)`` over its unit pixel embeddings;
3. the prototypes are PCA-whitened to 32 components and clustered by scikit-learn's
   ``MiniBatchKMeans`` (batch 1000, seeded) into ``C - 1`` clusters;
4. each image's prediction is its prototype's cluster (+1) on its object mask and 0 (background)
   elsewhere; with ``C`` predicted ids for ``C`` classes they are matched one-to-one by the Hungarian
   method on IoU (otherwise each id takes the class of highest IoU, the authors' ``_majority_vote``),
   and mIoU is taken over all classes.

Departures, each deliberate:

* the prototype and the masks are taken at the embedding's resolution (1/4) and the prediction is
  resized to the label with nearest-neighbour; the authors upsample embedding and saliency to the
  image first (a bilinear copy of the same values);
* PCA whitening gives every kept component unit variance, so with few images, or an embedding of
  low effective rank, noise directions weigh as much as the class directions (the authors' setting:
  32 components of a 32-d embedding, 1449 VOC images); ``pca_dim=None`` clusters the unit
  prototypes as they are;
* ``n_init=3``: the scikit-learn of the authors' time ran ``MiniBatchKMeans`` with 3 initialisations
  by default (today's default is 1 for k-means++), so it is fixed here;
* images without a salient pixel have no prototype: they stay out of the fit and are predicted all
  background (the authors cluster their zero prototype like any other);
* the data need not have a background class: on MSRC-v2 (no background, void ignored) the non-salient
  part is still one predicted id, and the matching decides which class it stands for.

The metrics beside mIoU: ``object_share`` (labelled eval pixels predicted as object),
``images_without_object`` and ``num_clusters``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from pydantic import Field

from distseg.core.constants import IGNORE_INDEX
from distseg.core.section import Section
from distseg.eval.metrics import ConfusionMatrix, contingency, hungarian_match, iou_matrix, remap
from distseg.eval.protocols.base import (
    EvalResult,
    Evaluator,
    FeatureSample,
    _l2_normalize,
    _mapped_confusion,
    _pixels,
    register_protocol,
    resize_nearest,
)


class ObjectKMeansParams(Section):
    """``evaluate.protocol_args.object_kmeans``."""

    clusters: int | None = Field(
        None, ge=1, description="object clusters (None: classes - 1, the background being the other id)"
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="saliency probability above which a pixel is object")
    pca_dim: int | None = Field(32, ge=1, description="whitened PCA components before k-means (None: no PCA)")
    batch_size: int = Field(1000, ge=1, description="MiniBatchKMeans batch size (the authors': 1000)")
    n_init: int = Field(3, ge=1, description="MiniBatchKMeans initialisations (the authors' scikit-learn: 3)")
    masks_from: str | None = Field(
        None, description="maskcontrast checkpoint whose saliency head gives the masks (None: the evaluated one)"
    )


@register_protocol("object_kmeans", headline="miou", params=ObjectKMeansParams, stochastic=True, needs_saliency=True)
class ObjectKMeansProtocol(Evaluator):
    """MaskContrast's k-means: one saliency-weighted prototype per image, PCA-whitened, clustered,
    cluster ids painted on the object masks (module docstring for the steps and departures).

    ``saliency`` maps each eval image id to its saliency probability ((h, w) or (1, h, w), any size:
    it is resized bilinearly to the feature grid). ``masks_from`` is read by `distseg evaluate`, which
    computes ``saliency`` with that checkpoint's head (a hiergroup or concepts checkpoint, or the
    baselines alone, are then scored under a maskcontrast run's masks)."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        num_examples: int = 4,
        *,
        saliency: Mapping[str, np.ndarray] | None = None,
        clusters: int | None = None,
        threshold: float = 0.5,
        pca_dim: int | None = 32,
        batch_size: int = 1000,
        n_init: int = 3,
        masks_from: str | None = None,
    ) -> None:
        if saliency is None:
            raise ValueError("object_kmeans needs saliency= (image id -> saliency map of a maskcontrast checkpoint)")
        self.saliency = saliency
        self.clusters = clusters
        self.threshold = threshold
        self.pca_dim = pca_dim
        self.batch_size = batch_size
        self.n_init = n_init
        super().__init__(num_classes, class_names, seed, ignore_index, num_examples)

    def _reset(self) -> None:
        # (image id, prototype or None, object mask at feature resolution, label or None)
        self._samples: list[tuple[str, np.ndarray | None, np.ndarray, np.ndarray | None]] = []

    def _mask(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        if image_id not in self.saliency:
            raise ValueError(f"{self.name}: no saliency map for image {image_id!r}")
        sal = np.asarray(self.saliency[image_id], np.float32)
        sal = sal[0] if sal.ndim == 3 else sal
        if sal.shape != size:
            sal = cv2.resize(sal, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return sal

    def _process_eval(self, sample: FeatureSample) -> None:
        size = tuple(sample.features.shape[1:])
        sal = self._mask(sample.image_id, size)
        mask = sal > self.threshold
        proto = None
        if mask.any():
            x = _l2_normalize(_pixels(sample.features))
            weights = np.where(mask, sal, 0).reshape(-1)
            proto = _l2_normalize((weights @ x)[None])[0]
        label = None if sample.label is None else self._clean_label(sample.label)
        self._samples.append((sample.image_id, proto, mask, label))

    def _cluster(self, protos: np.ndarray, k: int) -> np.ndarray:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.decomposition import PCA

        x = protos.astype(np.float64)
        if self.pca_dim and len(x) > 1:
            pca = PCA(n_components=min(self.pca_dim, *x.shape), random_state=self.seed).fit(x)
            keep = pca.explained_variance_ > 1e-12 * max(pca.explained_variance_.max(), 1e-30)
            x = (pca.transform(x) / np.sqrt(np.where(keep, pca.explained_variance_, 1.0)))[:, keep]
        k = min(k, len(x))
        km = MiniBatchKMeans(n_clusters=k, batch_size=self.batch_size, random_state=self.seed, n_init=self.n_init)
        return km.fit_predict(x)

    def evaluate(self) -> EvalResult:
        if not self._samples:
            raise ValueError(f"{self.name}: no eval-split samples were processed")
        with_object = [i for i, s in enumerate(self._samples) if s[1] is not None]
        k = self.clusters or max(1, self.num_classes - 1)
        assign = np.full(len(self._samples), -1, dtype=np.int64)
        if with_object:
            assign[with_object] = self._cluster(np.stack([self._samples[i][1] for i in with_object]), k)
        num_ids = k + 1  # 0 = background
        cont = np.zeros((self.num_classes, num_ids), dtype=np.int64)
        examples: dict[str, np.ndarray] = {}
        object_pixels = labelled = 0
        for (image_id, _proto, mask, label), cluster in zip(self._samples, assign):
            if label is None:
                self.num_skipped += 1
                continue
            pred = resize_nearest(np.where(mask, cluster + 1, 0).astype(np.int64), label.shape)
            cont += contingency(pred, label, num_ids, self.num_classes, self.ignore_index)
            valid = label != self.ignore_index
            object_pixels += int((pred[valid] > 0).sum())
            labelled += int(valid.sum())
            if len(examples) < self.num_examples:
                examples[image_id] = pred
        if num_ids == self.num_classes:
            mapping = hungarian_match(cont, score="iou")
        else:  # the authors' _majority_vote: each predicted id -> its class of highest IoU
            mapping = iou_matrix(cont).argmax(0).astype(np.int64)
        cm = _mapped_confusion(cont, mapping, ConfusionMatrix(self.num_classes, self.ignore_index))
        predictions = {i: self._example(remap(p, mapping)) for i, p in examples.items()}
        extra = {
            "object_share": object_pixels / max(labelled, 1),
            "images_without_object": float(len(self._samples) - len(with_object)),
            "num_clusters": float(k),
        }
        return self._result(cm, extra, predictions)
