"""Small datasets written inside the tests, in each layout a user brings (labelled folder, VOC, COCO).

Every scene has a background, a square and a disc, each in its own colour (plus noise), so colour
and position features can tell the classes apart: an evaluation on them gives numbers above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "square", "disc")
COLOURS = np.array([(60, 140, 60), (200, 40, 40), (40, 60, 200)], np.float32)  # per class, for the images


def scene(i: int, height: int = 40, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, H x W uint8 labels 0..2) for scene i: deterministic."""
    rng = np.random.default_rng(i)
    labels = np.zeros((height, width), np.uint8)
    s = int(rng.integers(8, 14))
    y, x = int(rng.integers(0, height - s)), int(rng.integers(0, width // 2 - s))
    labels[y : y + s, x : x + s] = 1
    r = int(rng.integers(5, 8))
    cy, cx = int(rng.integers(r, height - r)), int(rng.integers(width // 2 + r, width - r))
    yy, xx = np.mgrid[:height, :width]
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
    image = COLOURS[labels] + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_labeled(
    root: Path, n: int = 12, classes: str = "txt", splits: dict[str, list[str]] | None = None, void_row: bool = True
) -> list[str]:
    """A labelled folder: images/<id>.png, labels/<id>.png (255 = void on the last row), a class list,
    splits/<name>.txt when given. Returns the ids."""
    ids = [f"img{i:02d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        image, labels = scene(i)
        if void_row:
            labels[-1, :] = 255
        save(root / "images" / f"{image_id}.png", image)
        save(root / "labels" / f"{image_id}.png", labels)
    if classes == "txt":
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    elif classes == "yaml":
        (root / "classes.yaml").write_text(f"names: [{', '.join(CLASSES)}]\nvoid: 255\n")
    for name, members in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text("".join(f"{m}\n" for m in members))
    return ids


def voc_palette_image(labels: np.ndarray) -> Image.Image:
    """A VOC-style palette PNG: index = class id, VOC's colour map as the palette."""
    from distseg.data.voc import voc_colormap

    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    img.putpalette([c for rgb in voc_colormap() for c in rgb])
    return img


VOC_SQUARE, VOC_DISC = 15, 8  # person, cat: the VOC classes the square and the disc stand for


def make_voc(root: Path, n: int = 12, splits: bool = True, size: tuple[int, int] = (40, 48)) -> list[str]:
    """A VOC layout: JPEGImages/*.jpg (one more without label), SegmentationClass palette PNGs with 255
    on object borders, SegmentationObject, ImageSets/Segmentation/{train,val,trainval}.txt."""
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        image, labels = scene(i, *size)
        voc = np.select([labels == 1, labels == 2], [VOC_SQUARE, VOC_DISC], 0).astype(np.uint8)
        inst = labels.copy()
        border = np.zeros(labels.shape, bool)
        border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        border[1:, :] |= labels[1:, :] != labels[:-1, :]
        voc[border] = 255
        inst[border] = 255
        save(root / "JPEGImages" / f"{image_id}.jpg", image, quality=95)
        for folder, values in (("SegmentationClass", voc), ("SegmentationObject", inst)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            voc_palette_image(values).save(root / folder / f"{image_id}.png")
    save(root / "JPEGImages" / "2008_999999.jpg", scene(99, *size)[0])  # a detection-only image: no label, not listed
    if splits:
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        train, val = ids[: n * 2 // 3], ids[n * 2 // 3 :]
        for name, members in (("train", train), ("val", val), ("trainval", ids)):
            (sets / f"{name}.txt").write_text("".join(f"{m}\n" for m in members))
    return ids


COCO_CATEGORIES = [
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "disc", "supercategory": "shape"},
]


def coco_annotations(n: int, start: int = 0) -> tuple[list[dict], list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(images, annotations, file name -> (image, labels)) of n scenes: the square as a polygon, the
    disc as compressed RLE; scene 0 also has a crowd annotation (uncompressed RLE) over its square."""
    from pycocotools import mask as mask_utils

    images, anns, scenes = [], [], {}
    for i in range(start, start + n):
        image, labels = scene(i)
        h, w = labels.shape
        name = f"{i:012d}.jpg"
        scenes[name] = (image, labels)
        images.append({"id": 1000 + i, "file_name": name, "height": h, "width": w})
        ys, xs = np.nonzero(labels == 1)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        polygon = [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]
        anns.append(
            {
                "id": 10 * i + 1,
                "image_id": 1000 + i,
                "category_id": 3,
                "segmentation": [polygon],
                "area": float((x1 - x0) * (y1 - y0)),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "iscrowd": 0,
            }
        )
        rle = mask_utils.encode(np.asfortranarray((labels == 2).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "id": 10 * i + 2,
                "image_id": 1000 + i,
                "category_id": 7,
                "segmentation": rle,
                "area": float((labels == 2).sum()),
                "bbox": [0.0, 0.0, 1.0, 1.0],
                "iscrowd": 0,
            }
        )
    return images, anns, scenes


def make_coco(root: Path, splits: dict[str, int] | None = None) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A COCO layout: annotations/instances_<split>.json and <split>/*.jpg (PNG-lossless content saved
    as high-quality JPEG). Returns split -> file name -> (image, labels)."""
    out = {}
    start = 0
    for split, n in (splits or {"val2017": 6}).items():
        images, anns, scenes = coco_annotations(n, start)
        start += n
        for name, (image, _) in scenes.items():
            save(root / split / name, image, quality=95)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"images": images, "annotations": anns, "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        out[split] = scenes
    return out
