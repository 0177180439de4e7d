"""Image corpora: the shipped default, a folder with captions, a folder alone.

:func:`load_corpus` returns a :class:`Corpus` whose ``table`` has one row per
usable image with the columns of :data:`COLUMNS`:

- ``id`` (str, unique), ``image`` (path relative to ``root``, POSIX style),
- ``captions`` (list of str, possibly empty),
- ``level0``, ``level1``, ``level2`` (labels from coarse to fine, or None),
- ``split`` (``"train"`` or ``"test"``), ``source`` (where the row came from),
- ``group`` (the key that decided the split; near-duplicates share it).

Accepted specs:

- ``None`` or ``"default"``: the shipped corpus in ``assets/corpus``.
- a folder with ``corpus.jsonl`` (the format ``corpus build`` writes).
- a folder with ``captions.csv`` (columns ``file``, ``caption``; several rows
  per file allowed; optional ``level0``..``level2``, ``split``, ``group``).
- a folder with ``captions.jsonl`` (one object per line: ``file``, and
  ``captions`` (list) or ``caption`` (str); optional levels, split, group).
- any other folder: every image below it, no captions; the subfolder names
  become ``level0``..``level2``.

Every image is checked once when the corpus loads (header, ``verify()``, and
a full decode for images up to a few megapixels; see
:func:`backend.images.check_image`). Unusable images are left out of the table
and counted in ``corpus.report`` with their reason. Without a ``split``, about
10 % of groups go to ``"test"``, chosen by a stable hash of the group key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from backend import CACHE_ROOT
from backend.atomic import write_json
from backend.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageReport,
    ImageSkipped,
    check_image,
    open_rgb,
)

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "assets" / "corpus"
COLUMNS = [
    "id",
    "image",
    "captions",
    "level0",
    "level1",
    "level2",
    "split",
    "source",
    "group",
]
LEVELS = ("level0", "level1", "level2")
SPLITS = ("train", "test")
TEST_PERCENT = 10

# Results of check_image, keyed by (path, size, mtime, max_pixels): each file
# is checked once per process even when a corpus is loaded again, and once in
# all while it is unchanged, since the results are also kept on disk
# (CHECKS_DIR, one JSON file per corpus folder).
_CHECKED: dict[tuple[str, int, int, int], tuple[str, ...] | ImageSkipped] = {}
CHECKS_DIR = CACHE_ROOT / "image-checks"
CHECKS_VERSION = 1
CHECKS_MIN_IMAGES = 1000  # smaller folders are checked afresh in well under 1 s


@dataclass
class Corpus:
    """A table of images with captions, labels and a train/test split.

    Attributes
    ----------
    table : pandas.DataFrame with the :data:`COLUMNS` (plus ``name`` for the
        default corpus), one row per usable image.
    root : folder that ``table.image`` paths are relative to.
    meta : ``meta.json`` of a built corpus, or a description of the folder.
    report : images converted and skipped while loading.
    """

    table: pd.DataFrame
    root: Path
    meta: dict
    report: ImageReport = field(default_factory=ImageReport)
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.root.name))

    def path_of(self, id: str) -> Path:
        rows = self.table.index[self.table["id"] == id]
        if len(rows) == 0:
            raise KeyError(f"no image with id {id!r} in corpus {self.name}")
        return self.root / self.table.at[rows[0], "image"]

    def open_image(self, id: str) -> Image.Image:
        """The image ``id`` as 8-bit RGB (alpha on white, first frame).

        Raises ``KeyError`` for an unknown id and
        :class:`backend.images.ImageSkipped` if the file broke after loading.
        """
        return open_rgb(self.path_of(id))

    def fingerprint(self, content: bool = True) -> str:
        """A short hash of the table and the image files, for cache keys.

        With ``content=True`` (default) the image bytes are hashed, so the same
        corpus copied elsewhere has the same fingerprint; ``content=False``
        hashes sizes and modification times instead (fast on huge folders).
        """
        if content and self._fingerprint is not None:
            return self._fingerprint
        digest = hashlib.blake2b(digest_size=16)
        rows = self.table[COLUMNS].to_dict(orient="records")
        digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
        for image in self.table["image"]:
            path = self.root / image
            if content:
                digest.update(hashlib.blake2b(path.read_bytes()).digest())
            else:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        value = digest.hexdigest()
        if content:
            self._fingerprint = value
        return value

    def describe(self) -> str:
        """Counts per split, source and level0, then the image report."""
        table = self.table
        lines = [
            f"corpus {self.name} at {self.root}",
            f"{len(table)} images, {int(table['captions'].map(len).sum())} captions",
            "split: " + _counts(table["split"]),
            "source: " + _counts(table["source"]),
        ]
        if table["level0"].notna().any():
            crosstab = pd.crosstab(table["level0"].fillna("-"), table["split"])
            lines += ["images per level0 and split:", crosstab.to_string()]
        for level in ("level1", "level2"):
            lines.append(f"distinct {level}: {table[level].nunique()}")
        catch_all = self.meta.get("catch_all_level0")
        if catch_all:
            lines.append(
                "catch-all level0 (left out of category zero-shot): "
                + ", ".join(catch_all)
            )
        lines.append(self.report.summary())
        return "\n".join(lines)


def _counts(series: pd.Series) -> str:
    counts = series.value_counts().sort_index()
    return ", ".join(f"{key}: {value}" for key, value in counts.items())


# ---------------------------------------------------------------- loading


def load_corpus(
    spec: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    test_percent: int = TEST_PERCENT,
) -> Corpus:
    """Load a corpus from ``spec`` (see the module docstring for the forms).

    Parameters
    ----------
    spec : None, ``"default"``, or a folder.
    max_pixels : images declaring more pixels are skipped (bomb guard).
    test_percent : share of groups put in ``"test"`` where no split is given.

    Raises
    ------
    FileNotFoundError if the folder does not exist; ValueError if a captions
    file lacks its required columns or has a split other than train/test.
    """
    root = _resolve(spec)
    if (root / "corpus.jsonl").exists():
        table, meta = _read_built(root)
    elif (root / "captions.csv").exists():
        table, meta = _read_captions(root, _captions_csv_rows(root / "captions.csv"))
    elif (root / "captions.jsonl").exists():
        rows = _captions_jsonl_rows(root / "captions.jsonl")
        table, meta = _read_captions(root, rows)
    else:
        table, meta = _read_folder(root)

    extras = [c for c in table.columns if c not in COLUMNS]
    table = _fill_split(table[COLUMNS + extras], test_percent)
    table, report = _check_images(root, table, max_pixels)
    log.info(
        "corpus %s: %d images; %s",
        meta.get("name"),
        len(table),
        report.summary().splitlines()[0],
    )
    return Corpus(
        table=table.reset_index(drop=True), root=root, meta=meta, report=report
    )


def _resolve(spec: str | Path | None) -> Path:
    if spec is None or str(spec) == "default":
        root = DEFAULT_ROOT
        if not (root / "corpus.jsonl").exists():
            raise FileNotFoundError(
                f"the default corpus is missing from {root}; rebuild it with "
                "`python -m backend corpus build` or pass a folder of images"
            )
        return root
    root = Path(spec).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"corpus spec {spec!r} is neither 'default' nor an existing folder"
        )
    return root


def _read_built(root: Path) -> tuple[pd.DataFrame, dict]:
    """``corpus.jsonl`` + ``meta.json`` as written by ``corpus build``."""
    rows = [json.loads(line) for line in _lines(root / "corpus.jsonl")]
    table = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in table:
            table[column] = None
    table["captions"] = table["captions"].map(lambda c: list(c) if c else [])
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("name", root.name)
    meta["format"] = "corpus.jsonl"
    return table, meta


def _lines(path: Path) -> Iterable[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield line


def _captions_csv_rows(path: Path) -> list[dict]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "file" not in frame.columns:
        raise ValueError(
            f"{path} needs a 'file' column (and 'caption'); it has "
            f"{list(frame.columns)}"
        )
    rows = frame.to_dict(orient="records")
    for row in rows:
        caption = row.pop("caption", "")
        row["captions"] = [caption] if caption.strip() else []
    return rows


def _captions_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_lines(path), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from err
        if not isinstance(row, dict) or "file" not in row:
            raise ValueError(f"{path}:{number}: each line needs a 'file' key")
        captions = row.pop("captions", None)
        single = row.pop("caption", None)
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions or []) + ([single] if single else [])
        row["captions"] = [str(c) for c in captions if str(c).strip()]
        rows.append(row)
    return rows


def _read_captions(root: Path, rows: list[dict]) -> tuple[pd.DataFrame, dict]:
    """Merge caption rows per file; images without a row get no captions."""
    by_file: dict[str, dict] = {}
    for row in rows:
        file = Path(str(row["file"])).as_posix()
        entry = by_file.setdefault(file, {"captions": []})
        entry["captions"] += [c for c in row["captions"] if c not in entry["captions"]]
        for key in (*LEVELS, "split", "group"):
            value = row.get(key)
            if value not in (None, "") and entry.get(key) is None:
                entry[key] = str(value)

    captioned = len(by_file)
    for file in _image_files(root):
        by_file.setdefault(file, {"captions": []})
    if len(by_file) > captioned:
        log.info(
            "%d images in %s have no captions row; kept without captions",
            len(by_file) - captioned,
            root,
        )

    source = "captions.csv" if (root / "captions.csv").exists() else "captions.jsonl"
    records = []
    for file, entry in sorted(by_file.items()):
        levels = _folder_levels(file)
        records.append(
            {
                "id": file,
                "image": file,
                "captions": entry["captions"],
                **{lv: entry.get(lv, levels[i]) for i, lv in enumerate(LEVELS)},
                "split": entry.get("split"),
                "source": source,
                "group": entry.get("group") or _group_key(file),
            }
        )
    return pd.DataFrame(records, columns=COLUMNS), {"name": root.name, "format": source}


def _read_folder(root: Path) -> tuple[pd.DataFrame, dict]:
    """Every image file below ``root``; subfolders become the levels."""
    records = []
    for file in _image_files(root):
        levels = _folder_levels(file)
        records.append(
            {
                "id": file,
                "image": file,
                "captions": [],
                "level0": levels[0],
                "level1": levels[1],
                "level2": levels[2],
                "split": None,
                "source": "folder",
                "group": _group_key(file),
            }
        )
    return pd.DataFrame(records, columns=COLUMNS), {
        "name": root.name,
        "format": "folder",
    }


def _image_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _folder_levels(file: str) -> list[str | None]:
    folders = list(Path(file).parent.parts)[:3]
    return folders + [None] * (3 - len(folders))


def _group_key(file: str) -> str:
    """Folder + file stem without trailing numbers: ``cats/tabby_02.jpg`` and
    ``cats/tabby_07.jpg`` share ``cats/tabby``, so they land on one side."""
    path = Path(file)
    stem = re.sub(r"[\s_\-.]*\(?\d+\)?$", "", path.stem.lower()) or path.stem.lower()
    return f"{path.parent.as_posix()}/{stem}"


def split_for(group: str, test_percent: int = TEST_PERCENT) -> str:
    """``"test"`` for about ``test_percent`` % of group keys, by a stable hash."""
    digest = hashlib.sha256(group.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "test" if bucket < test_percent else "train"


def _fill_split(table: pd.DataFrame, test_percent: int) -> pd.DataFrame:
    table = table.copy()
    missing = table["split"].isna() | (table["split"] == "")
    table.loc[missing, "split"] = [
        split_for(g, test_percent) for g in table.loc[missing, "group"]
    ]
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"split must be 'train' or 'test', found {bad}")
    return table


# ---------------------------------------------------------------- checks


def _check_one(path: Path, max_pixels: int) -> tuple[str, ...] | ImageSkipped:
    try:
        stat = path.stat()
    except OSError as err:
        return ImageSkipped(path, "missing file", str(err))
    key = (str(path), stat.st_size, stat.st_mtime_ns, max_pixels)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = check_image(path, max_pixels)
        except ImageSkipped as skip:
            _CHECKED[key] = skip
    return _CHECKED[key]


def _checks_file(root: Path, max_pixels: int) -> Path:
    digest = hashlib.sha1(f"{root.resolve()}|{max_pixels}".encode()).hexdigest()
    return CHECKS_DIR / f"{digest[:16]}.json"


def _read_checks(root: Path, max_pixels: int) -> int:
    """Put the kept results of earlier checks under ``root`` into ``_CHECKED``.

    A kept result counts only for a file of the same size and modification
    time, so an edited or replaced file is checked again. Returns how many
    results were read.
    """
    try:
        kept = json.loads(_checks_file(root, max_pixels).read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(kept, dict) or kept.get("version") != CHECKS_VERSION:
        return 0
    for name, entry in kept.get("files", {}).items():
        size, mtime_ns, kinds, reason, detail = entry
        path = root / name
        key = (str(path), size, mtime_ns, max_pixels)
        _CHECKED[key] = ImageSkipped(path, reason, detail) if reason else tuple(kinds)
    return len(kept.get("files", {}))


def _write_checks(root: Path, max_pixels: int, paths: list[Path]) -> None:
    """Keep the results for ``paths`` on disk (quietly skipped where read-only)."""
    files = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue  # missing files are checked again next time
        result = _CHECKED.get((str(path), stat.st_size, stat.st_mtime_ns, max_pixels))
        if result is None:
            continue
        name = path.relative_to(root).as_posix()
        if isinstance(result, ImageSkipped):
            files[name] = [
                stat.st_size,
                stat.st_mtime_ns,
                [],
                result.reason,
                result.detail,
            ]
        else:
            files[name] = [stat.st_size, stat.st_mtime_ns, list(result), "", ""]
    try:
        write_json(
            _checks_file(root, max_pixels),
            {"version": CHECKS_VERSION, "root": str(root), "files": files},
        )
    except OSError as err:
        log.debug("image checks not kept: %s", err)


def _check_images(
    root: Path, table: pd.DataFrame, max_pixels: int
) -> tuple[pd.DataFrame, ImageReport]:
    """Check every image (once while it is unchanged); drop unusable rows and
    count why."""
    paths = [root / image for image in table["image"]]
    keep_on_disk = len(paths) >= CHECKS_MIN_IMAGES
    before = len(_CHECKED)
    if keep_on_disk:
        _read_checks(root, max_pixels)
    read = len(_CHECKED)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            tqdm(
                pool.map(lambda p: _check_one(p, max_pixels), paths),
                total=len(paths),
                desc="checking images",
                unit="img",
                disable=len(paths) < 2000,
            )
        )
    if keep_on_disk and (len(_CHECKED) > read or read == before):
        _write_checks(root, max_pixels, paths)
    report = ImageReport()
    keep = []
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, ImageSkipped):
            report.add_skip(result)
        else:
            report.add_ok(path, result)
        keep.append(not isinstance(result, ImageSkipped))
    return table[keep], report
