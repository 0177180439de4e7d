"""Atoms: find an atom (id, label, free text) and read everything about it.

The open atom lives in the URL (``?atom=123``), so every atom page can be
shared and every atom mentioned anywhere links to its page.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import live, loaders, plots, widgets
from dashboard.loaders import CacheRef

N_TOP = 12
N_LINKS = 8
N_MATCHES = 20
INPUT_KEY = "atom_input"
TAB_KEY = "atom_tab"
TEXT_ONLY = 0.05
IMAGE_ONLY = 0.95
WORD = re.compile(r"[0-9a-z]+")


def _sync_input_from_url(url_atom: int | None) -> None:
    if url_atom is not None and st.session_state.get(INPUT_KEY) != url_atom:
        st.session_state[INPUT_KEY] = url_atom


def _url_from_input() -> None:
    st.query_params["atom"] = str(st.session_state[INPUT_KEY])


def pick_by_id(ref: CacheRef, url_atom: int | None) -> None:
    n_atoms = len(loaders.atoms(ref))
    _sync_input_from_url(url_atom)
    st.number_input(
        "Atom id",
        min_value=0,
        max_value=n_atoms - 1,
        step=1,
        key=INPUT_KEY,
        on_change=_url_from_input,
        help=f"0 to {n_atoms - 1}; the URL follows (?atom=ID)",
    )


def _words(text: str) -> list[str]:
    """Lower-cased words of ``text``: runs of letters and digits."""
    return WORD.findall(text.lower())


def label_matches(atoms: pd.DataFrame, query: str) -> pd.DataFrame:
    """Atoms whose label holds every word of ``query`` as a whole word.

    Ranked: labels made of exactly the query's words first, then labels with
    a comma-separated part that is exactly the query, then the rest; the most
    frequent first within each rank.
    """
    wanted = _words(query)
    if not wanted:
        return atoms.iloc[:0]
    labels = atoms["label"].fillna("").astype(str)
    words = labels.map(_words)
    hits = words.map(lambda have: set(wanted) <= set(have))
    table = atoms[hits].copy()
    parts = labels[hits].map(lambda label: [_words(p) for p in label.split(",")])
    table["rank"] = np.where(
        words[hits].map(lambda have: set(have) == set(wanted)),
        0,
        np.where(parts.map(lambda ps: wanted in ps), 1, 2),
    )
    return table.sort_values(["rank", "frequency"], ascending=[True, False])


def search_by_label(ref: CacheRef) -> bool:
    """The label search; False when a query is typed and no label matches."""
    query = st.text_input(
        "Label words",
        key="label_query",
        placeholder="for example: dog",
        help="whole words of the label, any case; with several words, "
        "labels holding all of them",
    )
    if not query.strip():
        return True
    table = label_matches(loaders.atoms(ref), query)
    if table.empty:
        st.info(f"No atom label matches '{query.strip()}'.")
        return False
    shown = f"; the first {N_MATCHES} are listed" if len(table) > N_MATCHES else ""
    st.caption(
        f"{len(table)} atom{'s' if len(table) != 1 else ''} match{shown}: "
        "labels that are exactly the query first, then the most frequent."
    )
    for atom, label, freq in zip(
        table["atom"][:N_MATCHES],
        table["label"][:N_MATCHES],
        table["frequency"][:N_MATCHES],
        strict=True,
    ):
        widgets.atom_link(int(atom), str(label), f"frequency {freq:.4f}")
    return True


def search_by_text(ref: CacheRef) -> None:
    query = st.text_input(
        "Free text", key="text_query", placeholder="for example: a smiling cat"
    )
    if not query.strip():
        return
    with st.spinner("Encoding the text with CLIP and the MP-SAE ..."):
        x_d = live.embed_texts(ref, [query.strip()])[0]
        k = loaders.traces(ref, "mp").atoms_nk.shape[1]
        code = live.code_of(ref, x_d, "text", "mp", k)
    steps = live.step_table(ref, code, with_neighbors=False)
    st.caption(
        f"The MP-SAE picks {len(steps)} atoms for this text "
        f"(FVU {code.fvu_k[max(code.n_steps - 1, 0)]:.3f}), in pick order:"
    )
    for row in steps.itertuples():
        widgets.atom_link(
            int(row.atom),
            str(row.label),
            f"step {row.step}, coefficient {row.coefficient:.3f}",
        )


def show_header(info: pd.Series) -> None:
    st.header(f"Atom #{int(info['atom'])}: {info['label']}")
    cells = st.columns(6)
    cells[0].metric("frequency", f"{info['frequency']:.4f}")
    cells[1].metric("on images", f"{info['frequency_image']:.4f}")
    cells[2].metric("on texts", f"{info['frequency_text']:.4f}")
    cells[3].metric(
        "modality score",
        _fmt(info["modality_score"]),
        help="share of activation mass on images: 1 image only, 0 text only",
    )
    cells[4].metric(
        "bridge score",
        _fmt(info["bridge_score"]),
        help="how often it fires on both an image and its own caption",
    )
    cells[5].metric("mean pick step", _fmt(info["mean_pick_step"], ".1f"))
    if bool(info["dead"]):
        st.warning("This atom is dead: no input in the corpus picks it.")


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if pd.isna(value) else format(value, spec)


def _top(ref: CacheRef, atom: int, modality: str) -> pd.DataFrame:
    tops = loaders.top_items(ref)
    if (atom, modality) not in tops.index:
        return tops.iloc[:0]
    return tops.loc[[(atom, modality)]].head(N_TOP)


def modality_note(score: float) -> str | None:
    """One line for an atom that (almost) only fires on one modality."""
    if pd.isna(score):
        return None
    if score <= TEXT_ONLY:
        return (
            f"Text-only atom (modality score {score:.2f} <= {TEXT_ONLY}): "
            "nearly all its activation is on texts, so it has few or no top images."
        )
    if score >= IMAGE_ONLY:
        return (
            f"Image-only atom (modality score {score:.2f} >= {IMAGE_ONLY}): "
            "nearly all its activation is on images, so it has few or no top texts."
        )
    return None


def show_top_items(ref: CacheRef, atom: int, info: pd.Series) -> None:
    note = modality_note(info["modality_score"])
    if note:
        st.info(note)
    left, right = st.columns([3, 2])
    data = loaders.items(ref)
    with left:
        st.subheader("Top images")
        st.caption(
            "Under each image: this atom's coefficient on that image "
            "(its weight in the image's code), then the image's name."
        )
        with widgets.guard("Opening corpus images"):
            top = _top(ref, atom, "image")
            ids = data.loc[top["row"], "corpus_id"].tolist()
            images = [loaders.thumbnail_bytes(ref, cid) for cid in ids]
            names = loaders.short_names(ref).loc[top["row"]].tolist()
            captions = [
                f"{c:.2f} · {n}" for c, n in zip(top["coefficient"], names, strict=True)
            ]
            widgets.image_grid(images, captions, columns=4)
    with right:
        st.subheader("Top texts")
        st.caption("coefficient: this atom's weight in the text's code")
        top = _top(ref, atom, "text")
        texts = pd.DataFrame(
            {
                "coefficient": top["coefficient"].to_numpy(),
                "text": data.loc[top["row"], "text"].to_numpy(),
            }
        )
        st.dataframe(
            texts,
            hide_index=True,
            width="stretch",
            column_config={"coefficient": st.column_config.NumberColumn(format="%.3f")},
        )


def show_histograms(ref: CacheRef, atom: int, info: pd.Series) -> None:
    left, middle, right = st.columns(3)
    edges = loaders.array(ref, "coef_hist_edges")
    left.plotly_chart(
        plots.coefficient_histogram(loaders.array(ref, "coef_hist")[atom], edges),
        width="stretch",
    )
    middle.plotly_chart(
        plots.pick_step_histogram(loaders.array(ref, "pick_steps")[atom]),
        width="stretch",
    )
    right.plotly_chart(
        plots.modality_histogram(
            loaders.atoms(ref)["modality_score"],
            marked=None
            if pd.isna(info["modality_score"])
            else float(info["modality_score"]),
        ),
        width="stretch",
    )


def _link_list(title: str, atoms: np.ndarray, notes: list[str], ref: CacheRef) -> None:
    st.markdown(f"**{title}**")
    if len(atoms) == 0:
        st.caption("none")
    labels = loaders.atoms(ref)["label"]
    for atom, note in zip(atoms, notes, strict=True):
        widgets.atom_link(int(atom), str(labels.get(int(atom), "")), note)


def show_relations(ref: CacheRef, atom: int) -> None:
    left, middle, right = st.columns(3)
    near = loaders.neighbors(ref)
    near = near.loc[[atom]].head(N_LINKS) if atom in near.index else near.iloc[:0]
    with left:
        _link_list(
            "Nearest atoms (cosine)",
            near["neighbor"].to_numpy(),
            [f"{c:.2f}" for c in near["cosine"]],
            ref,
        )
    moves = loaders.transitions(ref)
    for column, series, title in (
        (middle, moves.before, "Usually picked just before"),
        (right, moves.after, "Usually picked just after"),
    ):
        counts = _partners(series, atom)
        with column:
            _link_list(title, counts.index.to_numpy(), [f"{n:,}×" for n in counts], ref)


def _partners(series: pd.Series, atom: int) -> pd.Series:
    """The most frequent partners of ``atom`` in a (atom, partner) series."""
    if atom not in series.index.get_level_values(0):
        return series.iloc[:0]
    partners = series.loc[atom]
    return partners.sort_values(ascending=False).head(N_LINKS)


def show_picture(ref: CacheRef, atom: int) -> None:
    """On request, the generator's picture of bias plus the scaled atom."""
    if not st.toggle(
        "Picture of this atom",
        key="atom_picture",
        help="decodes bias + scale x atom with the shipped generator",
    ):
        return
    from backend.generator import atom_picture

    scale = st.slider("scale", 0.1, 2.0, 1.0, 0.1, key="atom_picture_scale")
    try:
        model = loaders.generator(loaders.model_spec(ref))
    except (FileNotFoundError, ValueError) as error:
        st.info(f"No picture: {error}")
        return
    with st.spinner("Decoding ..."):
        st.image(atom_picture(loaders.sae(ref, "mp"), model, atom, scale), width=160)


def show_atom(ref: CacheRef, atom: int) -> None:
    table = loaders.atoms(ref)
    if atom not in table.index:
        st.error(
            f"There is no atom {atom}; this dictionary has atoms 0 to {len(table) - 1}."
        )
        return
    info = table.loc[atom]
    show_header(info)
    with widgets.guard("Showing the top items"):
        show_top_items(ref, atom, info)
    with widgets.guard("Drawing the histograms"):
        show_histograms(ref, atom, info)
    with widgets.guard("Listing related atoms"):
        show_relations(ref, atom)
    with widgets.guard("Drawing the atom's picture"):
        show_picture(ref, atom)


def default_atom(ref: CacheRef) -> int:
    """The most frequent atom, shown when the URL names none."""
    return int(loaders.atoms(ref)["frequency"].idxmax())


def render() -> None:
    st.title("Atoms")
    ref = widgets.current_cache()
    url_atom = widgets.query_int("atom")
    atom = default_atom(ref) if url_atom is None else url_atom
    # Write it back: the browser's address bar then always names the atom
    # shown, also after a link to this same page or with no parameter.
    st.query_params["atom"] = str(atom)
    by_id, by_label, by_text = st.tabs(
        ["By id", "By label", "By free text"], key=TAB_KEY, on_change="rerun"
    )
    with by_id:
        with widgets.guard("Choosing an atom"):
            pick_by_id(ref, atom)
    found = True
    with by_label:
        with widgets.guard("Searching labels"):
            found = search_by_label(ref)
    with by_text:
        with widgets.guard("Encoding the text"):
            search_by_text(ref)
    # An empty label search shows no atom: the one below would be unrelated.
    if not found and by_label.open:
        return
    show_atom(ref, atom)


with widgets.guard("Showing this page"):
    render()
