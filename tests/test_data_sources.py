"""A user's own data without code: labelled folders, VOC and COCO layouts, written here in tmp_path;
their splits, class lists and label formats; mining a source; a labelled folder evaluated end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray.data  # noqa: F401  (see below)
from data_layouts import (
    CLASSES,
    VOC_DISC,
    VOC_SQUARE,
    make_coco,
    make_labeled,
    make_voc,
    save,
    scene,
)
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data import (
    DATASETS,
    COCOSegmentation,
    LabeledFolder,
    LabelError,
    VOCSegmentation,
    hash_split,
    is_source,
    open_dataset,
    source_image_files,
)
from distseg.data.msrc import msrc_split
from distseg.data.voc import VOC_CLASSES, voc_colormap
from distseg.tracking import tracking_uri

# Ray Data's console log handler keeps the sys.stderr of the moment ray.data is first imported. Imported
# here, at collection, that is pytest's; were it first imported inside a CliRunner call (the mining test
# below), later runs would log into that call's closed stream ("--- Logging error ---" in their output).

# ---------------------------------------------------------------- labelled folder


def test_labeled_folder_reads_images_labels_and_hash_splits(tmp_path: Path) -> None:
    ids = make_labeled(tmp_path, n=12)
    every = open_dataset(f"labeled:{tmp_path}", split="all")
    assert isinstance(every, LabeledFolder) and every.ids() == ids
    assert every.class_names == list(CLASSES) and every.ignore_index == 255
    train = open_dataset(f"labeled:{tmp_path}", split="train").ids()
    val = open_dataset(f"labeled:{tmp_path}", split="val").ids()
    # the same rule as MSRC's, from the id alone
    assert val == [i for i in ids if hash_split(i) == "val"] and train == [i for i in ids if hash_split(i) == "train"]
    assert msrc_split is hash_split and val and train and sorted(train + val) == ids
    assert open_dataset(f"labeled:{tmp_path}", split=None).ids() == ids  # None: all
    assert open_dataset(f"labeled:{tmp_path}", split="all", limit=3).ids() == ids[:3]
    sample = every["img03"]
    image, labels = scene(3)
    assert np.array_equal(sample.image, image)
    assert np.array_equal(sample.labels[:-1], labels[:-1]) and (sample.labels[-1] == 255).all()
    assert sample.meta == {"split": hash_split("img03"), "path": str(tmp_path / "images" / "img03.png")}
    with pytest.raises(ValueError, match=r"unknown labelled folder split 'test'.*\['all', 'train', 'val'\]"):
        open_dataset(f"labeled:{tmp_path}", split="test")
    with pytest.raises(KeyError, match="no image 'img99'"):
        every["img99"]


def test_labeled_folder_split_files_and_nested_ids(tmp_path: Path) -> None:
    ids = make_labeled(tmp_path, n=6, classes="yaml", splits={"train": ["img00", "img01.png", "img02"], "test": []})
    (tmp_path / "splits" / "val.txt").write_text("# held out\nimg03 extra words\n\nimg04\nimg03\n")
    image, labels = scene(0)
    save(tmp_path / "images" / "street" / "day" / "a1.jpg", image, quality=95)
    save(tmp_path / "labels" / "street" / "day" / "a1.png", labels)
    ds = LabeledFolder(tmp_path, split="train", strict=False)
    assert ds.ids() == ["img00", "img01", "img02"]  # "img01.png": the file name works too
    assert set(ds.split_ids) == {"all", "train", "val", "test"}
    assert ds.split_ids["val"] == ["img03", "img04"]  # first word, comments skipped, once each
    assert ds.split_ids["all"] == sorted([*ids, "street/day/a1"])
    assert ds.problems[-1].reason == "split 'test' is empty (no line names a usable image)"
    assert open_dataset(f"labeled:{tmp_path}", split="all")["street/day/a1"].labels.shape == (40, 48)


def test_class_list_files(tmp_path: Path) -> None:
    make_labeled(tmp_path, n=2, classes="none")
    with pytest.raises(FileNotFoundError, match="no class list: add classes.txt"):
        open_dataset(f"labeled:{tmp_path}", split="all")
    (tmp_path / "classes.txt").write_text("# my classes\nbackground\n\nsquare\ndisc\n")
    assert open_dataset(f"labeled:{tmp_path}", split="all").class_names == list(CLASSES)
    (tmp_path / "classes.yaml").write_text("names: [a]\n")
    with pytest.raises(ValueError, match=r"several class lists \(classes.yaml, classes.txt\): keep one"):
        open_dataset(f"labeled:{tmp_path}", split="all")
    (tmp_path / "classes.txt").unlink()
    bad = {
        "names: [a, b]\nignore: 0\n": r"unknown key\(s\) \['ignore'\] \(allowed: names, palette, void, void_color\)",
        "names: [a, a]\n": r"class names appear twice: \['a'\]",
        "names: [a, b]\nvoid: -1\n": "void must be a label value 0..65535 or null",
        "names: [a, b]\npalette: [[0, 0, 0]]\n": r"palette must list one \[r, g, b\] per class name \(2\)",
        "names: [a, b]\npalette: [[0, 0, 0], [0, 0, 300]]\n": "integers 0..255",
        "just a string": "expected a mapping",
    }
    for text, message in bad.items():
        (tmp_path / "classes.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            open_dataset(f"labeled:{tmp_path}", split="all")
    (tmp_path / "classes.yaml").write_text("names: [void, square, disc]\nvoid: 0\n")
    ds = open_dataset(f"labeled:{tmp_path}", split="all")
    assert ds.ignore_index == 0 and ds.num_classes == 3


def test_colour_coded_labels_through_the_palette(tmp_path: Path) -> None:
    make_labeled(tmp_path, n=3, classes="none")
    palette = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    (tmp_path / "classes.yaml").write_text(
        f"names: [{', '.join(CLASSES)}]\npalette: {palette}\nvoid_color: [255, 255, 255]\n"
    )
    _, labels = scene(1)
    colours = np.array(palette + [[0, 0, 0]] * 252 + [[255, 255, 255]], np.uint8)
    labels[0, :5] = 255
    save(tmp_path / "labels" / "img01.png", colours[labels])  # an RGB label
    ds = open_dataset(f"labeled:{tmp_path}", split="all")
    assert np.array_equal(ds["img01"].labels, labels) and ds["img01"].labels.dtype == np.uint8
    odd = colours[labels]
    odd[2, 2] = (1, 2, 3)
    save(tmp_path / "labels" / "img01.png", odd)
    with pytest.raises(
        LabelError, match=r"img01.png: 1 colour\(s\) not in the palette of .*classes.yaml: \(1, 2, 3\) x1"
    ):
        ds.read_labels("img01")
    (tmp_path / "classes.yaml").write_text(f"names: [{', '.join(CLASSES)}]\n")  # no palette
    ds = open_dataset(f"labeled:{tmp_path}", split="all")
    with pytest.raises(LabelError, match=r"a colour \(RGB\) label map needs a palette"):
        ds["img01"]
    grey = np.repeat(labels[..., None], 3, axis=2)  # class ids saved as RGB by a careless export
    save(tmp_path / "labels" / "img01.png", grey)
    assert np.array_equal(ds["img01"].labels, labels)


def test_a_palette_png_label_counts_by_index(tmp_path: Path) -> None:
    """A palette (P mode) PNG is read by index, whatever colours its palette gives the indices."""
    make_labeled(tmp_path, n=2)
    _, labels = scene(0)
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    img.putpalette([255, 255, 0, 0, 255, 255, 9, 9, 9] + [0] * 759)
    img.save(tmp_path / "labels" / "img00.png")
    assert Image.open(tmp_path / "labels" / "img00.png").mode == "P"
    assert np.array_equal(open_dataset(f"labeled:{tmp_path}", split="all")["img00"].labels, labels)


def test_strict_opening_names_missing_files_and_data_check(tmp_path: Path) -> None:
    make_labeled(tmp_path, n=12)
    (tmp_path / "labels" / "img05.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        open_dataset(f"labeled:{tmp_path}", split="all")
    text = str(err.value)
    assert (
        "1 image(s) of split 'all' cannot be used" in text
        and "img05.png: no label (labels/img05.png is missing)" in text
    )
    assert f"`distseg data check labeled:{tmp_path}` lists every problem" in text
    other = "val" if hash_split("img05") == "train" else "train"
    assert "img05" not in open_dataset(f"labeled:{tmp_path}", split=other).ids()  # other split: fine
    ds = LabeledFolder(tmp_path, split="all", strict=False)
    assert len(ds) == 11 and ds.problems[0].path == str(tmp_path / "images" / "img05.png")
    with pytest.raises(FileNotFoundError, match=r"images has no images/ \(layout: images/, labels/"):
        open_dataset(f"labeled:{tmp_path / 'images'}")
    with pytest.raises(ValueError, match="labeled:PATH"):
        open_dataset("labeled")


# ---------------------------------------------------------------- VOC


def test_voc_layout(tmp_path: Path) -> None:
    ids = make_voc(tmp_path, n=12)
    ds = open_dataset(f"voc:{tmp_path}", split="val")
    assert isinstance(ds, VOCSegmentation) and ds.ids() == ids[8:]
    assert ds.class_names == list(VOC_CLASSES) and ds.ignore_index == 255 and ds.num_classes == 21
    assert open_dataset(f"voc:{tmp_path}", split="trainval").ids() == ids
    all_ids = open_dataset(f"voc:{tmp_path}", split="all").ids()
    assert all_ids == ids  # the JPEG without a label is no segmentation image
    sample = ds[ids[9]]
    _, labels = scene(9)
    assert sample.image.shape == (40, 48, 3)
    assert set(np.unique(sample.labels).tolist()) == {0, VOC_DISC, VOC_SQUARE, 255}
    inner = sample.labels != 255
    want = np.select([labels == 1, labels == 2], [VOC_SQUARE, VOC_DISC], 0)
    assert np.array_equal(sample.labels[inner], want[inner])
    assert sample.instances.dtype == np.int32 and set(np.unique(sample.instances).tolist()) == {0, 1, 2}
    assert sorted(source_image_files(f"voc:{tmp_path}", "train")) == ids[:8]


def test_voc_colour_labels_labelmap_and_no_imagesets(tmp_path: Path) -> None:
    ids = make_voc(tmp_path, n=8, splits=False)
    assert open_dataset(f"voc:{tmp_path}", split="val").ids() == [i for i in ids if hash_split(i) == "val"]
    # an RGB export of a VOC label: VOC's colour map, void in (224, 224, 192)
    label = np.array(Image.open(tmp_path / "SegmentationClass" / f"{ids[0]}.png"))
    colours = np.array(voc_colormap(), np.uint8)
    save(tmp_path / "SegmentationClass" / f"{ids[0]}.png", colours[label])
    assert np.array_equal(open_dataset(f"voc:{tmp_path}", split="all").read_labels(ids[0]), label)
    # a CVAT export names its own classes and colours in labelmap.txt
    lines = ["# label:color_rgb:parts:actions"] + [
        f"class{i}:{r},{g},{b}::" for i, (r, g, b) in enumerate(colours[:16])
    ]
    (tmp_path / "labelmap.txt").write_text("\n".join(lines) + "\n")
    ds = open_dataset(f"voc:{tmp_path}", split="all")
    assert ds.class_names == [f"class{i}" for i in range(16)] and ds.classes.palette[15] == tuple(colours[15])


# ---------------------------------------------------------------- COCO


def test_coco_instances_to_semantic_and_instance_maps(tmp_path: Path) -> None:
    scenes = make_coco(tmp_path, {"train2017": 4, "val2017": 3})
    _, first = scenes["val2017"]["000000000004.jpg"]
    y, x = next((y, x) for y in range(30) for x in range(40) if not first[y : y + 4, x : x + 4].any())
    crowd = [float(v) for v in (x, y, x + 4, y, x + 4, y + 4, x, y + 4)]
    first = first.copy()
    first[y : y + 4, x : x + 4] = 1  # a crowd of squares on the background: class square, no instance
    data = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    data["annotations"].append(
        {"id": 999, "image_id": 1004, "category_id": 3, "segmentation": [crowd], "area": 16.0, "iscrowd": 1}
    )
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = open_dataset(f"coco:{tmp_path}", split="val")  # "val" finds val2017
    assert isinstance(ds, COCOSegmentation) and ds.split == "val"
    assert ds.class_names == ["background", "square", "disc"] and ds.ignore_index == 255
    assert ds.ids() == ["000000000004", "000000000005", "000000000006"]
    for name, (image, labels) in scenes["val2017"].items():
        sample = ds[name[:-4]]
        assert sample.image.shape == image.shape
        want = first if name == "000000000004.jpg" else labels
        assert np.array_equal(sample.labels, want)  # polygon square, RLE disc, background 0
    sample = ds["000000000004"]
    assert set(np.unique(sample.instances).tolist()) == {0, 1, 2}
    assert (sample.instances[y : y + 4, x : x + 4] == 0).all()
    assert open_dataset(f"coco:{tmp_path}", split="train2017").ids() == [f"{i:012d}" for i in range(4)]
    assert len(open_dataset(f"coco:{tmp_path}", split="all")) == 7
    with pytest.raises(ValueError, match=r"unknown COCO split 'test'.*\['train2017', 'val2017', 'all'\]"):
        open_dataset(f"coco:{tmp_path}", split="test")
    assert source_image_files(f"coco:{tmp_path}", "val")["000000000005"] == str(
        tmp_path / "val2017" / "000000000005.jpg"
    )


def test_coco_panoptic(tmp_path: Path) -> None:
    _, labels = scene(0)
    save(tmp_path / "val2017" / "000000000001.jpg", scene(0)[0], quality=95)
    seg = np.select([labels == 1, labels == 2], [5, 300], 0)  # two segment ids, 0 = unlabelled
    seg[labels == 0] = 7
    seg[:3] = 0
    rgb = np.stack([seg % 256, (seg // 256) % 256, seg // 65536], axis=2).astype(np.uint8)
    save(tmp_path / "annotations" / "panoptic_val2017" / "000000000001.png", rgb)
    cats = [
        {"id": 1, "name": "square", "isthing": 1},
        {"id": 2, "name": "disc", "isthing": 1},
        {"id": 90, "name": "grass", "isthing": 0},
    ]
    infos = [{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 300, "category_id": 2}, {"id": 7, "category_id": 90}]
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 40, "width": 48}],
        "annotations": [{"image_id": 1, "file_name": "000000000001.png", "segments_info": infos}],
        "categories": cats,
    }
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    sample = open_dataset(f"coco:{tmp_path}", split="val")["000000000001"]
    want = np.select([labels == 1, labels == 2], [0, 1], 2).astype(np.uint8)
    want[:3] = 255
    assert np.array_equal(sample.labels, want)
    assert set(np.unique(sample.instances).tolist()) == {0, 1, 2}  # grass is stuff: no instance


# ---------------------------------------------------------------- the registry and mining


def test_sources_are_registered_with_their_splits() -> None:
    for name in ("labeled", "voc", "coco"):
        meta = DATASETS.meta(name)
        assert meta["path_arg"] and meta["splits"]
    assert not DATASETS.meta("folder").get("splits")
    assert is_source("voc:/data/VOC2012") and is_source("labeled:rel/path") and is_source("msrc")
    assert not is_source("s3://bucket/images") and not is_source("/data/images") and not is_source("voc")
    assert not is_source("tests")  # an existing folder named like no source


def test_mine_input_a_labelled_source(tmp_path: Path) -> None:
    """`distseg mine --input labeled:PATH` mines the images of data.split (real Ray, real shards)."""
    import pyarrow.parquet as pq

    ids = make_labeled(tmp_path / "data", n=6)
    out = tmp_path / "mined"
    result = CliRunner().invoke(
        app,
        [
            "mine",
            "--input",
            f"labeled:{tmp_path / 'data'}",
            "--output",
            str(out),
            f"workdir={tmp_path}",
            "mine.priors=[slic]",
            "ray.num_cpus=2",
        ],
    )
    assert result.exit_code == 0, result.output
    # the default config is the paper's (as pretrain's), and the run says first what it does to an image
    assert "mining with config 'hiergroup': priors slic; long side at most 512 px\n" in result.output
    train = [i for i in ids if hash_split(i) == "train"]
    assert f"mined {len(train)} images, 0 errors" in result.output
    rows = pq.read_table(out / "shards", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(rows) == train


# ---------------------------------------------------------------- evaluation end to end


SMALL = ["model.head_channels=8", "model.embed_dim=8", "evaluate.image_size=null"]


def test_labeled_folder_evaluated_against_the_baselines(tmp_path: Path) -> None:
    """A labelled folder made here, scored end to end (real Ray, real sqlite MLflow) by the random and
    rgbxy baselines: colour separates the three classes, so rgbxy beats random clearly."""
    data = tmp_path / "mydata"
    make_labeled(data, n=16)
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--baseline",
            "random,rgbxy",
            "--data",
            f"labeled:{data}",
            "--protocols",
            "dataset_kmeans,linear",
            "--out",
            str(out),
            f"workdir={tmp_path}",
            *SMALL,
            "evaluate.protocol_args={linear: {epochs: 5}}",
            "evaluate.diagnostics=[]",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [line.split("\r")[-1].strip() for line in result.output.strip().splitlines()]
    assert lines[-1] == f"wrote {out}/metrics.json"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"random", "rgbxy"}
    m = {s: metrics["sources"][s]["metrics"] for s in ("random", "rgbxy")}
    for source in m.values():
        for protocol in ("dataset_kmeans", "linear"):
            assert 0 <= source[f"{protocol}/miou"]["mean"] <= 1
    # colour is the class here: a linear probe on rgbxy finds it (0.62 when written), on random features not (0.30)
    assert m["rgbxy"]["linear/miou"]["mean"] > 0.5
    assert m["rgbxy"]["linear/miou"]["mean"] > m["random"]["linear/miou"]["mean"] + 0.15
    assert metrics["dataset"] == f"labeled:{data}"
    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("distseg-demo").experiment_id])
    evals = {r.info.run_name for r in runs if r.data.tags.get("stage") == "evaluate"}
    assert evals == {f"eval-{p}-{s}" for p in ("dataset_kmeans", "linear") for s in ("random", "rgbxy")}
    per_class = client.download_artifacts(
        next(r.info.run_id for r in runs if r.info.run_name == "eval-linear-rgbxy"), "linear_per_class_iou.json"
    )
    table = json.loads(Path(per_class).read_text())  # an MLflow table: columns, data rows
    assert set(CLASSES) <= {value for row in table["data"] for value in row}  # the folder's class names
