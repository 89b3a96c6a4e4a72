"""BSDS500 (Berkeley Segmentation Dataset): images with several human segmentations each.

Layout under root, either split into folders (the full dataset)::

    images/{train,val,test}/<id>.jpg          200 / 100 / 200 images, 481x321 or 321x481
    groundTruth/{train,val,test}/<id>.mat     loadmat(p)["groundTruth"]: 1 x N cell, N = 4..9 annotators

or flat (`bench_fixtures/` of the official benchmark; open it with ``split=None``)::

    images/<id>.jpg
    groundTruth/<id>.mat

Each cell entry has `Segmentation` (uint16 label map) and `Boundaries` (uint8 0/1 map). A sample's
id is the file stem (ids are unique across splits); `labels` is None because the annotators
disagree; `meta["segmentations"]` / `meta["boundaries"]` hold one H x W map per annotator and
`meta["split"]` the folder the image came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distseg.data.base import Dataset, Sample, register_dataset
from distseg.data.imageio import read_image

SPLITS = {
    "train": ("train",),
    "val": ("val",),
    "test": ("test",),
    "trainval": ("train", "val"),
    "all": ("train", "val", "test"),
}


def load_ground_truth(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(segmentations, boundaries) of a BSDS groundTruth .mat, one H x W array per annotator (uint16
    labels, uint8 0/1 boundaries): the benchmark's reader (`eval.bsds.load_bsds_ground_truth`), kept
    compact in memory, with a wrong or damaged file named in one ValueError."""
    from distseg.eval.bsds.io import load_bsds_ground_truth

    try:
        segs, bdrys = load_bsds_ground_truth(path)
    except Exception as err:  # MatReadError, KeyError, ValueError ... on a wrong or damaged file
        raise ValueError(f"{path}: not a BSDS groundTruth file ({type(err).__name__}: {err})") from err
    return [s.astype(np.uint16) for s in segs], [b.astype(np.uint8) for b in bdrys]


@register_dataset("bsds", default_dir="bsds500")
class BSDS500(Dataset):
    """BSDS500 images and their annotator segmentations (see the module docstring)."""

    name = "bsds"
    class_names: list[str] = []  # no semantic classes: segments are per-image
    ignore_index = None

    def __init__(self, root: str | Path, split: str | None = "train", limit: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if not (self.root / "images").is_dir():
            raise FileNotFoundError(f"BSDS500 root {self.root} has no images/ folder")
        if split is None:
            folders: tuple[str | None, ...] = (None,)
        elif split in SPLITS:
            folders = SPLITS[split]
        else:
            raise ValueError(f"unknown BSDS split {split!r}; expected one of {sorted(SPLITS)} or None (flat layout)")
        self._files: dict[str, tuple[str | None, Path, Path]] = {}
        for folder in folders:
            self._scan(folder)
        if not self._files:
            raise FileNotFoundError(f"no BSDS images for split {split!r} under {self.root / 'images'}")
        if limit:
            self._files = dict(list(self._files.items())[:limit])

    def _scan(self, folder: str | None) -> None:
        img_dir = self.root / "images" if folder is None else self.root / "images" / folder
        gt_dir = self.root / "groundTruth" if folder is None else self.root / "groundTruth" / folder
        if not img_dir.is_dir():
            hint = " (a flat layout: open it with split=None)" if any((self.root / "images").glob("*.jpg")) else ""
            raise FileNotFoundError(f"BSDS split folder {img_dir} does not exist{hint}")
        for img in sorted(img_dir.glob("*.jpg")):
            gt = gt_dir / f"{img.stem}.mat"
            if not gt.is_file():
                raise FileNotFoundError(f"BSDS image {img} has no ground truth {gt}")
            if img.stem in self._files:
                raise ValueError(f"BSDS id {img.stem!r} occurs in two splits under {self.root}")
            self._files[img.stem] = (folder, img, gt)

    def ids(self) -> list[str]:
        return list(self._files)

    def image_path(self, image_id: str) -> Path:
        return self._files[image_id][1]

    def ground_truth_path(self, image_id: str) -> Path:
        return self._files[image_id][2]

    def __getitem__(self, image_id: str) -> Sample:
        try:
            folder, img_path, gt_path = self._files[image_id]
        except KeyError:
            raise KeyError(f"no BSDS image {image_id!r} in split {self.split!r}") from None
        image = read_image(img_path)
        segs, bdrys = load_ground_truth(gt_path)
        for seg in segs:
            if seg.shape != image.shape[:2]:
                raise ValueError(f"{gt_path}: segmentation shape {seg.shape} != image shape {image.shape[:2]}")
        meta = {"split": folder, "segmentations": segs, "boundaries": bdrys}
        return Sample(id=image_id, image=image, meta=meta)
