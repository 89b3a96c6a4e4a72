"""Benchmark the grouping primitive on BSDS500: boundary ODS/OIS/AP and covering per edge detector,
for the edges alone and for their OWT-UCM, the seconds per image per core of each step, and the
official gPb-owt-ucm numbers beside them.

    python jobs/benchmark_grouping.py --data ../shared/data/bsds500 --split test --detectors learned,gradient
    python jobs/benchmark_grouping.py --detectors learned,learned@0.5+1+1.5   # single- vs multi-scale
    python jobs/benchmark_grouping.py --detectors learned --spectral 0,0.3,0.5 --limit 40   # gPb's sPb mixed in
    ray job submit --working-dir . -- python jobs/benchmark_grouping.py ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distseg.config import load_config
from distseg.eval.grouping import evaluate_grouping


def official_numbers(root: Path) -> dict | None:
    folder = root / "official_gpb_owt_ucm"
    if not folder.is_dir():
        return None
    bdry = np.loadtxt(folder / "eval_bdry.txt")
    cover = np.loadtxt(folder / "eval_cover.txt")
    return {"ods_f": bdry[3], "ois_f": bdry[6], "ap": bdry[7], "covering_ods": cover[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/bsds500"), help="BSDS500 root")
    parser.add_argument("--split", default="test", help="BSDS split (the official numbers are on test)")
    parser.add_argument(
        "--detectors",
        default="learned,gradient",
        help="comma-separated edge detectors; NAME@S1+S2+... runs NAME at those image scales",
    )
    parser.add_argument(
        "--spectral",
        default="0",
        help="comma-separated edges.spectral weights: every detector runs with each (0: local edges only)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--thresholds", type=int, default=99, help="benchmark thresholds (official: 99)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_grouping"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (e.g. hierarchy.max_regions=40)")
    args = parser.parse_args()

    rows = []
    specs = [(spec, float(w)) for spec in args.detectors.split(",") for w in args.spectral.split(",")]
    for spec, spectral in specs:
        detector, _, scales = spec.partition("@")
        scale_override = [f"edges.scales=[{scales.replace('+', ',')}]"] if scales else []
        cfg = load_config(
            "edges", [f"edges.detector={detector}", *args.overrides, *scale_override, f"edges.spectral={spectral}"]
        )
        name = detector if not scales else f"{detector} x{scales.replace('+', ',')}"
        name += f" + sPb {spectral:g}" if spectral else ""
        folder = args.out / (spec.replace("@", "_at_").replace("+", "_") + (f"_spb{spectral:g}" if spectral else ""))
        m = evaluate_grouping(cfg, args.data, args.split, folder, args.limit, args.thresholds)
        edge_s, hier_s = m["edge_seconds_per_image"], m["hierarchy_seconds_per_image"]
        rows.append((f"{name} edges", m["edges"]["ods_f"], m["edges"]["ois_f"], m["edges"]["ap"], None, edge_s, None))
        rows.append(
            (
                f"{name} + UCM",
                m["ucm"]["ods_f"],
                m["ucm"]["ois_f"],
                m["ucm"]["ap"],
                m["ucm"]["covering_ods"],
                edge_s,
                hier_s,
            )
        )
    official = official_numbers(args.data)
    if official:
        rows.append(
            (
                "gPb-owt-ucm (official)",
                official["ods_f"],
                official["ois_f"],
                official["ap"],
                official["covering_ods"],
                None,
                None,
            )
        )

    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    n = args.limit or "all"
    print(f"\nBSDS500 {args.split} ({n} images), {args.thresholds} thresholds; seconds are per image per core")
    print(f"{'method':<38} {'ODS':>6} {'OIS':>6} {'AP':>6} {'cover':>6} {'edge s':>7} {'ucm s':>7}")
    for row in rows:
        print(f"{row[0]:<38} " + " ".join(f"{fmt(v):>6}" for v in row[1:5]) + f" {fmt(row[5]):>7} {fmt(row[6]):>7}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
