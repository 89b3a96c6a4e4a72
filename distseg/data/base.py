"""What every reader yields, and the registry that opens a dataset by name."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from distseg.core.registry import Registry


class DataProblem(NamedTuple):
    """A file that cannot be used as it is, and why (what `distseg data check` lists)."""

    path: str
    reason: str


def hash_split(image_id: str) -> str:
    """'val' or 'train' from the id alone: ``int(md5(id).hexdigest(), 16) % 4 == 0`` -> 'val' (about a quarter).

    The split rule of every reader whose data has no split files (MSRC-v2, a labelled folder without
    splits/): it does not change with file order, machine or a subset of the files being present."""
    return "val" if int(hashlib.md5(image_id.encode("utf-8")).hexdigest(), 16) % 4 == 0 else "train"


@dataclass
class Sample:
    """One image with whatever annotation its dataset has."""

    id: str  # stable and unique within the dataset (derived from the source path, never an index)
    image: np.ndarray  # H x W x 3 uint8 RGB
    labels: np.ndarray | None = None  # H x W integer semantic class ids; `ignore_index` of the dataset = void
    instances: np.ndarray | None = None  # H x W int32 instance ids, 0 = none
    meta: dict[str, Any] = field(default_factory=dict)  # dataset-specific extras (see each reader)


class Dataset:
    """A finite, re-iterable collection of samples. Readers subclass it."""

    name: str = "dataset"
    class_names: list[str] = []  # index = class id
    ignore_index: int | None = None  # label value that means void / not annotated

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids(self) -> list[str]:
        raise NotImplementedError

    def __getitem__(self, image_id: str) -> Sample:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[Sample]:
        for image_id in self.ids():
            yield self[image_id]


DatasetFactory = Callable[..., Dataset]
# name -> reader class. Metadata (what open_dataset reads, so it keeps no per-reader lists):
#   default_dir: the reader's folder under the data root ("msrc_v2"); opened as reader(root=..., split=...)
#   builtin:     no files; opened as reader(split=...), `root` ignored
#   path_arg:    the source names its own path, "name:PATH"; opened as reader(root=PATH)
#   splits:      with path_arg: the path holds splits too; opened as reader(root=PATH, split=...)
#   takes:       option names only this reader uses (others drop them, as the config always carries them)
DATASETS: Registry[DatasetFactory] = Registry("data source")


def register_dataset(
    name: str,
    *,
    default_dir: str | None = None,
    builtin: bool = False,
    path_arg: bool = False,
    splits: bool = False,
    takes: tuple[str, ...] = (),
) -> Callable[[DatasetFactory], DatasetFactory]:
    """Class decorator: the reader `name`, with where open_dataset finds its files (see DATASETS)."""
    if sum((default_dir is not None, builtin, path_arg)) > 1:
        raise ValueError(f"data source {name!r}: give at most one of default_dir, builtin, path_arg")
    if splits and not path_arg:
        raise ValueError(f"data source {name!r}: splits=True is for path sources (path_arg=True)")
    return DATASETS.register(
        name, default_dir=default_dir, builtin=builtin, path_arg=path_arg, splits=splits, takes=tuple(takes)
    )


def default_data_root() -> Path:
    """$DISTSEG_DATA_ROOT, else ../shared/data relative to the working directory."""
    return Path(os.environ.get("DISTSEG_DATA_ROOT", Path("..") / "shared" / "data"))
