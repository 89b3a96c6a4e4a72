"""Benchmark one device's compute, without Ray: each method's training step (fp32 and AMP) and the
MaskDistill `vit_masks` prior per image, on batches built from real mined shards.

    python jobs/benchmark_device.py --shards outputs/msrc/mined --device cuda
    python jobs/benchmark_device.py --shards outputs/msrc/mined --device cpu --steps 3 --images 4

This is the ceiling that `jobs/benchmark_training.py` (the same step inside Ray Train, fed by the Ray
Data ingest) is compared against, and the way to time a GPU where Ray is not installed. Batches are
made by the training ingest's own `make_pairs` from the shards (so crops, segments and d_T are the
real ones), held in memory and cycled; each step is forward, backward, optimizer step and the
method's `after_step`, exactly as in `distseg.train.loop`, timed after `--warmup` steps with the
device synchronised. AMP is torch.autocast (fp16 with a GradScaler on CUDA, as the loop does).

The `vit_masks` rows time `VitMasksPrior` per image (affinities, mask growth, upsampling) with a
randomly initialised timm ViT (no weights can be downloaded here): the compute is the same as with
DINO weights; the masks are not meaningful, so only time and masks per image are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from distseg.config import load_config
from distseg.train.ingest import make_pairs, shard_files
from distseg.train.loop import LocalStep


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_rows(shards: str, prior: str, limit: int):
    """The first `limit` rows of the shards that hold `prior` (a pyarrow table)."""
    import pyarrow as pa

    tables, n = [], 0
    for path in shard_files(shards):
        names = pq.read_schema(path).names
        if prior not in names:
            raise SystemExit(f"{path}: no column {prior!r} (mined priors: {names})")
        t = pq.read_table(path, columns=list(dict.fromkeys(["image_id", "height", "width", "image", prior])))
        tables.append(t)
        n += t.num_rows
        if n >= limit:
            break
    return pa.concat_tables(tables).slice(0, limit)


def make_batches(cfg, shards: str, n_batches: int) -> list[dict]:
    pcfg = cfg.pretrain
    table = read_rows(shards, pcfg.prior, pcfg.batch_size * n_batches * 2)
    pairs = make_pairs(table, pcfg.model_dump(mode="json"))
    n = len(pairs["view1"]) // pcfg.batch_size
    if n == 0:
        raise SystemExit(f"{shards}: too few usable rows for one batch of {pcfg.batch_size}")
    return [
        {
            k: torch.from_numpy(np.ascontiguousarray(v[i * pcfg.batch_size : (i + 1) * pcfg.batch_size]))
            for k, v in pairs.items()
        }
        for i in range(min(n, n_batches))
    ]


def time_steps(cfg, batches: list[dict], device: torch.device, amp: bool, steps: int, warmup: int) -> dict:
    train_step = LocalStep(cfg, device, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        terms = train_step(batches[i % len(batches)], i)
        losses.append(float(terms["loss"].detach()))
    sync(device)
    seconds = time.perf_counter() - t0
    b = cfg.pretrain.batch_size
    return {
        "ms_per_step": 1000 * seconds / steps,
        "images_per_s": steps * b / seconds,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": bool(np.all(np.isfinite(losses))),
    }


def time_vit_masks(shards: str, device: torch.device, images: int, model: str, short_side: int) -> dict:
    from distseg.distill.affinity import AffinitySource
    from distseg.distill.prior import VitMasksPrior
    from distseg.models.vit import create_vit
    from distseg.shards import decode_image

    cfg = load_config("maskdistill", [f"priors.vit_masks.model={model}", f"priors.vit_masks.short_side={short_side}"])
    source = AffinitySource(create_vit(model, None), f"vit:{model} (random init)", short_side, device.type)
    prior = VitMasksPrior(cfg, source=source)
    table = read_rows(shards, "image", images + 2)
    decoded = [decode_image(b) for b in table.column("image").to_pylist()]
    for image in decoded[:2]:  # warm-up (allocations, cudnn choices)
        prior(image)
    sync(device)
    t0 = time.perf_counter()
    counts = [len(prior(image).masks) for image in decoded[2 : 2 + images]]
    sync(device)
    seconds = time.perf_counter() - t0
    return {"s_per_image": seconds / len(counts), "masks_per_image": float(np.mean(counts)), "images": len(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="mining output folder holding the configs' priors")
    parser.add_argument(
        "--configs",
        default="hiergroup_msrc,concepts_msrc,maskcontrast_msrc,hiergroup_msrc:model.backbone=vit_small",
        help="comma list of configs (one training method each); CONFIG:KEY=VALUE:... adds overrides",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches made from the shards and cycled")
    parser.add_argument("--batch-size", type=int, default=None, help="override pretrain.batch_size (all configs)")
    parser.add_argument("--amp", default="off,on", help="comma list: off (fp32), on (autocast)")
    parser.add_argument("--images", type=int, default=16, help="images timed for the vit_masks prior (0: skip)")
    parser.add_argument("--vit", default="vit_small_patch16_224", help="timm ViT for the vit_masks rows")
    parser.add_argument("--short-side", type=int, default=480, help="vit_masks: the ViT input's short side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/device.json"), help="JSON of the rows")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    rows = []
    for config in args.configs.split(","):
        config, *extra = config.split(":")
        # random init: a timing needs no trained weights (concepts/maskcontrast configs start from hiergroup's)
        overrides = ["model.init_from=null", *extra]
        overrides += [f"pretrain.batch_size={args.batch_size}"] if args.batch_size else []
        cfg = load_config(config, overrides)
        batches = make_batches(cfg, args.shards, args.batches)
        for amp in args.amp.split(","):
            r = time_steps(cfg, batches, device, amp == "on", args.steps, args.warmup)
            r.update(
                what=f"{cfg.pretrain.method} step ({':'.join([config, *extra])})",
                amp=amp,
                batch=cfg.pretrain.batch_size,
                crop=cfg.pretrain.crop,
                backbone=cfg.model.backbone,
            )
            rows.append(r)
            print(
                f"{r['what']:<40} amp={amp:<3} batch {r['batch']:>3} crop {r['crop']}: {r['ms_per_step']:8.1f} ms/step "
                f"{r['images_per_s']:8.1f} img/s  peak {r['peak_mem_mb']:.0f} MB  "
                f"loss {r['loss_first']:.3f}->{r['loss_last']:.3f}",
                flush=True,
            )
    if args.images:
        r = time_vit_masks(args.shards, device, args.images, args.vit, args.short_side)
        r.update(what=f"vit_masks prior ({args.vit}, short side {args.short_side})")
        rows.append(r)
        print(f"{r['what']:<40} {r['s_per_image']:.3f} s/image, {r['masks_per_image']:.2f} masks/image", flush=True)

    print()
    print(f"| what | AMP | batch | ms/step | images/s | peak GPU MB |  ({name})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ms_per_step" in r:
            cells = [r["what"], r["amp"], r["batch"], f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.1f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {r['peak_mem_mb']:.0f} |")
        else:
            print(
                f"| {r['what']} | - | 1 | {1000 * r['s_per_image']:.1f} (per image) | {1 / r['s_per_image']:.2f} | - |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"rows in {args.out}")


if __name__ == "__main__":
    main()
