"""Dataset readers, opened by name: `open_dataset("msrc", split="val")`.

Sources: "synthetic" (built in), "bsds", "msrc", "davis" (real data under the data root, see
../shared/data/README.md) and "folder:PATH" (any image folder, recursive). Every reader yields
`Sample`s: an H x W x 3 uint8 RGB image plus whatever annotation the dataset has.
"""

from __future__ import annotations

from pathlib import Path

from distseg.data import bsds, davis, folder, msrc, synthetic  # noqa: F401  (importing registers them)
from distseg.data.base import DATASETS, Dataset, Sample, default_data_root, register_dataset
from distseg.data.bsds import BSDS500
from distseg.data.davis import DAVIS2016
from distseg.data.folder import ImageFolder
from distseg.data.imageio import ImageDecodeError, decode_image, read_image, read_label_png
from distseg.data.msrc import MSRCv2
from distseg.data.synthetic import SyntheticScenes, make_scene, synthetic_video

# source name -> folder under the data root
DEFAULT_DIRS = {"bsds": "bsds500", "msrc": "msrc_v2", "davis": "davis2016"}
# the config always carries these (data.num_images, data.image_size, seed); only synthetic uses them
SYNTHETIC_ONLY = ("num_images", "image_size", "seed")

__all__ = [
    "BSDS500", "DATASETS", "DAVIS2016", "Dataset", "ImageDecodeError", "ImageFolder", "MSRCv2", "Sample",
    "SyntheticScenes", "decode_image", "default_data_root", "make_scene", "open_dataset", "read_image",
    "read_label_png", "register_dataset", "synthetic_video",
]


def open_dataset(source: str, root: str | Path | None = None, split: str | None = "train", **kwargs) -> Dataset:
    """Open a dataset by source name (see the module docstring); `kwargs` go to the reader.

    `root` defaults to $DISTSEG_DATA_ROOT (else ../shared/data) / bsds500 | msrc_v2 | davis2016.
    The synthetic source ignores `root`; other sources ignore the synthetic-only `num_images`,
    `image_size` and `seed`; an image folder has no splits and ignores `split`.
    """
    name, _, path = source.partition(":")
    if name != "synthetic":
        kwargs = {k: v for k, v in kwargs.items() if k not in SYNTHETIC_ONLY}
    if name == "folder":
        folder_root = path or root
        if not folder_root:
            raise ValueError("the folder source needs a path: 'folder:PATH'")
        return DATASETS["folder"](root=folder_root, **kwargs)
    if path or name not in DATASETS:
        known = sorted(n for n in DATASETS if n != "folder") + ["folder:PATH"]
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(known)}")
    if name == "synthetic":  # built in: no files
        return DATASETS[name](split=split or "train", **kwargs)
    if root is None and name not in DEFAULT_DIRS:
        raise ValueError(f"data source {name!r} has no default location: pass root=...")
    data_root = Path(root) if root is not None else default_data_root() / DEFAULT_DIRS[name]
    if not data_root.exists():
        raise FileNotFoundError(
            f"{name} data not found at {data_root}: pass root=... (data.root in the config) "
            f"or set DISTSEG_DATA_ROOT to the folder that holds {DEFAULT_DIRS.get(name, name)}/ "
            "(see ../shared/data/README.md)"
        )
    return DATASETS[name](root=data_root, split=split, **kwargs)
