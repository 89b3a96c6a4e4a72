"""`distseg distill confident`: the trained Mask R-CNN over the dataset -> confident masks -> one pseudo
semantic label map per image, in a NEW shard version (MaskDistill Sec. 3.3).

    shards (any version holding the images) -> Ray Data actor pool (GPU actors with
    distill.confident.num_gpus > 0): Mask R-CNN at its test scale -> distseg.distill.aggregate
    (threshold, fallback to the best, overlap rule) -> <output>/shards/<same names> with a new column
    `confident`: `regions` = PNG of the uint8 label map (0 background, k = cluster k - 1), `num_regions`
    = K + 1, `masks` = the kept masks (rle, score, label); `_manifest.json` with version = parent + 1
    and a `confident` entry (threshold, classes, masks kept per image).

With threshold 0 every prediction above the detector's own floor (0.05) is kept, subject to the
overlap rule: the "Mask R-CNN predictions" row of the paper's Table 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distseg.config import Config
from distseg.distill.versions import ChunkReader, absolute_uri, fresh_output, map_chunks, write_version
from distseg.shards import MASK_TYPE, PRIOR_TYPE

COLUMN = "confident"
RESULT_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("labels", pa.binary()), ("masks", pa.list_(MASK_TYPE)), ("predictions", pa.int32())]
)


@dataclass
class ConfidentSummary:
    output: str
    images: int
    masks: int  # kept, over all images
    predictions: int  # before the threshold and the overlap rule
    classes: int  # K + 1
    seconds: float
    pixel_share: list[float]  # fraction of all pixels per class id (0 = background)
    run_id: str | None = None


class ConfidentPredictor:
    """Ray Data actor: chunks {path, start, count} of shard rows -> (image_id, PNG label map, kept masks,
    number of predictions) per image. The network loads once per actor."""

    def __init__(self, checkpoint: str, threshold: float, mask_threshold: float, max_overlap: float, device: str):
        import torch

        from distseg.distill.maskrcnn import load_maskrcnn

        torch.set_num_threads(1)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = load_maskrcnn(checkpoint, device)
        self.threshold, self.mask_threshold, self.max_overlap = threshold, mask_threshold, max_overlap
        self.reader = ChunkReader(["image_id", "image"])

    def __call__(self, batch: dict) -> pa.Table:
        from distseg.distill.aggregate import confident_masks, label_map
        from distseg.distill.maskrcnn import predict
        from distseg.shards import decode_image, encode_masks, encode_png

        out = {"image_id": [], "labels": [], "masks": [], "predictions": []}
        for path, start, count in zip(batch["path"], batch["start"], batch["count"]):
            for row in self.reader.rows(str(path), int(start), int(count)):
                image = decode_image(row["image"])
                predictions = predict(self.model, image, self.mask_threshold)
                kept = confident_masks(predictions, self.threshold, self.max_overlap)
                out["image_id"].append(row["image_id"])
                out["labels"].append(encode_png(label_map(kept, *image.shape[:2])))
                out["masks"].append(encode_masks(kept))
                out["predictions"].append(len(predictions))
        return pa.Table.from_pydict(out, schema=RESULT_SCHEMA)


def add_column(table: pa.Table, cells: dict[str, dict], column: str = COLUMN) -> pa.Table:
    """`table` with the prior-shaped column `column` (cells by image_id) and `column` in each row's `prior`."""
    ids = table.column("image_id").to_pylist()
    missing = [i for i in ids if i not in cells]
    if missing:
        raise ValueError(f"no {column} result for {len(missing)} images, e.g. {missing[:3]}")
    metadata = table.schema.metadata
    if column in table.column_names:
        table = table.drop_columns([column])
    priors = [[p for p in (ps or []) if p != column] + [column] for ps in table.column("prior").to_pylist()]
    table = table.set_column(table.schema.get_field_index("prior"), "prior", pa.array(priors, pa.list_(pa.string())))
    table = table.append_column(pa.field(column, PRIOR_TYPE), pa.array([cells[i] for i in ids], type=PRIOR_TYPE))
    return table.replace_schema_metadata(metadata)


def confident_stage(cfg: Config, checkpoint: str, data_uri: str, output_uri: str | None = None) -> ConfidentSummary:
    """Run the Mask R-CNN checkpoint over every image of `data_uri`; write the pseudo label maps to
    `output_uri` (default `<data_uri>_confident`). Logs an MLflow run (tag stage=distill.confident)."""
    from pathlib import Path

    from distseg.cluster import init_ray
    from distseg.distill.trainer import read_version
    from distseg.shards import decode_png

    t0 = time.perf_counter()
    ccfg = cfg.distill.confident
    if not (Path(checkpoint) / "model.pt").is_file():
        raise FileNotFoundError(f"Mask R-CNN checkpoint {checkpoint}: no model.pt (run `distseg distill train`)")
    manifest, _ = read_version(data_uri)
    output_uri = output_uri or f"{data_uri.rstrip('/')}_{COLUMN}"
    fresh_output(output_uri)
    init_ray(cfg.ray)
    kwargs = {
        "checkpoint": absolute_uri(checkpoint),
        "threshold": ccfg.threshold,
        "mask_threshold": ccfg.mask_threshold,
        "max_overlap": ccfg.max_overlap,
        "device": "auto" if ccfg.num_gpus > 0 else "cpu",
    }
    results = map_chunks(manifest, data_uri, ConfidentPredictor, kwargs, ccfg.num_actors, ccfg.num_gpus, RESULT_SCHEMA)
    num_classes = int(manifest.get("cluster", {}).get("clusters", 0)) + 1 or None
    cells, kept, predicted = {}, 0, 0
    counts = np.zeros(256, np.int64)
    for row in results.to_pylist():
        label_png = row["labels"]
        counts += np.bincount(decode_png(label_png).ravel(), minlength=256)
        cells[row["image_id"]] = {
            "regions": label_png,
            "num_regions": num_classes,
            "region_dist": None,
            "ucm": None,
            "masks": row["masks"],
        }
        kept += len(row["masks"])
        predicted += row["predictions"]
    classes = num_classes or int(np.flatnonzero(counts).max(initial=0)) + 1
    share = (counts[:classes] / max(1, counts.sum())).round(4).tolist()
    entry = {
        "checkpoint": absolute_uri(checkpoint),
        "threshold": ccfg.threshold,
        "max_overlap": ccfg.max_overlap,
        "classes": classes,
        "masks": kept,
        "predictions": predicted,
        "labels": f"{COLUMN}.regions: PNG uint8 label map, 0 background, k = cluster k - 1",
    }
    write_version(
        manifest, data_uri, output_uri, lambda table: add_column(table, cells), "distill.confident", {COLUMN: entry}
    )
    summary = ConfidentSummary(output_uri, len(cells), kept, predicted, classes, time.perf_counter() - t0, share)
    summary.run_id = _log_run(cfg, summary, entry)
    return summary


def _log_run(cfg: Config, summary: ConfidentSummary, entry: dict) -> str:
    from distseg.tracking import start_run

    tags = {"stage": "distill.confident", "output": summary.output, "threshold": entry["threshold"]}
    with start_run(cfg, run_name=f"{cfg.name}-distill-confident", tags=tags) as tracker:
        tracker.log_metrics(
            {
                "images": summary.images,
                "masks_kept": summary.masks,
                "masks_per_image": summary.masks / max(1, summary.images),
                "predictions_per_image": summary.predictions / max(1, summary.images),
                "background_share": summary.pixel_share[0] if summary.pixel_share else 0.0,
                "seconds": summary.seconds,
            }
        )
        tracker.log_dict(entry, "confident.json")
        return tracker.run_id
