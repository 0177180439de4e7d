"""Overview: what was built, how well each SAE reconstructs, and its shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import analysis, loaders, plots, widgets
from dashboard.loaders import CacheRef

HIDDEN_SETTINGS = ("model.card.details", "model.card.preprocess")
# The build's stages in pipeline order (backend.build.STAGES; not imported
# here because importing the build module costs seconds on the first page).
STAGE_ORDER = ("activations", "train_mp", "train_topk", "encode", "stats")


def settings_table(data: dict) -> pd.DataFrame:
    """The manifest's inputs flattened to (setting, value) rows.

    Nested settings get dotted names; the model card's architecture details
    and preprocessing numbers are left out (they are in manifest.json).
    """
    flat = pd.json_normalize(data.get("inputs", {}), sep=".").iloc[0]
    keep = [name for name in flat.index if not name.startswith(HIDDEN_SETTINGS)]
    return pd.DataFrame(
        {"setting": keep, "value": [_readable(flat[name]) for name in keep]}
    )


def stage_table(data: dict) -> pd.DataFrame:
    """Seconds per build stage from the manifest, in pipeline order.

    Stages the pipeline does not know come last, in manifest order.
    """
    stages = data.get("stages", {})
    order = [name for name in STAGE_ORDER if name in stages]
    order += [name for name in stages if name not in STAGE_ORDER]
    rows = [(n, stages[n].get("seconds"), stages[n].get("done")) for n in order]
    return pd.DataFrame(
        rows,
        columns=["stage", "seconds", "done"],
    )


@st.cache_resource(show_spinner=False, max_entries=8)
def figures(ref: CacheRef) -> dict[str, go.Figure]:
    """The page's figures, built once per cache (they depend on nothing else)."""
    return {
        "fvu": plots.fvu_by_k(loaders.table(ref, "fvu_by_k")),
        "l0": plots.l0_distribution(loaders.table(ref, "l0")),
        "pairs": plots.cosine_histograms(analysis.pair_cosines(ref)),
        "hierarchy": plots.hierarchy_lines(_hierarchy(ref)),
    }


def _hierarchy(ref: CacheRef) -> pd.DataFrame:
    data = loaders.table(ref, "hierarchy")
    return data[data["modality"] == "all"] if "modality" in data else data


def show_settings(ref: CacheRef) -> None:
    data = loaders.manifest(ref)
    st.caption(f"Cache `{ref.key}` · built {data.get('created', '?')}")
    left, right = st.columns([3, 2])
    left.dataframe(settings_table(data), hide_index=True, width="stretch")
    right.dataframe(stage_table(data), hide_index=True, width="stretch")


def show_headline(ref: CacheRef) -> None:
    fvu = loaders.table(ref, "fvu_by_k")
    fvu = fvu[fvu["modality"].isin(["image", "text"])]
    top_k = int(fvu["k"].max())
    at_k = fvu[fvu["k"] == top_k].set_index(["sae", "modality"])["fvu"]
    atoms = loaders.atoms(ref)
    cells = st.columns(len(at_k) + 2)
    for cell, ((sae, modality), value) in zip(cells, at_k.items(), strict=False):
        cell.metric(
            f"FVU {plots.SAE_NAMES.get(sae, sae)} {modality}",
            f"{value:.3f}",
            help=f"fraction of variance unexplained at k = {top_k}",
        )
    cells[-2].metric("atoms", f"{len(atoms):,}")
    n_dead = int(atoms["dead"].sum())
    share = f"{atoms['dead'].mean():.1%} of the {len(atoms):,} atoms"
    cells[-1].metric(
        "dead atoms",
        f"{n_dead:,}",
        help=f"{share}; a dead atom is picked for no input of the corpus",
    )
    notes = [f"Dead atoms: {n_dead:,}, {share}."]
    kinds = loaders.summary(ref).get("mp", {}).get("atoms", {})
    if kinds:
        notes.append(
            "MP atoms: "
            + " · ".join(f"{n:,} {name.replace('_', '-')}" for name, n in kinds.items())
            + " (image-only: modality score >= 0.95, text-only: <= 0.05)."
        )
    st.caption(" ".join(notes))


def show_summary(ref: CacheRef) -> None:
    flat = pd.json_normalize(loaders.summary(ref), sep=".")
    if flat.empty:
        return
    rows = flat.T.reset_index()
    rows.columns = ["figure", "value"]
    rows["value"] = rows["value"].map(_readable)
    with st.expander("All global figures (stats/summary.json)"):
        st.dataframe(rows, hide_index=True, width="stretch")


def _readable(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def show_orthogonality(ref: CacheRef) -> None:
    samples = analysis.pair_cosines(ref)
    left, right = st.columns([3, 1])
    left.plotly_chart(figures(ref)["pairs"], width="stretch")
    for name, values in samples.items():
        right.metric(f"mean |cos|, {name}", f"{np.abs(values).mean():.3f}")
    mp = loaders.summary(ref).get("mp", {})
    if "coselected_abs_cosine" in mp:
        right.caption(
            f"Build statistics: mean |cosine| {mp['coselected_abs_cosine']:.3f} "
            f"between atoms of one code, {mp.get('random_abs_cosine', np.nan):.3f} "
            "between random alive atoms."
        )
    right.caption(
        f"{len(next(iter(samples.values()))):,} sampled pairs each. Matching "
        "pursuit removes each picked atom's direction from the residual before "
        "the next pick; this compares how aligned consecutive picks are with "
        "random pairs of used atoms."
    )


def show_hierarchy(ref: CacheRef) -> None:
    data = _hierarchy(ref)
    if data.empty:
        st.info("The corpus has no hierarchy labels, so there is no agreement table.")
        return
    values = ["accuracy", "chance"] if "chance" in data else ["accuracy"]
    wide = data.pivot_table(index="step", columns=["sae", "level"], values=values)
    wide.columns = [
        f"{plots.SAE_NAMES.get(s, s)} · {lv} · {v}" for v, s, lv in wide.columns
    ]
    wide = wide[sorted(wide.columns)].round(3)
    left, right = st.columns([2, 3])
    left.dataframe(wide, width="stretch", height=360)
    right.plotly_chart(figures(ref)["hierarchy"], width="stretch")


def render() -> None:
    st.title("Overview")
    ref = widgets.current_cache()
    with widgets.guard("Reading the build settings"):
        show_settings(ref)
    with widgets.guard("Reading the headline figures"):
        show_headline(ref)
        show_summary(ref)
    st.subheader("Reconstruction")
    with widgets.guard("Drawing FVU and L0"):
        left, right = st.columns(2)
        left.plotly_chart(figures(ref)["fvu"], width="stretch")
        right.plotly_chart(figures(ref)["l0"], width="stretch")
    st.subheader("Conditional orthogonality")
    with widgets.guard("Sampling atom pairs"):
        show_orthogonality(ref)
    st.subheader("Hierarchy agreement")
    st.caption(
        "How well the atom picked at each step predicts each hierarchy level "
        "(level0 coarse to level2 fine)."
    )
    with widgets.guard("Reading the hierarchy table"):
        show_hierarchy(ref)


with widgets.guard("Showing this page"):
    render()
