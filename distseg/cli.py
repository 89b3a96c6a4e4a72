"""The `distseg` command. Each verb is a thin caller of a stage function; `--help` on every verb."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from distseg.config import ConfigError, load_config, shipped_configs, to_yaml

app = typer.Typer(
    help="distseg: self-supervised semantic segmentation on Ray (grouping priors -> pixel embeddings -> evaluation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the shipped configs and resolved settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# messages are never folded at the console's width: a path or key in an error stays whole (to copy, to grep in a
# job's log); a terminal wraps long lines itself. The exception's text is escaped: "[...]" in it is not markup.
err = Console(stderr=True, soft_wrap=True)


def print_error(e: BaseException) -> None:
    """One red "error: <message>" line on stderr, the message as text (not markup), never folded."""
    err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)


_python_showwarning = warnings.showwarning  # other libraries' warnings keep Python's form

CONFIG_HELP = "a shipped config name (see `distseg config list`) or a YAML path"
SHARDS_OPTION = typer.Option(
    None,
    "--shards",
    "--data",
    "-d",
    help="shards folder written by `distseg mine` (default: mine the synthetic set first; --data: its old name)",
)
OVERRIDES_HELP = "dotted overrides KEY=VALUE, e.g. data.num_images=16 hierarchy.max_regions=30"


def resolve(config: str, overrides: list[str] | None):
    """Load a config or exit 2 with the message naming the bad key."""
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        print_error(e)
        raise typer.Exit(2) from None


@config_app.command("list")
def config_list() -> None:
    """List the configs that ship with distseg."""
    for name in shipped_configs():
        typer.echo(name)


@config_app.command("show")
def config_show(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    typer.echo(to_yaml(resolve(config, overrides)), nl=False)


@app.command()
def demo(
    config: str = typer.Option("demo", "--config", "-c", help=CONFIG_HELP),
    workdir: Path | None = typer.Option(
        None, help="where outputs and the MLflow store go (default: the config's workdir)"
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Run the pipeline end to end on the built-in synthetic data and log it to MLflow."""
    from distseg.data.synthetic import ScenesMismatch
    from distseg.demo import run_demo
    from distseg.mining import MiningError

    extra = list(overrides or []) + ([f"workdir={workdir}"] if workdir else [])
    cfg = resolve(config, extra)
    try:
        run_demo(cfg)
    except (ScenesMismatch, MiningError) as e:  # an outputs/demo/ from before the shared palette or the learned edges
        print_error(e)
        err.print(f"the demo keeps everything under {cfg.workdir}: remove it to run the demo anew", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def mine(
    input: str = typer.Option(
        ...,
        "--input",
        "-i",
        help="images: a folder (recursive), a glob, an s3:// / gs:// URI, or a data source "
        "(labeled:PATH, voc:PATH, coco:PATH, msrc, davis: the images of its data.split)",
    ),
    output: str = typer.Option(
        ..., "--output", "-o", help="where shards/, errors/ and _manifest.json go (local or s3:// / gs://)"
    ),
    config: str = typer.Option(
        "hiergroup",
        "--config",
        "-c",
        help=CONFIG_HELP + " (default hiergroup: the paper's ucm settings, long side 512 px; demo: 128 px)",
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="stop at the first bad image instead of recording it"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (e.g. mine.priors=\\[ucm,saliency])"),
) -> None:
    """Run the grouping priors over an image collection into Parquet shards (resumable)."""
    from distseg.mining import MiningError
    from distseg.mining import mine as run_mine

    cfg = resolve(config, overrides)
    err.print(mining_line(config, cfg), highlight=False, soft_wrap=True)
    try:
        summary = run_mine(cfg, input, output, fail_fast=fail_fast)
    except (MiningError, FileNotFoundError, ValueError) as e:
        print_error(e)
        raise typer.Exit(1) from None
    from distseg.cluster import shutdown_ray

    shutdown_ray()  # flush Ray's forwarded worker logs now, so the summary really is the last line
    typer.echo(
        f"{summary.new} processed this run, {summary.skipped} already present; "
        f"{summary.seconds:.1f} s; shards in {summary.output}"
    )
    if summary.duplicates:
        typer.secho(
            f"removed {summary.duplicates} repeated rows of images already in the shards "
            "(a retried write, or a worker of an earlier killed run)",
            fg="yellow",
        )
    typer.echo(f"mined {summary.mined} images, {summary.errors} errors")


def mining_line(config: str, cfg) -> str:
    """What a mining run will do to each image, before it starts (the settings a shard row depends on)."""
    mine = cfg.mine
    size = f"long side at most {mine.max_side} px" if mine.max_side else "images kept at full size"
    line = f"mining with config {config!r}: priors {', '.join(mine.priors)}; {size}"
    if "ucm" in mine.priors:
        line += f"; ucm: {cfg.edges.detector} edges, at most {cfg.hierarchy.max_regions} regions"
    return line


@app.command()
def pretrain(
    config: str = typer.Option(
        "hiergroup", "--config", "-c", help=CONFIG_HELP + ": hiergroup | concepts | maskcontrast | demo"
    ),
    shards: str | None = SHARDS_OPTION,
    name: str | None = typer.Option(None, help="run name (default: the config's); rerunning a name resumes it"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see pretrain.*, model.*, losses.*)"),
) -> None:
    """Pretrain pixel embeddings on grouping shards with Ray Train (resumable, checkpointed, logged to MLflow)."""
    from distseg.checkpoint import CheckpointMismatch
    from distseg.cluster import ResourceError
    from distseg.data.synthetic import ScenesMismatch
    from distseg.mining import MiningError
    from distseg.train.ingest import IngestError
    from distseg.train.pretrain import pretrain as run_pretrain
    from distseg.train.probe import ProbeError

    extra = ([f"pretrain.shards={shards}"] if shards else []) + ([f"name={name}"] if name else [])
    cfg = resolve(config, extra + list(overrides or []))
    try:
        result = run_pretrain(cfg)
    except (
        IngestError, ResourceError, FileNotFoundError, ScenesMismatch, MiningError, CheckpointMismatch, ProbeError
    ) as e:  # fmt: skip
        print_error(e)
        raise typer.Exit(1) from None
    losses = " ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k.startswith("loss"))
    typer.echo(f"checkpoint: {result.checkpoint}  (MLflow run {result.run_id})")
    typer.echo(f"pretrained {cfg.pretrain.method} for {result.metrics.get('step')} steps: {losses}")


@app.command()
def tune(
    space: str = typer.Option(..., "--space", "-s", help="search space YAML (see tune_spaces/) or shipped name"),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " (default: the space's `config`)"),
    shards: str | None = SHARDS_OPTION,
    name: str | None = typer.Option(None, help="sweep name (default: tune_<space file name>)"),
    images: str | None = typer.Option(
        None, "--images", help="spaces sweeping grouping settings: the images each trial mines (default: synthetic)"
    ),
    resume: bool = typer.Option(False, "--resume", help="finish an interrupted sweep of this name (no trial reruns)"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (applied to every trial)"),
) -> None:
    """Sweep a method's knobs with Ray Tune: each trial a pretraining run, ASHA early stopping, MLflow child runs."""
    from distseg.cluster import ResourceError
    from distseg.train.ingest import IngestError
    from distseg.train.probe import ProbeError
    from distseg.tune import SpaceError, SweepError, print_summary, sweep

    try:
        result = sweep(
            space,
            config=config,
            shards=shards,
            overrides=list(overrides or []),
            resume=resume,
            name=name,
            images=images,
        )
    except (SpaceError, SweepError, ResourceError, ConfigError, IngestError, FileNotFoundError, ProbeError) as e:
        print_error(e)
        raise typer.Exit(2 if isinstance(e, SpaceError | ConfigError) else 1) from None
    from distseg.cluster import shutdown_ray

    shutdown_ray()  # flush Ray's forwarded worker logs now, so the summary really is the last line
    print_summary(result)


@app.command()
def evaluate(
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="checkpoint folder from `distseg pretrain` (model.pt, config.yaml)"
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        "--data",
        help="msrc | davis | synthetic | labeled:PATH | voc:PATH | coco:PATH (default: the config's "
        "evaluate.dataset; --data: its old name)",
    ),
    protocols: str | None = typer.Option(
        None,
        "--protocols",
        help="comma list: dataset_kmeans, object_kmeans, linear, deeplab, knn, retrieval, davis, davis_zm, purity, "
        "segment_purity, position",
    ),
    seeds: int | None = typer.Option(None, "--seeds", help="rerun the stochastic protocols with N seeds (mean +- std)"),
    baseline: str | None = typer.Option(None, "--baseline", help="also score baselines: random, rgbxy (comma list)"),
    out: Path | None = typer.Option(
        None, "--out", help="output folder for metrics.json and pictures (default: <workdir>/eval/<name>)"
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help=CONFIG_HELP + " (default: the checkpoint's config.yaml, else demo)"
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see evaluate.*)"),
) -> None:
    """Score frozen embeddings with the evaluation protocols (and baselines) and log everything to MLflow."""
    from distseg.eval.evaluate import EvaluationError
    from distseg.eval.evaluate import evaluate as run_evaluate
    from distseg.eval.summary import summary_lines

    if config is None:
        config = (
            str(Path(checkpoint) / "config.yaml")
            if checkpoint and (Path(checkpoint) / "config.yaml").is_file()
            else "demo"
        )
    extra = []
    if dataset:
        extra.append(f"evaluate.dataset={dataset}")
    if protocols:
        extra.append(f"evaluate.protocols=[{protocols}]")
    if seeds:
        extra.append(f"evaluate.seeds={seeds}")
    if baseline:
        extra.append(f"evaluate.baselines=[{baseline}]")
    cfg = resolve(config, extra + list(overrides or []))
    out = out or Path(cfg.workdir) / "eval" / cfg.name
    try:
        results = run_evaluate(cfg, checkpoint, out)
    except (EvaluationError, FileNotFoundError) as e:
        print_error(e)
        raise typer.Exit(1) from None
    from distseg.cluster import shutdown_ray

    shutdown_ray()  # flush Ray's forwarded worker logs now, so the summary really is the last line
    for line in summary_lines(results):
        typer.echo(line)
    typer.echo(f"wrote {out}/metrics.json")


@contextlib.contextmanager
def stage_errors():
    """A stage's bad input (a missing file, an existing output, a bad value): one red line, exit 1."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print_error(e)
        raise typer.Exit(1) from None


distill_app = typer.Typer(
    help="MaskDistill: object masks from ViT affinities, clustered into pseudo classes, distilled into Mask R-CNN, "
    "then confident masks train a segmentation model.",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill")


@distill_app.command("masks")
def distill_masks(
    shards: str = typer.Option(
        ..., "--shards", "--data", "-d", help="where the mask shards go (mine output; resumable; --data: its old name)"
    ),
    input: str | None = typer.Option(None, "--input", "-i", help="images (default: synthetic, if data.source is)"),
    out: str | None = typer.Option(None, "--out", help="the clustered shard version (default: SHARDS_k<K>)"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see priors.vit_masks.*)"),
) -> None:
    """Mine vit_masks (pretraining a ViT first when no weights or checkpoint are given), then cluster them."""
    from distseg.distill.stage import distill_masks as run

    with stage_errors():
        s = run(resolve(config, overrides), shards, input, out)
    c = s.cluster
    typer.echo(f"mined {s.mined} images ({s.errors} errors) in {s.mine_seconds:.1f} s -> {s.masks}")
    typer.echo(f"{c.masks} masks, {c.masks / max(1, c.images):.2f} per image; k-means K={c.clusters}: sizes {c.sizes}")
    for name, ap in (s.mask_ap or {}).items():
        typer.echo(f"class-agnostic mask AP of {name}: AP {ap['AP']:.3f}  AP50 {ap['AP50']:.3f}  AP75 {ap['AP75']:.3f}")
    typer.echo(f"clustered shards: {c.output}  (MLflow run {c.run_id})")


@distill_app.command("cluster")
def distill_cluster(
    shards: str = typer.Option(
        ...,
        "--shards",
        "--data",
        "-d",
        help="shards holding the proposals (a `distseg mine` output; --data: its old name)",
    ),
    out: str | None = typer.Option(
        None, "--out", help="the clustered shard version (default: SHARDS_k<K>, SHARDS_<PRIOR>_k<K> for other priors)"
    ),
    prior: str = typer.Option(
        "vit_masks", "--prior", help="the proposals: a mask prior's column (vit_masks, saliency, felzenszwalb_masks)"
    ),
    score: bool = typer.Option(False, help="then score row (a): Hungarian mIoU against evaluate.dataset's labels"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see priors.vit_masks.*)"),
) -> None:
    """k-means over the masked images' features across the dataset; pseudo classes into a new version.
    Features and K always come from priors.vit_masks, so other proposals (--prior) compare like for like."""
    from distseg.distill.cluster import cluster_masks

    with stage_errors():
        c = cluster_masks(resolve(config, overrides), shards, out, prior=prior, score=score)
    typer.echo(
        f"{c.masks} {c.prior} masks of {c.images} images ({c.masks / max(1, c.images):.2f} per image), "
        f"K={c.clusters}: sizes {c.sizes}, {c.seconds:.0f} s -> {c.output}  (MLflow run {c.run_id})"
    )
    if c.scores:
        h, m = c.scores["hungarian"], c.scores["majority"]
        typer.echo(
            f"row (a), cluster the initial {c.prior} masks: Hungarian mIoU {h['miou']:.4f} "
            f"(pixel accuracy {h['pixel_accuracy']:.4f}), majority mIoU {m['miou']:.4f}, "
            f"{c.scores['images']} images"
        )


@distill_app.command("ap")
def distill_ap(
    shards: str = typer.Option(
        ...,
        "--shards",
        "--data",
        "-d",
        help="shards holding the mask proposals (a `distseg mine` output; --data: its old name)",
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="the dataset whose instance masks are the ground truth: synthetic | davis | coco:PATH "
        "(default: the data source the shards were mined from, else evaluate.dataset)",
    ),
    priors: str | None = typer.Option(
        None,
        "--priors",
        help="comma list of mask priors, e.g. vit_masks,saliency,felzenszwalb_masks (default: every mask "
        "prior stored in the shards; one that is not stored is run on the stored images)",
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="the dataset split the mined images are looked up in (default: all; synthetic: data.split)",
    ),
    track: bool = typer.Option(True, help="log the table to MLflow (tag stage=distill.ap) in the workdir's store"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (settings of the priors run here: priors.*)"),
) -> None:
    """Class-agnostic mask AP (pycocotools) of mined mask proposals against a dataset's instance masks.

    area: mean mask area (share of the image); best IoU: mean over annotated objects of the best IoU any
    mask reaches (extra masks do not lower it). Caveat: DAVIS-2016 annotates one object per frame, so a
    mask on another, unannotated object counts as a false positive: AP there is a lower bound, meant for
    comparing proposal kinds on the same frames."""
    from distseg.distill.evaluate import evaluate_masks, log_mask_ap

    cfg = resolve(config, overrides)
    names = [p.strip() for p in priors.split(",") if p.strip()] if priors else None
    with stage_errors():
        r = evaluate_masks(cfg, shards, dataset, names, split, progress=True)
    typer.echo(f"class-agnostic mask AP on {r.images} images of {r.dataset} (split {r.split}):")
    typer.echo(f"{'prior':<20} {'masks/image':>11} {'area':>6} {'AP':>7} {'AP50':>7} {'AP75':>7} {'best IoU':>8}")
    for name, a in r.scores.items():
        how = "" if a["stored"] else "  (run on the stored images)"
        typer.echo(
            f"{name:<20} {a['masks_per_image']:>11.2f} {a['area']:>6.3f} {a['AP']:>7.3f} {a['AP50']:>7.3f} "
            f"{a['AP75']:>7.3f} {a['best_iou']:>8.3f}{how}"
        )
    if track:
        typer.echo(f"MLflow run {log_mask_ap(cfg, shards, r)}")


@distill_app.command("train")
def distill_train(
    shards: str = typer.Option(
        ...,
        "--shards",
        "--data",
        "-d",
        help="a clustered shard version (`distill cluster` output; --data: its old name)",
    ),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see distill.maskrcnn.*)"),
) -> None:
    """Distil the clustered masks into Mask R-CNN with Ray Train (rerunning the same name resumes)."""
    from distseg.distill.maskrcnn import train_maskrcnn

    with stage_errors():
        r = train_maskrcnn(resolve(config, overrides), shards)
    typer.echo(
        f"Mask R-CNN: {r.metrics.get('step')} steps, loss {r.metrics.get('loss', float('nan')):.4f}, {r.seconds:.0f} s"
    )
    typer.echo(f"checkpoint: {r.checkpoint}  (MLflow run {r.run_id})")


@distill_app.command("confident")
def distill_confident(
    checkpoint: str = typer.Option(..., "--checkpoint", help="the Mask R-CNN checkpoint (`distill train`)"),
    shards: str = typer.Option(
        ..., "--shards", "--data", "-d", help="the shard version whose images are segmented (--data: its old name)"
    ),
    out: str | None = typer.Option(None, "--out", help="the pseudo-label version (default: SHARDS_confident)"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see distill.confident.*)"),
) -> None:
    """Mask R-CNN over the dataset (Ray Data); confident masks -> pseudo label maps in a new version."""
    from distseg.distill.confident import confident_stage

    with stage_errors():
        s = confident_stage(resolve(config, overrides), checkpoint, shards, out)
    typer.echo(f"{s.images} images: {s.masks} of {s.predictions} predictions kept ({s.seconds:.0f} s) -> {s.output}")
    typer.echo(f"pixel share per class (0 = background): {s.pixel_share}")


@distill_app.command("segment")
def distill_segment(
    shards: str = typer.Option(
        ...,
        "--shards",
        "--data",
        "-d",
        help="a pseudo-label version (`distill confident` output; --data: its old name)",
    ),
    evaluate: bool = typer.Option(True, help="then score it on evaluate.dataset (matched mIoU + protocols)"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see distill.segment.*, evaluate.*)"),
) -> None:
    """Train DeepLab-v3 on the pseudo label maps with hard pixel mining (Ray Train), then evaluate it."""
    from distseg.distill.segment import evaluate_segmenter, train_segmenter

    cfg = resolve(config, overrides)
    with stage_errors():
        r = train_segmenter(cfg, shards)
        scores = evaluate_segmenter(cfg, r.checkpoint) if evaluate else None
    typer.echo(
        f"DeepLab-v3: {r.metrics.get('step')} steps, loss {r.metrics.get('loss', float('nan')):.4f}, {r.seconds:.0f} s"
    )
    typer.echo(f"checkpoint: {r.checkpoint}  (MLflow run {r.run_id})")
    if scores:
        p = scores["predictions"]
        typer.echo(
            f"{p['dataset']}: Hungarian mIoU {p['hungarian']['miou']:.4f} (majority {p['majority']['miou']:.4f})"
        )
        for name, metrics in scores["protocols"].items():
            typer.echo(f"  {name}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "miou" in k))


@distill_app.command("run")
def distill_run(
    root: str = typer.Option(..., "--root", help="where every stage's output goes (rerun: resume)"),
    input: str | None = typer.Option(None, "--input", "-i", help="images (default: synthetic, if data.source is)"),
    ablation: bool = typer.Option(False, help="also score the paper's Table 1 rows (a)-(d)"),
    config: str = typer.Option("maskdistill_demo", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """MaskDistill end to end: masks, clusters, Mask R-CNN, confident masks, DeepLab-v3, evaluation."""
    from distseg.distill.pipeline import run_pipeline

    with stage_errors():
        s = run_pipeline(resolve(config, overrides), root, input, ablation)
    from distseg.cluster import shutdown_ray

    shutdown_ray()
    typer.echo("seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    for row, scores in s["scores"].items():
        scored = scores.get("predictions", scores)
        typer.echo(
            f"{row}: Hungarian mIoU {scored['hungarian']['miou']:.4f} (majority {scored['majority']['miou']:.4f})"
        )
    typer.echo(f"wrote {root}/summary.json")


edges_app = typer.Typer(
    help="The grouping primitive: train and evaluate edge detectors (BSDS500).", no_args_is_help=True
)
app.add_typer(edges_app, name="edges")


@edges_app.command("train")
def edges_train(
    root: Path | None = typer.Option(
        None,
        "--root",
        "--data",
        help="BSDS500 root with images/ and groundTruth/ (sets edge_train.root; default: $DISTSEG_DATA_ROOT/bsds500, "
        "else ../shared/data/bsds500; --data: its old name)",
    ),
    config: str = typer.Option("edges", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (see edge_train.*)"),
) -> None:
    """Train the learned edge network from scratch on BSDS500 train+val with Ray Train."""
    from distseg.train.edges import train_edges

    cfg = resolve(config, list(overrides or []) + ([f"edge_train.root={root}"] if root else []))
    with stage_errors():
        weights = train_edges(cfg)
    typer.echo(f"weights: {weights}")
    typer.echo(f"evaluate: distseg edges eval --detector learned --weights {weights} --split test")


@edges_app.command("eval")
def edges_eval(
    detector: str = typer.Option("learned", help="edge detector: learned | gradient | sed"),
    weights: str | None = typer.Option(
        None, help="weights file (learned: default the shipped ones; sed: model.yml.gz)"
    ),
    root: Path | None = typer.Option(
        None,
        "--root",
        "--data",
        help="BSDS500 root (default: $DISTSEG_DATA_ROOT/bsds500, else ../shared/data/bsds500; --data: its old name)",
    ),
    split: str = typer.Option("test", help="BSDS split: train | val | test"),
    limit: int | None = typer.Option(None, help="only the first N images of the split"),
    out: Path = typer.Option(Path("outputs/edges/eval"), help="output folder: <id>.png UCMs (16-bit) and metrics.json"),
    thresholds: int = typer.Option(99, help="benchmark thresholds (the official default is 99)"),
    regions: bool = typer.Option(True, help="also run the region benchmarks (covering, PRI, VOI)"),
    config: str = typer.Option("edges", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " (e.g. hierarchy.max_regions=40)"),
) -> None:
    """Score an edge detector and its OWT-UCM on BSDS500 with the BSDS boundary/region benchmarks."""
    from distseg.eval.grouping import evaluate_grouping

    extra = [f"edges.detector={detector}"] + ([f"edges.weights={weights}"] if weights else [])
    cfg = resolve(config, extra + list(overrides or []))
    if root is None:
        from distseg.data import default_data_root

        root = default_data_root() / "bsds500"
    with stage_errors():
        metrics = evaluate_grouping(
            cfg, root, split=split, out_dir=out, limit=limit, thresholds=thresholds, regions=regions
        )
    if "edges" in metrics:
        e = metrics["edges"]
        typer.echo(f"edges alone: ODS={e['ods_f']:.3f} OIS={e['ois_f']:.3f} AP={e['ap']:.3f}")
    u = metrics["ucm"]
    if "covering_ods" in u:
        typer.echo(
            f"ucm regions: covering ODS={u['covering_ods']:.3f} OIS={u['covering_ois']:.3f} "
            f"PRI={u['pri_ods']:.3f} VOI={u['voi_ods']:.3f}"
        )
    typer.echo(
        f"seconds/image: edges {metrics['edge_seconds_per_image']:.3f}, "
        f"hierarchy {metrics['hierarchy_seconds_per_image']:.3f}; wrote {out}/"
    )
    typer.echo(f"ODS={u['ods_f']:.3f} OIS={u['ois_f']:.3f} AP={u['ap']:.3f}")


data_app = typer.Typer(
    help="Your own data: check a dataset (labeled:PATH, voc:PATH, coco:PATH, folder:PATH, msrc) before using it.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    source: str = typer.Argument(..., help="labeled:PATH | voc:PATH | coco:PATH | folder:PATH | msrc | davis"),
    split: str = typer.Option("all", help="the split to check (all: every image)"),
    limit: int | None = typer.Option(None, help="only the first N images of the split"),
    out: Path | None = typer.Option(
        None, "--out", help="the overlay picture (default: outputs/data-check/<source>.png)"
    ),
    examples: int = typer.Option(6, help="images in the overlay picture"),
) -> None:
    """Check that every image decodes and every label fits (shape, class ids, splits): a summary, an
    overlay picture, and exit 1 listing each bad file and why. Modifies nothing."""
    from distseg.data.check import check_source, default_picture, print_report

    report = check_source(
        source, split=split, limit=limit, out=out or default_picture(source), examples=examples, progress=True
    )
    print_report(report, Console(soft_wrap=False))
    if not report.ok:
        raise typer.Exit(1)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` of the command: distseg's own warnings as one yellow line for people
    ("warning: <message>"), every other library's in Python's usual form."""
    package = str(Path(__file__).resolve().parent)
    if str(Path(filename).resolve()).startswith(package) or category.__module__.startswith("distseg"):
        err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main(args: list[str] | None = None) -> None:
    """The `distseg` command (and `jobs/*.py`, which pass their verb in `args`): the Typer app with
    distseg's warnings as one line (`show_warning`)."""
    warnings.showwarning = show_warning
    app(args)


if __name__ == "__main__":
    main()
