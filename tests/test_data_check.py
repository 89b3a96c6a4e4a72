"""`distseg data check SOURCE`: a summary, an overlay picture, and exit 1 listing every bad file and
why, on datasets written here in each layout, good and with each kind of fault; nothing is modified."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from data_layouts import CLASSES, make_coco, make_labeled, make_voc, save, scene
from PIL import Image
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data import hash_split
from distseg.data.check import check_source
from distseg.data.msrc import MSRC_CLASSES


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> content hash of every file under root (to show nothing was modified)."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_check(*args: str):
    result = CliRunner().invoke(app, ["data", "check", *args], env={"COLUMNS": "250"})  # no wrapped cells
    return result, result.output


def test_a_good_labelled_folder_passes_with_summary_and_picture(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = make_labeled(data, n=8)
    before = snapshot(data)
    picture = tmp_path / "pics" / "check.png"
    result, out = run_check(f"labeled:{data}", "--out", str(picture), "--examples", "4")
    assert result.exit_code == 0, out
    assert f"distseg data check labeled:{data}" in out
    assert re.search(r"classes\s+│ 3 from .*classes.txt; void = 255", out)
    train = sum(hash_split(i) == "train" for i in ids)
    assert re.search(rf"splits\s+│ all 8, train {train}, val {8 - train}", out)
    assert re.search(r"images checked \(all\)\s+│ 8", out) and re.search(r"sizes \(w x h\)\s+│ 48x40 \(8\)", out)
    assert re.search(r"void share\s+│ 2\.5%", out)  # the last of 40 rows
    for i, name in enumerate(CLASSES):
        assert re.search(rf"│\s+{i} │ {name}\s+│\s+[\d.]+% │\s+8 │", out), name
    assert f"overlay picture: {picture}" in out and out.rstrip().endswith("no problems")
    sheet = np.array(Image.open(picture))
    assert sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.shape[0] > 300 and sheet.shape[1] > 600  # 2 rows of 3
    assert snapshot(data) == before  # nothing modified, nothing added


def test_every_bad_file_is_listed_with_its_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = make_labeled(data, n=12, splits={"train": [f"img{i:02d}" for i in range(8)], "test": []})
    (data / "splits" / "val.txt").write_text("img08\nimg09\nnosuch\n")
    _, labels = scene(1)
    save(data / "labels" / "img01.png", labels[:30])  # wrong shape
    _, labels = scene(2)
    labels[:2, :3] = 7
    save(data / "labels" / "img02.png", labels)  # an id outside the class list
    (data / "labels" / "img03.png").unlink()  # missing label
    _, labels = scene(4)
    save(data / "labels" / "img04.png", np.stack([labels * 80] * 2 + [labels], axis=2))  # colour, no palette
    _, labels = scene(5)
    labels[0, 0] = 12
    palette_png = Image.frombytes("P", (48, 40), labels.tobytes())
    palette_png.putpalette(list(range(256)) * 3)
    palette_png.save(data / "labels" / "img05.png")  # a palette PNG: counted by index, 12 is no class
    good = data / "images" / "img06.png"
    (data / "images" / "img06.png").write_bytes(good.read_bytes()[:200])  # truncated image
    save(data / "labels" / "ghost.png", scene(0)[1])  # a label without image
    save(data / "labels" / "img07.jpg", scene(7)[1])  # a JPEG label beside the PNG one
    before = snapshot(data)
    result, out = run_check(f"labeled:{data}", "--out", str(tmp_path / "check.png"))
    assert result.exit_code == 1, out
    L, I = data / "labels", data / "images"  # noqa: E741
    expected = [
        (L / "img01.png", "label is 48x30 (width x height) but the image img01.png is 48x40"),
        (L / "img02.png", f"label value(s) 7 (6 px) are not class ids (0..2 in {data / 'classes.txt'}) nor void (255)"),
        (I / "img03.png", "no label (labels/img03.png is missing)"),
        (L / "img04.png", "a colour (RGB) label map needs a palette (one [r, g, b] per class) in classes.yaml"),
        (L / "img05.png", "label value(s) 12 (1 px) are not class ids (0..2"),
        (I / "img06.png", "truncated file"),
        (L / "ghost.png", "no image with id 'ghost' in images/"),
        (L / "img07.jpg", "label maps must be PNG (lossy formats such as JPEG change class ids)"),
        (data / "splits" / "val.txt", "'nosuch' has no image in images/ and no label in labels/"),
        (data / "splits" / "test.txt", "split 'test' is empty (no line names a usable image)"),
    ]
    for path, reason in expected:
        assert f"  {path}: {reason}" in out, (path, reason, out)
    assert f"{len(expected)} problem(s):" in out
    assert snapshot(data) == before
    # img03 (no label) is not in `all`; of the other 11, five have a bad image or label
    assert len(ids) == 12 and re.search(r"images checked \(all\)\s+│ 11, 5 with problems", out)


def test_voc_and_coco_problems(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    ids = make_voc(voc, n=6)
    label = np.array(Image.open(voc / "SegmentationClass" / f"{ids[0]}.png"))
    label[5, 5] = 30
    img = Image.frombytes("P", (48, 40), label.tobytes())
    img.putpalette(Image.open(voc / "SegmentationClass" / f"{ids[1]}.png").getpalette())
    img.save(voc / "SegmentationClass" / f"{ids[0]}.png")
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("2009_000001\n")
    report = check_source(f"voc:{voc}", out=None)
    assert report.classes.names[15] == "person" and report.images == 6
    reasons = {(Path(p.path).name, p.reason) for p in report.problems}
    assert reasons == {
        (f"{ids[0]}.png", "label value(s) 30 (1 px) are not class ids (0..20 in PASCAL VOC (built in)) nor void (255)"),
        ("test.txt", "'2009_000001' has no image in JPEGImages/ and no label in SegmentationClass/"),
        ("test.txt", "split 'test' is empty (no line names a usable image)"),
    }

    coco = tmp_path / "coco"
    make_coco(coco, {"val2017": 5})
    ann = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    data["images"][2]["height"] = 41  # its disc's RLE says 40
    data["annotations"].append({**data["annotations"][2], "id": 77, "image_id": 5555})
    ann.write_text(json.dumps(data))
    (coco / "val2017" / "000000000003.jpg").unlink()
    save(coco / "val2017" / "000000000001.jpg", scene(1, height=44)[0])  # the annotations say 40 rows
    report = check_source(f"coco:{coco}", out=tmp_path / "coco.png")
    reasons = sorted(p.reason for p in report.problems)
    assert reasons == [
        "annotation 1 (image 000000000000.jpg): category_id 99 is not in categories",
        "annotation 22: RLE size [40, 48] != the image entry's [height, width] [41, 48]",
        "annotation 77: image_id 5555 is not in images",
        "image file missing (listed in instances_val2017.json)",
        "label is 48x40 (width x height) but the image 000000000001.jpg is 48x44",
    ]
    assert report.classes.names == ("background", "square", "disc") and report.picture.is_file()


def test_unreadable_sources_and_unlabelled_folders(tmp_path: Path) -> None:
    result, out = run_check(f"labeled:{tmp_path / 'nowhere'}")
    assert result.exit_code == 1 and "does not exist or is not a directory" in out
    make_labeled(tmp_path / "d", n=4)
    result, out = run_check(f"labeled:{tmp_path / 'd'}", "--split", "test")
    assert result.exit_code == 1 and "unknown labelled folder split 'test'" in out
    folder = tmp_path / "pictures"
    save(folder / "a.png", scene(0)[0])
    (folder / "b.jpg").write_bytes(b"not an image")
    result, out = run_check(f"folder:{folder}", "--out", str(tmp_path / "f.png"))
    assert (
        result.exit_code == 1
        and f"{folder / 'b.jpg'}: not an image" in out
        and "not an image in a format Pillow recognises" in out
    )
    assert (tmp_path / "f.png").is_file()


def test_msrc_as_a_labelled_folder(tmp_path: Path, msrc_root: Path) -> None:
    """MSRC-v2 laid out as a labelled folder (links, a classes.yaml with void: 0) checks clean, as the
    built-in msrc source does."""
    (tmp_path / "images").symlink_to(msrc_root / "images")
    (tmp_path / "labels").symlink_to(msrc_root / "labels")
    (tmp_path / "classes.yaml").write_text(f"names: [{', '.join(MSRC_CLASSES)}]\nvoid: 0\n")
    report = check_source(f"labeled:{tmp_path}", split="val", limit=40, out=tmp_path / "pic.png")
    assert report.ok, report.problems
    assert report.splits == {"all": 591, "train": 445, "val": 146} and report.images == 40
    assert 0.05 < report.void_pixels / report.total_pixels < 0.6
    builtin = check_source("msrc", root=msrc_root, split="val", limit=40, out=None)
    assert builtin.ok and builtin.splits == report.splits
    assert np.array_equal(builtin.class_pixels, report.class_pixels)


@pytest.mark.parametrize("source", ["labeled", "voc"])
def test_check_reads_what_the_readers_read(tmp_path: Path, source: str) -> None:
    """The pixel shares come from the same labels the reader gives evaluation."""
    (make_labeled if source == "labeled" else make_voc)(tmp_path, n=5)
    report = check_source(f"{source}:{tmp_path}", out=None)
    from distseg.data import open_dataset

    ds = open_dataset(f"{source}:{tmp_path}", split="all")
    counts = np.zeros(ds.num_classes, np.int64)
    for sample in ds:
        values = sample.labels[sample.labels != 255]
        counts += np.bincount(values, minlength=ds.num_classes)
    assert np.array_equal(report.class_pixels, counts) and report.ok
