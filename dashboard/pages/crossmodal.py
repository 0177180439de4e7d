"""Cross-modal: which atoms images and texts share, and the modality gap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import analysis, live, loaders, plots, widgets
from dashboard.loaders import CacheRef

N_SHARED_SHOWN = 6


@st.cache_resource(show_spinner=False, max_entries=8)
def _modality_figure(ref: CacheRef) -> go.Figure:
    return plots.modality_histogram(loaders.atoms(ref)["modality_score"])


@st.cache_resource(show_spinner=False, max_entries=8)
def _gap_figure(ref: CacheRef) -> go.Figure:
    points, gap = analysis.gap_points(ref)
    return plots.modality_gap(points, gap)


def show_modality_histogram(ref: CacheRef) -> None:
    left, right = st.columns([3, 1])
    left.plotly_chart(_modality_figure(ref), width="stretch")
    kinds = loaders.summary(ref).get("mp", {}).get("atoms", {})
    for name, count in kinds.items():
        right.metric(f"{name.replace('_', '-')} atoms", f"{count:,}")
    right.caption("image-only: modality score >= 0.95; text-only: <= 0.05")


def show_shared(ref: CacheRef) -> None:
    left, right = st.columns(2)
    band = left.slider("Modality score between", 0.0, 1.0, (0.3, 0.7), 0.05, key="band")
    # Bridge scores are often small; the slider spans the values this cache has.
    top = float(np.ceil(loaders.atoms(ref)["bridge_score"].max() * 100) / 100) or 1.0
    min_bridge = right.slider(
        "Bridge score at least",
        0.0,
        top,
        0.0,
        top / 100,
        key="min_bridge",
        format="%.3f",
        help="share of (image, own caption) pairs firing the atom on both, among "
        "pairs where it fires on either",
    )
    found = analysis.shared_atoms(ref, band, min_bridge)
    st.caption(
        f"{len(found):,} shared atoms; the {N_SHARED_SHOWN} with the "
        "highest bridge score:"
    )
    data = loaders.items(ref)
    tops = loaders.top_items(ref)
    for info in found.head(N_SHARED_SHOWN).itertuples():
        widgets.atom_link(
            int(info.atom),
            str(info.label),
            f"modality {info.modality_score:.2f}, bridge {info.bridge_score:.2f}",
        )
        images_col, texts_col = st.columns([3, 2])
        with images_col, widgets.guard("Opening corpus images"):
            rows = _top_rows(tops, int(info.atom), "image", 4)
            widgets.image_grid(
                [
                    loaders.thumbnail_bytes(ref, cid)
                    for cid in data.loc[rows, "corpus_id"]
                ],
                loaders.short_names(ref).loc[rows].tolist(),
                columns=4,
            )
        rows = _top_rows(tops, int(info.atom), "text", 4)
        texts_col.markdown("\n".join(f"- {t}" for t in data.loc[rows, "text"]))


def _top_rows(tops: pd.DataFrame, atom: int, modality: str, n: int) -> list[int]:
    if (atom, modality) not in tops.index:
        return []
    return tops.loc[[(atom, modality)]]["row"].head(n).tolist()


def show_pair(ref: CacheRef) -> None:
    data = loaders.items(ref)
    left, right = st.columns(2)
    with left:
        image_row = widgets.item_picker(ref, "pair_image", modality="image")
    if image_row is None:
        return
    captions = data[
        (data["corpus_id"] == data.loc[image_row, "corpus_id"])
        & (data["modality"] == "text")
    ]
    if captions.empty:
        st.info("This image has no caption in the corpus.")
        return
    with right:
        text_row = st.selectbox(
            "Caption",
            captions.index.tolist(),
            format_func=lambda r: data.loc[r, "text"],
            key="pair_caption",
        )
    image_col, text_col = st.columns(2)
    with image_col:
        with widgets.guard("Opening the image"):
            st.image(
                loaders.thumbnail_bytes(ref, data.loc[image_row, "corpus_id"], 160)
            )
        _trace_with_marks(ref, image_row, text_row)
    with text_col:
        st.markdown(f"**{data.loc[text_row, 'text']}**")
        _trace_with_marks(ref, text_row, image_row)
    attribution = analysis.cosine_attribution(ref, image_row, text_row)
    st.markdown(
        f"**Image-text cosine {attribution['adds to cosine'].sum():.3f}**; "
        f"the {len(attribution) - 1} shared atoms add "
        f"{attribution['adds to cosine'].iloc[:-1].sum():.3f}."
    )
    st.dataframe(attribution, hide_index=True, width="stretch")


def _trace_with_marks(ref: CacheRef, row: int, other_row: int) -> None:
    trace = live.stored_code(ref, row)
    other = set(live.stored_code(ref, other_row)["atom"])
    trace.insert(0, "shared", np.where(trace["atom"].isin(other), "★", ""))
    st.dataframe(trace, hide_index=True, width="stretch", height=320)


def show_gap(ref: CacheRef) -> None:
    st.plotly_chart(_gap_figure(ref), width="stretch")
    stored = loaders.summary(ref).get("modality_gap")
    if stored is not None:
        st.caption(f"Modality gap over the whole corpus (summary.json): {stored}")


def render() -> None:
    st.title("Cross-modal")
    ref = widgets.current_cache()
    with widgets.guard("Drawing the modality scores"):
        show_modality_histogram(ref)
    st.subheader("Shared atoms")
    with widgets.guard("Finding shared atoms"):
        show_shared(ref)
    st.subheader("An image and its caption")
    st.caption("Both stored MP traces; ★ marks atoms the other trace also uses.")
    with widgets.guard("Comparing the traces"):
        show_pair(ref)
    st.subheader("Modality gap")
    with widgets.guard("Drawing the modality gap"):
        show_gap(ref)


with widgets.guard("Showing this page"):
    render()
