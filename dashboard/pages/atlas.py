"""Atlas: the UMAP map of the atoms; hover to see one, click to open it."""

from __future__ import annotations

import copy

import pandas as pd
import streamlit as st

from dashboard import loaders, plots, widgets
from dashboard.loaders import CacheRef

COLOR_OPTIONS = list(plots.ATLAS_COLOR_TITLES)


@st.cache_resource(show_spinner=False, max_entries=4)
def atlas_points(ref: CacheRef, thumbnails: bool) -> pd.DataFrame:
    """Live atoms with map coordinates, colour fields and hover thumbnails."""
    table = loaders.atoms(ref)
    table = table[~table["dead"].astype(bool)]
    points = table[
        [
            "atom",
            "umap_x",
            "umap_y",
            "label",
            "frequency",
            "modality_score",
            "mean_pick_step",
        ]
    ].copy()
    points["label"] = points["label"].fillna("").astype(str)
    points["label_group"] = plots.atlas_groups(points["label"])
    points["image"] = (
        loaders.atom_thumbnail_uris(ref).reindex(points.index) if thumbnails else ""
    )
    return points.reset_index(drop=True)


@st.cache_resource(show_spinner=False, max_entries=8)
def atlas_spec(color: str, groups: tuple[str, ...] = ()) -> dict:
    """The chart spec for one colouring, built once (validation is slow)."""
    return plots.atlas_spec(color, groups)


def _groups(points: pd.DataFrame) -> tuple[str, ...]:
    """Label groups, largest first, "other" last."""
    order = points["label_group"].value_counts().index
    named = [g for g in order if g != plots.ATLAS_OTHER]
    return (*named, plots.ATLAS_OTHER)


def _points_or_plain(ref: CacheRef, thumbnails: bool) -> pd.DataFrame:
    """Points with thumbnails; without them (and a warning) if images fail."""
    if thumbnails:
        try:
            return atlas_points(ref, True)
        except (OSError, KeyError, ValueError) as error:
            st.warning(
                f"Hover thumbnails are off: the corpus images could not be read "
                f"({type(error).__name__}: {error})."
            )
    return atlas_points(ref, False)


def render() -> None:
    st.title("Atlas")
    ref = widgets.current_cache()
    left, right = st.columns([1, 1])
    color = left.selectbox(
        "Colour by",
        COLOR_OPTIONS,
        format_func=plots.ATLAS_COLOR_TITLES.get,
        key="atlas_color",
    )
    thumbnails = right.toggle("Thumbnails on hover", value=True, key="atlas_thumbnails")
    with widgets.guard("Drawing the atlas"):
        points = _points_or_plain(ref, thumbnails)
        dead = len(loaders.atoms(ref)) - len(points)
        st.caption(
            f"{len(points):,} live atoms placed by UMAP on their dictionary "
            f"directions ({dead:,} dead atoms left out). Hover for the label and "
            "top image; click an atom to open its page."
        )
        event = st.vega_lite_chart(
            points,
            # Streamlit may add to the spec, so the cached one is copied.
            copy.deepcopy(
                atlas_spec(color, _groups(points) if color == "label" else ())
            ),
            on_select="rerun",
            key="atlas_chart",
            width="stretch",
        )
        atom = widgets.selected_atom(event)
        if atom is not None:
            st.switch_page(widgets.ATOMS_PAGE, query_params={"atom": str(atom)})


with widgets.guard("Showing this page"):
    render()
