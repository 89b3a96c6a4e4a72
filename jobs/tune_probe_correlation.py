"""Does the in-loop probe a sweep stops on track the final evaluation? Scores every trial of a sweep.

    python jobs/tune_probe_correlation.py --sweep outputs/demo/ray_results/tune_demo [--protocols dataset_kmeans,linear]

For each trial: its last Train checkpoint (a trial ASHA stopped keeps the one of its last rung), the
`probe_score` it last reported, and `distseg evaluate` of that checkpoint on the eval split (which
the probe never reads) with the given protocols. Prints the table and Spearman's rho between the
probe and each protocol's headline; each evaluation is an MLflow run nested under the trial's run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted(run.glob("checkpoint_*"), key=lambda p: json.loads((p / "meta.json").read_text())["step"])
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="the sweep's Tune folder: <workdir>/ray_results/<sweep name>")
    parser.add_argument("--protocols", default="dataset_kmeans,linear", help="comma list of evaluation protocols")
    parser.add_argument("--limit", type=int, default=None, help="only the first N eval images (quick runs)")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    from distseg.checkpoint import read_meta
    from distseg.cluster import shutdown_ray
    from distseg.config import load_config
    from distseg.eval.evaluate import evaluate
    from distseg.eval.protocols import protocol_info

    sweep = Path(args.sweep).resolve()
    protocols = args.protocols.split(",")
    rows = []
    for run in sorted((sweep / "train").iterdir()):
        ckpt = latest_checkpoint(run) if run.is_dir() else None
        if ckpt is None:
            continue
        meta = read_meta(ckpt)
        overrides = [f"evaluate.protocols={json.dumps(protocols)}", "evaluate.diagnostics=[]"]
        cfg = load_config(ckpt / "config.yaml", overrides)
        cfg.evaluate.baselines, cfg.evaluate.seeds, cfg.evaluate.limit = [], 1, args.limit
        result = evaluate(cfg, str(ckpt), sweep / "final_eval" / run.name)
        scores = result["sources"]["checkpoint"]["metrics"]
        row = {"trial": run.name, "step": meta["step"], "probe_score": meta["metrics"].get("probe_score")}
        for p in protocols:
            row[p] = scores[f"{p}/{protocol_info(p).headline}"]["mean"]
        rows.append(row)
    shutdown_ray()
    if not rows:
        raise SystemExit(f"no trial checkpoints under {sweep / 'train'}")
    header = ["trial", "step", "probe_score", *protocols]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header))
    probe = [r["probe_score"] for r in rows]
    for p in protocols:
        rho = spearmanr(probe, [r[p] for r in rows]).statistic if len(rows) > 2 else float("nan")
        print(f"Spearman rho(probe_score, {p}) = {rho:.3f} over {len(rows)} trials")


if __name__ == "__main__":
    main()
