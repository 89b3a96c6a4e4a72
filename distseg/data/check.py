"""`distseg data check SOURCE`: is a dataset usable as it is? Reads everything, modifies nothing.

    report = check_source("voc:/data/VOC2012", out=Path("outputs/data-check/voc.png"))
    print_report(report, console)   # the summary table, every problem, where the picture is
    report.ok                       # False: the command exits 1

What is checked, for every image of the split (default: all):
- the image file decodes (a truncated or corrupt file is named with the reason);
- its label exists, decodes, has the image's height and width, and holds only class ids of the class
  list or the void value (a colour label only colours of the palette);
- the listing itself: a label without image, an id of a split file that has no files, a non-PNG
  label, every split non-empty (the reader's `problems`, distseg.data.labeled).

The summary has the images, their sizes, the splits, each class's share of the labelled pixels and of
the images, and the void share. The picture is a few images (spread over the split) with their labels
overlaid, each region named by its class. An unlabelled source (`folder:PATH`) is checked for decoding
only.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from distseg.data.base import DATASETS, DataProblem, Dataset
from distseg.data.imageio import read_image
from distseg.data.labeled import ClassList, LabeledFiles, LabelError

TILE = 320  # longer side of each picture tile, pixels


@dataclass
class CheckReport:
    """What `check_source` found (see the module docstring)."""

    source: str
    kind: str = ""
    root: str = ""
    split: str = "all"
    classes: ClassList | None = None
    splits: dict[str, int] = field(default_factory=dict)
    images: int = 0  # images checked (the split's ids)
    bad_images: int = 0  # of those, images whose file or label has a problem
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    class_pixels: np.ndarray | None = None  # pixels per class id
    class_images: np.ndarray | None = None  # images that show each class id
    void_pixels: int = 0
    other_pixels: int = 0  # values neither a class id nor void
    total_pixels: int = 0
    problems: list[DataProblem] = field(default_factory=list)
    picture: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def labelled(self) -> bool:
        return self.classes is not None


def open_for_check(source: str, split: str | None, root: str | Path | None) -> Dataset:
    """The source opened leniently (a labelled reader lists its problems instead of raising)."""
    from distseg.data import open_dataset

    name = source.partition(":")[0]
    reader = DATASETS.get(name) if name in DATASETS else None
    lenient = {"strict": False} if isinstance(reader, type) and issubclass(reader, LabeledFiles) else {}
    return open_dataset(source, root=root, split=split, **lenient)


def _check_one(dataset: Dataset, image_id: str) -> tuple[list[DataProblem], dict | None]:
    """(problems, stats) of one image and its label; stats None when it cannot be used."""
    if not isinstance(dataset, LabeledFiles):
        try:
            image = dataset[image_id].image
        except Exception as e:  # any reader error is this file's problem
            files = getattr(dataset, "image_files", None)
            where = files().get(image_id) if files else f"{getattr(dataset, 'root', dataset.name)} [{image_id}]"
            return [DataProblem(str(where), getattr(e, "reason", None) or str(e))], None
        return [], {"size": (image.shape[1], image.shape[0])}
    problems = []
    image_path = dataset.image_path(image_id)
    image = labels = None
    try:
        image = read_image(image_path)
    except Exception as e:  # ImageDecodeError names the reason; OSError for an unreadable file
        problems.append(DataProblem(str(image_path), getattr(e, "reason", None) or f"cannot read ({e})"))
    try:
        labels = dataset.read_labels(image_id)
    except LabelError as e:
        problems.append(DataProblem(e.path, e.reason))
    except Exception as e:
        problems.append(DataProblem(dataset.label_name(image_id), f"cannot read the label ({type(e).__name__}: {e})"))
    if image is None or labels is None:
        return problems, None
    stats: dict = {"size": (image.shape[1], image.shape[0])}
    if labels.shape != image.shape[:2]:
        problems.append(
            DataProblem(
                dataset.label_name(image_id),
                f"label is {labels.shape[1]}x{labels.shape[0]} (width x height) but the image "
                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}",
            )
        )
    values, counts = np.unique(labels, return_counts=True)
    void = dataset.classes.void
    n = len(dataset.classes.names)
    outside = [(int(v), int(c)) for v, c in zip(values, counts) if not (0 <= v < n or v == void)]
    if outside:
        shown = ", ".join(f"{v} ({c} px)" for v, c in outside[:6]) + (", ..." if len(outside) > 6 else "")
        void_text = f" nor void ({void})" if void is not None else " (no void value)"
        problems.append(
            DataProblem(
                dataset.label_name(image_id),
                f"label value(s) {shown} are not class ids (0..{n - 1} in {dataset.classes.source}){void_text}",
            )
        )
    stats["values"] = dict(zip(values.tolist(), counts.tolist()))
    return problems, stats


def check_source(
    source: str,
    *,
    split: str | None = "all",
    root: str | Path | None = None,
    limit: int | None = None,
    out: Path | None = None,
    examples: int = 6,
    workers: int | None = None,
    progress: bool = False,
) -> CheckReport:
    """Check every image (and label) of `source`'s split; write the overlay picture to `out`."""
    t0 = time.perf_counter()
    report = CheckReport(source=source, split=split or "all")
    try:
        dataset = open_for_check(source, split, root)
    except Exception as e:  # a missing folder or class list, a bad classes.yaml, an unknown split ...
        report.problems.append(DataProblem(source, str(e)))
        report.seconds = time.perf_counter() - t0
        return report
    labelled = isinstance(dataset, LabeledFiles)
    report.kind = getattr(dataset, "title", dataset.name)
    report.root = str(getattr(dataset, "root", ""))
    ids = dataset.ids()[:limit] if limit else dataset.ids()
    if labelled:
        report.classes = dataset.classes
        report.splits = {name: len(v) for name, v in sorted(dataset.split_ids.items())}
        report.problems += dataset.problems
        n = len(dataset.classes.names)
        report.class_pixels = np.zeros(n, np.int64)
        report.class_images = np.zeros(n, np.int64)
    else:
        report.splits = {report.split: len(ids)}
    good: list[str] = []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda i: _check_one(dataset, i), ids)
        results = _progress(results, len(ids), progress)
        for image_id, (problems, stats) in zip(ids, results):
            report.images += 1
            report.problems += problems
            report.bad_images += bool(problems)
            if not problems:
                good.append(image_id)
            if stats is None:
                continue
            report.sizes[stats["size"]] += 1
            for value, count in stats.get("values", {}).items():
                report.total_pixels += count
                if report.classes.void is not None and value == report.classes.void:
                    report.void_pixels += count
                elif 0 <= value < len(report.class_pixels):
                    report.class_pixels[value] += count
                    report.class_images[value] += 1
                else:
                    report.other_pixels += count
    report.problems.sort()
    if out is not None and good and examples > 0:
        picks = [good[round(i * (len(good) - 1) / max(1, examples - 1))] for i in range(min(examples, len(good)))]
        report.picture = write_overlay(dataset, list(dict.fromkeys(picks)), Path(out))
    report.seconds = time.perf_counter() - t0
    return report


def _progress(results, total: int, show: bool):
    if not show:
        return results
    from rich.progress import track

    return track(results, total=total, description="checking", transient=True)


# ---------------------------------------------------------------- the picture


def class_colours(classes: ClassList) -> np.ndarray:
    """RGB colour per class id: the dataset's palette when it has one, else distinct hues."""
    from distseg.viz import palette

    if classes.palette:
        return np.array(classes.palette, np.uint8)
    return palette(len(classes.names))


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.42) -> None:
    """White text with a dark outline (readable on any colour), clipped to the picture."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (w, h), _ = cv2.getTextSize(text, font, scale, 1)
    x = int(min(max(org[0] - w // 2, 1), max(1, img.shape[1] - w - 1)))
    y = int(min(max(org[1] + h // 2, h + 1), img.shape[0] - 2))
    cv2.putText(img, text, (x, y), font, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (x, y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def overlay_tile(image: np.ndarray, labels: np.ndarray, classes: ClassList, caption: str) -> np.ndarray:
    """One image with its labels blended in, region borders drawn, each class named on its largest region."""
    h, w = image.shape[:2]
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    labels = cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    colours = class_colours(classes)
    n = len(classes.names)
    known = (labels >= 0) & (labels < n) & (labels != (classes.void if classes.void is not None else -1))
    colour = np.zeros_like(image)
    colour[known] = colours[labels[known]]
    out = image.copy()
    out[known] = (0.45 * image[known] + 0.55 * colour[known]).astype(np.uint8)
    border = np.zeros(labels.shape, bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:, :] != labels[:-1, :]
    out[border] = (20, 20, 20)
    for value in np.unique(labels[known]):
        mask = (labels == value).astype(np.uint8)
        count, comps, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[biggest, cv2.CC_STAT_AREA] < 30:
            continue
        inside = np.pad((comps == biggest).astype(np.uint8), 1)
        dist = cv2.distanceTransform(inside, cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        _text(out, classes.names[int(value)], (int(x), int(y)))
    tile = np.full((TILE + 18, TILE, 3), 255, np.uint8)
    tile[18 : 18 + size[1], : size[0]] = out
    cv2.putText(tile, caption[:48], (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def write_overlay(dataset: Dataset, ids: list[str], out: Path, columns: int = 3) -> Path | None:
    """The overlay picture of `ids` (images only for an unlabelled source) as a PNG at `out`."""
    tiles = []
    for image_id in ids:
        if isinstance(dataset, LabeledFiles):
            image, labels = read_image(dataset.image_path(image_id)), dataset.read_labels(image_id)
            tiles.append(overlay_tile(image, labels, dataset.classes, image_id))
        else:
            image = dataset[image_id].image
            none = ClassList(("-",), None)
            tiles.append(overlay_tile(image, np.full(image.shape[:2], -1), none, image_id))
    if not tiles:
        return None
    rows = math.ceil(len(tiles) / columns)
    th, tw = tiles[0].shape[:2]
    sheet = np.full((rows * (th + 4) + 4, min(columns, len(tiles)) * (tw + 4) + 4, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[4 + r * (th + 4) : 4 + r * (th + 4) + th, 4 + c * (tw + 4) : 4 + c * (tw + 4) + tw] = tile
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), sheet[:, :, ::-1]):
        raise OSError(f"could not write {out}")
    return out


def default_picture(source: str) -> Path:
    """outputs/data-check/<name>[-<folder>].png for a source."""
    name, _, path = source.partition(":")
    stem = f"{name}-{Path(path).resolve().name}" if path else name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return Path("outputs") / "data-check" / f"{safe}.png"


# ---------------------------------------------------------------- printing


def _share(part: int, whole: int) -> str:
    if whole == 0:
        return "-"
    if part == 0:
        return "0"
    pct = 100.0 * part / whole
    return f"{pct:.1f}%" if pct >= 0.1 else "<0.1%"


def _sizes(sizes: Counter) -> str:
    if not sizes:
        return "-"
    common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
    more = f", +{len(sizes) - 3} other sizes" if len(sizes) > 3 else ""
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return f"{common}{more}; width {min(widths)}..{max(widths)}, height {min(heights)}..{max(heights)}"


def print_report(report: CheckReport, console) -> None:
    """The summary table, the class table, every problem and the picture's path (rich console)."""
    from rich.table import Table

    console.print(f"distseg data check {report.source}", markup=False, highlight=False, soft_wrap=True)
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row("layout", f"{report.kind} at {report.root}" if report.kind else "-")
    if report.classes is not None:
        void = "none" if report.classes.void is None else str(report.classes.void)
        summary.add_row("classes", f"{len(report.classes.names)} from {report.classes.source}; void = {void}")
    summary.add_row("splits", ", ".join(f"{k} {v}" for k, v in report.splits.items()) or "-")
    bad = f", {report.bad_images} with problems" if report.bad_images else ""
    summary.add_row(f"images checked ({report.split})", f"{report.images}{bad}")
    summary.add_row("sizes (w x h)", _sizes(report.sizes))
    if report.classes is not None:
        summary.add_row("labelled pixels", f"{report.total_pixels:,}")
        summary.add_row("void share", _share(report.void_pixels, report.total_pixels))
        if report.other_pixels:
            summary.add_row("not a class id", _share(report.other_pixels, report.total_pixels))
    summary.add_row("problems", str(len(report.problems)))
    summary.add_row("seconds", f"{report.seconds:.1f}")
    console.print(summary)
    if report.classes is not None and report.class_pixels is not None:
        table = Table(title="classes", title_justify="left")
        table.add_column("id", justify="right")
        table.add_column("name")
        table.add_column("pixel share", justify="right")
        table.add_column("images", justify="right")
        for i, name in enumerate(report.classes.names):
            if i == report.classes.void:
                table.add_row(
                    str(i),
                    name if name == "void" else f"{name} (void)",
                    _share(report.void_pixels, report.total_pixels),
                    "",
                )
                continue
            table.add_row(
                str(i), name, _share(int(report.class_pixels[i]), report.total_pixels), str(report.class_images[i])
            )
        console.print(table)
        absent = [
            n for i, n in enumerate(report.classes.names) if i != report.classes.void and not report.class_pixels[i]
        ]
        if absent and report.images:
            console.print(f"classes without pixels: {', '.join(absent)}", markup=False, highlight=False)
    if report.picture is not None:
        console.print(f"overlay picture: {report.picture}", markup=False, highlight=False, soft_wrap=True)
    if report.problems:
        console.print(f"{len(report.problems)} problem(s):", markup=False, highlight=False)
        for p in report.problems:
            console.print(f"  {p.path}: {p.reason}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("no problems", markup=False, highlight=False)
