"""Built-in synthetic scenes and videos: the demo and test data, generated on the fly (no download).

A scene is a textured, low-saturation background (class 0) with 2..6 objects from four classes.
Each class has its own shape family and texture; where its colours come from is the `palette`:

    class       shape                hue ("class")        texture
    1 disc      filled ellipses      warm (red..yellow)   smooth directional shading
    2 box       rotated rectangles   blue                 stripes
    3 triangle  triangles            green                speckled noise
    4 star      5/6-point stars      purple..magenta      checkerboard

- "class" (the default): each class has its own hue range (above), so colour + texture + shape tell
  the classes apart, while hue/brightness jitter and the dark/light texture mix keep raw RGB
  ambiguous. Colour alone separates the classes here (a per-pixel colour + position baseline, rgbxy,
  scores high), and the colour jitter of pretraining removes exactly that cue.
- "shared": every object class draws its colour from one distribution (hue uniform over the whole
  circle, saturation 0.45..0.9, value 0.5..1.0, the union of the class ranges), so only shape and
  texture tell the classes apart, as with real categories, which are not colour-coded. The
  background is the same in both. The demo config uses it (`data.palette: shared`; README).

The palette changes colours only: it consumes the same random draws, so a scene's geometry, textures,
`labels`, `instances` and `meta` are the same under either palette (only `image` differs); the
ground truth distill rebuilds from a scene's file name (`make_scene(...).labels`) needs no palette.

Objects are drawn in order, so later ones occlude earlier ones. Every object's region is filled
into a mask first (cv2.fillPoly, sub-pixel vertices) and then the pixels under that mask are painted
with the object's texture and written into `labels` (uint8 class) and `instances` (int32, 1.. in
drawing order, 0 = background), so labels, instances and pixels always agree. A texture is
generated in the object's own frame and warped with it, so in a video it moves with the object.

Scene `i` of split `s` with seed `k` depends only on (k, s, i): any scene can be made on its own
(`make_scene`), e.g. in parallel workers. Ids are "synthetic/<split>/<i:05d>".
"""

from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from distseg.data.base import Dataset, Sample, register_dataset
from distseg.storage import write_text

CLASS_NAMES = ["background", "disc", "box", "triangle", "star"]


@dataclass(frozen=True)
class _Style:
    hue: float  # centre, degrees
    hue_jitter: float
    sat: tuple[float, float]
    val: tuple[float, float]


PALETTES = ("class", "shared")

_STYLES = {
    1: _Style(hue=22.0, hue_jitter=20.0, sat=(0.6, 0.9), val=(0.75, 1.0)),
    2: _Style(hue=218.0, hue_jitter=14.0, sat=(0.55, 0.9), val=(0.55, 0.95)),
    3: _Style(hue=118.0, hue_jitter=18.0, sat=(0.5, 0.85), val=(0.5, 0.9)),
    4: _Style(hue=298.0, hue_jitter=16.0, sat=(0.45, 0.8), val=(0.55, 0.95)),
}
# "shared": one colour distribution for every class (hue uniform over the circle; the union of the
# classes' saturation and value ranges).
_SHARED = _Style(hue=180.0, hue_jitter=180.0, sat=(0.45, 0.9), val=(0.5, 1.0))


def check_palette(palette: str) -> str:
    if palette not in PALETTES:
        raise ValueError(f"data.palette: unknown palette {palette!r} (known: {', '.join(PALETTES)})")
    return palette


@dataclass
class _Object:
    cls: int
    shape: np.ndarray  # K x 2 float vertices around (0, 0), in the object's own axes
    appearance: np.ndarray  # n x n x 3 float32 RGB texture, centred on the object


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8")), index])


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg / 360.0) % 1.0, s, v), dtype=np.float32)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(n, dtype=np.float32) - (n - 1) / 2
    return np.meshgrid(ax, ax)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """n x n noise in [0, 1] with about `cells` blobs per side."""
    small = rng.random((cells + 1, cells + 1)).astype(np.float32)
    big = cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(big.min()), float(big.max())
    return (big - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, cls: int, n: int, unit: float) -> np.ndarray:
    """The class texture on an n x n canvas: values in [0, 1] (0 = the dark colour, 1 = the light one)."""
    x, y = _grid(n)
    if cls == 1:  # smooth shading: lit from one side, with a soft rim
        a = rng.uniform(0, 2 * np.pi)
        g = (x * np.cos(a) + y * np.sin(a)) / (n / 2)
        t = 0.6 + 0.4 * g - 0.35 * (x * x + y * y) / (n / 2) ** 2
    elif cls == 2:  # stripes
        a, period = rng.uniform(0, np.pi), rng.uniform(4.0, 7.0) * unit
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period + rng.uniform(0, 2 * np.pi))
    elif cls == 3:  # speckles on grain
        m = max(2, int(round(n / unit)))
        grain, spots = rng.random((m, m), dtype=np.float32), rng.random((m, m), dtype=np.float32) < 0.18
        t = cv2.resize(0.45 * grain + 0.55 * spots, (n, n), interpolation=cv2.INTER_NEAREST)
    else:  # checkerboard
        cell = rng.uniform(3.0, 5.0) * unit
        t = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    return np.clip(t, 0.0, 1.0).astype(np.float32)


def _shape(rng: np.random.Generator, cls: int, r: float) -> np.ndarray:
    """Outline vertices of a class-`cls` object of radius about `r`, centred at (0, 0)."""
    if cls == 1:
        th = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([r * np.cos(th), r * rng.uniform(0.55, 1.0) * np.sin(th)], axis=1)
    if cls == 2:
        w, h = r, r * rng.uniform(0.45, 0.9)
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64)
    if cls == 3:
        th = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-15, 15, 3))
        rad = r * rng.uniform(0.85, 1.1, 3)
        return np.stack([rad * np.cos(th), rad * np.sin(th)], axis=1)
    points = int(rng.integers(5, 7))
    th = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False)
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * rng.uniform(0.4, 0.55))
    return np.stack([rad * np.cos(th), rad * np.sin(th)], axis=1)


def _make_object(rng: np.random.Generator, cls: int, r: float, unit: float, palette: str = "class") -> _Object:
    style = _STYLES[cls] if palette == "class" else _SHARED  # the same number of draws either way
    shape = _shape(rng, cls, r)
    n = 2 * int(np.ceil(np.abs(shape).max())) + 5
    hue = style.hue + rng.uniform(-style.hue_jitter, style.hue_jitter)
    sat, val = rng.uniform(*style.sat), rng.uniform(*style.val)
    light = _hsv(hue, sat, val)
    dark = _hsv(hue + rng.uniform(-8, 8), min(1.0, sat * 1.1), val * rng.uniform(0.45, 0.65))
    t = _texture(rng, cls, n, unit)[..., None]
    return _Object(cls=cls, shape=shape, appearance=dark + (light - dark) * t)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """size x size x 3 float32: two low-saturation colours mixed by smooth noise and/or soft stripes."""
    hue = rng.uniform(0, 360)
    c1 = _hsv(hue, rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.6))
    c2 = _hsv(hue + rng.uniform(-30, 30), rng.uniform(0.0, 0.2), rng.uniform(0.55, 0.8))
    t = _smooth_noise(rng, size, int(rng.integers(3, 8)))
    if rng.random() < 0.5:
        x, y = _grid(size)
        a, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.25) * size
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)
        t = 0.5 * t + 0.5 * stripes
    return c1 + (c2 - c1) * t[..., None]


def _render(
    background: np.ndarray, objects: list[_Object], poses: list[tuple[float, float, float]], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint objects at poses (cx, cy, angle in degrees) over the background -> image, labels, instances."""
    size = background.shape[0]
    canvas = background.copy()
    labels = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for k, (obj, (cx, cy, angle)) in enumerate(zip(objects, poses), start=1):
        a = np.deg2rad(angle)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = obj.shape @ rot.T + (cx, cy)
        x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 2, size)
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the frame
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round((pts - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        m = mask.astype(bool)
        # canvas pixel q -> image pixel rot @ (q - centre) + (cx, cy), relative to the box corner
        c = (obj.appearance.shape[0] - 1) / 2
        affine = np.hstack([rot, ((cx - x0, cy - y0) - rot @ (c, c))[:, None]])
        tex = cv2.warpAffine(
            obj.appearance, affine, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        canvas[y0:y1, x0:x1][m] = tex[m]
        labels[y0:y1, x0:x1][m] = obj.cls
        instances[y0:y1, x0:x1][m] = k
    canvas += rng.normal(0.0, 0.012, canvas.shape).astype(np.float32)  # sensor noise
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, labels, instances


def _objects_meta(objects: list[_Object], poses: list[tuple[float, float, float]]) -> list[dict]:
    return [
        {"instance": k, "class": o.cls, "center": (float(p[0]), float(p[1])), "angle": float(p[2])}
        for k, (o, p) in enumerate(zip(objects, poses), start=1)
    ]


def make_scene(
    index: int, image_size: int = 128, seed: int = 0, split: str = "train", palette: str = "class"
) -> Sample:
    """Scene `index` of (seed, split): the same arrays every time, independent of any other scene.
    `palette` ("class" | "shared", see the module docstring) changes the image only."""
    check_palette(palette)
    rng = _rng(seed, f"scene/{split}", index)
    size, unit = image_size, max(1.0, image_size / 128)
    background = _background(rng, size)
    objects, poses = [], []
    for cls in rng.integers(1, 5, size=int(rng.integers(2, 7))):
        r = size * rng.uniform(0.09, 0.2)
        objects.append(_make_object(rng, int(cls), r, unit, palette))
        poses.append((rng.uniform(0.12, 0.88) * size, rng.uniform(0.12, 0.88) * size, rng.uniform(0, 360)))
    image, labels, instances = _render(background, objects, poses, rng)
    meta = {"seed": seed, "split": split, "index": index, "objects": _objects_meta(objects, poses)}
    return Sample(id=f"synthetic/{split}/{index:05d}", image=image, labels=labels, instances=instances, meta=meta)


def scene_options(cfg) -> dict:
    """The synthetic reader's options from a config (data.num_images, data.image_size, data.palette,
    the global seed): what every stage that opens the scenes passes, so training, mining and the
    evaluation's synthetic splits see the same scenes."""
    d = cfg.data
    return {"num_images": d.num_images, "image_size": d.image_size, "seed": cfg.seed, "palette": d.palette}


class ScenesMismatch(ValueError):
    """A folder of synthetic scene PNGs made with other settings than the config's (write_scenes)."""


def write_scenes(cfg, folder: str | Path) -> str:
    """Write the config's scenes (`scene_options`, the train split) as PNGs `synthetic_train_<i>.png`
    into `folder`, once (existing files are kept), and return the folder.

    The folder records the settings that decide the pixels (seed, image_size, palette) in
    scenes.json; a folder made with other settings is an error rather than stale scenes for the
    stages that mine it (a folder from before the palette existed holds "class" scenes)."""
    folder = Path(folder)
    options = scene_options(cfg)
    pixels = {k: options[k] for k in ("seed", "image_size", "palette")}
    stamp = folder / "scenes.json"
    found = json.loads(stamp.read_text()) if stamp.is_file() else None
    if found is None and any(folder.glob("synthetic_*.png")):
        found = {**pixels, "palette": "class"}  # written before scenes.json: seed and size unknown
    if found is not None and found != pixels:
        raise ScenesMismatch(
            f"{folder} holds synthetic scenes made with {found}, this config asks for {pixels} "
            "(seed, data.image_size, data.palette): use another workdir, or delete that folder and the "
            "shards mined from it"
        )
    write_text(str(stamp), json.dumps(pixels))  # whole or not at all (distseg.storage)
    dataset = SyntheticScenes(**options)
    for image_id in dataset.ids():
        path = folder / f"{image_id.replace('/', '_')}.png"
        if not path.exists() and not cv2.imwrite(str(path), dataset[image_id].image[:, :, ::-1]):
            raise OSError(f"could not write {path}")
    return str(folder)


@register_dataset("synthetic", builtin=True, takes=("num_images", "image_size", "seed", "palette"))
class SyntheticScenes(Dataset):
    """`num_images` synthetic scenes of one split (any name; different names give unrelated scenes),
    coloured with `palette` ("class" | "shared", see the module docstring)."""

    name = "synthetic"
    class_names = CLASS_NAMES
    ignore_index = None

    def __init__(
        self,
        num_images: int = 64,
        image_size: int = 128,
        seed: int = 0,
        split: str = "train",
        limit: int | None = None,
        palette: str = "class",
    ) -> None:
        if num_images < 1 or image_size < 16 or seed < 0:
            raise ValueError(
                f"need num_images >= 1, image_size >= 16, seed >= 0; got {num_images}, {image_size}, {seed}"
            )
        self.num_images = min(num_images, limit) if limit else num_images
        self.image_size, self.seed, self.split, self.palette = image_size, seed, split, check_palette(palette)
        self._prefix = f"synthetic/{split}/"

    def ids(self) -> list[str]:
        return [f"{self._prefix}{i:05d}" for i in range(self.num_images)]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, image_id: str) -> Sample:
        tail = image_id.removeprefix(self._prefix)
        if tail == image_id or not tail.isdigit() or int(tail) >= self.num_images:
            raise KeyError(f"no synthetic scene {image_id!r}: ids are {self._prefix}00000..{self.num_images - 1:05d}")
        return make_scene(int(tail), self.image_size, self.seed, self.split, self.palette)


def synthetic_video(
    num_frames: int = 12, image_size: int = 128, seed: int = 0, num_objects: int = 3, palette: str = "class"
) -> list[Sample]:
    """Objects gliding and turning over a fixed background, occluding each other; ids "synthetic-video/<seed>/<t:05d>".

    Each object keeps its class, shape, texture and depth order; it moves 1.2..2.5% of the frame
    per frame in a straight line (bouncing off the borders) and turns -4..4 degrees per frame.
    `meta["objects"]` gives every object's true pose in that frame. `palette` as for the scenes.
    """
    if num_frames < 1 or num_objects < 1:
        raise ValueError(f"need num_frames >= 1 and num_objects >= 1, got {num_frames}, {num_objects}")
    check_palette(palette)
    rng = _rng(seed, "video", 0)
    size, unit = image_size, max(1.0, image_size / 128)
    background = _background(rng, size)
    classes = rng.permutation(4)[:num_objects] + 1 if num_objects <= 4 else rng.integers(1, 5, num_objects)
    objects, pos, vel, angle, spin, radius = [], [], [], [], [], []
    for cls in classes:
        r = size * rng.uniform(0.1, 0.18)
        objects.append(_make_object(rng, int(cls), r, unit, palette))
        radius.append(r)
        pos.append(rng.uniform(0.3, 0.7, 2) * size)  # start near the middle, so paths cross
        heading, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.012, 0.025) * size
        vel.append(speed * np.array([np.cos(heading), np.sin(heading)]))
        angle.append(rng.uniform(0, 360))
        spin.append(rng.uniform(-4, 4))
    frames = []
    for t in range(num_frames):
        poses = [(float(p[0]), float(p[1]), a + s * t) for p, a, s in zip(pos, angle, spin)]
        image, labels, instances = _render(background, objects, poses, rng)
        meta = {"seed": seed, "frame": t, "objects": _objects_meta(objects, poses)}
        frames.append(Sample(f"synthetic-video/{seed}/{t:05d}", image, labels, instances, meta))
        for p, v, r in zip(pos, vel, radius):
            p += v
            for d in range(2):  # bounce off the borders (keep the centre r away from them)
                if not r <= p[d] <= size - r:
                    v[d] = -v[d]
                    p[d] = np.clip(p[d], r, size - r)
    return frames
