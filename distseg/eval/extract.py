"""Feature extraction on a Ray Data actor pool: one feature source over many images, built once per actor.

    rows = extract_features("rgbxy", {"image_size": 320}, images=[img0, img1, ...])
    for row in rows: ...  # FeatureRow(index, features (D, h, w) float32, label or None), in input order

``ray.data.from_items`` -> ``map_batches(FeatureActor, compute=ActorPoolStrategy(...))`` -> rows streamed
back in input order (``preserve_order``), so a consumer may process them as they come and the driver
holds only what it keeps. An item carries either its image (``images=``: the labelled splits, which the
driver reads anyway for its pictures) or only an id (``ids=`` with ``data=``): the actor then reads the
sample from its own copy of the dataset and returns its label too (video frames: the driver never holds
a video's frames; on a multi-node cluster the data folder must then be readable from every node).

Pool: one actor per GPU (``num_gpus=1``, device ``cuda``) when the source runs a network (its
``FEATURES`` metadata ``gpu``) and the cluster has GPUs, else one actor per CPU (``num_cpus=1``); never
more actors than batches. The caller starts Ray (``distseg.cluster.init_ray``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

BATCH_SIZE = 4  # images per actor call: small blocks stream back early and balance the pool


@dataclass(frozen=True)
class DataSpec:
    """How an actor opens a dataset itself: ``open_dataset(source, root=root, split=split, **options)``.

    Build it with :meth:`resolve` on the driver, so a relative or default root becomes the absolute
    folder (Ray workers run in another working directory)."""

    source: str
    root: str | None = None
    split: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, source: str, root: str | Path | None, split: str | None, **options: Any) -> DataSpec:
        from distseg.data import DATASETS, default_data_root

        name = source.partition(":")[0]
        meta = DATASETS.meta(name) if name in DATASETS else {}
        if root is None and meta.get("default_dir"):
            root = default_data_root() / meta["default_dir"]
        return cls(source, str(Path(root).resolve()) if root is not None else None, split, dict(options))

    def open(self):
        from distseg.data import open_dataset

        return open_dataset(self.source, root=self.root, split=self.split, **self.options)


class FeatureRow(NamedTuple):
    index: int  # position of the item in the input
    features: np.ndarray  # (D, h, w) float32
    label: np.ndarray | None  # the sample's label map (items read by id), else None


def _column(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A batch column: stacked when the shapes agree, else a 1-D object array (a ragged tensor)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column


class FeatureActor:
    """Ray Data callable class: builds the feature source once, then maps batches of items to features.

    Output columns: ``index``, ``features``, and for items read by id ``label`` (int32; a 1x1 zero map
    where the sample has none) and ``has_label``."""

    def __init__(self, source: str, source_kwargs: dict, data: DataSpec | None = None, plugins: Sequence[str] = ()):
        import ray
        import torch

        from distseg.eval.features import FEATURES, create_features

        if plugins:  # a plugin may register the feature source or the dataset
            from distseg.config import import_plugins

            import_plugins(list(plugins))
        kwargs = dict(source_kwargs)
        if FEATURES.meta(source).get("gpu"):
            kwargs.setdefault("device", "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self.fn = create_features(source, **kwargs)
        self.dataset = data.open() if data is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"index": np.asarray(batch["index"], np.int64)}
        if "image" in batch:
            images, labels = list(batch["image"]), None
        else:
            samples = [self.dataset[str(image_id)] for image_id in batch["image_id"]]
            images, labels = [s.image for s in samples], [s.labels for s in samples]
        out["features"] = _column([np.asarray(self.fn(image), np.float32) for image in images])
        if labels is not None:
            out["has_label"] = np.array([lab is not None for lab in labels])
            out["label"] = _column(
                [np.zeros((1, 1), np.int32) if lab is None else np.asarray(lab, np.int32) for lab in labels]
            )
        return out


def pool_size(source: str, num_batches: int) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor): one per GPU for a network source on a GPU cluster, else one per CPU."""
    import ray

    from distseg.eval.features import FEATURES

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and FEATURES.meta(source).get("gpu"):
        return max(1, min(gpus, num_batches)), {"num_gpus": 1}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, num_batches)), {"num_cpus": 1}


@contextlib.contextmanager
def _data_context(progress: bool):
    """Ray Data settings of one extraction (restored after): rows in input order, no Ray progress bars
    (`extract_features` shows its own), the actor's own exception raised as is."""
    import ray

    context = ray.data.DataContext.get_current()
    settings = {
        "enable_progress_bars": False,
        "enable_operator_progress_bars": False,
        "print_on_execution_start": False,
        "raise_original_map_exception": True,
    }
    saved = {key: getattr(context, key) for key in settings}
    saved_order = context.execution_options.preserve_order
    try:
        for key, value in settings.items():
            setattr(context, key, value)
        context.execution_options.preserve_order = True
        yield context
    finally:
        for key, value in saved.items():
            setattr(context, key, value)
        context.execution_options.preserve_order = saved_order


def extract_features(
    source: str,
    source_kwargs: dict,
    *,
    images: Sequence[np.ndarray] | None = None,
    ids: Sequence[str] | None = None,
    data: DataSpec | None = None,
    name: str = "features",
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    plugins: Sequence[str] = (),
) -> Iterator[FeatureRow]:
    """Features of `images` (or of the samples `ids` of `data`) by the feature source `source`, built
    as ``create_features(source, **source_kwargs)`` in each actor; yields rows in input order.

    `name` labels the stage's progress bar. Ray must be initialised."""
    import ray

    if (images is None) == (ids is None) or (ids is not None and data is None):
        raise ValueError("pass images=, or ids= with data=")
    if images is not None:
        items = [{"index": i, "image": np.asarray(image)} for i, image in enumerate(images)]
    else:
        items = [{"index": i, "image_id": str(image_id)} for i, image_id in enumerate(ids)]
    if not items:
        return
    total = len(items)
    num_batches = math.ceil(total / batch_size)
    actors, resources = pool_size(source, num_batches)
    with _data_context(progress):
        ds = ray.data.from_items(items, override_num_blocks=num_batches)
        del items  # the images now live in the object store
        with warnings.catch_warnings():
            # restarts can only be bounded through ray_remote_args (Ray documents map_batches(...,
            # max_restarts=N)); its deprecation warning has no named replacement in the pinned Ray
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                FeatureActor,
                fn_constructor_kwargs={
                    "source": source,
                    "source_kwargs": source_kwargs,
                    "data": data,
                    "plugins": list(plugins),
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                # an actor that dies (out of memory, a crash in native code) fails the stage with Ray's
                # error instead of restarting forever (Ray Data's default) on the same images
                max_restarts=0,
                max_task_retries=0,
                **resources,
            )
        ds.set_name(name)
        # the stage's own progress (Ray Data's bar is off: its non-terminal form is a log of operator
        # states); refreshed in place on a terminal, a line every 10 s otherwise, cleared when done as the
        # stage's other bars are (the protocols' result lines follow)
        tty = sys.stderr.isatty()
        bar = tqdm(
            total=total, desc=name, unit="img", disable=not progress, mininterval=0.5 if tty else 10, leave=False
        )
        with bar:
            for row in ds.iter_rows():
                # copies: a view would pin its whole block in the object store for as long as it is kept
                label = np.array(row["label"]) if "label" in row and bool(row["has_label"]) else None
                bar.update(1)
                if bar.n >= total:  # done: clear it now, not when a consumer that stops here lets go of us
                    bar.close()
                yield FeatureRow(int(row["index"]), np.array(row["features"], np.float32), label)


def extract_all(source: str, source_kwargs: dict, images: Sequence[np.ndarray], **kwargs: Any) -> list[np.ndarray]:
    """The features of every image, as a list in input order (see :func:`extract_features`)."""
    out: list[np.ndarray | None] = [None] * len(images)
    for row in extract_features(source, source_kwargs, images=images, **kwargs):
        out[row.index] = row.features
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise RuntimeError(f"feature extraction returned no row for {len(missing)} of {len(images)} images")
    return out
