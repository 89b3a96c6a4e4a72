"""Dataset readers, opened by name: `open_dataset("msrc", split="val")`.

Sources: "synthetic" (built in), "bsds", "msrc", "davis" (real data under the data root, see
../shared/data/README.md) and "folder:PATH" (any image folder, recursive). Every reader yields
`Sample`s: an H x W x 3 uint8 RGB image plus whatever annotation the dataset has.
"""

from __future__ import annotations

from pathlib import Path

from distseg.core.registry import UnknownNameError
from distseg.data import bsds, davis, folder, msrc, synthetic  # noqa: F401  (importing registers them)
from distseg.data.base import DATASETS, Dataset, Sample, default_data_root, register_dataset
from distseg.data.bsds import BSDS500
from distseg.data.davis import DAVIS2016
from distseg.data.folder import ImageFolder
from distseg.data.imageio import ImageDecodeError, decode_image, read_image, read_label_png
from distseg.data.msrc import MSRCv2
from distseg.data.synthetic import SyntheticScenes, make_scene, synthetic_video

__all__ = [
    "BSDS500",
    "DATASETS",
    "DAVIS2016",
    "Dataset",
    "ImageDecodeError",
    "ImageFolder",
    "MSRCv2",
    "Sample",
    "SyntheticScenes",
    "decode_image",
    "default_data_root",
    "make_scene",
    "open_dataset",
    "read_image",
    "read_label_png",
    "register_dataset",
    "synthetic_video",
]


def open_dataset(source: str, root: str | Path | None = None, split: str | None = "train", **kwargs) -> Dataset:
    """Open a dataset by source name (see the module docstring); `kwargs` go to the reader.

    Where each reader's files are comes from its registration (see distseg.data.base.DATASETS):
    `root` defaults to $DISTSEG_DATA_ROOT (else ../shared/data) / its `default_dir` (bsds500, msrc_v2,
    davis2016). A builtin source (synthetic) ignores `root`; options another reader `takes` (the
    synthetic-only `num_images`, `image_size`, `seed`, which the config always carries) are dropped;
    a path source (`folder:PATH`) has no splits and ignores `split`.
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
        return reader(root=path_root, **kwargs)
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
    return {"default_dir": None, "builtin": False, "path_arg": False, "takes": (), **DATASETS.meta(name)}
