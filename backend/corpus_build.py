"""Build the shipped default corpus from Debian packages; the ``corpus`` command.

Sources (all installed by apt, nothing downloaded):

- ``fonts-noto-color-emoji``: every fully-qualified emoji (and the emoji
  components) of Unicode's ``emoji-test.txt`` (``unicode-data``), rendered
  with Noto Color Emoji. Labels: level0 = group ("Animals & Nature"),
  level1 = subgroup ("animal-mammal"), level2 = name ("dog face").
- ``openclipart-png``: Open Clip Art PNGs. Labels: level0 = top folder,
  level1 = second folder, level2 = deeper folders joined by "/" (None where
  the file sits higher up); the cleaned file name is the ``name``.

Each image becomes a square ``size`` x ``size`` WebP thumbnail on white.
Captions carry the hierarchy words as well as the name, in several variants,
because category prompts only land when captions mention the categories.

The test split (about 10 %) is chosen by a hash of a group key that keeps
near-duplicates on one side: all skin-tone / gender / hair variants of one
emoji share their base name; clip-art files share their cleaned name.

The build is deterministic: same packages, same Pillow/libwebp -> same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from backend.atomic import write_bytes, write_json, write_text
from backend.corpus import TEST_PERCENT, split_for
from backend.images import ImageReport, open_rgb

log = logging.getLogger(__name__)

ASSETS_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "corpus"
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLDR_ANNOTATION_DIRS = (
    Path("/usr/share/unicode/cldr/common/annotations"),
    Path("/usr/share/unicode-cldr/common/annotations"),
)
PACKAGES = ("fonts-noto-color-emoji", "unicode-data", "openclipart-png")

# Noto Color Emoji is a bitmap font with a single strike at 109 px.
EMOJI_FONT_SIZE = 109

# The package is trusted and a few of its posters are 10k x 16k pixels; allow
# them (one at a time, about 1 GB each) instead of skipping them as bombs.
BUILD_MAX_PIXELS = 250_000_000

# Level-0 values that are not real categories; zero-shot category evaluation
# must leave them out.
CATCH_ALL_LEVEL0 = ("Component", "unsorted", "special")

SKIN_TONES = (
    "light skin tone",
    "medium-light skin tone",
    "medium skin tone",
    "medium-dark skin tone",
    "dark skin tone",
)
# Words after "name:" that mark a variant of the same emoji, not a new one.
VARIANT_WORDS = set(SKIN_TONES) | {
    "red hair",
    "curly hair",
    "white hair",
    "bald",
    "blond hair",
    "beard",
    "man",
    "woman",
    "men",
    "women",
    "person",
    "boy",
    "girl",
    "child",
}
GENDER_PREFIXES = ("man ", "woman ", "person ", "men ", "women ", "people ")

# Open Clip Art file names end with a (truncated) author name. These are the
# authors whose names recur in the package; a tail of tokens matching one of
# them (the last token may be cut short) is removed from the cleaned name.
CLIPART_AUTHORS = (
    "architetto francesco rollandin",
    "benji park",
    "nicu buculei",
    "gerald g",
    "linda kim",
    "jarno vasamaa",
    "ganson",
    "juliane krug",
    "jean victor balin",
    "jon phillips",
    "anthony liekens",
    "sergio luiz araujo",
    "enrique meza c",
    "matthew gates",
    "dave pena",
    "aj ashton",
    "toh yen cheng",
    "susan park",
    "patricia fidi",
    "fudriot omic ch",
    "matt todd",
    "lumen design studio",
    "jonathan dietrich",
    "jakob chaosi",
    "guillaume boitel",
    "frederic moser",
    "dan gerhards",
    "charles mccolm",
    "anton yu",
    "yet another paul",
    "shandy brown",
    "roman bertle",
    "richard torkar",
    "nathan eady",
    "jonadab",
    "mimooh",
    "peterm",
    "marcelo",
    "jasper van de grond",
    "andy fitzsimon",
)


@dataclass
class BuildConfig:
    """Settings of one corpus build.

    Attributes
    ----------
    out : folder that receives ``images/``, ``corpus.jsonl``, ``meta.json``.
    size : side of the square thumbnails in pixels.
    quality : WebP quality (0-100) of the thumbnails.
    limit : keep at most this many images per source (0 = all); for tests.
    """

    out: Path = ASSETS_CORPUS
    size: int = 96
    quality: int = 85
    limit: int = 0


@dataclass
class Item:
    """One corpus image before it is written."""

    id: str
    image: str
    name: str
    captions: list[str]
    level0: str | None
    level1: str | None
    level2: str | None
    group: str
    source: str
    split: str = "train"
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- splits


def emoji_base_name(name: str) -> str:
    """The name shared by all skin-tone / gender / hair variants of an emoji.

    ``"woman raising hand: medium skin tone"`` -> ``"raising hand"``;
    ``"kiss: woman, man"`` -> ``"kiss"``; ``"flag: Germany"`` stays as is.
    """
    base = name
    if ": " in name:
        head, tail = name.split(": ", 1)
        if all(part.strip() in VARIANT_WORDS for part in tail.split(",")):
            base = head
    for prefix in GENDER_PREFIXES:
        if base.startswith(prefix):
            return base[len(prefix) :]
    return "person" if base in ("man", "woman", "person") else base


# ---------------------------------------------------------------- emoji


@dataclass
class EmojiEntry:
    codepoints: tuple[str, ...]
    name: str
    group: str
    subgroup: str


def parse_emoji_test(path: Path = EMOJI_TEST) -> list[EmojiEntry]:
    """Fully-qualified and component entries of ``emoji-test.txt``, in file order."""
    entries, group, subgroup = [], "", ""
    line_re = re.compile(r"^([0-9A-F ]+);\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := line_re.match(line):
            codes, status, name = match.groups()
            if status in ("fully-qualified", "component"):
                entries.append(
                    EmojiEntry(tuple(codes.lower().split()), name, group, subgroup)
                )
    return entries


def load_cldr_keywords() -> dict[str, list[str]]:
    """Emoji -> English keywords from CLDR annotations, if installed (else {})."""
    import xml.etree.ElementTree as ET

    keywords: dict[str, list[str]] = {}
    for folder in CLDR_ANNOTATION_DIRS:
        for name in ("en.xml",):
            path = folder / name
            if not path.exists():
                continue
            for node in ET.parse(path).getroot().iter("annotation"):
                if node.get("type") != "tts" and node.text:
                    words = [w.strip() for w in node.text.split("|") if w.strip()]
                    keywords.setdefault(node.get("cp", ""), words)
    return keywords


def _readable(label: str) -> str:
    """Folder or subgroup label as words: ``animal-mammal`` -> ``animal mammal``."""
    return re.sub(r"[_\-/]+", " ", label).replace("&", "and").strip().lower()


def emoji_captions(entry: EmojiEntry, keywords: list[str]) -> list[str]:
    name = entry.name
    group, subgroup = _readable(entry.group), _readable(entry.subgroup)
    captions = [
        name,
        f"{name}, {subgroup} emoji",
        f"an emoji of {group}: {name}",
        f"a {subgroup} emoji from {group}, {name}",
    ]
    if keywords:
        captions.append(f"{name} emoji: " + ", ".join(keywords[:6]))
    return captions


def render_emoji(
    text: str, font: ImageFont.FreeTypeFont, size: int
) -> Image.Image | None:
    """Render one emoji sequence as a ``size`` px square on white.

    Returns None when the font has no single glyph for the sequence (it would
    draw several glyphs side by side).
    """
    if font.getlength(text) > 1.5 * EMOJI_FONT_SIZE * 1.25:
        return None
    canvas = Image.new("RGBA", (3 * EMOJI_FONT_SIZE, 2 * EMOJI_FONT_SIZE))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    return square_on_white(canvas.crop(box), size)


def emoji_items(config: BuildConfig, report: ImageReport) -> list[Item]:
    """Render every emoji into ``out/images/emoji`` and label it."""
    font = ImageFont.truetype(
        str(EMOJI_FONT), size=EMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM
    )
    keywords = load_cldr_keywords()
    entries = parse_emoji_test()
    if config.limit:
        entries = entries[:: max(1, len(entries) // config.limit)][: config.limit]

    items = []
    for entry in tqdm(entries, desc="emoji", unit="img"):
        text = "".join(chr(int(c, 16)) for c in entry.codepoints)
        key = "-".join(entry.codepoints)
        thumb = render_emoji(text, font, config.size)
        if thumb is None:
            report.n_checked += 1
            report.skipped["no glyph in font"] += 1
            continue
        image = f"images/emoji/{key}.webp"
        write_bytes(config.out / image, encode_webp(thumb, config.quality))
        report.add_ok(image)
        items.append(
            Item(
                id=f"emoji-{key}",
                image=image,
                name=entry.name,
                captions=emoji_captions(
                    entry, keywords.get(text.replace("\ufe0f", ""), [])
                ),
                level0=entry.group,
                level1=entry.subgroup,
                level2=entry.name,
                group="emoji:" + emoji_base_name(entry.name),
                source="noto-emoji",
            )
        )
    return items


# ---------------------------------------------------------------- clip art


def _strip_author(tokens: list[str]) -> list[str]:
    """Drop a trailing (possibly truncated) author name from the tokens."""
    for author in CLIPART_AUTHORS:
        words = author.split()
        for m in range(len(words), 0, -1):
            if len(tokens) <= m:
                continue
            tail = tokens[-m:]
            if tail[:-1] == words[: m - 1] and words[m - 1].startswith(tail[-1]):
                if m == 1 and len(words) > 1 and len(tail[-1]) < 4:
                    continue
                return tokens[:-m]
    return tokens


def clean_clipart_name(stem: str) -> str:
    """``acquila_architetto_franc_01`` -> ``acquila``; ``jigsaw_green_09`` ->
    ``jigsaw green``. Numbers at the end and a known author name are removed."""
    text = re.sub(r"[_\-\s]*\d+[a-z]?$", "", stem.lower())
    tokens = [t for t in re.split(r"[_\-\s.]+", text) if t]
    tokens = _strip_author(tokens)
    while len(tokens) > 1 and tokens[-1].isdigit():
        tokens.pop()
    return " ".join(tokens) or stem.lower()


def clipart_levels(rel: Path) -> tuple[str, str | None, str | None]:
    folders = list(rel.parent.parts)
    level1 = folders[1] if len(folders) > 1 else None
    level2 = "/".join(folders[2:]) if len(folders) > 2 else None
    return folders[0], level1, level2


def clipart_captions(name: str, rel: Path) -> list[str]:
    path_words = [_readable(p) for p in rel.parent.parts]
    category = " ".join(path_words)
    return [
        name,
        f"{name}, {category} clip art",
        f"a clip art drawing of {', '.join(path_words)}: {name}",
        f"a picture of {name} in the {' / '.join(path_words)} category",
    ]


def clipart_items(config: BuildConfig, report: ImageReport) -> list[Item]:
    """Thumbnail every Open Clip Art PNG into ``out/images/clipart``."""
    files = sorted(p.relative_to(CLIPART_ROOT) for p in CLIPART_ROOT.rglob("*.png"))
    files = [f for f in files if len(f.parts) > 1]
    if config.limit:
        files = files[:: max(1, len(files) // config.limit)][: config.limit]

    items = []
    for rel in tqdm(files, desc="clip art", unit="img"):
        rgb = open_rgb(CLIPART_ROOT / rel, report, max_pixels=BUILD_MAX_PIXELS)
        if rgb is None:
            continue
        slug = rel.with_suffix("").as_posix()
        image = f"images/clipart/{slug}.webp"
        write_bytes(
            config.out / image,
            encode_webp(square_on_white(rgb, config.size), config.quality),
        )
        name = clean_clipart_name(rel.stem)
        level0, level1, level2 = clipart_levels(rel)
        items.append(
            Item(
                id="clipart-" + slug.replace("/", "-"),
                image=image,
                name=name,
                captions=clipart_captions(name, rel),
                level0=level0,
                level1=level1,
                level2=level2,
                group="clipart:" + name,
                source="openclipart",
            )
        )
    return items


# ---------------------------------------------------------------- pictures


def square_on_white(image: Image.Image, size: int) -> Image.Image:
    """Fit ``image`` (alpha composited on white) into a white ``size`` square."""
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    offset = ((size - new[0]) // 2, (size - new[1]) // 2)
    canvas.alpha_composite(image, offset)
    return canvas.convert("RGB")


def encode_webp(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=quality, method=6)
    return buffer.getvalue()


# ---------------------------------------------------------------- build


def package_versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        versions[package] = result.stdout.strip() or "not installed"
    import PIL

    versions["Pillow"] = PIL.__version__
    return versions


def check_sources() -> None:
    missing = [p for p in (EMOJI_TEST, EMOJI_FONT, CLIPART_ROOT) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(map(str, missing))}; install the Debian packages "
            f"{' '.join(PACKAGES)} (apt-get install ...) or use the shipped "
            "assets/corpus instead of rebuilding it"
        )


def build_corpus(config: BuildConfig) -> dict:
    """Build the corpus into ``config.out``; return the meta dictionary.

    Old thumbnails under ``out/images`` that the new build does not write are
    left in place but are not listed in ``corpus.jsonl``.
    """
    check_sources()
    report = ImageReport()
    items = emoji_items(config, report) + clipart_items(config, report)
    duplicates = len(items) - len({item.id for item in items})
    if duplicates:
        raise ValueError(
            f"{duplicates} duplicate ids; file names collide after slugging"
        )
    for item in items:
        item.split = split_for(item.group)

    lines = [
        json.dumps(_row(item), ensure_ascii=False, sort_keys=True) for item in items
    ]
    write_text(config.out / "corpus.jsonl", "\n".join(lines) + "\n")
    meta = _meta(config, items, report)
    write_json(config.out / "meta.json", meta)
    write_text(config.out / "LICENSES.md", LICENSES_MD)
    log.info("corpus written to %s\n%s", config.out, report.summary())
    return meta


def _row(item: Item) -> dict:
    row = asdict(item)
    row.pop("extra")
    return row


def _count(items: list[Item], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        value = str(getattr(item, key))
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _meta(config: BuildConfig, items: list[Item], report: ImageReport) -> dict:
    return {
        "name": "mpsae-atlas-default",
        "description": "Noto Color Emoji (Unicode emoji-test.txt hierarchy) and "
        "Open Clip Art thumbnails, with hierarchy-bearing captions",
        "n_images": len(items),
        "n_captions": sum(len(i.captions) for i in items),
        "counts": {
            "source": _count(items, "source"),
            "split": _count(items, "split"),
            "level0": _count(items, "level0"),
        },
        "catch_all_level0": list(CATCH_ALL_LEVEL0),
        "thumbnail": {"size": config.size, "format": "webp", "quality": config.quality},
        "test_percent": TEST_PERCENT,
        "licenses": {
            "noto-emoji": "SIL Open Font License 1.1 (Noto Color Emoji)",
            "openclipart": "Public domain (Open Clip Art Library)",
            "unicode-data": "Unicode License v3 (emoji-test.txt names and groups)",
        },
        "build_command": "python -m backend corpus build"
        + (f" --size {config.size}" if config.size != 96 else ""),
        "package_versions": package_versions(),
        "report": report.to_dict(),
    }


LICENSES_MD = """\
# Licences of the default corpus

The default corpus is built by `python -m backend corpus build` from three
Debian packages. The thumbnails are derived works of the sources below.

## Emoji pictures: Noto Color Emoji (`fonts-noto-color-emoji`)

Copyright 2021 Google Inc. All Rights Reserved. The emoji images are rendered
from the Noto Color Emoji font, licensed under the SIL Open Font License,
Version 1.1 (https://openfontlicense.org). The font itself is not
redistributed here; the rendered pictures are images made with it.

## Emoji names and groups: Unicode data (`unicode-data`)

Names, groups and subgroups come from `emoji-test.txt`,
Copyright (c) Unicode, Inc., distributed under the Unicode License v3
(https://www.unicode.org/license.txt). Unicode and the Unicode Logo are
registered trademarks of Unicode, Inc. in the U.S. and other countries.

## Clip art: Open Clip Art Library (`openclipart-png`)

The clip-art pictures come from the Open Clip Art Library
(http://www.openclipart.org) as packaged by Debian. Every image was dedicated
to the public domain by its author (Creative Commons Public Domain
Dedication). Author names that appear in the original file names are kept in
the image paths.
"""


# ---------------------------------------------------------------- CLI


def add_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corpus",
        help="build or inspect an image corpus",
        description="Build the shipped default corpus from Debian packages, or "
        "print what a corpus holds (counts per split and level, skipped images).",
    )
    actions = parser.add_subparsers(dest="corpus_command", metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="build the default corpus from Debian packages",
        description="Render every Noto Color Emoji named in Unicode's "
        "emoji-test.txt and thumbnail every Open Clip Art PNG into a corpus "
        "folder (corpus.jsonl, meta.json, images/, LICENSES.md). Needs the "
        f"Debian packages {', '.join(PACKAGES)}.",
    )
    build.add_argument(
        "--out",
        type=Path,
        default=ASSETS_CORPUS,
        help="output folder (default: assets/corpus)",
    )
    build.add_argument(
        "--size", type=int, default=96, help="thumbnail side in pixels (default 96)"
    )
    build.add_argument(
        "--quality", type=int, default=85, help="WebP quality 0-100 (default 85)"
    )
    build.add_argument(
        "--limit",
        type=int,
        default=0,
        help="at most this many images per "
        "source, spread evenly (default 0 = all; for quick trials)",
    )
    build.set_defaults(func=_run_build)

    info = actions.add_parser(
        "info",
        help="print counts per split and level and the image report",
        description="Load a corpus (default: the shipped one; or a folder) and "
        "print counts per split, source and level0, and the skipped/converted "
        "image report.",
    )
    info.add_argument(
        "spec", nargs="?", default=None, help="'default' or a folder of images"
    )
    info.set_defaults(func=_run_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_build(args: argparse.Namespace) -> int:
    config = BuildConfig(
        out=args.out, size=args.size, quality=args.quality, limit=args.limit
    )
    meta = build_corpus(config)
    print(
        json.dumps({k: meta[k] for k in ("n_images", "n_captions", "counts")}, indent=2)
    )
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from backend.corpus import load_corpus

    corpus = load_corpus(args.spec)
    sys.stdout.write(corpus.describe() + "\n")
    return 0
