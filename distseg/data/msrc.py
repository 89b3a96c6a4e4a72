"""MSRC object-class database v2 (591 images, 23 classes + void).

Layout under root::

    images/<id>.png     RGB, mostly 320x213 or 213x320
    labels/<id>.png     uint8 class ids: 0 = void, 1..23 = MSRC_CLASSES[1:]

Splits (MSRC-v2 has no official one, so this one is ours): an image is in `val` when
``int(md5(id).hexdigest(), 16) % 4 == 0`` (146 of 591 images, 24.7%), otherwise in `train`; `all` is
both. The rule depends only on the id, so it does not change with file order, machine or a subset
of files being present. `labels` is the uint8 label map; ignore_index = 0 (void).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distseg.data.base import Dataset, Sample, register_dataset
from distseg.data.imageio import read_image, read_label_png

MSRC_CLASSES = [
    "void",
    "building",
    "grass",
    "tree",
    "cow",
    "horse",
    "sheep",
    "sky",
    "mountain",
    "aeroplane",
    "water",
    "face",
    "car",
    "bicycle",
    "flower",
    "sign",
    "bird",
    "book",
    "chair",
    "road",
    "cat",
    "dog",
    "body",
    "boat",
]
SPLITS = ("all", "train", "val")


def msrc_split(image_id: str) -> str:
    """'val' or 'train' for an MSRC id (see the module docstring)."""
    return "val" if int(hashlib.md5(image_id.encode("utf-8")).hexdigest(), 16) % 4 == 0 else "train"


@register_dataset("msrc", default_dir="msrc_v2")
class MSRCv2(Dataset):
    """MSRC-v2 images with per-pixel class labels (see the module docstring)."""

    name = "msrc"
    class_names = MSRC_CLASSES
    ignore_index = 0

    def __init__(self, root: str | Path, split: str = "train", limit: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if split not in SPLITS:
            raise ValueError(f"unknown MSRC split {split!r}; expected one of {list(SPLITS)}")
        img_dir, lbl_dir = self.root / "images", self.root / "labels"
        if not img_dir.is_dir() or not lbl_dir.is_dir():
            raise FileNotFoundError(f"MSRC-v2 root {self.root} must contain images/ and labels/")
        images = {p.stem for p in img_dir.glob("*.png")}
        labels = {p.stem for p in lbl_dir.glob("*.png")}
        if images != labels:
            odd = sorted(images ^ labels)
            raise FileNotFoundError(f"MSRC-v2 under {self.root}: {len(odd)} ids lack an image or label, e.g. {odd[:5]}")
        ids = sorted(i for i in images if split == "all" or msrc_split(i) == split)
        self._ids = ids[:limit] if limit else ids
        self._known = set(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, image_id: str) -> Sample:
        if image_id not in self._known:
            raise KeyError(f"no MSRC image {image_id!r} in split {self.split!r}")
        image = read_image(self.root / "images" / f"{image_id}.png")
        label_path = self.root / "labels" / f"{image_id}.png"
        labels = read_label_png(label_path)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{label_path}: label shape {labels.shape} != image shape {image.shape[:2]}")
        return Sample(id=image_id, image=image, labels=labels, meta={"split": msrc_split(image_id)})
