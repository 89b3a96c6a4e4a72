"""The in-loop probe: an evaluation protocol run inside training every `pretrain.probe_every` steps.

It is the metric `distseg tune` stops trials on (ASHA), and a learning curve in MLflow for any run.
Two kinds, chosen by `pretrain.probe_protocol`:

**Labelled** (an evaluation protocol's name; default `dataset_kmeans`, the k-means + Hungarian mIoU).
The probe reads the first `pretrain.probe_images` images of `evaluate.dataset`'s *train* split (the
labels are used by the protocol only, never by the loss) and runs the protocol on the network's
embeddings, exactly as `distseg evaluate` would on those images. A protocol that needs a train split
(`linear`, `knn`) gets the first half of the probe images as its train split and is scored on the
second half. Why the train split: a sweep that selects settings on the images its final evaluation
scores would report a selected, optimistic number. The eval split stays untouched until `distseg
evaluate`.

**Label-free** (`prior_agreement`, for users without labels; :class:`PriorAgreementProbe`). On each
held-out image the network's pixel embeddings are cut into K clusters by per-image k-means (K: the
number of regions the grouping prior finds in that image, or `pretrain.probe_segments`) and the
clusters are compared with the regions of the grouping prior the method learns from
(`pretrain.prior`, computed by the registered prior as mining computes it: the image resized to
`mine.max_side`, then the prior) by the adjusted Rand index; `probe_score` is the mean over images.
See :func:`prior_agreement` for why ARI and why this should track the final evaluation. No label is
read anywhere on this path.

Held-out images for the label-free probe: `pretrain.probe_data`, a data source given by path
(`folder:PATH`, the form any unlabelled user set has; `labeled:PATH`, `voc:PATH`, `coco:PATH` with
`evaluate.train_split`, labels ignored; a bare folder means `folder:PATH`). It must be named
explicitly: the training shards usually hold every image of the user's set (MSRC is mined whole), so
no default set is held out. Images whose id or file is in the training shards (`pretrain.shards`) are
dropped, so the probe only sees images the training never sees; the first `probe_images` that remain
are used, and fewer than 2 is an error (`ProbeError`). The simplest held-out set that needs no change
to mining or ingest: any folder of images of the same kind (for MSRC: BSDS500's train images,
`folder:../shared/data/bsds500/images/train`).

Rank 0 runs the probe (the other workers wait at the next collective); it costs one forward pass
per probe image plus the protocol (a few seconds for 24 images at 320 px on a CPU). The label-free
probe computes its images' prior regions once, when it is built (a UCM with learned edges: 0.4 s for
four 320-px BSDS500 images on one core, measured when it was built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distseg.config import Config

PRIOR_AGREEMENT = "prior_agreement"  # the label-free probe's name in pretrain.probe_protocol
PATH_SOURCES_HINT = "folder:PATH (or labeled:PATH, voc:PATH, coco:PATH; labels are not read)"


class ProbeError(ValueError):
    """A probe that cannot run: unknown or unsuitable protocol, unlabelled or too small data."""


def check_probe(cfg: Config) -> Config:
    """Validate the probe settings on the driver (before Ray starts) and make the data paths absolute."""
    from distseg.eval.extract import DataSpec
    from distseg.eval.protocols import PROTOCOLS, protocol_info, resolve_protocol_name

    pcfg = cfg.pretrain
    if not pcfg.probe_every:
        return cfg
    if pcfg.probe_protocol == PRIOR_AGREEMENT:
        return _check_prior_agreement(cfg)
    for key in ("probe_data", "probe_segments"):
        if getattr(pcfg, key) is not None:
            raise ProbeError(
                f"pretrain.{key}={getattr(pcfg, key)!r} is for the label-free probe only "
                f"(pretrain.probe_protocol={PRIOR_AGREEMENT}); pretrain.probe_protocol={pcfg.probe_protocol!r} "
                "reads evaluate.dataset's train split"
            )
    if resolve_protocol_name(pcfg.probe_protocol) not in PROTOCOLS:
        raise ProbeError(
            f"pretrain.probe_protocol={pcfg.probe_protocol!r} is not a protocol "
            f"(known: {', '.join(PROTOCOLS.list())}, or {PRIOR_AGREEMENT} without labels)"
        )
    info = protocol_info(resolve_protocol_name(pcfg.probe_protocol))
    if info.needs_video or info.needs_concepts or info.needs_saliency:
        raise ProbeError(
            f"pretrain.probe_protocol={pcfg.probe_protocol!r} needs video, a concept dictionary or a saliency "
            "head; the probe runs image protocols on the embedding only (dataset_kmeans, linear, knn, ...)"
        )
    if cfg.evaluate.dataset.split(":")[0] in ("bsds", "folder"):
        raise ProbeError(
            f"pretrain.probe_every needs labels: evaluate.dataset={cfg.evaluate.dataset!r} has no classes "
            f"(without labels: pretrain.probe_protocol={PRIOR_AGREEMENT} with pretrain.probe_data)"
        )
    cfg = cfg.model_copy(deep=True)
    spec = DataSpec.resolve(cfg.evaluate.dataset, cfg.evaluate.root, cfg.evaluate.train_split)
    cfg.evaluate.root = spec.root
    return cfg


def _check_prior_agreement(cfg: Config) -> Config:
    """The label-free probe's settings: a path source of held-out images, a prior that segments."""
    from distseg.data import DATASETS, is_source
    from distseg.grouping.priors import PRIORS
    from distseg.storage import absolute, is_uri

    pcfg = cfg.pretrain
    if not pcfg.probe_data:
        raise ProbeError(
            f"pretrain.probe_protocol={PRIOR_AGREEMENT} needs pretrain.probe_data: held-out images the training "
            f"does not see, as {PATH_SOURCES_HINT}"
        )
    source = pcfg.probe_data if is_source(pcfg.probe_data) else f"folder:{pcfg.probe_data}"
    name, _, path = source.partition(":")
    if not DATASETS.meta(name).get("path_arg") or not path or is_uri(path):
        raise ProbeError(
            f"pretrain.probe_data={pcfg.probe_data!r}: the label-free probe reads a local data source given by "
            f"path, {PATH_SOURCES_HINT}"
        )
    if PRIORS.meta(pcfg.prior).get("yields", "regions") != "regions":
        raise ProbeError(
            f"pretrain.probe_protocol={PRIOR_AGREEMENT} compares the embedding's clusters with the regions of "
            f"pretrain.prior, but pretrain.prior={pcfg.prior!r} yields masks, not regions"
        )
    cfg = cfg.model_copy(deep=True)
    cfg.pretrain.probe_data = f"{name}:{absolute(path)}"
    return cfg


def _embed(model: torch.nn.Module, images: list[np.ndarray], image_size: int | None, device) -> list[np.ndarray]:
    """(D, h, w) embeddings of each image, the model left in the mode it was in."""
    from distseg.eval.features import ModelFeatures

    was_training = model.training
    try:
        extractor = ModelFeatures(model, image_size, str(device))
        with torch.no_grad():
            return [extractor(image) for image in images]
    finally:
        model.train(was_training)


class Probe:
    """`probe(model) -> {"probe_score": headline, "probe/<metric>": ...}` on the fixed probe images."""

    def __init__(self, cfg: Config):
        from distseg.eval.evaluate import LabeledSplit, load_split, plan_protocols

        self.cfg = cfg.model_copy(deep=True)
        pcfg = self.cfg.pretrain
        ecfg = self.cfg.evaluate
        ecfg.protocols, ecfg.diagnostics = [pcfg.probe_protocol], []
        ecfg.limit = pcfg.probe_images
        (self.plan,) = plan_protocols(self.cfg)
        split, self.class_names = load_split(self.cfg, ecfg.train_split)
        if len(split.ids) < 2:
            raise ProbeError(
                f"the probe needs at least 2 images; {ecfg.dataset}/{ecfg.train_split} has {len(split.ids)}"
            )
        if self.plan.info.needs_train:
            half = len(split.ids) // 2
            self.train = LabeledSplit(split.ids[:half], split.images[:half], split.labels[:half])
            self.evals = LabeledSplit(split.ids[half:], split.images[half:], split.labels[half:])
        else:
            self.train, self.evals = None, split
        self.image_size = ecfg.image_size
        self.headline = f"{self.plan.name}/{self.plan.info.headline}"

    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        from distseg.eval.evaluate import run_protocol

        train_feats = _embed(model, self.train.images, self.image_size, device) if self.train else None
        eval_feats = _embed(model, self.evals.images, self.image_size, device)
        extra: dict[str, Any] = {}
        result = run_protocol(
            self.plan, self.class_names, self.cfg.seed, self.train, train_feats, self.evals, eval_feats, 0, extra
        )
        metrics = {f"probe/{k.split('/', 1)[-1]}": float(v) for k, v in result.metrics.items()}
        metrics["probe_score"] = float(result.metrics[self.headline])
        return metrics


def build_probe(cfg: Config) -> Probe | PriorAgreementProbe:
    """The probe `pretrain.probe_protocol` names (a checked config: `check_probe`)."""
    return PriorAgreementProbe(cfg) if cfg.pretrain.probe_protocol == PRIOR_AGREEMENT else Probe(cfg)


# ------------------------------------------------------------------------------------------------
# the label-free probe


def cluster_map(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(h, w) cluster ids of per-image k-means of the L2-normalised pixel embeddings (D, h, w).

    Spherical in effect (k-means on unit vectors, cosine geometry as the protocols); sklearn's
    k-means++ seeding rather than the protocols' faiss random seeding: k-means++ never seeds two
    centres on identical vectors, so an embedding that is constant on each of k regions is cut into
    exactly those k regions (faiss' random seeding merged some in 3 of 6 synthetic images)."""
    from sklearn.cluster import KMeans

    from distseg.eval.protocols.base import _l2_normalize, _pixels

    x = _l2_normalize(_pixels(features))
    k = min(k, len(np.unique(x, axis=0)))
    if k < 2:
        return np.zeros(features.shape[1:], np.int64)
    labels = KMeans(k, init="k-means++", n_init=1, max_iter=50, random_state=seed).fit_predict(x)
    return labels.reshape(features.shape[1:])


def prior_agreement(features: np.ndarray, regions: np.ndarray, k: int | None = None, seed: int = 0) -> float:
    """Adjusted Rand index between the embedding's k clusters and the prior's regions of one image.

    `features` (D, h, w) at any grid; `regions` (H, W) leaf ids of the prior; `k` None: as many
    clusters as the image has regions. The cluster map is upsampled to the regions' size with the
    protocols' nearest-neighbour rule and scored at the prior's resolution.

    Why the adjusted Rand index (sklearn.metrics.adjusted_rand_score): it is corrected for chance, so
    a partition independent of the regions scores 0 in expectation (a constant embedding, one
    cluster, scores exactly 0) and identical partitions score 1, whatever K is. NMI is not corrected
    (random partitions into 40 clusters score well above 0, and more clusters score higher); variation
    of information is unbounded and grows with K, so scores of images with different region counts
    would not average. ARI counts pixel pairs, so large regions weigh most: the few large segments an
    image's semantics live in decide the score, not the many small leaves of a UCM cut.

    Why it should track the final evaluation: the methods learn to make pixels of a prior region
    alike and of different regions unlike (hiergroup's segment contrast, MaskContrast's mask
    prototypes), and the evaluation protocols (k-means + Hungarian, kNN of k-means segments) read
    exactly that clustering structure. On held-out images the score measures how well the learned
    grouping generalises rather than how well the training images were fitted. It is a proxy, not the
    target: it rewards agreement with the prior's boundaries, so a setting that trades semantic
    categories for instance boundaries (hiergroup's cns) can move it the other way; a position-only
    embedding (x, y) scores about 0.2 on the synthetic scenes (regions are compact), the floor a
    useful embedding must clear. `jobs/tune_probe_correlation.py` measures the rank correlation."""
    from sklearn.metrics import adjusted_rand_score

    from distseg.eval.protocols.base import resize_nearest

    k = k or len(np.unique(regions))
    clusters = resize_nearest(cluster_map(features, k, seed), regions.shape)
    return float(adjusted_rand_score(regions.ravel(), clusters.ravel()))


@dataclass
class HeldOut:
    """The label-free probe's images: ids, images at the mined size, the prior's regions."""

    ids: list[str]
    images: list[np.ndarray]
    regions: list[np.ndarray]
    dropped: int  # probe_data images left out because the training shards hold them


def _shard_keys(shards: str) -> tuple[set[str], set[str]]:
    """(image ids with '/' as '_', resolved image files) of every row of the training shards."""
    import pyarrow.parquet as pq

    from distseg.storage import is_uri, resolve_uri
    from distseg.train.ingest import shard_files

    ids, files = set(), set()
    for path in shard_files(shards):
        fs, local = resolve_uri(path)
        table = pq.read_table(local, columns=["image_id", "uri"], filesystem=fs)
        ids.update(i.replace("/", "_") for i in table.column("image_id").to_pylist())
        files.update(u if is_uri(u) else _resolved(u) for u in table.column("uri").to_pylist())
    return ids, files


def _resolved(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def held_out_files(cfg: Config) -> tuple[dict[str, str], int]:
    """(id -> file of the first `probe_images` probe_data images the training shards do not hold,
    how many were dropped for being in the shards). Reads no image and no label."""
    from distseg.data import source_image_files

    pcfg = cfg.pretrain
    try:
        files = source_image_files(pcfg.probe_data, split=cfg.evaluate.train_split)
    except (OSError, ValueError, KeyError) as e:
        raise ProbeError(f"pretrain.probe_data={pcfg.probe_data!r}: {e}") from None
    ids, mined = _shard_keys(pcfg.shards) if pcfg.shards else (set(), set())
    kept = {i: f for i, f in files.items() if i.replace("/", "_") not in ids and _resolved(f) not in mined}
    if len(kept) < 2:
        raise ProbeError(
            f"pretrain.probe_data={pcfg.probe_data!r}: {len(kept)} of its {len(files)} images are not in the "
            f"training shards {pcfg.shards}; the label-free probe needs at least 2 held-out images "
            "(point it at images the training does not see)"
        )
    return dict(list(kept.items())[: pcfg.probe_images]), len(files) - len(kept)


def load_held_out(cfg: Config) -> HeldOut:
    """Read the held-out images, resize them as mining does and run the prior on them once."""
    from distseg.data.imageio import read_image
    from distseg.grouping.priors import create_prior
    from distseg.mining.worker import resize_max_side

    files, dropped = held_out_files(cfg)
    prior = create_prior(cfg.pretrain.prior, cfg)
    images = [resize_max_side(read_image(path), cfg.mine.max_side) for path in files.values()]
    return HeldOut(list(files), images, [prior(image).regions for image in images], dropped)


class PriorAgreementProbe:
    """`probe(model) -> {"probe_score": mean ARI, "probe/ari": ..., ...}` on held-out images, no labels.

    Also reported: `probe/ari_position`, the score of a position-only embedding (x, y) on the same
    images (a constant: the floor to beat), and `probe/regions`, the prior's mean region count."""

    def __init__(self, cfg: Config, held_out: HeldOut | None = None):
        self.cfg = cfg
        self.data = held_out or load_held_out(cfg)
        self.k = cfg.pretrain.probe_segments
        self.position = float(np.mean([self._score(_position(r.shape), r) for r in self.data.regions]))

    def _score(self, features: np.ndarray, regions: np.ndarray) -> float:
        return prior_agreement(features, regions, self.k, self.cfg.seed)

    def score(self, features: list[np.ndarray]) -> float:
        """Mean ARI over the held-out images of their (D, h, w) embeddings."""
        return float(np.mean([self._score(f, r) for f, r in zip(features, self.data.regions, strict=True)]))

    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        value = self.score(_embed(model, self.data.images, None, device))  # the images are at the mined size
        return {
            "probe_score": value,
            "probe/ari": value,
            "probe/ari_position": self.position,
            "probe/regions": float(np.mean([len(np.unique(r)) for r in self.data.regions])),
        }


def _position(shape: tuple[int, int]) -> np.ndarray:
    """(3, h, w) position-only embedding at the 1/4 grid: x, y in [-1, 1] and a constant 1 (so the
    L2 normalisation keeps the plane's geometry instead of collapsing it to the angle)."""
    h, w = max(1, shape[0] // 4), max(1, shape[1] // 4)
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return np.stack([xs, ys, np.ones_like(xs)]).astype(np.float32)
