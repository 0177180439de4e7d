"""Cached readers of one built cache (docs/cache.md, schema version 1).

Every page reads the cache through these functions and recomputes nothing
heavy. A cache is named by a :class:`CacheRef` (folder and the modification
time of its manifest), so a rebuilt cache is read again while a warm one costs
a dictionary lookup. Big read-only objects (arrays, tables, models) live in
``st.cache_resource``, which hands out the same object on every rerun instead
of unpickling a copy; pages must not modify what these functions return.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from backend.cache import CacheError, open_cache, read_manifest, rebuild_command

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT_ENV = "ATLAS_CACHE_ROOT"
BUILD_COMMAND = "make app    # or: .venv/bin/python -m backend build"
SAE_KINDS = ("mp", "topk")


class CacheRef(NamedTuple):
    """A built cache: its folder and its manifest's mtime (ns) as a version."""

    path: str
    stamp: int

    @property
    def key(self) -> str:
        return Path(self.path).name


class Traces(NamedTuple):
    """Pursuit traces of every activation, as the build stored them.

    ``atoms_nk`` (int32, -1 after a stop), ``coefficients_nk`` (float32),
    ``residual_norms_nk1`` (float32, n x (k+1): ``|x - b|`` then after each
    step, for TopK adding atoms by decreasing coefficient; ``None`` if the
    build stored none) and ``fvu_n`` (float32, fraction of variance
    unexplained).
    """

    atoms_nk: np.ndarray
    coefficients_nk: np.ndarray
    residual_norms_nk1: np.ndarray | None
    fvu_n: np.ndarray


class AtomTransitions(NamedTuple):
    """Counts of consecutive picks, indexed both ways for fast look-ups.

    ``before`` has index (atom_to, atom_from) and ``after`` has index
    (atom_from, atom_to); both hold ``count`` summed over steps.
    """

    before: pd.Series
    after: pd.Series


def cache_root() -> Path:
    """The folder holding built caches: ``$ATLAS_CACHE_ROOT`` or ``cache/``."""
    return Path(os.environ.get(CACHE_ROOT_ENV, REPO_ROOT / "cache"))


def list_caches(root: Path | None = None) -> list[CacheRef]:
    """Built caches under ``root`` (folders with a manifest), newest first."""
    root = cache_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    refs = []
    for folder in root.iterdir():
        manifest_path = folder / "manifest.json"
        if folder.is_dir() and manifest_path.is_file():
            refs.append(CacheRef(str(folder), manifest_path.stat().st_mtime_ns))
    return sorted(refs, key=lambda ref: ref.stamp, reverse=True)


def _path(ref: CacheRef, relative: str) -> Path:
    return Path(ref.path) / relative


@st.cache_resource(show_spinner="Checking the cache ...", max_entries=8)
def manifest(ref: CacheRef) -> dict:
    """The manifest, once the cache passed :func:`backend.cache.open_cache`.

    That check (schema version, complete build, every file's size and
    SHA-256) reads each file once per cache and dashboard process.

    Raises
    ------
    backend.cache.CacheError
        Unfinished, incompatible or damaged cache; the message names the
        command that rebuilds it.
    """
    return open_cache(ref.path, verify=True)


@st.cache_resource(show_spinner=False, max_entries=64)
def describe(ref: CacheRef) -> str:
    """A one-line name for the cache picker: short key, corpus, model."""
    try:
        data = read_manifest(Path(ref.path))
    except (CacheError, OSError, ValueError):
        return f"{ref.key} (unreadable manifest)"
    inputs = data.get("inputs", {})
    corpus_name = (inputs.get("corpus") or {}).get("name", "?")
    model_name = (inputs.get("model") or {}).get("spec", "?")
    state = "" if data.get("complete") else ", unfinished"
    return f"{ref.key[:8]} · {corpus_name} · {model_name}{state}"


def rebuild_hint(ref: CacheRef) -> str:
    """The command that rebuilds this cache (from its manifest if readable)."""
    try:
        return rebuild_command(read_manifest(Path(ref.path)))
    except (CacheError, OSError, ValueError):
        return BUILD_COMMAND


def _spec(data: dict, part: str) -> str | None:
    """The spec string of ``inputs[part]``, whether stored as str or dict."""
    value = data.get("inputs", {}).get(part)
    if isinstance(value, dict):
        value = value.get("spec")
    return value


def model_spec(ref: CacheRef) -> str:
    """The model spec the cache was built with (for live encoding)."""
    spec = _spec(manifest(ref), "model")
    if not spec:
        raise CacheError(f"Cache {ref.key} does not record its model spec.")
    return spec


def corpus_spec(ref: CacheRef) -> str | None:
    """The corpus spec the cache was built with (None: the default corpus)."""
    spec = _spec(manifest(ref), "corpus")
    return None if spec in (None, "", "default") else spec


@st.cache_resource(show_spinner="Reading the activation table ...", max_entries=8)
def items(ref: CacheRef) -> pd.DataFrame:
    """One row per activation (row order = matrix order), see docs/cache.md."""
    table = pd.read_parquet(_path(ref, "activations/items.parquet"))
    return table.set_index("row", drop=False).sort_index()


@st.cache_resource(show_spinner="Reading activations ...", max_entries=4)
def acts(ref: CacheRef) -> np.ndarray:
    """float32 (n_items, d) L2-normalised CLIP embeddings."""
    return np.load(_path(ref, "activations/acts.npy"))


@st.cache_resource(show_spinner="Reading pursuit traces ...", max_entries=8)
def traces(ref: CacheRef, kind: str) -> Traces:
    """The stored codes of every activation for ``kind`` in ``SAE_KINDS``."""
    if kind not in SAE_KINDS:
        raise ValueError(f"unknown SAE kind {kind!r}; use one of {SAE_KINDS}")
    norms_path = _path(ref, f"codes/{kind}_residual_norms.npy")
    return Traces(
        atoms_nk=np.load(_path(ref, f"codes/{kind}_atoms.npy")),
        coefficients_nk=np.load(_path(ref, f"codes/{kind}_coefficients.npy")),
        residual_norms_nk1=np.load(norms_path) if norms_path.is_file() else None,
        fvu_n=np.load(_path(ref, f"codes/{kind}_fvu.npy")),
    )


@st.cache_resource(show_spinner=False, max_entries=8)
def modality_rows(ref: CacheRef) -> dict[str, np.ndarray]:
    """Activation rows of each modality, in row order."""
    modality = items(ref)["modality"].to_numpy()
    return {m: np.flatnonzero(modality == m) for m in ("image", "text")}


@st.cache_resource(show_spinner=False, max_entries=8)
def modality_means(ref: CacheRef) -> dict[str, np.ndarray]:
    """Mean activation (d,) of each modality: the FVU reference point."""
    modality = items(ref)["modality"].to_numpy()
    acts_nd = acts(ref)
    return {m: acts_nd[modality == m].mean(axis=0) for m in ("image", "text")}


@st.cache_resource(show_spinner=False, max_entries=8)
def atoms(ref: CacheRef) -> pd.DataFrame:
    """Per-atom statistics indexed by atom id (stats/atoms.parquet)."""
    table = pd.read_parquet(_path(ref, "stats/atoms.parquet"))
    return table.set_index("atom", drop=False).sort_index()


@st.cache_resource(show_spinner=False, max_entries=8)
def table(ref: CacheRef, name: str) -> pd.DataFrame:
    """A statistics table ``stats/<name>.parquet`` as stored."""
    return pd.read_parquet(_path(ref, f"stats/{name}.parquet"))


@st.cache_resource(show_spinner=False, max_entries=8)
def top_items(ref: CacheRef) -> pd.DataFrame:
    """Top activations per atom, indexed by (atom, modality), ordered by rank."""
    data = table(ref, "top_items").sort_values(["atom", "modality", "rank"])
    return data.set_index(["atom", "modality"], drop=False).sort_index()


@st.cache_resource(show_spinner=False, max_entries=8)
def neighbors(ref: CacheRef) -> pd.DataFrame:
    """Nearest atoms by cosine, indexed by atom, ordered by rank."""
    data = table(ref, "neighbors").sort_values(["atom", "rank"])
    return data.set_index("atom", drop=False)


@st.cache_resource(show_spinner=False, max_entries=8)
def transitions(ref: CacheRef) -> AtomTransitions:
    """Consecutive-pick counts summed over steps, indexed both ways."""
    data = table(ref, "transitions")
    after = data.groupby(["atom_from", "atom_to"])["count"].sum().sort_index()
    before = data.groupby(["atom_to", "atom_from"])["count"].sum().sort_index()
    return AtomTransitions(before=before, after=after)


@st.cache_resource(show_spinner=False, max_entries=8)
def summary(ref: CacheRef) -> dict:
    """Global figures (stats/summary.json)."""
    with open(_path(ref, "stats/summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


@st.cache_resource(show_spinner=False, max_entries=8)
def array(ref: CacheRef, name: str) -> np.ndarray:
    """A statistics array ``stats/<name>.npy`` (pick_steps, coef_hist, ...)."""
    return np.load(_path(ref, f"stats/{name}.npy"))


@st.cache_resource(show_spinner=False, max_entries=8)
def item_names(ref: CacheRef) -> pd.Series:
    """A short readable name per activation row, for pickers and tables."""
    data = items(ref)
    is_text = (data["modality"] == "text").to_numpy()
    name = np.where(is_text, '"' + data["text"].astype(str) + '"', short_names(ref))
    prefix = np.where(is_text, "text", "image")
    return pd.Series(
        [f"{p} · {n}" for p, n in zip(prefix, name, strict=True)], index=data.index
    )


@st.cache_resource(show_spinner=False, max_entries=8)
def short_names(ref: CacheRef) -> pd.Series:
    """Caption-like name per row: a text's own text; for an image its first
    caption, else its finest non-empty hierarchy label, else its corpus id."""
    data = items(ref)
    texts = data["text"].astype(str).to_numpy()
    names = pd.Series(texts, index=data.index, dtype=object)
    fallback = data["corpus_id"].astype(str)
    for level in ("level0", "level1", "level2"):
        labels = data[level].astype("string").str.strip()
        fallback = labels.where(labels.fillna("") != "", fallback)
    is_image = (data["modality"] == "image").to_numpy()
    pair = data["pair_row"].to_numpy()
    has_caption = is_image & (pair >= 0)
    names[has_caption] = texts[pair[has_caption]]
    alone = is_image & ~has_caption
    names[alone] = fallback[alone].to_numpy()
    return names


@st.cache_resource(show_spinner="Loading the SAE ...", max_entries=4)
def sae(ref: CacheRef, kind: str):
    """The trained SAE of ``kind`` from ``sae/<kind>/`` (backend.sae)."""
    from backend.sae import load_sae

    return load_sae(_path(ref, f"sae/{kind}"))


@st.cache_resource(show_spinner=False, max_entries=4)
def dictionary(ref: CacheRef, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The SAE's atoms ``(n_atoms, d)`` and bias ``(d,)`` as float32 arrays."""
    model = sae(ref, kind)
    return (
        model.atoms_md.detach().cpu().numpy(),
        model.bias_d.detach().cpu().numpy(),
    )


@st.cache_resource(show_spinner="Loading the CLIP model ...", max_entries=2)
def encoder(spec: str):
    """The CLIP encoder of ``spec`` through ``backend.models.resolve_model``."""
    from backend.models import resolve_model

    return resolve_model(spec)


@st.cache_resource(show_spinner="Loading the picture generator ...", max_entries=2)
def generator(spec: str):
    """The shipped embedding-to-picture generator for the model of ``spec``.

    Raises FileNotFoundError (none shipped) or ValueError (trained for another
    model); both messages name the command that trains one.
    """
    from backend import generator as gen

    return gen.load_generator(gen.DEFAULT_DIR, gen.model_fingerprint(encoder(spec)))


@st.cache_resource(show_spinner="Opening the corpus ...", max_entries=4)
def corpus(spec: str | None):
    """The corpus of ``spec`` through ``backend.corpus.load_corpus``."""
    from backend.corpus import load_corpus

    return load_corpus(spec)


@st.cache_data(show_spinner=False, max_entries=20000)
def thumbnail_png(spec: str | None, corpus_id: str, size: int) -> bytes:
    """A corpus image as PNG bytes, at most ``size`` pixels on a side."""
    image = corpus(spec).open_image(corpus_id).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_bytes(ref: CacheRef, corpus_id: str, size: int = 128) -> bytes:
    """A corpus image as PNG bytes, ready for ``st.image`` (no re-encoding)."""
    return thumbnail_png(corpus_spec(ref), corpus_id, size)


def thumbnail(ref: CacheRef, corpus_id: str, size: int = 128) -> Image.Image:
    """A corpus image of the cache's corpus as a small RGB image."""
    return Image.open(io.BytesIO(thumbnail_png(corpus_spec(ref), corpus_id, size)))


@st.cache_resource(show_spinner="Preparing thumbnails ...", max_entries=4)
def atom_thumbnail_uris(ref: CacheRef, size: int = 40) -> pd.Series:
    """A data URI of each atom's top image (WebP, ``size`` px), by atom id.

    Atoms without a top image get an empty string. Built once per cache for
    the Atlas hover; about a kilobyte per atom.
    """
    tops = top_items(ref).reset_index(drop=True)
    # top_items is ordered by rank, so the first image row per atom is its top.
    firsts = tops[tops["modality"] == "image"].drop_duplicates("atom")
    corpus_ids = items(ref)["corpus_id"]
    uris = pd.Series("", index=atoms(ref).index, dtype=object)
    source = corpus(corpus_spec(ref))
    for atom, row in zip(firsts["atom"], firsts["row"], strict=True):
        image = source.open_image(corpus_ids[row])
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=70)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        uris[atom] = f"data:image/webp;base64,{encoded}"
    return uris
