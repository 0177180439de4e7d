"""Cross-modal: which atoms images and texts share, and the modality gap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import live, loaders, plots, widgets
from dashboard.loaders import CacheRef

N_SHARED_SHOWN = 6
GAP_SAMPLE = 1500


def show_modality_histogram(ref: CacheRef) -> None:
    scores = loaders.atoms(ref)["modality_score"]
    left, right = st.columns([3, 1])
    left.plotly_chart(plots.modality_histogram(scores), width="stretch")
    figures = loaders.summary(ref)
    for name in ("n_image_only", "n_text_only", "n_shared"):
        if name in figures:
            right.metric(
                name.removeprefix("n_").replace("_", " ") + " atoms",
                f"{figures[name]:,}",
            )


def shared_atoms(ref: CacheRef, band: tuple[float, float], min_bridge: float):
    """Atoms with a modality score inside ``band`` and a high bridge score."""
    table = loaders.atoms(ref)
    keep = (
        table["modality_score"].between(*band)
        & (table["bridge_score"] >= min_bridge)
        & ~table["dead"].astype(bool)
    )
    return table[keep].sort_values("bridge_score", ascending=False)


def show_shared(ref: CacheRef) -> None:
    left, right = st.columns(2)
    band = left.slider("Modality score between", 0.0, 1.0, (0.3, 0.7), 0.05, key="band")
    min_bridge = right.slider(
        "Bridge score at least", 0.0, 1.0, 0.1, 0.05, key="min_bridge"
    )
    found = shared_atoms(ref, band, min_bridge)
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
                [loaders.thumbnail(ref, cid) for cid in data.loc[rows, "corpus_id"]],
                data.loc[rows, "level2"].fillna("").tolist(),
                columns=4,
            )
        rows = _top_rows(tops, int(info.atom), "text", 4)
        texts_col.markdown("\n".join(f"- {t}" for t in data.loc[rows, "text"]))


def _top_rows(tops: pd.DataFrame, atom: int, modality: str, n: int) -> list[int]:
    if (atom, modality) not in tops.index:
        return []
    return tops.loc[[(atom, modality)]]["row"].head(n).tolist()


def cosine_attribution(ref: CacheRef, image_row: int, text_row: int) -> pd.DataFrame:
    """How much each shared atom adds to the image-text cosine.

    With unit-norm embeddings ``cos = x_i . x_t`` and ``x = b + sum_j z_j D_j
    + r``. Expanding the product, each atom j used by both codes contributes
    the diagonal term ``z_ij * z_tj * |D_j|^2 = z_ij * z_tj``; the rest of the
    cosine (bias, cross terms between different atoms, residuals) is reported
    as one remainder row, so the column sums to the cosine exactly.
    """
    image = live.summed_codes(live.stored_code(ref, image_row))
    text = live.summed_codes(live.stored_code(ref, text_row))
    shared = image.index.intersection(text.index)
    labels = loaders.atoms(ref)["label"]
    table = pd.DataFrame(
        {
            "atom": shared,
            "label": labels.reindex(shared).fillna("").to_numpy(),
            "image coefficient": image[shared].to_numpy(),
            "text coefficient": text[shared].to_numpy(),
        }
    )
    table["adds to cosine"] = table["image coefficient"] * table["text coefficient"]
    acts_nd = loaders.acts(ref)
    cosine = float(acts_nd[image_row] @ acts_nd[text_row])
    rest = cosine - table["adds to cosine"].sum()
    table = table.sort_values("adds to cosine", ascending=False)
    remainder = pd.DataFrame(
        [
            {
                "atom": -1,
                "label": "everything else (bias, cross terms, residuals)",
                "adds to cosine": rest,
            }
        ]
    )
    return pd.concat([table, remainder], ignore_index=True)


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
            st.image(loaders.thumbnail(ref, data.loc[image_row, "corpus_id"], 160))
        _trace_with_marks(ref, image_row, text_row)
    with text_col:
        st.markdown(f"**{data.loc[text_row, 'text']}**")
        _trace_with_marks(ref, text_row, image_row)
    attribution = cosine_attribution(ref, image_row, text_row)
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


@st.cache_data(show_spinner="Projecting embeddings ...", max_entries=8)
def gap_points(ref: CacheRef, n: int = GAP_SAMPLE) -> tuple[pd.DataFrame, float]:
    """A sample of each modality on its top-2 principal components.

    Returns the points and the distance between the two modality centroids
    in the full embedding space, measured on the sample.
    """
    data = loaders.items(ref)
    acts_nd = loaders.acts(ref)
    rng = np.random.default_rng(0)
    rows = []
    for modality in ("image", "text"):
        candidates = np.flatnonzero(data["modality"].to_numpy() == modality)
        rows.append(rng.choice(candidates, size=min(n, candidates.size), replace=False))
    rows = np.concatenate(rows)
    sample_nd = acts_nd[rows]
    centred_nd = sample_nd - sample_nd.mean(axis=0)
    _, _, vt = np.linalg.svd(centred_nd, full_matrices=False)
    pcs_n2 = centred_nd @ vt[:2].T
    modality = data["modality"].to_numpy()[rows]
    points = pd.DataFrame(
        {
            "pc1": pcs_n2[:, 0],
            "pc2": pcs_n2[:, 1],
            "modality": modality,
            "name": loaders.item_names(ref).iloc[rows].to_numpy(),
        }
    )
    gap = np.linalg.norm(
        sample_nd[modality == "image"].mean(0) - sample_nd[modality == "text"].mean(0)
    )
    return points, float(gap)


def show_gap(ref: CacheRef) -> None:
    points, gap = gap_points(ref)
    st.plotly_chart(plots.modality_gap(points, gap), width="stretch")
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


render()
