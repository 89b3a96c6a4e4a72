"""Image decoding that every reader (and the mining stage) shares.

`read_image` / `decode_image` always return an H x W x 3 uint8 RGB array:
- EXIF orientation is applied (a phone photo comes out upright);
- grey, grey+alpha, palette, RGBA, CMYK, YCbCr, 1-bit ... are converted to RGB; alpha is dropped
  (not composited);
- 16-bit ('I;16*') is scaled by 255/65535; 32-bit integer 'I' likewise, unless it holds values above
  65535, then by its maximum; float 'F' in [0, 1] is scaled by 255, otherwise min-max normalised;
- the pixel data is decoded completely, so a truncated or corrupt file fails here with an
  `ImageDecodeError` that names the file and the reason, not later in some worker.

`read_label_png` returns a label map's raw values (palette indices, never palette colours).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """A file that is not a readable image: its message names the file and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot decode image {name}: {reason}")
        self.name = name
        self.reason = reason


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image in a format Pillow recognises"
    if isinstance(err, Image.DecompressionBombError):
        return f"too many pixels ({err})"
    text = str(err) or type(err).__name__
    if "truncated" in text:
        return f"truncated file ({text})"
    return f"corrupt image data ({type(err).__name__}: {text})"


def _open(data: bytes, name: str) -> Image.Image:
    """Open and fully decode the first frame."""
    if not data:
        raise ImageDecodeError(name, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except MemoryError:
        raise
    except Exception as err:  # Pillow plugins raise OSError, SyntaxError, struct.error, ... on bad data
        raise ImageDecodeError(name, _reason(err)) from err
    return img


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel high-bit-depth or float pixels -> uint8."""
    if mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.rint(arr * 255.0).astype(np.uint8)
    arr = np.clip(arr.astype(np.float64), 0, None)
    top = 65535.0
    if mode == "I" and arr.size and arr.max() > top:
        top = float(arr.max())
    return np.rint(arr * (255.0 / top)).astype(np.uint8)


def to_rgb_array(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """A decoded Pillow image (any mode) -> H x W x 3 uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode.startswith("I") or mode == "F":
        arr = _scale_to_uint8(np.asarray(img), "I" if mode == "I" else mode)
    elif mode in ("L", "1"):
        arr = np.asarray(img.convert("L"))
    elif mode in ("LA", "La"):
        arr = np.asarray(img)[..., 0]
    elif mode in ("P", "PA", "RGBA", "RGBa", "RGBX"):
        arr = np.asarray(img.convert("RGBA"))[..., :3]  # via RGBA: palette transparency stays valid
    else:  # CMYK, YCbCr, LAB, HSV
        try:
            arr = np.asarray(img.convert("RGB"))
        except Exception as err:
            raise ImageDecodeError(name, f"unsupported image mode {mode!r} ({err})") from err
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageDecodeError(name, f"unexpected pixel layout {arr.shape} {arr.dtype} from mode {mode!r}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> H x W x 3 uint8 RGB, upright. `name` is used in error messages."""
    img = _open(data, name)
    try:
        if img.getexif().get(0x0112, 1) != 1:  # orientation tag; skip the copy exif_transpose makes otherwise
            img = ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception:  # a malformed EXIF block: keep the stored orientation rather than fail
        pass
    return to_rgb_array(img, name)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file -> H x W x 3 uint8 RGB (FileNotFoundError if absent, ImageDecodeError if bad)."""
    path = Path(path)
    return decode_image(path.read_bytes(), str(path))


def open_image(path: str | Path) -> Image.Image:
    """An image file opened and fully decoded, as Pillow has it (mode untouched; ImageDecodeError if bad)."""
    path = Path(path)
    return _open(path.read_bytes(), str(path))


def label_values(img: Image.Image, name: str) -> np.ndarray:
    """A decoded single-channel label image's raw values (see read_label_png); `name` is for messages."""
    if img.mode in ("P", "L", "1"):
        return np.array(img, dtype=np.uint8)
    if img.mode.startswith("I;16"):
        return np.array(img).astype(np.uint16)
    if img.mode == "I":
        return np.array(img, dtype=np.int32)
    raise ImageDecodeError(name, f"a label map must have one channel, got mode {img.mode!r}")


def read_label_png(path: str | Path) -> np.ndarray:
    """A single-channel label image's raw values: palette indices for 'P', 0..255 for 'L', uint16 for 16-bit."""
    return label_values(open_image(path), str(path))
