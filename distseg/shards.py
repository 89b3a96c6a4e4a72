"""The grouping-shard contract: one Parquet row per image, written by `mine`, read by training.

Columns: `image_id`, `uri`, `height`, `width`, `image` (encoded bytes of the possibly resized image),
`prior` (the names of the priors in the row), then one struct column per prior, named by it, with
`regions` (PNG of the uint8 leaf-label map), `region_dist` (flattened K x K float32 tree distances),
`ucm` (PNG of the contour map quantised to 8 bits) and `masks` (COCO RLE, score, label). The schema
version and the config hash go into the Parquet file metadata.

Only the grouping value types (distseg.grouping.types) are imported, never the priors: reading shards
needs no higra, torch or config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
from pycocotools import mask as coco_mask

from distseg.core.constants import SHARD_SCHEMA_VERSION
from distseg.grouping.types import Mask, PriorOutput

SCHEMA_VERSION = SHARD_SCHEMA_VERSION  # kept under this name: readers and tests import it from here
META_VERSION = b"distseg.schema_version"
META_CONFIG = b"distseg.config_hash"
META_SETTINGS = b"distseg.mining_settings"  # the settings a row depends on (mining.manifest.mining_settings)

MASK_TYPE = pa.struct([("rle", pa.binary()), ("score", pa.float32()), ("label", pa.int32())])
PRIOR_TYPE = pa.struct(
    [
        ("regions", pa.binary()),
        ("num_regions", pa.int32()),
        ("region_dist", pa.list_(pa.float32())),
        ("ucm", pa.binary()),
        ("masks", pa.list_(MASK_TYPE)),
    ]
)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_schema(priors: list[str], config: dict | None = None) -> pa.Schema:
    fields = [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("prior", pa.list_(pa.string())),
    ] + [(name, PRIOR_TYPE) for name in priors]
    from distseg.mining.manifest import mining_settings

    metadata = {
        META_VERSION: str(SCHEMA_VERSION).encode(),
        META_CONFIG: config_hash(config or {}).encode(),
        META_SETTINGS: json.dumps(mining_settings(config or {}), sort_keys=True, default=str).encode(),
    }
    return pa.schema(fields, metadata=metadata)


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {array.shape} and dtype {array.dtype}")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("corrupt PNG bytes in a shard")
    return array


def encode_image(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if fmt == "png":
        return encode_png(bgr)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt image bytes in a shard")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def encode_masks(masks: list[Mask]) -> list[dict]:
    out = []
    for m in masks:
        rle = coco_mask.encode(np.asfortranarray(m.mask.astype(np.uint8)))
        out.append({"rle": rle["counts"], "score": float(m.score), "label": int(m.label)})
    return out


def decode_masks(items: list[dict] | None, height: int, width: int) -> list[Mask]:
    masks = []
    for item in items or []:
        rle = {"size": [height, width], "counts": item["rle"]}
        masks.append(
            Mask(mask=coco_mask.decode(rle).astype(bool), score=float(item["score"]), label=int(item["label"]))
        )
    return masks


def encode_prior(out: PriorOutput) -> dict:
    return {
        "regions": None if out.regions is None else encode_png(out.regions.astype(np.uint8)),
        "num_regions": None if out.regions is None else int(out.regions.max()) + 1,
        "region_dist": None if out.region_dist is None else out.region_dist.astype(np.float32).ravel().tolist(),
        "ucm": None if out.ucm is None else encode_png(np.round(np.clip(out.ucm, 0, 1) * 255).astype(np.uint8)),
        "masks": encode_masks(out.masks),
    }


def decode_region_dist(flat) -> np.ndarray | None:
    """A row's `region_dist` column (flattened K x K float32 tree distances) back to its K x K matrix."""
    if flat is None:
        return None
    k = int(round(np.sqrt(len(flat))))
    if k * k != len(flat):
        raise ValueError(f"region_dist holds {len(flat)} values, not a K x K matrix")
    return np.asarray(flat, np.float32).reshape(k, k)


def decode_prior(value: dict | None, height: int, width: int) -> PriorOutput | None:
    if value is None:
        return None
    regions = None if value.get("regions") is None else decode_png(value["regions"])
    dist = decode_region_dist(value.get("region_dist"))
    ucm = None if value.get("ucm") is None else decode_png(value["ucm"]).astype(np.float32) / 255.0
    return PriorOutput(
        regions=regions, region_dist=dist, ucm=ucm, masks=decode_masks(value.get("masks"), height, width)
    )


@dataclass
class GroupingRecord:
    image_id: str
    uri: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    priors: dict[str, PriorOutput] = field(default_factory=dict)


def encode_record(record: GroupingRecord, image_format: str = "jpeg", quality: int = 95) -> dict:
    height, width = record.image.shape[:2]
    row = {
        "image_id": record.image_id,
        "uri": record.uri,
        "height": height,
        "width": width,
        "image": encode_image(record.image, image_format, quality),
        "prior": list(record.priors),
    }
    row.update({name: encode_prior(out) for name, out in record.priors.items()})
    return row


def decode_record(row: dict, priors: list[str] | None = None) -> GroupingRecord:
    names = priors if priors is not None else list(row.get("prior") or [])
    height, width = int(row["height"]), int(row["width"])
    decoded = {name: decode_prior(row.get(name), height, width) for name in names}
    return GroupingRecord(
        image_id=row["image_id"],
        uri=row["uri"],
        image=decode_image(row["image"]),
        priors={k: v for k, v in decoded.items() if v is not None},
    )
