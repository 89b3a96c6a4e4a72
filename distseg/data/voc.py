"""PASCAL VOC segmentation layout: `open_dataset("voc:PATH", split="val")` (VOC2012 itself, or your own
data exported "VOC-style", e.g. by CVAT or Label Studio).

Layout under PATH (the folder that holds JPEGImages/, e.g. VOCdevkit/VOC2012)::

    JPEGImages/<id>.jpg                   the images (any format; images without a label are skipped)
    SegmentationClass/<id>.png            palette PNGs: index = class id, 255 = void (object borders)
    SegmentationObject/<id>.png           optional: instance ids (0 = none, 255 = void -> 0)
    ImageSets/Segmentation/<split>.txt    train.txt, val.txt, trainval.txt ...: one id per line

Classes: VOC's 21 (background, aeroplane, ..., tvmonitor), unless PATH has its own class list
(classes.txt / classes.yaml as for `labeled:PATH`, or CVAT's labelmap.txt with its colours). Label
PNGs count by palette index; an RGB label is mapped through the class palette (VOC's colour map by
default). Without ImageSets/Segmentation the hash rule splits the labelled images as for `labeled:PATH`.
`all` is every image with a label. Everything else is the labelled folder's (distseg.data.labeled).
"""

from __future__ import annotations

import numpy as np

from distseg.data.base import register_dataset
from distseg.data.imageio import ImageDecodeError, label_values, open_image
from distseg.data.labeled import ClassList, LabeledFolder, LabelError

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """VOC's label colours: the bits of the class id spread over r, g, b from the high bit down."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


VOC_PALETTE = tuple(voc_colormap()[: len(VOC_CLASSES)])
VOC_VOID_COLOR = voc_colormap()[255]  # (224, 224, 192): the object borders


@register_dataset("voc", path_arg=True, splits=True)
class VOCSegmentation(LabeledFolder):
    """PASCAL VOC-style segmentation data (see the module docstring)."""

    name = "voc"
    title = "VOC"
    image_dir = "JPEGImages"
    label_dir = "SegmentationClass"
    splits_dir = "ImageSets/Segmentation"
    ids_from = "labels"
    default_classes = ClassList(VOC_CLASSES, 255, VOC_PALETTE, VOC_VOID_COLOR, "PASCAL VOC (built in)")
    layout_hint = "JPEGImages/, SegmentationClass/ and optionally ImageSets/Segmentation/<split>.txt"
    instance_dir = "SegmentationObject"

    def read_instances(self, image_id: str) -> np.ndarray | None:
        path = self.root / self.instance_dir / f"{image_id}.png"
        if not path.is_file():
            return None
        try:
            values = label_values(open_image(path), str(path)).astype(np.int32)
        except ImageDecodeError as e:
            raise LabelError(str(path), e.reason) from None
        values[values == 255] = 0
        return values
