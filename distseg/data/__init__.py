"""Dataset readers, opened by name: `open_dataset("msrc", split="val")`.

Sources: "synthetic" (built in), "bsds", "msrc", "davis" (real data under the data root, see
../shared/data/README.md), "folder:PATH" (any image folder, recursive, no labels) and a user's own
labelled data: "labeled:PATH" (images/, labels/, classes.txt), "voc:PATH" (PASCAL VOC layout) and
"coco:PATH" (COCO instances or panoptic JSON). Every reader yields `Sample`s: an H x W x 3 uint8 RGB
image plus whatever annotation the dataset has. `distseg data check SOURCE` (distseg.data.check)
validates a source; `source_image_files` gives mining the image files of a source.
"""

from __future__ import annotations

from pathlib import Path

from distseg.core.registry import UnknownNameError
from distseg.data import bsds, coco, davis, folder, labeled, msrc, synthetic, voc  # noqa: F401  (registers them)
from distseg.data.base import (
    DATASETS,
    DataProblem,
    Dataset,
    Sample,
    default_data_root,
    hash_split,
    register_dataset,
)
from distseg.data.bsds import BSDS500
from distseg.data.coco import COCOSegmentation
from distseg.data.davis import DAVIS2016
from distseg.data.folder import ImageFolder
from distseg.data.imageio import ImageDecodeError, decode_image, read_image, read_label_png
from distseg.data.labeled import ClassList, LabeledFiles, LabeledFolder, LabelError
from distseg.data.msrc import MSRCv2
from distseg.data.synthetic import SyntheticScenes, make_scene, synthetic_video
from distseg.data.voc import VOCSegmentation

__all__ = [
    "BSDS500",
    "COCOSegmentation",
    "DATASETS",
    "DAVIS2016",
    "ClassList",
    "DataProblem",
    "Dataset",
    "ImageDecodeError",
    "ImageFolder",
    "LabelError",
    "LabeledFiles",
    "LabeledFolder",
    "MSRCv2",
    "Sample",
    "SyntheticScenes",
    "VOCSegmentation",
    "decode_image",
    "default_data_root",
    "hash_split",
    "is_source",
    "make_scene",
    "open_dataset",
    "read_image",
    "read_label_png",
    "register_dataset",
    "source_image_files",
    "synthetic_video",
]


def open_dataset(source: str, root: str | Path | None = None, split: str | None = "train", **kwargs) -> Dataset:
    """Open a dataset by source name (see the module docstring); `kwargs` go to the reader.

    Where each reader's files are comes from its registration (see distseg.data.base.DATASETS):
    `root` defaults to $DISTSEG_DATA_ROOT (else ../shared/data) / its `default_dir` (bsds500, msrc_v2,
    davis2016). A builtin source (synthetic) ignores `root`; options another reader `takes` (the
    synthetic-only `num_images`, `image_size`, `seed`, which the config always carries) are dropped;
    a path source with splits (`labeled:PATH`, `voc:PATH`, `coco:PATH`) takes `split` (None: all), one
    without (`folder:PATH`) ignores it.
    """
    name, _, path = source.partition(":")
    meta = _where(name) if name in DATASETS else None
    if meta is None or (path and not meta["path_arg"]):
        known = sorted(n for n in DATASETS if not _where(n)["path_arg"])
        known += sorted(f"{n}:PATH" for n in DATASETS if _where(n)["path_arg"])
        raise UnknownNameError(f"unknown data source {source!r}; known: {', '.join(known)}")
    others = {key for n in DATASETS if n != name for key in _where(n)["takes"]}
    kwargs = {k: v for k, v in kwargs.items() if k not in others or k in meta["takes"]}
    reader = DATASETS.get(name)
    if meta["path_arg"]:
        path_root = path or root
        if not path_root:
            raise ValueError(f"the {name} source needs a path: '{name}:PATH'")
        return reader(root=path_root, split=split, **kwargs) if meta["splits"] else reader(root=path_root, **kwargs)
    if meta["builtin"]:  # no files
        return reader(split=split or "train", **kwargs)
    default_dir = meta["default_dir"]
    if root is None and default_dir is None:
        raise ValueError(f"data source {name!r} has no default location: pass root=...")
    data_root = Path(root) if root is not None else default_data_root() / default_dir
    if not data_root.exists():
        raise FileNotFoundError(
            f"{name} data not found at {data_root}: pass root=... (data.root in the config) "
            f"or set DISTSEG_DATA_ROOT to the folder that holds {default_dir or name}/ "
            "(see ../shared/data/README.md)"
        )
    return reader(root=data_root, split=split, **kwargs)


def _where(name: str) -> dict:
    """A reader's registration metadata, with the defaults of register_dataset filled in."""
    return {
        "default_dir": None,
        "builtin": False,
        "path_arg": False,
        "splits": False,
        "takes": (),
        **DATASETS.meta(name),
    }


def is_source(text: str) -> bool:
    """Whether `text` names a data source ("voc:PATH", "msrc", ...) rather than a path or URI: a
    registered name, followed by ':' for a path source; a bare name only when no such file exists."""
    if "://" in text:
        return False
    name, colon, _ = text.partition(":")
    if name not in DATASETS:
        return False
    return bool(colon) if _where(name)["path_arg"] else not colon and not Path(text).exists()


def source_image_files(source: str, split: str | None = "train", root: str | Path | None = None) -> dict[str, str]:
    """id -> image file of a data source's split (what `distseg mine --input SOURCE` mines).

    Labels are not read (mining needs images only), but the source must list cleanly: an image of
    the split without its label is an error that names `distseg data check`. Sources whose images are
    not files (synthetic) raise ValueError."""
    dataset = open_dataset(source, root=root, split=split)
    files = getattr(dataset, "image_files", None)
    if files is None:
        raise ValueError(f"data source {source!r} has no image files to mine (write its images to a folder)")
    return {image_id: str(Path(path).absolute()) for image_id, path in files().items()}  # for Ray workers
