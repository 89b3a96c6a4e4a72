"""Pretrain on one device without Ray: the same method, step and checkpoint format as `distseg pretrain`,
fed by a torch DataLoader over the shards instead of Ray Data and Ray Train.

    python jobs/pretrain_local.py --config hiergroup_msrc --shards outputs/msrc/mined --device cuda \\
        --out outputs/msrc/checkpoints/hiergroup_msrc_gpu pretrain.batch_size=64 model.backbone=resnet50

For a single GPU box, or a machine where Ray is not installed (this is how the H200 numbers in the
README were made). Each DataLoader process reads whole shard files and draws the views with the
ingest's own seeded `make_pairs` (pass p of file f goes to process (p * files + f) % workers); the
step is `distseg.train.loop`'s (views, method forward, GradScaler, optimizer, `after_step`). What it
does not have: several workers, fault tolerance, resume, MLflow (a metrics.json is written beside the
checkpoint). `--max-minutes` ends training early and still saves the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distseg.checkpoint import save_checkpoint
from distseg.config import load_config
from distseg.train.ingest import check_prior, make_pairs, shard_files
from distseg.train.loop import LocalStep, lr_at


class ShardPairs(IterableDataset):
    """Endless paired views of the shards' rows, pass after pass (files in a seeded order per pass)."""

    def __init__(self, files: list[str], pcfg: dict, prior: str, seed: int, chunk: int = 16):
        self.files, self.pcfg, self.seed, self.chunk = files, pcfg, seed, chunk
        self.columns = ["image_id", "height", "width", "image", prior]

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(self.seed)
        p = 0
        while True:
            order = rng.permutation(len(self.files))
            for k, i in enumerate(order):
                if (p * len(self.files) + k) % nw != wid:
                    continue
                table = pq.read_table(self.files[i], columns=self.columns).sort_by("image_id")  # as the ingest
                table = table.append_column("pass", pa.array([p] * table.num_rows, pa.int32()))
                rows = np.random.default_rng([self.seed, p, int(i)]).permutation(table.num_rows)
                for s in range(0, len(rows), self.chunk):
                    pairs = make_pairs(table.take(rows[s : s + self.chunk]), self.pcfg, self.seed)
                    for j in range(len(pairs["view1"])):
                        yield {key: value[j] for key, value in pairs.items()}
            p += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="hiergroup_msrc", help="config name or YAML path")
    parser.add_argument(
        "--shards", "--data", dest="data", required=True, help="mining output folder (--data: old name)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--loaders", type=int, default=8, help="DataLoader processes drawing the views")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on GPU)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between console lines")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early (still saves) after this long")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    args = parser.parse_intermixed_args()  # options may follow the KEY=VALUE overrides

    cfg = load_config(args.config, [f"pretrain.shards={args.data}", *args.overrides])
    pcfg, device = cfg.pretrain, torch.device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    files = shard_files(args.data)
    check_prior(files, pcfg.prior)
    train_step = LocalStep(cfg, device, amp)
    data = ShardPairs(files, pcfg.model_dump(mode="json"), pcfg.prior, cfg.seed)
    loader = DataLoader(
        data, batch_size=pcfg.batch_size, num_workers=args.loaders, pin_memory=device.type == "cuda", prefetch_factor=4
    )
    print(
        f"pretrain_local: {pcfg.method} {cfg.model.backbone} batch {pcfg.batch_size} for {pcfg.steps} steps on {device}"
    )
    history, sums, count = [], {}, 0
    t0 = t_last = time.perf_counter()
    step = 0
    for batch in loader:
        terms = train_step(batch, step)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        step += 1
        late = args.max_minutes is not None and time.perf_counter() - t0 > 60 * args.max_minutes
        if step % args.log_every == 0 or step == pcfg.steps or late:
            now = time.perf_counter()
            row = {k: v / count for k, v in sums.items()}
            rate = count * pcfg.batch_size / (now - t_last)
            row.update(step=step, lr=float(lr_at(step - 1, pcfg)), images_per_s=rate)
            if not all(np.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {row}")
            history.append(row)
            print(
                f"step {step}/{pcfg.steps} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s "
                + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("loss", "step", "lr", "images_per_s")),
                flush=True,
            )
            sums, count, t_last = {}, 0, now
        if step >= pcfg.steps or late:
            break
    seconds = time.perf_counter() - t0
    metrics = {**history[-1], "seconds": seconds, "steps_done": step}
    save_checkpoint(
        args.out,
        cfg=cfg,
        step=step,
        metrics=metrics,
        model=train_step.net.state_dict(),
        loss=train_step.loss_fn.state_dict(),
    )
    (args.out / "metrics.json").write_text(json.dumps({"history": history, "seconds": seconds}, indent=1))
    print(f"checkpoint: {args.out} ({step} steps in {seconds:.0f} s, {step * pcfg.batch_size / seconds:.0f} img/s)")


if __name__ == "__main__":
    main()
