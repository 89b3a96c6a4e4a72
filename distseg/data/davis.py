"""DAVIS 2016 video object segmentation (one foreground object per sequence).

Layout under root::

    JPEGImages/480p/<seq>/00000.jpg ...     854x480 frames
    Annotations/480p/<seq>/00000.png ...    masks, 0 = background, 255 = object
    ImageSets/480p/<split>_sequences.txt    one sequence name per line

A split is read from `<split>_sequences.txt`, or else from the original DAVIS `<split>.txt` (lines
"/JPEGImages/480p/<seq>/00000.jpg /Annotations/480p/<seq>/00000.png"); split "all" is every
sequence folder. The shared copy has only `val` (blackswan, car-shadow, drift-chicane, kite-surf).
Ids are "<seq>/<frame>" ("blackswan/00000"); labels are uint8 0/1 (mask >= 128; > 0 for 0/1 masks),
instances the same as int32 (one object per frame: DAVIS-2016 annotates only the main object, so
other objects in a frame are background); `meta` has "sequence" and "frame" (int).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distseg.data.base import Dataset, Sample, register_dataset
from distseg.data.imageio import read_image, read_label_png


@register_dataset("davis", default_dir="davis2016")
class DAVIS2016(Dataset):
    """DAVIS 2016 frames with their object masks (see the module docstring)."""

    name = "davis"
    class_names = ["background", "object"]
    ignore_index = None

    def __init__(
        self, root: str | Path, split: str = "val", resolution: str = "480p", limit: int | None = None
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.resolution = resolution
        self._frames_dir = self.root / "JPEGImages" / resolution
        self._masks_dir = self.root / "Annotations" / resolution
        if not self._frames_dir.is_dir():
            raise FileNotFoundError(f"DAVIS root {self.root} has no JPEGImages/{resolution}/ folder")
        self._sequences = self._read_split(split)
        self._frames: dict[str, list[str]] = {}
        for seq in self._sequences:
            names = sorted(p.stem for p in (self._frames_dir / seq).glob("*.jpg"))
            if not names:
                raise FileNotFoundError(f"DAVIS sequence {seq!r} has no frames in {self._frames_dir / seq}")
            self._frames[seq] = names
        ids = [f"{seq}/{name}" for seq in self._sequences for name in self._frames[seq]]
        self._ids = ids[:limit] if limit else ids
        self._known = set(self._ids)

    def _read_split(self, split: str) -> list[str]:
        if split == "all":
            return sorted(p.name for p in self._frames_dir.iterdir() if p.is_dir())
        sets = self.root / "ImageSets" / self.resolution
        listing = sets / f"{split}_sequences.txt"
        if listing.is_file():
            return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        pairs = sets / f"{split}.txt"
        if pairs.is_file():  # original DAVIS 2016: "/JPEGImages/480p/<seq>/<frame>.jpg /Annotations/..."
            seqs = [Path(line.split()[0]).parent.name for line in pairs.read_text().splitlines() if line.strip()]
            return list(dict.fromkeys(seqs))
        have = sorted(p.name.removesuffix("_sequences.txt").removesuffix(".txt") for p in sets.glob("*.txt"))
        raise FileNotFoundError(
            f"DAVIS split {split!r} not found: neither {listing} nor {pairs} exists; available splits: {have + ['all']}"
        )

    def ids(self) -> list[str]:
        return list(self._ids)

    def image_files(self) -> dict[str, str]:
        """id -> frame file (what `distseg mine --input davis` mines, and how a mined frame is found again)."""
        return {image_id: str(self._frames_dir / f"{image_id}.jpg") for image_id in self._ids}

    def sequences(self) -> list[str]:
        """The split's sequence names, in listing order."""
        return list(self._sequences)

    def frames(self, seq: str) -> list[Sample]:
        """Every frame of one sequence, in temporal order (ignores `limit`)."""
        if seq not in self._frames:
            raise KeyError(f"no DAVIS sequence {seq!r} in split {self.split!r}; have {self._sequences}")
        return [self._load(seq, name) for name in self._frames[seq]]

    def __getitem__(self, image_id: str) -> Sample:
        if image_id not in self._known:
            raise KeyError(f"no DAVIS frame {image_id!r} in split {self.split!r}")
        seq, name = image_id.split("/")
        return self._load(seq, name)

    def _load(self, seq: str, name: str) -> Sample:
        image = read_image(self._frames_dir / seq / f"{name}.jpg")
        mask_path = self._masks_dir / seq / f"{name}.png"
        mask = read_label_png(mask_path)
        labels = (mask >= (128 if mask.max() > 1 else 1)).astype(np.uint8)  # 0/255 masks, or 0/1 (palette)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {labels.shape} != frame shape {image.shape[:2]}")
        meta = {"sequence": seq, "frame": int(name)}
        return Sample(id=f"{seq}/{name}", image=image, labels=labels, instances=labels.astype(np.int32), meta=meta)
