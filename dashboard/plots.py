"""Figures for the pages: plotly, and one Altair chart where plotly cannot.

Functions here take plain tables and arrays and return figures; they never
touch streamlit, so they are cheap to test.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

MODALITY_COLORS = {"image": "#1f77b4", "text": "#ff7f0e"}
SAE_DASH = {"mp": "solid", "topk": "dash"}
SAE_NAMES = {"mp": "MP-SAE", "topk": "TopK SAE"}
# Per SAE a dark (image) and a light (text) shade of one colour (not the
# modality colours, so SAE and modality never read alike), and a marker.
SAE_COLORS = {
    "mp": {"image": "#006d2c", "text": "#74c476"},
    "topk": {"image": "#54278f", "text": "#9e9ac8"},
}
SAE_MARKERS = {"mp": "circle", "topk": "square"}


def _named_sae(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with its ``sae`` column in readable names ("mp" -> "MP-SAE")."""
    return data.assign(sae=data["sae"].map(SAE_NAMES).fillna(data["sae"]))


def _compact(fig: go.Figure, height: int = 320) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def log_ticks(low: float, high: float) -> list[float]:
    """Clean tick values (1, 2, 5 times a power of ten) from ``low`` to ``high``.

    Over more than three decades only the powers of ten; with fewer than
    three values in range, 1 to 9 times each power of ten.
    """
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 or high < low:
        return []
    decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
    options = [(1, 2, 5), range(1, 10)]
    if np.log10(high / low) > 3:
        options.insert(0, (1,))
    for steps in options:
        ticks = [
            float(f"{m * 10.0**d:.12g}")
            for d in decades
            for m in steps
            if low <= m * 10.0**d <= high
        ]
        if len(ticks) >= 3:
            break
    return ticks


def fvu_by_k(data: pd.DataFrame) -> go.Figure:
    """FVU against k: one line per SAE and modality (log y, k >= 1).

    Each SAE has its own colour, dash and marker shape; within an SAE, image
    lines are dark with filled markers and text lines light with open ones.
    """
    data = data[(data["k"] >= 1) & data["modality"].isin(["image", "text"])]
    fig = go.Figure()
    for (sae, modality), part in data.sort_values("k").groupby(
        ["sae", "modality"], sort=True
    ):
        name = SAE_NAMES.get(sae, sae)
        shades = SAE_COLORS.get(sae, {"image": "#444444", "text": "#999999"})
        symbol = SAE_MARKERS.get(sae, "diamond")
        fig.add_trace(
            go.Scatter(
                x=part["k"],
                y=part["fvu"],
                mode="lines+markers",
                name=f"{name}, {modality}",
                legendgroup=name,
                legendgrouptitle_text=name,
                line=dict(color=shades[modality], dash=SAE_DASH.get(sae, "dot")),
                marker=dict(
                    symbol=symbol if modality == "image" else f"{symbol}-open",
                    size=8,
                    color=shades[modality],
                ),
            )
        )
    ticks = log_ticks(float(data["fvu"].min()), float(data["fvu"].max()))
    fig.update_layout(title="FVU against k", legend=dict(groupclick="toggleitem"))
    fig.update_xaxes(title="k (steps)", dtick=1 if data["k"].nunique() <= 16 else None)
    fig.update_yaxes(
        type="log",
        title="FVU (log scale)",
        tickvals=ticks,
        ticktext=[f"{t:g}" for t in ticks],
    )
    return _compact(fig)


def l0_distribution(data: pd.DataFrame) -> go.Figure:
    """How many atoms each input uses, per SAE and modality (bars)."""
    data = _named_sae(data)
    fig = px.bar(
        data,
        x="l0",
        y="count",
        color="modality",
        facet_col="sae",
        facet_col_spacing=0.08,
        barmode="group",
        color_discrete_map=MODALITY_COLORS,
        labels={"l0": "L0", "count": "inputs"},
        title="L0 distribution (distinct atoms per input)",
    )
    # Facet titles "sae=MP-SAE" read as just "MP-SAE".
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return _compact(fig)


def cosine_histograms(samples: dict[str, np.ndarray], bins: int = 80) -> go.Figure:
    """Histograms of cosines, one per named sample, as shares per bin.

    Binned here (not by plotly) so the figure carries ``bins`` numbers per
    sample rather than every sampled value.
    """
    edges = np.linspace(-1, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    colors = ["#d62728", "#7f7f7f", "#1f77b4"]
    for (name, values), color in zip(samples.items(), colors, strict=False):
        counts, _ = np.histogram(values, bins=edges)
        fig.add_trace(
            go.Bar(
                x=centers,
                y=counts / max(len(values), 1),
                name=name,
                opacity=0.55,
                marker_color=color,
                width=edges[1] - edges[0],
            )
        )
    fig.update_layout(
        barmode="overlay",
        title="Cosine between atoms: picked one after the other vs random pairs",
        xaxis_title="cosine",
        yaxis_title="share of pairs",
    )
    return _compact(fig)


def hierarchy_lines(data: pd.DataFrame) -> go.Figure:
    """Accuracy of predicting each hierarchy level from the atom at step t."""
    data = _named_sae(data)
    fig = px.line(
        data.sort_values("step"),
        x="step",
        y="accuracy",
        color="level",
        line_dash="sae",
        markers=True,
        labels={"step": "pick step", "accuracy": "accuracy"},
        title="Hierarchy agreement per pick step",
    )
    return _compact(fig)


def counts_bar(
    counts: np.ndarray, labels: np.ndarray, title: str, x_title: str
) -> go.Figure:
    """A plain bar chart of counts over labelled bins."""
    fig = go.Figure(go.Bar(x=labels, y=counts, marker_color="#4c78a8"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="count")
    return _compact(fig, height=260)


def coefficient_histogram(counts: np.ndarray, edges: np.ndarray) -> go.Figure:
    """An atom's coefficient histogram from stored counts and bin edges."""
    centers = (edges[:-1] + edges[1:]) / 2
    fig = counts_bar(counts, centers, "Coefficients", "coefficient")
    fig.update_traces(width=np.diff(edges) * 0.95)
    return fig


def pick_step_histogram(counts: np.ndarray) -> go.Figure:
    """How often an atom was picked at step 1, 2, ..., k."""
    steps = np.arange(1, len(counts) + 1)
    return counts_bar(counts, steps, "Pick steps", "step")


def modality_histogram(
    scores: pd.Series, marked: float | None = None, bins: int = 40
) -> go.Figure:
    """Histogram of atoms' modality scores (0 = text only, 1 = image only)."""
    counts, edges = np.histogram(scores.dropna(), bins=bins, range=(0, 1))
    fig = counts_bar(
        counts,
        (edges[:-1] + edges[1:]) / 2,
        "Modality score of the atoms",
        "modality score (0 text only, 1 image only)",
    )
    fig.update_traces(width=edges[1] - edges[0])
    fig.update_layout(yaxis_title="atoms")
    if marked is not None:
        fig.add_vline(x=marked, line_color="red", annotation_text="this atom")
    return fig


def modality_gap(points: pd.DataFrame, gap: float | None) -> go.Figure:
    """Image and text embeddings on their top two principal components.

    ``points`` has columns ``pc1``, ``pc2``, ``modality`` and ``name``; the
    centroid of each modality is drawn as a large marker and joined by a line.
    """
    fig = px.scatter(
        points,
        x="pc1",
        y="pc2",
        color="modality",
        hover_name="name",
        opacity=0.5,
        color_discrete_map=MODALITY_COLORS,
    )
    centroids = points.groupby("modality")[["pc1", "pc2"]].mean()
    fig.add_trace(
        go.Scatter(
            x=centroids["pc1"],
            y=centroids["pc2"],
            mode="lines+markers+text",
            text=[f"{name} centroid" for name in centroids.index],
            textposition="top center",
            marker=dict(size=16, color="black", symbol="x"),
            line=dict(color="black", dash="dot"),
            name="centroids",
        )
    )
    title = "Modality gap (top two principal components)"
    if gap is not None:
        title += f": centroid distance {gap:.3f}"
    fig.update_layout(title=title)
    return _compact(fig, height=420)


def trace_curves(curves: dict[str, pd.DataFrame], title: str) -> go.Figure:
    """Residual norm and FVU along each named pursuit, from step 0.

    ``curves`` maps a name (e.g. the SAE) to a frame with columns step,
    residual norm and cumulative FVU; FVU goes on the right axis, dotted.
    """
    fig = go.Figure()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    for (name, steps), color in zip(curves.items(), colors, strict=False):
        fig.add_trace(
            go.Scatter(
                x=steps["step"],
                y=steps["residual norm"],
                name=f"{name}: residual norm",
                line=dict(color=color),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=steps["step"],
                y=steps["cumulative FVU"],
                name=f"{name}: FVU",
                yaxis="y2",
                line=dict(color=color, dash="dot"),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="step (TopK: atoms added by decreasing coefficient)",
        yaxis=dict(title="residual norm", rangemode="tozero"),
        yaxis2=_fvu_axis(curves),
        legend=dict(orientation="h", y=-0.3),
    )
    return _compact(fig, height=340)


def _fvu_axis(curves: dict[str, pd.DataFrame]) -> dict:
    """Right-hand FVU axis from 0 with ticks every 0.25 (or 0.5 above 2)."""
    values = [c["cumulative FVU"].to_numpy(dtype=float) for c in curves.values()]
    finite = np.concatenate(values) if values else np.array([])
    finite = finite[np.isfinite(finite)]
    top = max(1.0, float(finite.max())) if finite.size else 1.0
    step = 0.25 if top <= 2 else 0.5
    ticks = np.arange(0, np.ceil(top / step) * step + step / 2, step)
    return dict(
        title="FVU",
        overlaying="y",
        side="right",
        range=[0, float(ticks[-1]) * 1.02],
        tickvals=[float(t) for t in ticks],
        ticktext=[f"{t:g}" for t in ticks],
        showgrid=False,
    )


ATLAS_COLOR_TITLES = {
    "modality_score": "modality score",
    "frequency": "frequency",
    "mean_pick_step": "typical pick step",
    "label": "label",
}


ATLAS_OTHER = "other"


def atlas_groups(labels: pd.Series, n: int = 9) -> pd.Series:
    """Labels grouped by their first word or category, the ``n`` most common
    groups kept and every other atom put in ``"other"``.

    Word labels list up to three words ("stars, shapes, pt"); grouping on the
    first puts them with the atoms labelled "stars" alone.
    """
    head = labels.astype(str).str.split(",").str[0].str.strip()
    head = head.where(head != "", ATLAS_OTHER)
    top = head[head != ATLAS_OTHER].value_counts().index[:n]
    return head.where(head.isin(top), ATLAS_OTHER)


TABLEAU10 = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)


def atlas_spec(color: str, groups: tuple[str, ...] = ()) -> dict:
    """Vega-Lite spec of the UMAP map of atoms, with a click selection.

    Vega-Lite (through Altair) rather than plotly because its tooltip renders
    a field named ``image`` as a picture, which gives the hover thumbnail;
    plotly's hover labels cannot show images. The spec carries no data: the
    page passes a table with columns atom, umap_x, umap_y, label,
    label_group, frequency, modality_score, mean_pick_step and image (a data
    URI, may be empty), which Streamlit sends as Arrow. The selection
    parameter is named ``atom``. Rendered as SVG so every point is a DOM
    element (the browser test hovers one). ``groups`` are the label groups
    (:func:`atlas_groups`) in legend order, for the ``label`` colouring.
    """
    title = ATLAS_COLOR_TITLES[color]
    if color == "label":
        # Named groups in distinct colours, "other" last and light grey.
        named = [g for g in groups if g != ATLAS_OTHER]
        encoding = alt.Color(
            "label_group:N",
            title=f"label group ({len(named)} largest)",
            scale=alt.Scale(
                domain=[*named, ATLAS_OTHER],
                range=[*TABLEAU10[: len(named)], "#d9d9d9"],
            ),
        )
    elif color == "frequency":
        encoding = alt.Color(
            "frequency:Q", title=title, scale=alt.Scale(type="log", scheme="viridis")
        )
    elif color == "modality_score":
        encoding = alt.Color(
            "modality_score:Q",
            title=title,
            scale=alt.Scale(scheme="redblue", domain=[0, 1], reverse=True),
        )
    else:
        encoding = alt.Color(
            f"{color}:Q", title=title, scale=alt.Scale(scheme="plasma")
        )
    select = alt.selection_point(name="atom", fields=["atom"], on="click")
    chart = (
        alt.Chart()
        .mark_circle(size=40)
        .encode(
            x=alt.X("umap_x:Q", axis=None, scale=alt.Scale(zero=False)),
            y=alt.Y("umap_y:Q", axis=None, scale=alt.Scale(zero=False)),
            color=encoding,
            opacity=alt.condition(select, alt.value(0.85), alt.value(0.3)),
            tooltip=[
                alt.Tooltip("atom:Q", title="atom"),
                alt.Tooltip("label:N", title="label"),
                alt.Tooltip("modality_score:Q", title="modality", format=".2f"),
                alt.Tooltip("frequency:Q", title="frequency", format=".4f"),
                alt.Tooltip("image:N"),
            ],
        )
        .add_params(select)
        .properties(height=620, usermeta={"embedOptions": {"renderer": "svg"}})
    )
    spec = chart.to_dict()
    # Altair puts a placeholder dataset in a chart without data; the page's
    # table takes its place.
    spec.pop("data", None)
    spec.pop("datasets", None)
    return spec
