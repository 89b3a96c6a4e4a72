"""Any folder of images, searched recursively: `open_dataset("folder:PATH")`.

Layout: `<root>/**/<name>.<ext>` with ext in `extensions`, matched case-insensitively. Hidden files
and folders (name starting with '.') are skipped, and symbolic links to folders are not followed.
An image's id is its path relative to root without the extension, '/'-separated
(`"street/day/0001"`), so ids are the same on every machine. Where two files differ only by
extension (`a.jpg`, `a.png`), both keep the extension in the id (`"a.jpg"`, `"a.png"`).
Samples have no labels; `meta["path"]` is the file.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from distseg.core.constants import IMAGE_EXTENSIONS
from distseg.data.base import Dataset, Sample, register_dataset
from distseg.data.imageio import read_image


def assign_ids(rel_paths: list[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, str]:
    """id -> relative path for the image files among rel_paths ('/'-separated), in sorted id order.

    The id is the relative path without its extension; when two files differ only by extension,
    both keep it, so ids stay unique and stable across machines and storage systems.
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    files = []
    for rel in rel_paths:
        name = rel.rsplit("/", 1)[-1]
        stem, dot, ext = name.rpartition(".")
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if dot and stem and not hidden and ext.lower() in exts:
            files.append(rel)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for rel in files:
        by_stem[rel.rpartition(".")[0]].append(rel)
    found = {}
    for stem, rels in by_stem.items():
        for rel in rels:
            found[stem if len(rels) == 1 else rel] = rel
    return dict(sorted(found.items()))


def find_images(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """id -> path for every image under root (recursive; hidden files and folders skipped)."""
    rel_paths: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).as_posix()
        rel_paths += [name if rel == "." else f"{rel}/{name}" for name in names]
    return {image_id: root / rel for image_id, rel in assign_ids(rel_paths, extensions).items()}


@register_dataset("folder", path_arg=True)
class ImageFolder(Dataset):
    """Unlabelled images found recursively under `root` (see the module docstring for ids)."""

    name = "folder"
    class_names: list[str] = []
    ignore_index = None

    def __init__(
        self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, limit: int | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        paths = find_images(self.root, tuple(extensions))
        if not paths:
            raise FileNotFoundError(f"no images under {self.root} (looked recursively for .{', .'.join(extensions)})")
        self._paths = dict(list(paths.items())[:limit]) if limit else paths

    def ids(self) -> list[str]:
        return list(self._paths)

    def image_files(self) -> dict[str, str]:
        """id -> image file (what `distseg mine --input folder:PATH` mines)."""
        return {image_id: str(path) for image_id, path in self._paths.items()}

    def __getitem__(self, image_id: str) -> Sample:
        try:
            path = self._paths[image_id]
        except KeyError:
            raise KeyError(f"no image with id {image_id!r} under {self.root}") from None
        return Sample(id=image_id, image=read_image(path), meta={"path": str(path)})
