"""Traces: watch the pursuit on one input, step by step, re-encoded live."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import streamlit as st

from dashboard import live, loaders, plots, widgets
from dashboard.loaders import CacheRef

SOURCES = ("From the corpus", "Upload an image", "Type a text")


class Chosen(NamedTuple):
    """The input to trace: embedding, its corpus row (or None), name, modality."""

    x_d: np.ndarray
    row: int | None
    name: str
    modality: str


URL_SEEN = "trace_url_seen"


def apply_url(ref: CacheRef) -> None:
    """Open the view a shared link names: ``?item=ROW`` (a corpus activation)
    or ``?text=...``, with optional ``k``. A parameter is applied once, when it
    changes, so the widgets stay the user's afterwards."""
    params = {name: st.query_params.get(name) for name in ("item", "text", "k")}
    if st.session_state.get(URL_SEEN) == params:
        return
    st.session_state[URL_SEEN] = params
    row = widgets.query_int("item")
    if row is not None:
        names = loaders.item_names(ref)
        if 0 <= row < len(names):
            st.session_state["trace_source"] = SOURCES[0]
            st.session_state["trace_item_filter"] = names[row]
            st.session_state["trace_item_row"] = row
        else:
            st.warning(f"There is no corpus item {row}; the link's item is ignored.")
    elif params["text"]:
        st.session_state["trace_source"] = SOURCES[2]
        st.session_state["trace_text"] = params["text"]
    k = widgets.query_int("k")
    if k is not None and 1 <= k <= live.max_steps(ref):
        st.session_state["trace_k"] = k


def write_url(chosen: Chosen | None, k: int) -> None:
    """Keep the URL naming the current view, so that it can be shared."""
    params: dict[str, str] = {}
    source = st.session_state.get("trace_source", SOURCES[0])
    if chosen is not None and chosen.row is not None:
        params["item"] = str(chosen.row)
    elif chosen is not None and source == SOURCES[2]:
        params["text"] = st.session_state.get("trace_text", "").strip()
    if chosen is not None:
        params["k"] = str(k)
    st.query_params.from_dict(params)
    st.session_state[URL_SEEN] = {
        name: params.get(name) for name in ("item", "text", "k")
    }


def choose_input(ref: CacheRef) -> Chosen | None:
    """The input the user picked, uploaded or typed, embedded."""
    source = st.radio("Input", SOURCES, horizontal=True, key="trace_source")
    if source == SOURCES[0]:
        row = widgets.item_picker(ref, "trace_item")
        if row is None:
            return None
        data = loaders.items(ref)
        modality = data.loc[row, "modality"]
        if modality == "image":
            with widgets.guard("Opening the image"):
                st.image(
                    loaders.thumbnail_bytes(ref, data.loc[row, "corpus_id"]), width=96
                )
        return Chosen(
            loaders.acts(ref)[row], row, loaders.item_names(ref)[row], modality
        )
    if source == SOURCES[1]:
        upload = st.file_uploader(
            "Image", type=widgets.UPLOAD_TYPES, key="trace_upload"
        )
        image = widgets.checked_upload(upload)
        if image is None:
            return None
        st.image(image, width=160)
        with st.spinner("Encoding the image with CLIP ..."):
            return Chosen(live.embed_image(ref, image), None, upload.name, "image")
    text = st.text_input("Text", key="trace_text", placeholder="a red apple")
    if not text.strip():
        return None
    with st.spinner("Encoding the text with CLIP ..."):
        x_d = live.embed_texts(ref, [text.strip()])[0]
        return Chosen(x_d, None, f'"{text.strip()}"', "text")


def sparsity_controls(ref: CacheRef) -> tuple[int, float | None]:
    """Sliders for k and the residual threshold (0 = off)."""
    build_k = loaders.traces(ref, "mp").atoms_nk.shape[1]
    left, right = st.columns(2)
    k = left.slider("k (steps)", 1, live.max_steps(ref), build_k, key="trace_k")
    threshold = right.slider(
        "threshold (stop when |r| <= threshold x |x - b|)",
        0.0,
        0.95,
        0.0,
        0.05,
        key="trace_threshold",
        help="adaptive sparsity: 0 turns it off",
    )
    return k, (threshold or None)


STEP_FORMATS = {
    "coefficient": st.column_config.NumberColumn(format="%.3f"),
    "residual norm": st.column_config.NumberColumn(format="%.3f"),
    "cumulative FVU": st.column_config.NumberColumn(format="%.4f"),
    "label": st.column_config.TextColumn(width="medium"),
    "nearest to reconstruction": st.column_config.TextColumn(width="large"),
    "nearest to residual": st.column_config.TextColumn(width="large"),
}
ROW_PX = 35  # st.dataframe row height


def table_height(n_rows: int, most: int = 33) -> int:
    """Pixels that show ``n_rows`` rows and the header (at most ``most`` rows)."""
    return ROW_PX * (min(n_rows, most) + 1) + 3


def _final_fvu(code: live.Code) -> float:
    return float(code.fvu_k[code.n_steps - 1]) if code.n_steps else float("nan")


def show_codes(ref: CacheRef, chosen: Chosen, k: int, threshold) -> live.Code:
    """Both codes live: curves and the TopK code on top, MP steps below."""
    mp = live.code_of(ref, chosen.x_d, chosen.modality, "mp", k, threshold)
    topk = live.code_of(ref, chosen.x_d, chosen.modality, "topk", k)
    left, right = st.columns([3, 2])
    with left:
        st.markdown(
            f"**MP-SAE**: {mp.n_steps} steps, FVU {_final_fvu(mp):.4f} · "
            f"**TopK SAE**: {topk.n_steps} atoms, FVU {_final_fvu(topk):.4f}"
        )
        curves = {"MP": live.curve(mp), "TopK": live.curve(topk)}
        st.plotly_chart(
            plots.trace_curves(curves, f"Pursuit of {chosen.name}"), width="stretch"
        )
    with right:
        st.markdown("**TopK code of the same input** (by decreasing coefficient)")
        steps = live.step_table(ref, topk, with_neighbors=False)
        st.dataframe(
            steps[["atom", "label", "coefficient"]],
            hide_index=True,
            width="stretch",
            height=340,
            column_config=STEP_FORMATS,
        )
    st.markdown("**MP-SAE, step by step**")
    mp_steps = live.step_table(ref, mp, exclude=chosen.row)
    st.dataframe(
        mp_steps,
        hide_index=True,
        width="stretch",
        height=table_height(len(mp_steps)),
        column_config=STEP_FORMATS,
    )
    return mp


def show_step(ref: CacheRef, chosen: Chosen, mp: live.Code) -> None:
    """What the reconstruction and the residual look like after step t."""
    if mp.n_steps == 0:
        return
    if st.session_state.get("trace_step", 1) > mp.n_steps:
        st.session_state["trace_step"] = mp.n_steps  # k shrank below it
    step = (
        st.slider("Look at step", 1, mp.n_steps, key="trace_step")
        if mp.n_steps > 1
        else 1
    )
    recon_d = mp.recon_kd[step - 1]
    queries_qd = np.stack([recon_d, mp.x_d - recon_d])
    titles = (f"Reconstruction after step {step}", f"Residual after step {step}")
    near = live.nearest_items(ref, queries_qd, {"image": 4, "text": 3}, chosen.row)
    images, texts = near["image"], near["text"]
    for column, title, image, text in zip(
        st.columns(2), titles, images, texts, strict=True
    ):
        with column:
            st.markdown(f"**{title}**: nearest corpus images (cosine)")
            with widgets.guard("Opening corpus images"):
                widgets.image_grid(
                    [loaders.thumbnail_bytes(ref, c) for c in image["corpus_id"]],
                    [f"{c:.2f}" for c in image["cosine"]],
                    columns=4,
                )
            st.markdown(
                "Nearest captions:\n\n"
                + "\n".join(
                    f"- {t} ({c:.2f})"
                    for t, c in zip(text["text"], text["cosine"], strict=True)
                )
            )


def render() -> None:
    st.title("Traces")
    ref = widgets.current_cache()
    apply_url(ref)
    with widgets.guard("Choosing the input"):
        chosen = choose_input(ref)
    if chosen is None:
        write_url(None, 0)
        st.info("Choose a corpus item, upload an image or type a text.")
        return
    k, threshold = sparsity_controls(ref)
    write_url(chosen, k)
    with widgets.guard("Encoding the input"):
        mp = show_codes(ref, chosen, k, threshold)
        show_step(ref, chosen, mp)
    st.caption(
        "FVU here is one input's |residual|² / |x - m|², m the mean of its "
        "modality, as in the cache. Nearest items are "
        "by cosine among all corpus activations (the input itself left out)."
    )


with widgets.guard("Showing this page"):
    render()
