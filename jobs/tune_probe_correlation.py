"""Does the in-loop probe a sweep stops on track the final evaluation? Scores every trial of a sweep.

    python jobs/tune_probe_correlation.py --sweep outputs/demo/ray_results/tune_demo [--protocols dataset_kmeans,linear]
        [--probe-data folder:../shared/data/bsds500/images/train]

For each trial: its last Train checkpoint (a trial ASHA stopped keeps the one of its last rung), the
`probe_score` it last reported, and `distseg evaluate` of that checkpoint on the eval split (which
the probe never reads) with the given protocols. Prints the table and Spearman's rho between the
probe and each protocol's headline; each evaluation is an MLflow run nested under the trial's run.

With `--probe-data` (or a sweep whose trials ran the label-free probe, whose `pretrain.probe_data` is
the default) each checkpoint also gets the label-free score (`distseg.train.probe.prior_agreement`,
column `label_free`) on the first `--probe-images` of those images that the trial's shards do not
hold, and rho(label_free, each protocol) is printed too: one sweep shows whether the label-free
probe ranks trials as the final evaluation does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def latest_checkpoint(run: Path) -> Path | None:
    """The trial's Train checkpoint of the highest step (Ray's `checkpoint_manager_snapshot.json` is skipped)."""
    found = [p for p in run.glob("checkpoint_*") if (p / "meta.json").is_file()]
    found.sort(key=lambda p: json.loads((p / "meta.json").read_text())["step"])
    return found[-1] if found else None


def label_free(ckpt: Path, cfg, probe_data: str | None, images: int, cache: dict) -> float:
    """The label-free probe's score of a checkpoint; held-out images and their prior computed once per
    prior setting and shards (`cache`)."""
    from distseg.checkpoint import load_embedding_model
    from distseg.train.probe import PriorAgreementProbe, check_probe, load_held_out

    cfg = cfg.model_copy(deep=True)
    pcfg = cfg.pretrain
    pcfg.probe_every, pcfg.probe_protocol, pcfg.probe_images = pcfg.probe_every or 1, "prior_agreement", images
    pcfg.probe_data = probe_data or pcfg.probe_data
    cfg = check_probe(cfg)
    grouping = cfg.model_dump(mode="json", include={"edges", "hierarchy", "priors", "mine"})
    key = json.dumps([grouping, cfg.pretrain.prior, cfg.pretrain.shards, cfg.pretrain.probe_data], sort_keys=True)
    if key not in cache:
        cache[key] = load_held_out(cfg)
    model, _ = load_embedding_model(str(ckpt), "cpu")
    return PriorAgreementProbe(cfg, cache[key])(model)["probe_score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="the sweep's Tune folder: <workdir>/ray_results/<sweep name>")
    parser.add_argument("--protocols", default="dataset_kmeans,linear", help="comma list of evaluation protocols")
    parser.add_argument("--limit", type=int, default=None, help="only the first N eval images (quick runs)")
    parser.add_argument("--probe-data", default=None, help="held-out images for the label-free score (folder:PATH)")
    parser.add_argument("--probe-images", type=int, default=24, help="images the label-free score averages over")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    from distseg.checkpoint import read_meta
    from distseg.cluster import shutdown_ray
    from distseg.config import load_config
    from distseg.eval.evaluate import evaluate
    from distseg.eval.protocols import protocol_info

    sweep = Path(args.sweep).resolve()
    protocols = args.protocols.split(",")
    rows, held_out = [], {}
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
        if args.probe_data or cfg.pretrain.probe_data:
            row["label_free"] = label_free(ckpt, cfg, args.probe_data, args.probe_images, held_out)
        rows.append(row)
    shutdown_ray()
    if not rows:
        raise SystemExit(f"no trial checkpoints under {sweep / 'train'}")
    header = ["trial", "step", "probe_score", *protocols, *(["label_free"] if "label_free" in rows[0] else [])]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header))
    probe = [r["probe_score"] for r in rows]
    for p in protocols:
        rho = spearmanr(probe, [r[p] for r in rows]).statistic if len(rows) > 2 else float("nan")
        print(f"Spearman rho(probe_score, {p}) = {rho:.3f} over {len(rows)} trials")
    if "label_free" in rows[0]:
        free = [r["label_free"] for r in rows]
        for p in protocols:
            rho = spearmanr(free, [r[p] for r in rows]).statistic if len(rows) > 2 else float("nan")
            print(f"Spearman rho(label_free, {p}) = {rho:.3f} over {len(rows)} trials")


if __name__ == "__main__":
    main()
