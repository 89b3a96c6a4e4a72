"""COCO layout: `open_dataset("coco:PATH", split="val")`, semantic and instance maps from COCO's JSON.

Layout under PATH::

    annotations/instances_<split>.json       COCO instances (polygons or RLE), e.g. instances_val2017.json
      or annotations/panoptic_<split>.json   COCO panoptic, with its PNGs in annotations/panoptic_<split>/
    <split>/<file_name>                      the images (or images/<split>/<file_name>, or images/<file_name>)

Splits are named by the annotation files; `train` also finds the one file whose split starts with it
(`train2017`), and `all` is every file together. An image's id is its file_name without the
extension ("000000000139").

Instances: class 0 is `background` (pixels in no annotation), classes 1..K are the JSON's categories
sorted by id, void = 255. Annotations are painted largest first, so a small object on a large one
stays visible; a crowd region (iscrowd) gets its class in the semantic map but is no instance.
`instances` numbers the other annotations 1..N in that order. Masks are decoded with pycocotools.
Panoptic: the categories (things and stuff) sorted by id are classes 0..K-1, unlabelled pixels are
void (255); `instances` numbers the non-crowd thing segments 1..N.

The annotations of the opened split(s) are read once, on opening (a large instances file takes a
while). Problems (a missing image file, an unknown category, an annotation for no image, an empty
split) are listed like a labelled folder's, and `data check` reports them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distseg.data.base import DataProblem, Sample, register_dataset
from distseg.data.imageio import ImageDecodeError, open_image, read_image
from distseg.data.labeled import MAX_CLASSES, ClassList, LabeledFiles, LabelError

KINDS = ("instances", "panoptic")


@register_dataset("coco", path_arg=True, splits=True)
class COCOSegmentation(LabeledFiles):
    """COCO instances (or panoptic) annotations as semantic and instance maps (see the module docstring)."""

    name = "coco"
    title = "COCO"

    def __init__(
        self, root: str | Path, split: str | None = "train", limit: int | None = None, strict: bool = True
    ) -> None:
        self.root = Path(root)
        ann_dir = self.root / "annotations"
        if not ann_dir.is_dir():
            raise FileNotFoundError(
                f"COCO root {self.root} has no annotations/ (layout: annotations/instances_<split>.json "
                "and the images in <split>/)"
            )
        files: dict[str, tuple[str, Path]] = {}
        for kind in reversed(KINDS):  # instances win over panoptic for the same split
            for path in sorted(ann_dir.glob(f"{kind}_*.json")):
                files[path.stem[len(kind) + 1 :]] = (kind, path)
        if not files:
            raise FileNotFoundError(f"COCO root {self.root}: no annotations/instances_<split>.json (or panoptic_)")
        self.available = sorted(files) + ["all"]
        wanted = split or "all"
        if wanted == "all":
            chosen = sorted(files)
        elif wanted in files:
            chosen = [wanted]
        else:
            chosen = [s for s in files if s.startswith(wanted)]
            if len(chosen) != 1:
                raise ValueError(f"unknown COCO split {wanted!r} for {self.source}; expected one of {self.available}")
        self.problems = []
        self._entries: dict[str, dict] = {}  # id -> {"path", "height", "width", "anns" | "png", "json", "kind"}
        dropped: dict[str, list[DataProblem]] = {"all": []}
        self.split_ids = {}
        classes = None
        for name in chosen:
            kind, path = files[name]
            data = self._load(path)
            these = self._class_list(kind, data, path)
            if classes is not None and these.names != classes.names:
                raise ValueError(
                    f"COCO root {self.root}: {path.name} has other categories than {classes.source}; "
                    "open one split at a time"
                )
            classes = classes or these
            ids, bad = self._index(name, kind, path, data)
            self.split_ids[name] = ids
            dropped[name] = bad
            dropped["all"] += bad
        self.classes = classes
        if wanted == "all":
            self.split_ids["all"] = sorted(i for name in chosen for i in self.split_ids[name])
        elif wanted not in self.split_ids:  # "train" for train2017
            self.split_ids[wanted], dropped[wanted] = self.split_ids[chosen[0]], dropped[chosen[0]]
        self._select(wanted, limit, dropped, strict)

    # ------------------------------------------------------------ listing

    @staticmethod
    def _load(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{path}: not a COCO annotation file (no 'images' list)")
        if not isinstance(data.get("categories"), list) or not data["categories"]:
            raise ValueError(f"{path}: no 'categories' list")
        return data

    def _class_list(self, kind: str, data: dict, path: Path) -> ClassList:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = [str(c["name"]) for c in cats]
        if kind == "instances":
            names = ["background", *names]
        if len(names) > MAX_CLASSES:
            raise ValueError(f"{path}: {len(names)} classes; at most {MAX_CLASSES} are supported")
        offset = 1 if kind == "instances" else 0
        self._category_class = {int(c["id"]): i + offset for i, c in enumerate(cats)}
        self._things = {int(c["id"]) for c in cats if c.get("isthing", 1)}
        return ClassList(tuple(names), 255, None, None, str(path))

    def _image_folder(self, split: str) -> Path:
        for folder in (self.root / split, self.root / "images" / split, self.root / "images"):
            if folder.is_dir():
                return folder
        raise FileNotFoundError(
            f"COCO root {self.root}: no image folder for split {split!r} ({split}/ or images/{split}/)"
        )

    def _index(self, split: str, kind: str, path: Path, data: dict) -> tuple[list[str], list[DataProblem]]:
        folder = self._image_folder(split)
        by_coco_id: dict[int, str] = {}
        listed = {img.get("id") for img in data["images"]}
        bad: list[DataProblem] = []
        ids = []
        for img in data["images"]:
            file_name = str(img.get("file_name", ""))
            image_id = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
            if image_id in self._entries:
                self.problems.append(DataProblem(str(path), f"image {file_name} is listed twice"))
                continue
            file = folder / file_name
            entry = {
                "path": file,
                "height": int(img.get("height", 0)),
                "width": int(img.get("width", 0)),
                "coco_id": img.get("id"),
                "file_name": file_name,
                "json": path,
                "kind": kind,
                "anns": [],
                "png": None,
            }
            if not file.is_file():
                bad.append(DataProblem(str(file), f"image file missing (listed in {path.name})"))
                continue
            self._entries[image_id] = entry
            by_coco_id[img.get("id")] = image_id
            ids.append(image_id)
        anns = data.get("annotations") or []
        for ann in anns:
            image_id = by_coco_id.get(ann.get("image_id"))
            what = f"annotation {ann.get('id', ann.get('file_name'))}"
            if image_id is None:  # an image whose file is missing (reported) or no image at all
                if ann.get("image_id") not in listed:
                    self.problems.append(
                        DataProblem(str(path), f"{what}: image_id {ann.get('image_id')} is not in images")
                    )
                continue
            entry = self._entries[image_id]
            if kind == "instances":
                if int(ann.get("category_id", -1)) not in self._category_class:
                    bad.append(
                        DataProblem(
                            str(path),
                            f"{what} (image {entry['file_name']}): category_id {ann.get('category_id')} "
                            "is not in categories",
                        )
                    )
                    entry["bad"] = True
                    continue
                entry["anns"].append(ann)
            else:
                png = path.parent / path.stem / str(ann.get("file_name", ""))
                unknown = [
                    s.get("category_id")
                    for s in ann.get("segments_info", [])
                    if s.get("category_id") not in self._category_class
                ]
                if unknown:
                    bad.append(DataProblem(str(png), f"segment category_id(s) {unknown} are not in categories"))
                    entry["bad"] = True
                elif not png.is_file():
                    bad.append(DataProblem(str(png), f"panoptic PNG missing (listed in {path.name})"))
                    entry["bad"] = True
                entry["png"] = png
                entry["anns"] = list(ann.get("segments_info", []))
        if kind == "panoptic":
            for image_id in ids:
                entry = self._entries[image_id]
                if entry["png"] is None:
                    bad.append(DataProblem(str(entry["path"]), f"no panoptic annotation in {path.name}"))
                    entry["bad"] = True
        self.problems += bad
        ids = sorted(i for i in ids if not self._entries[i].get("bad"))
        if not ids:
            self.problems.append(DataProblem(str(path), f"split {split!r} is empty (no usable image)"))
        return ids, bad

    # ------------------------------------------------------------ reading

    def image_path(self, image_id: str) -> Path:
        return self._entries[image_id]["path"]

    def label_name(self, image_id: str) -> str:
        e = self._entries[image_id]
        if e["kind"] == "panoptic":
            return str(e["png"])
        return f"{e['json']} (image {e['coco_id']}, {e['file_name']})"

    def _mask(self, ann: dict, height: int, width: int, where: str) -> np.ndarray:
        from pycocotools import mask as mask_utils

        segm = ann.get("segmentation")
        try:
            if isinstance(segm, list):
                polygons = [p for p in segm if len(p) >= 6]  # fewer than 3 points cover no area
                if not polygons:
                    return np.zeros((height, width), bool)
                rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            elif isinstance(segm, dict) and "counts" in segm:
                if list(segm.get("size", [])) != [height, width]:
                    raise ValueError(
                        f"RLE size {segm.get('size')} != the image entry's [height, width] {[height, width]}"
                    )
                rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
            else:
                raise ValueError(f"segmentation is neither polygons nor RLE: {type(segm).__name__}")
            return mask_utils.decode(rle).astype(bool)
        except Exception as e:  # pycocotools raises TypeError, ValueError, ... on malformed input
            raise LabelError(where, f"annotation {ann.get('id')}: {e}") from None

    def _render(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        self._known(image_id)
        e = self._entries[image_id]
        h, w = e["height"], e["width"]
        if e["kind"] == "panoptic":
            return self._render_panoptic(e)
        semantic = np.zeros((h, w), np.uint8)
        instances = np.zeros((h, w), np.int32)
        anns = sorted(e["anns"], key=lambda a: (-float(a.get("area", 0)), a.get("id", 0)))
        n = 0
        for ann in anns:
            mask = self._mask(ann, h, w, self.label_name(image_id))
            semantic[mask] = self._category_class[int(ann["category_id"])]
            if not ann.get("iscrowd"):
                n += 1
                instances[mask] = n
            else:
                instances[mask] = 0
        return semantic, instances

    def _render_panoptic(self, e: dict) -> tuple[np.ndarray, np.ndarray]:
        try:
            img = open_image(e["png"])
        except (ImageDecodeError, OSError) as err:
            raise LabelError(str(e["png"]), getattr(err, "reason", str(err))) from None
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        semantic = np.full(seg.shape, 255, np.uint8)
        instances = np.zeros(seg.shape, np.int32)
        known = {0}
        n = 0
        for s in e["anns"]:
            mask = seg == int(s["id"])
            known.add(int(s["id"]))
            semantic[mask] = self._category_class[int(s["category_id"])]
            if int(s["category_id"]) in self._things and not s.get("iscrowd"):
                n += 1
                instances[mask] = n
        stray = sorted(set(np.unique(seg).tolist()) - known)
        if stray:
            raise LabelError(str(e["png"]), f"segment id(s) {stray[:5]} are not in segments_info")
        return semantic, instances

    def read_labels(self, image_id: str) -> np.ndarray:
        return self._render(image_id)[0]

    def read_instances(self, image_id: str) -> np.ndarray | None:
        return self._render(image_id)[1]

    def __getitem__(self, image_id: str) -> Sample:
        self._known(image_id)
        image = read_image(self.image_path(image_id))
        labels, instances = self._render(image_id)
        if labels.shape != image.shape[:2]:
            raise ValueError(
                f"{self.label_name(image_id)}: the annotations give {labels.shape[0]}x{labels.shape[1]} "
                f"(height x width), the image is {image.shape[0]}x{image.shape[1]}"
            )
        return Sample(id=image_id, image=image, labels=labels, instances=instances, meta=self._sample_meta(image_id))
