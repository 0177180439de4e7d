"""Cross-modal: which atoms images and texts share, and the modality gap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import analysis, live, loaders, plots, widgets
from dashboard.loaders import CacheRef

N_SHARED_SHOWN = 6
PICKER_LIMIT = 300
KIND_NAMES = {"image_only": "image-only", "text_only": "text-only"}


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@st.cache_resource(show_spinner=False, max_entries=8)
def _modality_figure(ref: CacheRef) -> go.Figure:
    return plots.modality_histogram(loaders.atoms(ref)["modality_score"])


@st.cache_resource(show_spinner=False, max_entries=8)
def _gap_figure(ref: CacheRef) -> go.Figure:
    points, gap = analysis.gap_points(ref)
    return _centroids_on_top(plots.modality_gap(points, gap))


def _centroids_on_top(fig: go.Figure) -> go.Figure:
    """Redraw the centroid trace last, large, on the WebGL layer.

    Plotly draws WebGL scatter traces (used for large samples) above every SVG
    trace, so an SVG centroid marker hides under the points; a WebGL copy
    added last is drawn over them.
    """
    old = [t for t in fig.data if t.name == "centroids"]
    if not old:
        return fig
    old = old[0]
    fig.data = [t for t in fig.data if t.name != "centroids"]
    fig.add_trace(
        go.Scattergl(
            x=old.x,
            y=old.y,
            mode="lines+markers+text",
            text=old.text,
            textposition="top center",
            textfont=dict(size=14, color="black"),
            marker=dict(
                size=22,
                color="black",
                symbol="x",
                line=dict(width=2, color="white"),
            ),
            line=dict(color="black", dash="dot", width=2),
            name="centroids",
        )
    )
    return fig


def show_modality_histogram(ref: CacheRef) -> None:
    left, right = st.columns([3, 1])
    left.plotly_chart(_modality_figure(ref), width="stretch")
    summary = loaders.summary(ref)
    high = float(summary.get("only_share", 0.95))
    low = 1 - high
    kinds = summary.get("mp", {}).get("atoms", {})
    ranges = {
        "image_only": f"score ≥ {high:.2f}",
        "text_only": f"score ≤ {low:.2f}",
        "shared": f"score {low:.2f}-{high:.2f}",
    }
    for name, count in kinds.items():
        label = f"{KIND_NAMES.get(name, name)} atoms"
        if name in ranges:
            label += f" ({ranges[name]})"
        right.metric(label, f"{count:,}")
    right.caption(
        f"Modality score: share of an atom's firing on images. Shared here "
        f"means strictly between {low:.2f} and {high:.2f}; the section below "
        "uses its own, adjustable range."
    )


def show_shared(ref: CacheRef) -> None:
    left, right = st.columns(2)
    band = left.slider("Modality score between", 0.0, 1.0, (0.3, 0.7), 0.05, key="band")
    span = f"modality score {band[0]:.2f}-{band[1]:.2f}"
    in_band = analysis.shared_atoms(ref, band, 0.0)
    if in_band.empty:
        st.info(f"No live atom has a {span}. Widen the range.")
        return
    # The slider ends at the highest bridge score in the range, so its
    # maximum always keeps at least one atom.
    top = float(np.floor(in_band["bridge_score"].max() * 1000 + 1e-6) / 1000)
    if top <= 0:
        min_bridge = 0.0
        right.caption(f"Every atom with a {span} has bridge score 0.")
    else:
        if st.session_state.get("min_bridge", 0.0) > top:
            st.session_state["min_bridge"] = top
        min_bridge = right.slider(
            "Bridge score at least",
            min_value=0.0,
            max_value=top,
            step=0.001,
            key="min_bridge",
            format="%.3f",
            help="share of (image, own caption) pairs firing the atom on both, "
            "among pairs where it fires on either; the slider ends at the "
            "highest bridge score within the modality range",
        )
    # A slider value can carry float noise (0.4000000000000001).
    found = in_band[in_band["bridge_score"] >= min_bridge - 1e-9]
    condition = f"{span} and bridge score ≥ {min_bridge:.3f}"
    if found.empty:
        st.info(
            f"No atom has a {condition}. Lower the bridge score or widen the "
            "modality range."
        )
        return
    head = f"{_plural(len(found), 'atom')} with a {condition}"
    if len(found) > N_SHARED_SHOWN:
        head += f"; the {N_SHARED_SHOWN} with the highest bridge score"
    st.caption(f"{head}:")
    data = loaders.items(ref)
    tops = loaders.top_items(ref)
    for info in found.head(N_SHARED_SHOWN).itertuples():
        widgets.atom_link(
            int(info.atom),
            str(info.label),
            f"modality {info.modality_score:.2f}, bridge {info.bridge_score:.3f}",
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
    if "pair_image_row" not in st.session_state:
        start = _first_sharing_pair(ref)
        if start is not None:
            st.session_state["pair_image_row"] = start
            st.session_state["pair_caption"] = int(data.loc[start, "pair_row"])
    with left:
        image_row = widgets.item_picker(
            ref, "pair_image", modality="image", limit=PICKER_LIMIT
        )
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
    cosine = float(attribution["adds to cosine"].sum())
    shared = attribution[attribution["atom"] >= 0]
    if shared.empty:
        st.markdown(
            f"**Image-text cosine {cosine:.3f}.** This image and caption share "
            "no atom; all of the cosine comes from the bias, cross terms "
            "between different atoms and the residuals."
        )
        return
    part = float(shared["adds to cosine"].sum())
    verb = "adds" if len(shared) == 1 else "add"
    st.markdown(
        f"**Image-text cosine {cosine:.3f}**; the {_plural(len(shared), 'shared atom')}"
        f" {verb} {part:.3f}, the rest (bias, cross terms between different "
        f"atoms, residuals) {cosine - part:.3f}."
    )
    table = shared.assign(atom=shared["atom"].astype(int)).reset_index(drop=True)
    st.dataframe(table, hide_index=True, width="stretch")


@st.cache_resource(show_spinner=False, max_entries=8)
def _first_sharing_pair(ref: CacheRef) -> int | None:
    """The first image in the picker's list whose first caption shares an atom.

    Test-split images come first; None when no listed pair shares an atom.
    """
    data = loaders.items(ref)
    images = data[data["modality"] == "image"].iloc[:PICKER_LIMIT]
    images = images[images["pair_row"] >= 0]
    if images.empty:
        return None
    atoms_nk = loaders.traces(ref, "mp").atoms_nk
    image_nk = atoms_nk[images["row"].to_numpy()]
    text_nk = atoms_nk[images["pair_row"].to_numpy()]
    same_nkk = (image_nk[:, :, None] == text_nk[:, None, :]) & (
        image_nk[:, :, None] >= 0
    )
    sharing = images[same_nkk.any(axis=(1, 2))]
    if sharing.empty:
        return None
    test = sharing[sharing["split"] == "test"]
    return int((test if not test.empty else sharing)["row"].iloc[0])


def _trace_with_marks(ref: CacheRef, row: int, other_row: int) -> None:
    trace = live.stored_code(ref, row)
    other = set(live.stored_code(ref, other_row)["atom"])
    trace.insert(0, "shared", np.where(trace["atom"].isin(other), "★", ""))
    st.dataframe(trace, hide_index=True, width="stretch", height=320)


def show_gap(ref: CacheRef) -> None:
    st.plotly_chart(_gap_figure(ref), width="stretch")
    stored = loaders.summary(ref).get("modality_gap")
    if stored is not None:
        st.caption(
            f"Modality gap over the whole corpus (summary.json): {float(stored):.3f}"
        )


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
