"""Widgets shared by the pages: cache picker, guards, links, grids, uploads."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from PIL import Image

from backend.images import ImageSkipped, open_rgb
from dashboard import loaders
from dashboard.loaders import CacheError, CacheRef

logger = logging.getLogger(__name__)

CACHE_STATE = "atlas_cache"
ATOMS_PAGE = "dashboard/pages/atoms.py"
UPLOAD_MAX_BYTES = 8 * 1024 * 1024
UPLOAD_MAX_PIXELS = 40_000_000
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "gif", "bmp"]


def sidebar_cache_picker() -> CacheRef | None:
    """Pick a built cache in the sidebar; remember it in the session state.

    Returns None (and shows the build command) when no cache is built.
    """
    refs = loaders.list_caches()
    if not refs:
        st.session_state.pop(CACHE_STATE, None)
        return None
    by_key = {ref.key: ref for ref in refs}
    keys = list(by_key)
    current = st.session_state.get(CACHE_STATE)
    index = keys.index(current.key) if current and current.key in by_key else 0
    key = st.sidebar.selectbox(
        "Cache",
        keys,
        index=index,
        format_func=lambda key: loaders.describe(by_key[key]),
        help=f"Built caches under {loaders.cache_root()}, newest first",
        key="cache_picker",
    )
    st.session_state[CACHE_STATE] = by_key[key]
    _sidebar_cache_caption(by_key[key])
    return by_key[key]


def _sidebar_cache_caption(ref: CacheRef) -> None:
    try:
        data = loaders.manifest(ref)
    except (CacheError, OSError, ValueError):
        return
    sae = data.get("inputs", {}).get("settings", {}).get("sae", {})
    st.sidebar.caption(
        f"model `{loaders.model_spec(ref)}` · corpus "
        f"`{loaders.corpus_spec(ref) or 'default'}` · "
        f"{data.get('n_items', '?')} activations · "
        f"{sae.get('n_atoms', '?')} atoms, k = {sae.get('k', '?')}"
    )


def show_missing_cache() -> None:
    """The message for an empty cache folder: the exact build command."""
    st.warning(
        f"No built cache found in `{loaders.cache_root()}`. Build one with "
        "the command below (it takes a few minutes), then reload this page."
    )
    st.code(loaders.BUILD_COMMAND, language="bash")


def current_cache() -> CacheRef:
    """The cache the sidebar picked, checked; stops the page when unusable."""
    ref = st.session_state.get(CACHE_STATE)
    if ref is None:
        show_missing_cache()
        st.stop()
    try:
        loaders.manifest(ref)
    except (CacheError, OSError, ValueError) as error:
        st.error(str(error))
        st.code(loaders.rebuild_hint(ref), language="bash")
        st.stop()
    return ref


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show an error raised inside the block in the page, never a traceback.

    Streamlit's own control flow (stop, rerun, switch page) derives from
    BaseException and passes through.
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the page must stay up
        logger.exception("%s failed", what)
        st.error(f"{what} failed: {type(error).__name__}: {error}")


def atom_link(atom: int, label: str = "", note: str = "") -> None:
    """A link to the atom's page (``?atom=ID``), keeping the page routing."""
    text = f"#{atom} {label}".strip()
    if note:
        text = f"{text} · {note}"
    st.page_link(ATOMS_PAGE, label=text, query_params={"atom": str(atom)})


def image_grid(
    images: Sequence[Image.Image | bytes], captions: Sequence[str], columns: int = 4
) -> None:
    """Images (PIL or encoded bytes) in a grid of ``columns``, one caption each."""
    if not images:
        st.caption("no image in the corpus fires this")
        return
    for start in range(0, len(images), columns):
        cells = st.columns(columns)
        chunk = zip(images[start : start + columns], captions[start:], strict=False)
        for cell, (image, caption) in zip(cells, chunk, strict=False):
            cell.image(image, caption=caption, width="stretch")


def checked_upload(upload) -> Image.Image | None:
    """Decode an uploaded file as an RGB image, or say in the page why not.

    Checks the size limit first, then opens the bytes with the project's safe
    opener (:func:`backend.images.open_rgb`: must decode as an image, bounded
    pixel count, odd modes converted); a bad file gives a message, never a
    traceback.
    """
    if upload is None:
        return None
    data = upload.getvalue()
    if len(data) > UPLOAD_MAX_BYTES:
        st.error(
            f"{upload.name} is {len(data) / 1e6:.1f} MB; the limit is "
            f"{UPLOAD_MAX_BYTES / 1e6:.0f} MB. Upload a smaller image."
        )
        return None
    try:
        return decode_image(data, Path(upload.name).suffix)
    except ImageSkipped as error:
        st.error(
            f"{upload.name} cannot be used: {error.reason}"
            f"{f' ({error.detail})' if error.detail else ''}. Upload a PNG, "
            "JPEG, WebP, GIF or BMP image."
        )
        return None


def decode_image(data: bytes, suffix: str = "") -> Image.Image:
    """Bytes to an RGB image through :func:`backend.images.open_rgb`.

    Raises :class:`backend.images.ImageSkipped` naming the reason when the
    bytes are not a usable image.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix.lower()}"
        path.write_bytes(data)
        return open_rgb(path, max_pixels=UPLOAD_MAX_PIXELS)


def query_int(name: str) -> int | None:
    """An integer URL parameter, or None when absent or not a number."""
    value = st.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        st.warning(f"URL parameter {name}={value!r} is not a number; ignored.")
        return None


def item_picker(
    ref: CacheRef, key: str, modality: str | None = None, limit: int = 300
) -> int | None:
    """Choose one corpus activation: a filter box, then a short list.

    Parameters
    ----------
    modality : "image", "text" or None (both).
    limit : the list shows at most this many matches, so that a corpus of
        any size keeps the page light.

    Returns the activation row, or None when nothing matches.
    """
    names = loaders.item_names(ref)
    if modality is not None:
        names = names[loaders.items(ref)["modality"] == modality]
    query = st.text_input(
        "Filter", key=f"{key}_filter", placeholder="words in the name or caption"
    )
    if query.strip():
        names = names[names.str.contains(query.strip(), case=False, regex=False)]
    if names.empty:
        st.info("Nothing matches this filter.")
        return None
    shown = names.iloc[:limit]
    if len(names) > limit:
        st.caption(f"{len(names):,} match; showing the first {limit}. Narrow it.")
    return st.selectbox(
        "Item", shown.index.tolist(), format_func=shown.get, key=f"{key}_row"
    )


def selected_atom(event) -> int | None:
    """The atom id a click on the chart selected, if any."""
    picked = (event or {}).get("selection", {}).get("atom") or []
    if not picked:
        return None
    return int(picked[0]["atom"])
