"""Broken and odd images, made from real shipped thumbnails, never stop a load."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.corpus import DEFAULT_ROOT, load_corpus
from backend.images import ImageReport, ImageSkipped, open_rgb

EMOJI = DEFAULT_ROOT / "images" / "emoji"


def _thumb(name: str) -> Image.Image:
    with Image.open(EMOJI / name) as image:
        return image.convert("RGB")


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (with a valid CRC)."""
    ihdr_start = 8 + 8  # signature, then length + "IHDR"
    body = bytearray(data[ihdr_start : ihdr_start + 13])
    body[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return data[:ihdr_start] + bytes(body) + crc + data[ihdr_start + 17 :]


# file name -> expected (action, kind) in the report; None = clean
EXPECTED = {
    "good_dog.webp": None,
    "good_cat.png": None,
    "truncated.png": ("skipped", "truncated or corrupt"),
    "truncated.webp": ("skipped", "truncated or corrupt"),
    "zero.png": ("skipped", "empty"),
    "notes.png": ("skipped", "not an image"),
    "huge.png": ("skipped", "too many pixels"),
    "cmyk.jpg": ("converted", "cmyk"),
    "deep.png": ("converted", "16-bit"),
    "palette.png": ("converted", "palette"),
    "rgba.png": ("converted", "alpha"),
    "anim.gif": ("converted", "animated"),
}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    dog, cat = _thumb("1f436.webp"), _thumb("1f431.webp")

    shutil.copy(EMOJI / "1f436.webp", folder / "good_dog.webp")
    cat.save(folder / "good_cat.png")

    cat.save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    webp = (EMOJI / "1f436.webp").read_bytes()
    (folder / "truncated.webp").write_bytes(webp[: len(webp) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file, not a picture\n")
    (folder / "huge.png").write_bytes(_patch_png_size(data, 100_000, 100_000))

    dog.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray_16 = np.asarray(dog.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray_16).save(folder / "deep.png")
    dog.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")

    rgba = dog.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 20))  # transparent black corner
    rgba.save(folder / "rgba.png")

    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    return folder


@pytest.fixture(scope="module")
def bad_corpus(bad_folder):
    return load_corpus(bad_folder)


def test_load_never_raises_and_keeps_only_usable(bad_corpus):
    kept = set(bad_corpus.table["image"])
    usable = {f for f, e in EXPECTED.items() if e is None or e[0] == "converted"}
    assert kept == usable
    assert bad_corpus.report.n_checked == len(EXPECTED)


@pytest.mark.parametrize("file", sorted(EXPECTED))
def test_each_file_reported_with_its_reason(bad_corpus, file):
    note = bad_corpus.report.reason_for(bad_corpus.root / file)
    expected = EXPECTED[file]
    if expected is None:
        assert note is None
    else:
        assert note is not None, f"{file} missing from the report"
        assert note.action == expected[0]
        assert expected[1] in note.kinds


def test_report_counts_and_summary(bad_corpus):
    report = bad_corpus.report
    assert report.skipped == {
        "truncated or corrupt": 2,
        "empty": 1,
        "not an image": 1,
        "too many pixels": 1,
    }
    for kind in ("cmyk", "16-bit", "palette", "alpha", "animated"):
        assert report.converted[kind] >= 1
    summary = report.summary()
    assert "12 images checked, 5 skipped" in summary
    assert "zero.png: empty" in summary


def test_converted_images_open_as_rgb(bad_corpus):
    for id in bad_corpus.table["id"]:
        image = bad_corpus.open_image(id)
        assert image.mode == "RGB"


def test_alpha_is_composited_on_white(bad_folder):
    image = open_rgb(bad_folder / "rgba.png")
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_animated_gives_first_frame(bad_folder):
    image = open_rgb(bad_folder / "anim.gif")
    red, green, blue = image.getpixel((16, 16))
    assert red > 200 and blue < 50


def test_sixteen_bit_keeps_its_values(bad_folder):
    image = open_rgb(bad_folder / "deep.png")
    expected = np.asarray(_thumb("1f436.webp").convert("L"), dtype=np.int16)
    got = np.asarray(image, dtype=np.int16)[..., 0]
    assert np.abs(got - expected).max() <= 1


def test_open_rgb_raises_or_counts(bad_folder):
    with pytest.raises(ImageSkipped) as info:
        open_rgb(bad_folder / "notes.png")
    assert info.value.reason == "not an image"

    report = ImageReport()
    assert open_rgb(bad_folder / "zero.png", report) is None
    assert report.skipped == {"empty": 1}


def test_pixel_limit_is_configurable(bad_folder):
    report = ImageReport()
    assert open_rgb(bad_folder / "good_dog.webp", report, max_pixels=1000) is None
    assert report.skipped == {"too many pixels": 1}
