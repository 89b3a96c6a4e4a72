"""Time the mask proposal priors that `distseg distill cluster --prior` compares (vit_masks, saliency,
felzenszwalb_masks) on one core: masks per image and seconds per image per core, each prior built
once and run image by image in this process with torch (and OpenCV) on one thread. The per-core
figure is the process's CPU time (one thread), so it holds on a busy machine; the wall time beside it
does not.

    python jobs/benchmark_proposals.py --config maskdistill --input msrc --limit 40 \
        data.split=val priors.vit_masks.short_side=320 priors.vit_masks.source=checkpoint \
        priors.vit_masks.checkpoint=CHECKPOINT

--input takes what `distseg mine --input` takes (a folder, a glob or a data source of data.split).
Images are read at their stored size (mine.max_side is applied as mining would).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import cv2
    import numpy as np
    import torch

    from distseg.config import load_config
    from distseg.data import is_source, source_image_files
    from distseg.data.imageio import decode_image
    from distseg.grouping.priors import create_prior, prior_yields
    from distseg.mining.listing import list_images
    from distseg.mining.worker import resize_max_side
    from distseg.storage import resolve_uri

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="maskdistill", help="config name or YAML file")
    parser.add_argument("--input", required=True, help="images: a folder, a glob, or a data source (msrc, voc:PATH)")
    parser.add_argument("--priors", default="vit_masks,saliency,felzenszwalb_masks", help="comma-separated")
    parser.add_argument("--limit", type=int, default=40, help="the first N images (sorted by id)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = load_config(args.config, args.overrides)
    names = [n for n in args.priors.split(",") if n]
    bad = [n for n in names if prior_yields(n) != "masks"]
    if bad:
        raise SystemExit(f"--priors: {bad} yield regions, not mask proposals")
    inputs = source_image_files(args.input, cfg.data.split) if is_source(args.input) else None
    inputs = inputs or list_images(args.input, cfg.mine.extensions)
    uris = [inputs[i] for i in sorted(inputs)[: args.limit]]
    images = []
    for uri in uris:
        fs, path = resolve_uri(uri)
        with fs.open_input_file(path) as f:
            images.append(resize_max_side(decode_image(f.read(), uri), cfg.mine.max_side))
    results = {}
    for name in names:
        prior = create_prior(name, cfg)
        prior(images[0])  # warm-up (first-call allocations), not timed
        counts, t0, c0 = [], time.perf_counter(), time.process_time()
        for image in images:
            counts.append(len(prior(image).masks))
        seconds = (time.perf_counter() - t0) / len(images)
        cpu = (time.process_time() - c0) / len(images)
        results[name] = {
            "images": len(images),
            "masks_per_image": float(np.mean(counts)),
            "images_without_masks": int(sum(c == 0 for c in counts)),
            "seconds_per_image_per_core": cpu,
            "wall_seconds_per_image": seconds,
        }
    print("| prior | images | masks/image | without masks | CPU s/image (one core) | wall s/image |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['images']} | {r['masks_per_image']:.2f} | {r['images_without_masks']} "
            f"| {r['seconds_per_image_per_core']:.3f} | {r['wall_seconds_per_image']:.3f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
