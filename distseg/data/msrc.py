"""MSRC object-class database v2 (591 images, 23 classes + void).

Layout under root::

    images/<id>.png     RGB, mostly 320x213 or 213x320
    labels/<id>.png     uint8 class ids: 0 = void, 1..23 = MSRC_CLASSES[1:]

Splits (MSRC-v2 has no official one, so this one is ours): an image is in `val` when
``int(md5(id).hexdigest(), 16) % 4 == 0`` (146 of 591 images, 24.7%), otherwise in `train`; `all` is
both (`distseg.data.base.hash_split`, the rule of every labelled folder without split files). The
rule depends only on the id, so it does not change with file order, machine or a subset of files
being present. `labels` is the uint8 label map; ignore_index = 0 (void). The reader is a labelled
folder (distseg.data.labeled) with these classes built in.
"""

from __future__ import annotations

from pathlib import Path

from distseg.data.base import hash_split, register_dataset
from distseg.data.labeled import ClassList, LabeledFolder

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

msrc_split = hash_split  # 'val' or 'train' for an MSRC id (see the module docstring)


@register_dataset("msrc", default_dir="msrc_v2")
class MSRCv2(LabeledFolder):
    """MSRC-v2 images with per-pixel class labels: a labelled folder with MSRC's classes, void = 0 and
    the hash split (see the module docstring and distseg.data.labeled)."""

    name = "msrc"
    title = "MSRC"
    splits_dir = None  # always the hash rule
    image_extensions = ("png",)
    default_classes = ClassList(tuple(MSRC_CLASSES), void=0, source="MSRC-v2 (built in)")
    layout_hint = "images/<id>.png and labels/<id>.png"

    def __init__(self, root: str | Path, split: str = "train", limit: int | None = None, strict: bool = True) -> None:
        super().__init__(root, split=split, limit=limit, strict=strict)

    @property
    def source(self) -> str:
        return "msrc"
