"""Your own labelled images, no code: `open_dataset("labeled:PATH", split="val")`.

Layout under PATH::

    images/<id>.<ext>      any image format (recursive: the id is the path below images/ without the
                           extension, as for `folder:PATH`)
    labels/<id>.png        the class id of every pixel, same id and size as the image: a single-channel
                           PNG (8 or 16 bit; a palette PNG counts by its indices, as VOC's), or an RGB
                           PNG coloured by the palette of classes.yaml
    classes.txt            one class name per line, line i = class id i (blank and '#' lines skipped);
                           label value 255 = void (not annotated)
      or classes.yaml      names: [...], void: 255 (or null: no void value), and optionally
                           palette: [[r, g, b], ...] (one colour per name, for colour-coded labels)
                           and void_color: [r, g, b]
    splits/<name>.txt      optional: one id per line (its first word; VOC's ImageSets files work);
                           every file is a split, `all` is every labelled image

Without splits/, an image is in `val` when ``int(md5(id).hexdigest(), 16) % 4 == 0`` and in `train`
otherwise (`hash_split`, MSRC-v2's rule): it depends only on the id, so it does not change with file
order, machine or a subset of the files being present.

`LabeledFolder` is also the base of `voc:PATH` (distseg.data.voc) and `msrc` (distseg.data.msrc): the
same reader with other folder names and a default class list. `LabeledFiles` is what `distseg data
check` reads from any labelled reader (COCO's too): the problems found while listing, every split,
each id's image file and label.

Opening is strict by default: an id of the requested split without its image or label raises, naming
a few and `distseg data check`, which lists them all (it opens with strict=False). Label values outside
the class list are not checked on reading (evaluation counts them as void): `data check` reports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from distseg.core.constants import IMAGE_EXTENSIONS
from distseg.data.base import DataProblem, Dataset, Sample, hash_split, register_dataset
from distseg.data.folder import find_images
from distseg.data.imageio import ImageDecodeError, label_values, open_image, read_image

CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt", "labelmap.txt")
MAX_CLASSES = 255  # class ids must fit the evaluation's uint8 label space beside void (distseg.eval)
SHOWN = 5  # problems named in a strict reader's error


class LabelError(ValueError):
    """A label that cannot be used: the message names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ClassList:
    """The classes of a labelled dataset: names by id, the void value, optional label colours."""

    names: tuple[str, ...]
    void: int | None = 255  # label value meaning void / not annotated (None: none)
    palette: tuple[tuple[int, int, int], ...] | None = None  # colour of class i, for RGB label PNGs
    void_color: tuple[int, int, int] | None = None
    source: str = "<built in>"  # the file it was read from

    def colour_table(self) -> dict[int, int]:
        """24-bit colour (r << 16 | g << 8 | b) -> label value, for colour-coded label PNGs."""
        table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(self.palette or ())}
        if self.void_color is not None and self.void is not None:
            r, g, b = self.void_color
            table[(r << 16) | (g << 8) | b] = self.void
        return table


def _colour(value, where: str) -> tuple[int, int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        raise ValueError(f"{where}: a colour is [r, g, b] with integers 0..255, got {value!r}")
    return tuple(value)


def _check_names(names: list, where: str) -> tuple[str, ...]:
    if not names:
        raise ValueError(f"{where}: no class names")
    bad = [n for n in names if not isinstance(n, str | int) or isinstance(n, bool) or not str(n).strip()]
    if bad:
        raise ValueError(f"{where}: class names must be non-empty strings, got {bad[:3]}")
    names = [str(n).strip() for n in names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: class names appear twice: {dupes}")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{where}: {len(names)} classes; at most {MAX_CLASSES} are supported")
    return tuple(names)


def parse_class_yaml(text: str, where: str) -> ClassList:
    """classes.yaml: names (required), void (default 255, null: none), palette, void_color."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with names: [...], got {type(data).__name__}")
    allowed = {"names", "void", "palette", "void_color"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {', '.join(sorted(allowed))})")
    if not isinstance(data.get("names"), list):
        raise ValueError(f"{where}: 'names' must be a list of class names (index = class id)")
    names = _check_names(data["names"], where)
    void = data.get("void", 255)
    if void is not None and (not isinstance(void, int) or isinstance(void, bool) or not 0 <= void <= 65535):
        raise ValueError(f"{where}: void must be a label value 0..65535 or null, got {void!r}")
    palette = None
    if data.get("palette") is not None:
        if not isinstance(data["palette"], list) or len(data["palette"]) != len(names):
            raise ValueError(f"{where}: palette must list one [r, g, b] per class name ({len(names)})")
        palette = tuple(_colour(c, f"{where}: palette") for c in data["palette"])
        if len(set(palette)) != len(palette):
            raise ValueError(f"{where}: two classes share a palette colour")
    void_color = None
    if data.get("void_color") is not None:
        void_color = _colour(data["void_color"], f"{where}: void_color")
        if void is None:
            raise ValueError(f"{where}: void_color needs a void value")
        if palette and void_color in palette:
            raise ValueError(f"{where}: void_color {list(void_color)} is also a class colour")
    return ClassList(names, void, palette, void_color, where)


def parse_class_txt(text: str, where: str) -> ClassList:
    """classes.txt: one name per line (blank and '#' lines skipped); void = 255."""
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return ClassList(_check_names(names, where), 255, None, None, where)


def parse_labelmap(text: str, where: str) -> ClassList:
    """CVAT's VOC export labelmap.txt: 'name:r,g,b:parts:actions' lines; void = 255."""
    names, palette = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = [int(c) for c in rest.split(":", 1)[0].split(",")]
        except ValueError:
            raise ValueError(f"{where}: line {n}: expected 'name:r,g,b::', got {line!r}") from None
        names.append(name)
        palette.append(_colour(rgb, f"{where}: line {n}"))
    return ClassList(_check_names(names, where), 255, tuple(palette), None, where)


def read_class_list(root: Path) -> ClassList | None:
    """The class list file under root (classes.yaml, classes.txt or CVAT's labelmap.txt), or None."""
    found = [root / name for name in CLASS_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root}: several class lists ({', '.join(p.name for p in found)}): keep one")
    if not found:
        return None
    path = found[0]
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix in (".yaml", ".yml"):
        return parse_class_yaml(text, str(path))
    if path.name == "labelmap.txt":
        return parse_labelmap(text, str(path))
    return parse_class_txt(text, str(path))


def decode_label(path: str | Path, classes: ClassList) -> np.ndarray:
    """A label PNG -> H x W label values (class ids, void): single-channel values as stored (palette
    PNGs by index), RGB through the class palette (or grey stored as RGB). LabelError if unusable."""
    try:
        img = open_image(path)
    except ImageDecodeError as e:
        raise LabelError(str(path), e.reason) from None
    except OSError as e:
        raise LabelError(str(path), f"cannot read ({e.strerror or e})") from None
    if img.mode not in ("RGB", "RGBA", "RGBX"):
        try:
            return label_values(img, str(path))
        except ImageDecodeError as e:
            raise LabelError(str(path), e.reason) from None
    rgb = np.asarray(img.convert("RGB"))
    if classes.palette is None:
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])  # grey ids saved as RGB
        raise LabelError(
            str(path),
            "a colour (RGB) label map needs a palette (one [r, g, b] per class) in classes.yaml; "
            f"{classes.source} has none (or save the class ids as a single-channel PNG)",
        )
    return colours_to_ids(rgb, classes, str(path))


def colours_to_ids(rgb: np.ndarray, classes: ClassList, name: str) -> np.ndarray:
    """H x W x 3 colours -> label values by the class palette; LabelError naming unknown colours."""
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse, counts = np.unique(keys.ravel(), return_inverse=True, return_counts=True)
    table = classes.colour_table()
    unknown = [(int(k), int(c)) for k, c in zip(uniq, counts) if int(k) not in table]
    if unknown:
        unknown.sort(key=lambda kc: -kc[1])
        shown = ", ".join(f"({k >> 16}, {(k >> 8) & 255}, {k & 255}) x{c}" for k, c in unknown[:3])
        raise LabelError(name, f"{len(unknown)} colour(s) not in the palette of {classes.source}: {shown}")
    values = np.array([table[int(k)] for k in uniq], np.int64)
    dtype = np.uint8 if values.max(initial=0) < 256 else np.uint16
    return values[inverse].reshape(keys.shape).astype(dtype)


class LabeledFiles(Dataset):
    """A labelled dataset of files: what every labelled reader offers beyond Dataset (and `data check` reads).

    Subclasses fill in `root`, `split`, `classes`, `problems` (found while listing), `split_ids` (every
    split -> its usable ids, before `limit`), `_ids` (the opened split) and implement image_path,
    label_name and read_labels (read_instances when the dataset has instances)."""

    name = "labeled"
    title = "labelled folder"  # in messages

    root: Path
    split: str
    classes: ClassList
    problems: list[DataProblem]
    split_ids: dict[str, list[str]]
    _ids: list[str]

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return list(self.classes.names)

    @property
    def ignore_index(self) -> int | None:  # type: ignore[override]
        return self.classes.void

    @property
    def source(self) -> str:
        """How to name this dataset on the command line."""
        return f"{self.name}:{self.root}"

    def ids(self) -> list[str]:
        return list(self._ids)

    def image_path(self, image_id: str) -> Path:
        raise NotImplementedError

    def label_name(self, image_id: str) -> str:
        """The file (or file and entry) its label comes from, for messages."""
        raise NotImplementedError

    def read_labels(self, image_id: str) -> np.ndarray:
        """H x W label values (class ids, `ignore_index` = void); LabelError if unusable."""
        raise NotImplementedError

    def read_instances(self, image_id: str) -> np.ndarray | None:
        return None

    def image_files(self) -> dict[str, str]:
        """id -> image file of the opened split (what `distseg mine --input SOURCE` mines)."""
        return {image_id: str(self.image_path(image_id)) for image_id in self._ids}

    def _sample_meta(self, image_id: str) -> dict:
        return {"split": self.split, "path": str(self.image_path(image_id))}

    def _known(self, image_id: str) -> None:
        if image_id not in self._id_set:
            raise KeyError(f"no image {image_id!r} in split {self.split!r} of {self.source}")

    def __getitem__(self, image_id: str) -> Sample:
        self._known(image_id)
        image = read_image(self.image_path(image_id))
        labels = self.read_labels(image_id)
        if labels.shape != image.shape[:2]:
            raise ValueError(
                f"{self.label_name(image_id)}: label shape {labels.shape} != image shape {image.shape[:2]}"
            )
        instances = self.read_instances(image_id)
        return Sample(id=image_id, image=image, labels=labels, instances=instances, meta=self._sample_meta(image_id))

    def _select(self, split: str | None, limit: int | None, dropped: dict[str, list[DataProblem]], strict: bool):
        """Open `split` (None: all): ValueError for an unknown one; in strict mode, FileNotFoundError when
        an id of it lacks its files (the first few named, `data check` for the rest)."""
        split = split or "all"
        if split not in self.split_ids:
            raise ValueError(
                f"unknown {self.title} split {split!r} for {self.source}; expected one of {sorted(self.split_ids)}"
            )
        bad = dropped.get(split, [])
        if strict and bad:
            shown = "; ".join(f"{p.path}: {p.reason}" for p in bad[:SHOWN])
            more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
            raise FileNotFoundError(
                f"{self.source}: {len(bad)} image(s) of split {split!r} cannot be used: {shown}{more}. "
                f"`distseg data check {self.source}` lists every problem"
            )
        self.split = split
        ids = self.split_ids[split]
        self._ids = ids[:limit] if limit else list(ids)
        self._id_set = set(self._ids)


def read_split_file(path: Path) -> list[str]:
    """The ids of a split file: the first word of each line, blank and '#' lines skipped, each once."""
    ids: list[str] = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            ids.append(words[0])
    return list(dict.fromkeys(ids))


@register_dataset("labeled", path_arg=True, splits=True)
class LabeledFolder(LabeledFiles):
    """Images and label PNGs under one folder (see the module docstring for the layout)."""

    name = "labeled"
    title = "labelled folder"
    image_dir = "images"
    label_dir = "labels"
    splits_dir: str | None = "splits"  # None: always the hash rule
    ids_from = "images"  # every image needs a label; "labels": only labelled images count (VOC)
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    default_classes: ClassList | None = None  # when the folder has no class list file
    layout_hint = "images/, labels/ and classes.txt (or classes.yaml)"

    def __init__(
        self, root: str | Path, split: str | None = "train", limit: int | None = None, strict: bool = True
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.title} {self.root} does not exist or is not a directory")
        img_dir, lbl_dir = self.root / self.image_dir, self.root / self.label_dir
        for folder in (img_dir, lbl_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.title} {self.root} has no {folder.name}/ (layout: {self.layout_hint})")
        classes = read_class_list(self.root) or self.default_classes
        if classes is None:
            raise FileNotFoundError(
                f"{self.title} {self.root} has no class list: add classes.txt (one name per line, "
                "line i = class id i, 255 = void) or classes.yaml (names, void, palette)"
            )
        self.classes = classes
        self.problems = []
        self._images = find_images(img_dir, self.image_extensions)
        self._labels = self._find_labels(lbl_dir)
        usable = self._match()
        dropped: dict[str, list[DataProblem]] = {}
        self.split_ids = self._splits(usable, dropped)
        self._select(split, limit, dropped, strict)

    # ------------------------------------------------------------ listing

    def _find_labels(self, lbl_dir: Path) -> dict[str, Path]:
        labels: dict[str, Path] = {}
        for image_id, path in find_images(lbl_dir, IMAGE_EXTENSIONS).items():
            if path.suffix.lower() != ".png":
                self.problems.append(
                    DataProblem(str(path), "label maps must be PNG (lossy formats such as JPEG change class ids)")
                )
                continue
            labels[image_id.removesuffix(".png")] = path  # "a.png" when a twin "a.jpg" kept its extension
        return labels

    def _rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def _match(self) -> list[str]:
        """The ids with both an image and a label; what lacks one is a problem."""
        self._missing: dict[str, DataProblem] = {}
        usable = []
        if self.ids_from == "images":
            for image_id, path in self._images.items():
                if image_id in self._labels:
                    usable.append(image_id)
                else:
                    want = f"{self.label_dir}/{image_id}.png"
                    self._missing[image_id] = DataProblem(str(path), f"no label ({want} is missing)")
            for image_id, path in self._labels.items():
                if image_id not in self._images:
                    self.problems.append(DataProblem(str(path), f"no image with id {image_id!r} in {self.image_dir}/"))
        else:
            for image_id, path in self._labels.items():
                if image_id in self._images:
                    usable.append(image_id)
                else:
                    self._missing[image_id] = DataProblem(
                        str(path), f"no image with id {image_id!r} in {self.image_dir}/"
                    )
        self.problems += list(self._missing.values())
        return sorted(usable)

    def _split_files(self) -> dict[str, Path]:
        if self.splits_dir is None:
            return {}
        folder = self.root / self.splits_dir
        return {p.stem: p for p in sorted(folder.glob("*.txt"))} if folder.is_dir() else {}

    def _splits(self, usable: list[str], dropped: dict[str, list[DataProblem]]) -> dict[str, list[str]]:
        known = set(usable)
        files = self._split_files()
        splits: dict[str, list[str]] = {}
        dropped["all"] = list(self._missing.values())
        self._hash_rule = not files
        if not files:
            for name in ("train", "val"):
                splits[name] = [i for i in usable if hash_split(i) == name]
                dropped[name] = [p for i, p in self._missing.items() if hash_split(i) == name]
                if not splits[name] and usable:
                    self.problems.append(
                        DataProblem(
                            str(self.root),
                            f"split {name!r} is empty: the hash rule (md5(id) % 4 == 0 -> val) puts none of the "
                            f"{len(usable)} images there; add {self.splits_dir or 'split'} files",
                        )
                    )
        for name, path in files.items():
            ids, bad, seen = [], [], []
            for image_id in read_split_file(path):
                if image_id not in known:
                    stem = image_id.rsplit(".", 1)[0]
                    if "." in image_id and stem in known:
                        image_id = stem  # the file name was listed, not the id
                    elif image_id in self._missing:  # already a problem of its own
                        seen.append(self._missing[image_id])
                        continue
                    else:
                        bad.append(DataProblem(str(path), self._unknown_reason(image_id)))
                        continue
                ids.append(image_id)
            self.problems += bad
            dropped[name] = seen + bad
            splits[name] = sorted(set(ids))
            if not splits[name]:
                self.problems.append(DataProblem(str(path), f"split {name!r} is empty (no line names a usable image)"))
        if "all" not in splits:
            splits["all"] = usable
        if not usable:
            self.problems.append(
                DataProblem(str(self.root), f"no image has both an image file and a label (layout: {self.layout_hint})")
            )
        return splits

    def _unknown_reason(self, image_id: str) -> str:
        if image_id in self._images:
            return f"{image_id!r} has no label ({self.label_dir}/{image_id}.png)"
        if image_id in self._labels:
            return f"{image_id!r} has no image in {self.image_dir}/"
        return f"{image_id!r} has no image in {self.image_dir}/ and no label in {self.label_dir}/"

    # ------------------------------------------------------------ reading

    def image_path(self, image_id: str) -> Path:
        return self._images[image_id]

    def label_name(self, image_id: str) -> str:
        return str(self._labels[image_id])

    def read_labels(self, image_id: str) -> np.ndarray:
        self._known(image_id)
        return decode_label(self._labels[image_id], self.classes)

    def _sample_meta(self, image_id: str) -> dict:
        split = hash_split(image_id) if self._hash_rule else self.split
        return {"split": split, "path": str(self._images[image_id])}
