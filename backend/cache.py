"""The build cache: content keys, the manifest, integrity checks, list and clean.

Every build writes ``cache/<key>/`` (layout in ``docs/cache.md``). The key is
a short SHA-256 of a canonical JSON of everything that changes the output
(model spec and weights fingerprint, corpus fingerprint, SAE settings, seed,
``SCHEMA_VERSION``), so two builds with the same inputs share a folder and a
rerun finds its own work.

``manifest.json`` is the single source of truth about what is complete: a
stage counts as done only when the manifest lists it with ``done: true`` and
every file it names still has the recorded size and SHA-256. A file that was
truncated, edited or removed is reported as damaged, never silently used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend import CACHE_ROOT
from backend.atomic import write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the cache layout; bump it when a reader of version N-1 breaks."""

MANIFEST = "manifest.json"
DEFAULT_REBUILD = "python -m backend build"


class CacheError(Exception):
    """A cache folder cannot be used; the message says how to rebuild it."""


class IncompatibleCacheError(CacheError):
    """The manifest's schema version differs from ``SCHEMA_VERSION``."""


class DamagedCacheError(CacheError):
    """A file listed in the manifest is missing or its checksum differs."""


@dataclass(frozen=True)
class CacheEntry:
    """One folder under the cache root, as ``cache list`` shows it.

    Attributes
    ----------
    key : str
        Folder name (the content key).
    path : Path
        Folder path.
    created : str
        ISO time the build started, or "" when there is no readable manifest.
    model : str
        Model spec the build used.
    corpus : str
        Corpus name (or path).
    n_items : int
        Activations in the build (images + captions); 0 when unknown.
    size_bytes : int
        Bytes on disk under the folder.
    status : str
        ``"complete"``, ``"partial"`` (some stage not done),
        ``"incompatible"`` (other schema version) or ``"unreadable"``.
    """

    key: str
    path: Path
    created: str
    model: str
    corpus: str
    n_items: int
    size_bytes: int
    status: str


def cache_key(inputs: dict[str, Any]) -> str:
    """Hash ``inputs`` (JSON-serialisable) and the schema version to 16 hex chars.

    The JSON is canonical (sorted keys, no spaces), so the key depends only on
    the values, not on dict order.
    """
    payload = {"schema_version": SCHEMA_VERSION, "inputs": inputs}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def rebuild_command(manifest: dict[str, Any] | None) -> str:
    """The command that rebuilds the cache a manifest describes."""
    if manifest and manifest.get("build_command"):
        return str(manifest["build_command"])
    return DEFAULT_REBUILD


def new_manifest(key: str, inputs: dict[str, Any], command: str) -> dict[str, Any]:
    """A fresh manifest with no stage done yet."""
    return {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "build_command": command,
        "inputs": inputs,
        "versions": {},
        "stages": {},
        "sizes": {},
        "checksums": {},
    }


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; raise a ``CacheError`` saying what to do.

    Raises
    ------
    CacheError
        No manifest, or it is not valid JSON.
    IncompatibleCacheError
        Its schema version is not ``SCHEMA_VERSION``.
    """
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheError(
            f"{cache_dir} has no {MANIFEST}; rebuild with: {DEFAULT_REBUILD}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(
            f"{path} is not valid JSON ({err}); delete the folder "
            f"and rebuild with: {DEFAULT_REBUILD}"
        ) from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IncompatibleCacheError(
            f"{cache_dir} has cache schema version {version}, this code reads "
            f"version {SCHEMA_VERSION}; rebuild it with: {rebuild_command(manifest)}"
        )
    return manifest


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically."""
    write_json(Path(cache_dir) / MANIFEST, manifest)


def record_stage(
    cache_dir: Path,
    manifest: dict[str, Any],
    name: str,
    files: Iterable[str],
    seconds: float,
    **extra: Any,
) -> None:
    """Mark stage ``name`` done with its files' sizes and checksums; save.

    ``files`` are paths relative to ``cache_dir``; ``extra`` goes into the
    stage's entry (for example chunk counts or training figures).
    """
    files = sorted(files)
    for rel in files:
        path = Path(cache_dir) / rel
        manifest["sizes"][rel] = path.stat().st_size
        manifest["checksums"][rel] = file_sha256(path)
    manifest["stages"][name] = {
        "done": True,
        "seconds": round(float(seconds), 3),
        "files": files,
        **extra,
    }
    write_manifest(cache_dir, manifest)


def forget_stage(cache_dir: Path, manifest: dict[str, Any], name: str) -> None:
    """Drop a stage from the manifest (its files stay until overwritten)."""
    stage = manifest["stages"].pop(name, None)
    for rel in (stage or {}).get("files", []):
        manifest["sizes"].pop(rel, None)
        manifest["checksums"].pop(rel, None)
    write_manifest(cache_dir, manifest)


def damaged_files(
    cache_dir: Path, manifest: dict[str, Any], files: Iterable[str]
) -> list[str]:
    """Files (relative paths) that are missing or whose size or SHA-256 differ.

    The size check is free; the checksum is read only when the size matches.
    """
    problems = []
    for rel in files:
        path = Path(cache_dir) / rel
        if not path.exists():
            problems.append(f"{rel} (missing)")
        elif path.stat().st_size != manifest["sizes"].get(rel):
            problems.append(f"{rel} (size differs from the manifest)")
        elif file_sha256(path) != manifest["checksums"].get(rel):
            problems.append(f"{rel} (checksum differs from the manifest)")
    return problems


def stage_done(cache_dir: Path, manifest: dict[str, Any], name: str) -> bool:
    """True when the manifest lists stage ``name`` as done and its files are intact.

    A damaged stage is logged as a warning and reported as not done, so the
    build redoes it instead of using it.
    """
    stage = manifest["stages"].get(name)
    if not stage or not stage.get("done"):
        return False
    problems = damaged_files(cache_dir, manifest, stage["files"])
    if problems:
        log.warning("stage %s is damaged, redoing it: %s", name, "; ".join(problems))
        return False
    return True


def open_cache(cache_dir: Path | str, verify: bool = True) -> dict[str, Any]:
    """Check a cache folder for reading and return its manifest.

    Parameters
    ----------
    cache_dir
        A ``cache/<key>/`` folder.
    verify
        Also compare every listed file's SHA-256 with the manifest (reads
        every byte once; the dashboard does this once per cache).

    Raises
    ------
    CacheError
        The build is not complete (some stage missing).
    IncompatibleCacheError, DamagedCacheError
        See their docstrings; each message names the rebuild command.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete"):
        raise CacheError(
            f"{cache_dir} is an unfinished build; finish it with: "
            f"{rebuild_command(manifest)}"
        )
    files = [rel for st in manifest["stages"].values() for rel in st["files"]]
    problems = (
        damaged_files(cache_dir, manifest, files)
        if verify
        else [f"{rel} (missing)" for rel in files if not (cache_dir / rel).exists()]
    )
    if problems:
        raise DamagedCacheError(
            f"{cache_dir} is damaged: {'; '.join(problems)}. Rerun "
            f"{rebuild_command(manifest)} to redo the damaged stages."
        )
    return manifest


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(cache_dir: Path) -> CacheEntry:
    """A ``CacheEntry`` for one folder, whatever state it is in."""
    size = folder_size(cache_dir)
    try:
        manifest = read_manifest(cache_dir)
    except IncompatibleCacheError:
        return CacheEntry(
            cache_dir.name, cache_dir, "", "", "", 0, size, "incompatible"
        )
    except CacheError:
        return CacheEntry(cache_dir.name, cache_dir, "", "", "", 0, size, "unreadable")
    inputs = manifest.get("inputs", {})
    return CacheEntry(
        key=cache_dir.name,
        path=cache_dir,
        created=manifest.get("created", ""),
        model=str(inputs.get("model", {}).get("spec", "")),
        corpus=str(inputs.get("corpus", {}).get("name", "")),
        n_items=int(manifest.get("n_items", 0)),
        size_bytes=size,
        status="complete" if manifest.get("complete") else "partial",
    )


def list_caches(root: Path | str = CACHE_ROOT) -> list[CacheEntry]:
    """Every folder under ``root``, newest first (folders without a manifest last)."""
    root = Path(root)
    if not root.exists():
        return []
    entries = [describe(p) for p in root.iterdir() if p.is_dir()]
    return sorted(entries, key=lambda e: e.created, reverse=True)


def latest_cache(root: Path | str = CACHE_ROOT) -> Path | None:
    """The newest complete build under ``root``, or None when there is none."""
    for entry in list_caches(root):
        if entry.status == "complete":
            return entry.path
    return None


def clean(
    root: Path | str = CACHE_ROOT,
    keys: Iterable[str] = (),
    remove_all: bool = False,
    dry_run: bool = False,
) -> list[CacheEntry]:
    """Remove cache folders and return what was (or would be) removed.

    With no ``keys`` and not ``remove_all``, removes only folders that are not
    usable: partial, incompatible or unreadable builds. Complete builds are
    removed only when named or with ``remove_all``.
    """
    keys = set(keys)
    entries = list_caches(root)
    unknown = keys - {e.key for e in entries}
    if unknown:
        raise CacheError(
            f"no cache folder named {', '.join(sorted(unknown))} "
            f"under {root}; see: python -m backend cache list"
        )
    if remove_all:
        chosen = entries
    elif keys:
        chosen = [e for e in entries if e.key in keys]
    else:
        chosen = [e for e in entries if e.status != "complete"]
    for entry in chosen:
        if not dry_run:
            shutil.rmtree(entry.path)
        log.info(
            "%s %s (%s)",
            "would remove" if dry_run else "removed",
            entry.path,
            entry.status,
        )
    return chosen


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _cmd_list(args: argparse.Namespace) -> int:
    entries = list_caches(args.root)
    if not entries:
        print(f"no builds under {args.root}; make one with: {DEFAULT_REBUILD}")
        return 0
    print(
        f"{'key':16}  {'status':12}  {'created':25}  {'model':14}  "
        f"{'corpus':14}  {'items':>7}  size"
    )
    for e in entries:
        print(
            f"{e.key:16}  {e.status:12}  {e.created:25}  {e.model[:14]:14}  "
            f"{e.corpus[:14]:14}  {e.n_items:7d}  {_human(e.size_bytes)}"
        )
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    removed = clean(args.root, args.keys, args.all, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.path} ({e.status}, {_human(e.size_bytes)})")
    if not removed:
        print("nothing to remove (complete builds go only when named or with --all)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.root)
    targets = [root / k for k in args.keys] or [e.path for e in list_caches(root)]
    failed = 0
    for path in targets:
        try:
            open_cache(path, verify=True)
            print(f"ok       {path}")
        except CacheError as err:
            failed += 1
            print(f"FAILED   {err}")
    return 1 if failed else 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``python -m backend cache {list,clean,verify}``."""
    parser = subparsers.add_parser(
        "cache",
        help="list, check and remove builds under cache/",
        description="Inspect and tidy the build cache (one folder per content "
        "key, see docs/cache.md).",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=CACHE_ROOT,
        help="cache root folder (default: %(default)s)",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p_list = actions.add_parser("list", help="show every build with status and size")
    p_list.set_defaults(func=_cmd_list)
    p_clean = actions.add_parser(
        "clean",
        help="remove unfinished or incompatible builds (or named ones, or --all)",
    )
    p_clean.add_argument("keys", nargs="*", help="cache keys to remove")
    p_clean.add_argument(
        "--all", action="store_true", help="remove every build, complete ones included"
    )
    p_clean.add_argument(
        "--dry-run", action="store_true", help="only say what would be removed"
    )
    p_clean.set_defaults(func=_cmd_clean)
    p_verify = actions.add_parser(
        "verify", help="check every file of a build against the manifest checksums"
    )
    p_verify.add_argument("keys", nargs="*", help="cache keys (default: all)")
    p_verify.set_defaults(func=_cmd_verify)
