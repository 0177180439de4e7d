"""Safe image opening: one file in, an RGB ``PIL.Image`` (or a skip reason) out.

Corpora come from users, so any file may be broken or odd. This module turns
every odd-but-usable image into plain 8-bit RGB and records what it did, and
turns every unusable one into a skip with a reason. Nothing here raises on bad
input except :func:`open_rgb` with ``report=None``, which raises
:class:`ImageSkipped` (a ``ValueError``) naming the reason.

Conversions (kinds counted in :attr:`ImageReport.converted`):

- ``animated``: multi-frame file (GIF, APNG, WebP); the first frame is used.
- ``alpha``: transparency (RGBA, LA, palette with transparency) is composited
  on white, so transparent pixels become white rather than black.
- ``palette``: palette image (mode ``P``) expanded to RGB.
- ``cmyk``: CMYK (or YCbCr / LAB) converted to RGB.
- ``16-bit``: 16/32-bit integer or float pixels rescaled to 8 bits.
- ``grayscale``: one-channel (``L``, ``1``) replicated to RGB.
- ``rotated``: EXIF orientation applied.

Skip reasons (counted in :attr:`ImageReport.skipped`):

- ``empty``: zero-byte file.
- ``not an image``: Pillow recognises no image format.
- ``too many pixels``: declared width x height above ``max_pixels``
  (decompression-bomb guard; checked from the header, before decoding).
- ``truncated or corrupt``: the header is fine but decoding fails.
- ``unreadable``: the file cannot be read at all (permissions, a folder...).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# 64 megapixels: far above any photo a corpus needs, far below a bomb.
DEFAULT_MAX_PIXELS = 64_000_000

# Full decodes during a check are done up to this size; larger files get the
# cheaper header + verify() only (verify misses some truncations, so
# open_rgb can still skip them later).
FULL_CHECK_PIXELS = 4_000_000

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
)

_WHITE = (255, 255, 255)
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageSkipped(ValueError):
    """An image that cannot be used; ``reason`` is one of the skip reasons."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class FileNote:
    """What happened to one file: ``action`` is "converted" or "skipped"."""

    file: str
    action: str
    kinds: tuple[str, ...]
    detail: str = ""


@dataclass
class ImageReport:
    """Counts of converted and skipped images, with the files behind them.

    Attributes
    ----------
    n_checked : int
        Files looked at.
    converted : Counter
        Conversion kind -> number of files (a file can count under several).
    skipped : Counter
        Skip reason -> number of files.
    files : list of FileNote
        One note per converted or skipped file (clean files are not listed).
    """

    n_checked: int = 0
    converted: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    files: list[FileNote] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_ok(self, path: str | os.PathLike, kinds: tuple[str, ...] = ()) -> None:
        self.n_checked += 1
        if kinds:
            self.converted.update(kinds)
            self.files.append(FileNote(str(path), "converted", tuple(kinds)))

    def add_skip(self, error: ImageSkipped) -> None:
        self.n_checked += 1
        self.skipped[error.reason] += 1
        self.files.append(
            FileNote(error.path, "skipped", (error.reason,), error.detail)
        )

    def reason_for(self, path: str | os.PathLike) -> FileNote | None:
        """The note for ``path`` (matched on the full path, then the name)."""
        path = str(path)
        for note in self.files:
            if note.file == path:
                return note
        name = Path(path).name
        matches = [n for n in self.files if Path(n.file).name == name]
        return matches[0] if len(matches) == 1 else None

    def merge(self, other: ImageReport) -> None:
        self.n_checked += other.n_checked
        self.converted.update(other.converted)
        self.skipped.update(other.skipped)
        self.files.extend(other.files)

    def to_dict(self) -> dict:
        return {
            "n_checked": self.n_checked,
            "converted": dict(sorted(self.converted.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def summary(self, max_files: int = 10) -> str:
        """A few readable lines: totals, counts by kind, the first skipped files."""
        lines = [
            f"{self.n_checked} images checked, {self.n_skipped} skipped, "
            f"{len([f for f in self.files if f.action == 'converted'])} converted"
        ]
        for title, counts in (("converted", self.converted), ("skipped", self.skipped)):
            if counts:
                parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                lines.append(f"  {title}: {parts}")
        skipped = [f for f in self.files if f.action == "skipped"]
        for note in skipped[:max_files]:
            detail = f" ({note.detail})" if note.detail else ""
            lines.append(f"  skipped {note.file}: {note.kinds[0]}{detail}")
        if len(skipped) > max_files:
            lines.append(f"  ... and {len(skipped) - max_files} more skipped")
        return "\n".join(lines)


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's own bomb guard (2 x MAX_IMAGE_PIXELS) to ``max_pixels``.

    Only needed when a caller allows more pixels than Pillow does (the corpus
    builder on trusted package files); the explicit check in ``_open_header``
    stays in force either way.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open_header(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and apply the size and emptiness guards."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageSkipped(path, "unreadable", str(err)) from err
    if size == 0:
        raise ImageSkipped(path, "empty")

    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageSkipped(path, "too many pixels", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageSkipped(path, "not an image") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageSkipped(path, "truncated or corrupt", str(err)) from err

    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageSkipped(
            path, "too many pixels", f"{width}x{height} > {max_pixels} pixels"
        )
    if width == 0 or height == 0:
        image.close()
        raise ImageSkipped(path, "truncated or corrupt", "zero width or height")
    return image


def _decode(path: Path, image: Image.Image) -> None:
    """Decode the first frame fully; a failure becomes a skip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageSkipped(path, "truncated or corrupt", str(err)) from err


def conversion_kinds(image: Image.Image) -> tuple[str, ...]:
    """The conversions :func:`to_rgb` will apply to ``image`` (from its header)."""
    kinds = []
    if getattr(image, "n_frames", 1) > 1:
        kinds.append("animated")
    mode = image.mode
    if _has_alpha(image):
        kinds.append("alpha")
    if mode in ("P", "PA"):
        kinds.append("palette")
    if mode in ("CMYK", "YCbCr", "LAB"):
        kinds.append("cmyk")
    if mode.startswith("I") or mode == "F":
        kinds.append("16-bit")
    if mode in ("L", "1"):
        kinds.append("grayscale")
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    if orientation not in (1, None):
        kinds.append("rotated")
    return tuple(kinds)


def _has_alpha(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return image.mode == "P" and "transparency" in image.info


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer or float pixels to 8-bit gray, min..max -> 0..255.

    16-bit files (``I;16``) use the full 0..65535 range, so they are divided by
    257; other depths (``I``, ``F``) are stretched from their own min..max.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = pixels / 257.0
    else:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded first frame of any mode to 8-bit RGB.

    Transparency is composited on white; 16-bit and float pixels are rescaled;
    CMYK goes through Pillow's conversion; EXIF orientation is applied.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _guarded(path: Path, step, image: Image.Image):
    """Run ``step(image)``; a decoding error on the way becomes a skip."""
    try:
        return step(image)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageSkipped(path, "truncated or corrupt", str(err)) from err


def check_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    full_check_pixels: int = FULL_CHECK_PIXELS,
) -> tuple[str, ...]:
    """Check one file cheaply; return the conversions it will need.

    Reads the header and runs Pillow's ``verify()``; images up to
    ``full_check_pixels`` are also decoded, which catches truncations that
    ``verify()`` misses for some formats. Raises :class:`ImageSkipped`.
    """
    path = Path(path)
    with _open_header(path, max_pixels) as image:
        try:
            image.verify()  # must come first after open
        except Exception as err:  # verify() raises many types on bad data
            raise ImageSkipped(path, "truncated or corrupt", str(err)) from err
    with _open_header(path, max_pixels) as image:
        kinds = _guarded(path, conversion_kinds, image)
        if image.width * image.height <= full_check_pixels:
            _decode(path, image)
    return kinds


def open_rgb(
    path: str | os.PathLike,
    report: ImageReport | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image | None:
    """Open one image file as 8-bit RGB (first frame, alpha on white).

    Parameters
    ----------
    path : path of the file.
    report : where to count the outcome. With a report, an unusable file is
        counted there and ``None`` is returned; without one, it raises
        :class:`ImageSkipped`.
    max_pixels : header-declared width x height above which the file is
        skipped before any decoding.

    Returns
    -------
    PIL.Image.Image in mode ``RGB``, fully loaded (the file is closed), or
    ``None`` for a skipped file when ``report`` is given.
    """
    path = Path(path)
    try:
        with _open_header(path, max_pixels) as image:
            kinds = _guarded(path, conversion_kinds, image)
            _decode(path, image)
            rgb = _guarded(path, to_rgb, image)
    except ImageSkipped as skip:
        if report is None:
            raise
        log.debug("skipping %s", skip)
        report.add_skip(skip)
        return None
    if report is not None:
        report.add_ok(path, kinds)
    return rgb
