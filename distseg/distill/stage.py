"""`distseg distill masks`: the whole MaskDistill part-1 chain as one stage call.

    [bootstrap: no ViT weights and no checkpoint given -> pretrain distseg's ViT (model.backbone
     vit_tiny / vit_small) with pretrain.method on pretrain.prior shards -> checkpoint]
    -> mine vit_masks over the images (distseg.mining: resumable shards)
    -> cluster the masks (distseg.distill.cluster: a new shard version with pseudo classes)

Images: `input` (a folder, glob or s3:// URI), or the built-in synthetic scenes when the config's
data.source is synthetic (written once as PNGs under <workdir>/synthetic/images, as pretraining does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distseg.config import Config
from distseg.distill.cluster import ClusterSummary, cluster_masks


@dataclass
class DistillSummary:
    checkpoint: str | None
    mined: int
    errors: int
    mine_seconds: float
    masks: str  # the mined shards (version 1)
    cluster: ClusterSummary
    mask_ap: dict | None = None  # synthetic scenes: class-agnostic mask AP of vit_masks and of saliency


def synthetic_images(cfg: Config) -> str:
    from distseg.data.synthetic import write_scenes

    return write_scenes(cfg, Path(cfg.workdir).resolve() / "synthetic" / "images")


def check_source(params) -> None:
    """Fail before Ray starts when the affinity source's file is missing (the actors would fail later)."""
    if params.source == "vit" and not (
        params.weights and "://" not in params.weights and Path(params.weights).is_file()
    ):
        where = f"{params.weights} does not exist" if params.weights else "is not set"
        raise FileNotFoundError(
            f"priors.vit_masks.weights {where}: the vit source needs a local weights file for {params.model!r} "
            "(e.g. DINO's ViT-S/16); nothing is downloaded. Or use priors.vit_masks.source=checkpoint."
        )
    if params.source == "checkpoint" and params.checkpoint and not (Path(params.checkpoint) / "model.pt").is_file():
        raise FileNotFoundError(
            f"priors.vit_masks.checkpoint: {params.checkpoint} has no model.pt (a distseg checkpoint)"
        )


def distill_masks(cfg: Config, data: str, input_uri: str | None = None, output: str | None = None) -> DistillSummary:
    """Mask proposals into `data` (shards), then their clustering into `output` (default data_k<K>)."""
    from distseg.mining import mine

    cfg = cfg.model_copy(deep=True)
    params = cfg.priors.vit_masks
    if "vit_masks" not in cfg.mine.priors:
        cfg.mine.priors = [*cfg.mine.priors, "vit_masks"]
    check_source(params)
    synthetic = input_uri is None  # the built-in scenes: their instances are known, so the masks get an AP
    if input_uri is None:
        if cfg.data.source != "synthetic":
            raise ValueError(f"data.source is {cfg.data.source!r}: give the images with --input")
        input_uri = synthetic_images(cfg)
    if params.source == "checkpoint" and not params.checkpoint:
        from distseg.models import VIT_MODELS
        from distseg.train.pretrain import pretrain

        if cfg.model.backbone not in VIT_MODELS:
            raise ValueError(
                f"priors.vit_masks.checkpoint is empty and model.backbone={cfg.model.backbone!r} is not a ViT "
                f"({', '.join(sorted(VIT_MODELS))}): give a checkpoint or pretrain a ViT"
            )
        boot = cfg.model_copy(deep=True)
        boot.mine.priors = [cfg.pretrain.prior]
        params.checkpoint = str(pretrain(boot).checkpoint)
    summary = mine(cfg, input_uri, data)
    clustered = cluster_masks(cfg, summary.output, output)
    ap = None
    if synthetic:
        from distseg.distill.evaluate import evaluate_masks

        # the split synthetic_images writes; saliency, not mined here, is run on the stored images
        ap = evaluate_masks(cfg, summary.output, "synthetic", ["vit_masks", "saliency"], split="train").scores
    return DistillSummary(
        params.checkpoint, summary.mined, summary.errors, summary.seconds, summary.output, clustered, ap
    )
