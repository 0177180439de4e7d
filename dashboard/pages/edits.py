"""Edits: move an image's CLIP embedding towards a text and read the change.

Choose a corpus image or upload one, type a source and a target text, choose
an edit method (backend.edits) and see the pictures (original, the
generator's reconstruction, the edited picture), a verdict (is the target
text's label among the nearest corpus images after the edit), the atoms
gained, lost and changed, both pursuit traces, the similarity to both texts
and the nearest corpus images before and after. Atom steering starts on the
atom closest to the target text. The same seed gives the same result.
"""

from __future__ import annotations

import os
import re

import numpy as np
import streamlit as st
import torch
from PIL import Image

from backend import edits
from backend import generator as gen
from dashboard import live, loaders, widgets
from dashboard.loaders import CacheRef

SOURCES = ("From the corpus", "Upload an image")
METHODS = ("Text direction", "CLIP-guided", "Atom steering")
TRAIN_COMMAND = ".venv/bin/python -m backend generator train --out assets/generator"
# Folder of the generator; tests and other models point it elsewhere.
GENERATOR_DIR_ENV = "ATLAS_GENERATOR_DIR"


class Chosen:
    """The image to edit: embedding, picture, name and corpus id (or None)."""

    def __init__(self, e_d, image, name, corpus_id):
        self.e_d, self.image, self.name, self.corpus_id = e_d, image, name, corpus_id


@st.cache_resource(show_spinner="Indexing the corpus images ...", max_entries=4)
def retrieval_index(ref: CacheRef) -> edits.RetrievalIndex:
    """The cache's image activations as a retrieval index."""
    return edits.retrieval_index(loaders.items(ref), loaders.acts(ref))


@st.cache_resource(show_spinner="Loading the generator ...", max_entries=2)
def load_generator(directory: str, fingerprint: str | None):
    """The generator in ``directory``, checked against the model's fingerprint."""
    return gen.load_generator(directory, fingerprint)


@st.cache_resource(show_spinner="Preparing the image tower ...", max_entries=2)
def load_tower(spec: str):
    """The frozen differentiable image tower of the cache's model."""
    return gen.image_tower(loaders.encoder(spec))


def generator_dir() -> str:
    return os.environ.get(GENERATOR_DIR_ENV, str(gen.DEFAULT_DIR))


def generator_or_none(ref: CacheRef):
    """The generator for this cache's model, or None with a note saying why."""
    encoder = loaders.encoder(loaders.model_spec(ref))
    try:
        return load_generator(generator_dir(), gen.model_fingerprint(encoder))
    except (FileNotFoundError, ValueError) as error:
        st.info(f"No pictures: {error}")
        st.code(TRAIN_COMMAND, language="bash")
        return None


def atom_labels(ref: CacheRef) -> list[str]:
    labels = loaders.atoms(ref)["label"].fillna("").astype(str)
    return labels.reindex(range(int(labels.index.max()) + 1), fill_value="").tolist()


def choose_image(ref: CacheRef) -> Chosen | None:
    source = st.radio("Image", SOURCES, horizontal=True, key="edit_source")
    if source == SOURCES[0]:
        row = widgets.item_picker(ref, "edit_item", modality="image")
        if row is None:
            return None
        corpus_id = str(loaders.items(ref).at[row, "corpus_id"])
        image = loaders.thumbnail(ref, corpus_id, 128)
        name = loaders.item_names(ref)[row]
        return Chosen(loaders.acts(ref)[row], image, name, corpus_id)
    upload = st.file_uploader("Image", type=widgets.UPLOAD_TYPES, key="edit_upload")
    image = widgets.checked_upload(upload)
    if image is None:
        return None
    with st.spinner("Encoding the image with CLIP ..."):
        return Chosen(live.embed_image(ref, image), image, upload.name, None)


def method_controls(
    ref: CacheRef, has_generator: bool, target: str = ""
) -> edits.EditMethod:
    """The method radio and its knobs; returns the method config."""
    method = st.radio("Method", METHODS, horizontal=True, key="edit_method")
    seed = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="edit_seed"))
    if method == METHODS[0]:
        alpha = st.slider(
            "alpha",
            0.0,
            4.0,
            edits.TextDirection.alpha,
            0.1,
            key="edit_alpha",
            help="e' = normalise(e + alpha (T(target) - T(source)))",
        )
        return edits.TextDirection(alpha=alpha, seed=seed)
    if method == METHODS[1]:
        return clip_guided_controls(seed, has_generator)
    return steering_controls(ref, seed, target)


def clip_guided_controls(seed: int, has_generator: bool) -> edits.ClipGuided:
    defaults = edits.ClipGuided()
    cols = st.columns(4)
    target = cols[0].slider(
        "pull to target", 0.0, 6.0, defaults.target_weight, 0.1, key="edit_cg_target"
    )
    keep = cols[1].slider(
        "stay close", 0.0, 3.0, defaults.keep_weight, 0.1, key="edit_cg_keep"
    )
    direction = cols[2].slider(
        "along direction", 0.0, 10.0, defaults.direction_weight, 0.5, key="edit_cg_dir"
    )
    picture = cols[3].slider(
        "picture loss",
        0.0,
        3.0,
        0.0,
        0.1,
        key="edit_cg_picture",
        disabled=not has_generator,
        help="1 - cos(tower(G(e')), T(target)) through the generator",
    )
    left, right = st.columns([3, 1])
    steps = left.slider("steps", 0, 200, defaults.steps, 10, key="edit_cg_steps")
    contrastive = right.checkbox(
        "and away from the source",
        defaults.contrastive,
        key="edit_cg_contrastive",
        help="pull = cos(e', T(target)) - cos(e', T(source)): the modality gap "
        "cancels, so the image embedding is not dragged towards the texts",
    )
    return edits.ClipGuided(
        contrastive=contrastive,
        target_weight=target,
        keep_weight=keep,
        direction_weight=direction,
        picture_weight=picture if has_generator else 0.0,
        steps=steps,
        seed=seed,
    )


def steering_controls(ref: CacheRef, seed: int, target: str = "") -> edits.AtomSteering:
    n_atoms = int(loaders.sae(ref, "mp").atoms_md.shape[0])
    k = int(loaders.sae(ref, "mp").config.k)
    suggestion = prefill_atom(ref, target)
    cols = st.columns(4)
    atom = int(cols[0].number_input("atom", 0, n_atoms - 1, key="edit_atom"))
    st.session_state[ATOM_CHOICE] = atom
    action = cols[1].radio("action", ("add", "remove", "force"), key="edit_action")
    if action == "remove":
        strength = cols[2].slider(
            "fraction removed", 0.0, 1.0, 1.0, 0.05, key="edit_remove_strength"
        )
    else:
        strength = cols[2].slider(
            "coefficient", 0.0, 1.5, 0.3, 0.05, key="edit_strength"
        )
    step = int(
        cols[3].number_input(
            "force at step", 1, k, 1, key="edit_step", disabled=action != "force"
        )
    )
    if suggestion is not None:
        suggested, text, cosine = suggestion
        label = atom_labels(ref)[suggested] or "no label"
        if atom == suggested:
            st.caption(
                f"Atom {suggested} ({label}) was chosen from the target text: of "
                f"all dictionary atoms its direction is closest to the embedding "
                f"of '{text}' (cosine {cosine:.3f}). Change it to steer with "
                "another atom."
            )
        else:
            st.caption(
                f"The atom closest to the target text '{text}' is {suggested} "
                f"({label}, cosine {cosine:.3f})."
            )
    return edits.AtomSteering(atom, action, strength, step, seed=seed)


# Session keys of the steering atom: the suggestion for the current target
# text (set only when the target changes) and the last atom used, which
# survives the atom box being hidden by another method or page.
ATOM_SUGGESTION = "edit_atom_suggestion"
ATOM_CHOICE = "edit_atom_choice"


def prefill_atom(ref: CacheRef, target: str) -> tuple[int, str, float] | None:
    """Pre-fill the steering atom from the target text, once per new text.

    Returns ``(atom, text, cosine)`` of the suggestion for the current target
    text, or None without one. The atom box is set to the suggestion only
    when the target text (or the cache) changes, so a hand-picked atom stays.
    """
    text = " ".join(target.split())
    previous = st.session_state.get(ATOM_SUGGESTION)
    if text and (previous is None or previous[0] != (ref.key, text)):
        atom, cosine = atom_for_text(ref, text)
        previous = ((ref.key, text), atom, cosine)
        st.session_state[ATOM_SUGGESTION] = previous
        st.session_state[ATOM_CHOICE] = atom
        st.session_state["edit_atom"] = atom
    elif "edit_atom" not in st.session_state and ATOM_CHOICE in st.session_state:
        st.session_state["edit_atom"] = st.session_state[ATOM_CHOICE]
    if not text or previous is None or previous[0] != (ref.key, text):
        return None
    return previous[1], text, previous[2]


def atom_for_text(ref: CacheRef, text: str) -> tuple[int, float]:
    """The MP atom whose (unit) direction is closest to ``T(text)``, and the
    cosine between them."""
    text_d = edits.phrase_embedding(loaders.encoder(loaders.model_spec(ref)), [text])[0]
    atoms_md = loaders.sae(ref, "mp").atoms_md.detach().float()
    scores_m = atoms_md @ text_d.to(atoms_md.device)
    atom = int(scores_m.argmax())
    return atom, float(scores_m[atom])


def show_pictures(ref, chosen: Chosen, result: edits.EditResult, generator) -> None:
    """Original, reconstruction and edited picture side by side, then the
    similarity to both texts (and, for atom steering, the atom alone)."""
    cols = st.columns([1, 1, 1, 2])
    cols[0].image(_big(chosen.image), caption="original", width=160)
    if generator is None:
        cols[1].caption("reconstruction: no generator")
    else:
        both = torch.stack([result.original_d, result.edited_d])
        recon, edited = gen.decode_pictures(generator, both)
        cols[1].image(_big(recon), caption="reconstruction G(e)", width=160)
        cols[2].image(_big(edited), caption="edited G(e')", width=160)
    with cols[3]:
        st.markdown(
            f"cosine(original, edited) = "
            f"**{float(result.original_d @ result.edited_d):.3f}**"
        )
        sim = result.similarity.assign(change=lambda t: t["after"] - t["before"])
        st.dataframe(sim, hide_index=True, width="stretch")
        if generator is not None and isinstance(result.method, edits.AtomSteering):
            picture = gen.atom_picture(
                loaders.sae(ref, "mp"), generator, result.method.atom, 1.0
            )
            st.image(_big(picture), caption="the atom alone: G(b + atom)", width=96)
    if generator is not None:
        st.caption(generator_note())


def generator_note() -> str:
    """How far to trust the pictures, with the generator's held-out cosine."""
    note = "The generator keeps colour and rough shape only"
    try:
        test = gen.generator_meta(generator_dir()).get("test") or {}
    except (OSError, ValueError):
        test = {}
    if "cosine" in test and "cosine_baseline" in test:
        note += (
            f" (on held-out images, its picture encoded again has cosine "
            f"{test['cosine']:.3f} with the embedding it was made from; a "
            f"constant mean picture scores {test['cosine_baseline']:.3f})"
        )
    return (
        note + ", so pictures of different edits can look alike. The nearest "
        "corpus images below are the reliable read-out of the edit."
    )


def show_verdict(result: edits.EditResult, target: str, index) -> None:
    """One line: is the target text's label among the nearest images after?"""
    text = " ".join(target.split())
    after, before = result.neighbours_after, result.neighbours_before
    if not text or after is None or before is None:
        return
    rank_after = _label_rank(after, text)
    rank_before = _label_rank(before, text)
    if rank_before is None:
        was = "it was not among the nearest before"
    else:
        already = "already " if rank_after is not None else ""
        was = f"it was {already}the {_ordinal(rank_before)} before"
    if rank_after is not None:
        st.markdown(
            f"**Target reached:** '{text}' is the {_ordinal(rank_after)} nearest "
            f"corpus image after the edit ({was})."
        )
        return
    line = f"**Target not among the {len(after)} nearest corpus images** after the edit"
    if not any(_matches(label, text) for label in set(index.labels)):
        line += f": no corpus image has a label matching '{text}'"
    elif rank_before is not None:
        line += f" ({was})"
    st.markdown(line + ".")


def _label_rank(table, text: str) -> int | None:
    """The 1-based rank of the first neighbour whose label matches ``text``."""
    for rank, label in zip(table["rank"], table["label"], strict=True):
        if _matches(str(label), text):
            return int(rank)
    return None


def _matches(label: str, text: str) -> bool:
    """Case-insensitive: the label is the text, or holds it as whole words
    (also with the label's last path part read as words)."""
    pattern = re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)
    return any(pattern.search(form) for form in (label, edits.readable(label)))


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _big(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((160, 160), Image.NEAREST)


def show_changes(result: edits.EditResult) -> None:
    st.subheader("Code changes")
    changes = result.changes
    counts = changes["status"].value_counts()
    lost = int(counts.get("lost", 0))
    st.markdown(
        f"**{counts.get('gained', 0)} atoms gained, {lost} lost, "
        f"{counts.get('changed', 0)} changed** (fresh pursuits of the original "
        "and the edited embedding)"
    )
    n_code = int((result.before.codes[0] != 0).sum())
    if n_code and 2 * lost > n_code:
        st.markdown(
            f"The edit replaced {lost} of the {n_code} atoms of the code: the "
            "edited embedding is read by mostly different atoms."
        )
    st.dataframe(changes, hide_index=True, width="stretch")
    for rec in changes.head(5).itertuples():
        widgets.atom_link(int(rec.atom), rec.label, f"{rec.status} {rec.delta:+.3f}")


def show_traces(result: edits.EditResult, labels: list[str]) -> None:
    st.subheader("Traces")
    panes = [("before", result.before), ("after", result.after)]
    if result.steered is not None:
        panes.append(("steered (the edit)", result.steered))
    for col, (name, code) in zip(st.columns(len(panes)), panes, strict=True):
        col.markdown(f"**{name}**")
        col.dataframe(edits.trace_table(code, 0, labels), hide_index=True)


def show_neighbours(ref: CacheRef, result: edits.EditResult) -> None:
    st.subheader("Nearest corpus images")
    for title, table in (
        ("before", result.neighbours_before),
        ("after", result.neighbours_after),
    ):
        st.markdown(f"**{title}**")
        images = [loaders.thumbnail(ref, cid, 96) for cid in table["corpus_id"]]
        captions = [
            f"{lab} · {cos:.3f}"
            for lab, cos in zip(table["label"], table["cosine"], strict=True)
        ]
        widgets.image_grid(images, captions, columns=len(images) or 1)


def render() -> None:
    st.title("Edits")
    ref = widgets.current_cache()
    with widgets.guard("Choosing the image"):
        chosen = choose_image(ref)
    if chosen is None:
        st.info("Choose a corpus image or upload one.")
        return
    left, right = st.columns(2)
    source = left.text_input(
        "Source text", key="edit_source_text", placeholder="e.g. dog face"
    )
    target = right.text_input(
        "Target text", key="edit_target_text", placeholder="e.g. cat face"
    )
    with widgets.guard("Loading the generator"):
        generator = generator_or_none(ref)
    method = method_controls(ref, generator is not None, target)
    if not isinstance(method, edits.AtomSteering) and not (
        source.strip() and target.strip()
    ):
        st.info("Type a source and a target text.")
        return
    with widgets.guard("Editing"), st.spinner("Editing ..."):
        result = run(ref, chosen, method, source, target, generator)
        show_pictures(ref, chosen, result, generator)
        show_verdict(result, target, retrieval_index(ref))
        show_changes(result)
        show_traces(result, atom_labels(ref))
        show_neighbours(ref, result)


def run(ref, chosen, method, source, target, generator) -> edits.EditResult:
    spec = loaders.model_spec(ref)
    tower = None
    if getattr(method, "picture_weight", 0) > 0:
        tower = load_tower(spec)
    result = edits.run_edit(
        method,
        torch.as_tensor(np.asarray(chosen.e_d, dtype=np.float32)),
        encoder=loaders.encoder(spec),
        sae=loaders.sae(ref, "mp"),
        source=source,
        target=target,
        index=retrieval_index(ref),
        atom_labels=atom_labels(ref),
        generator=generator,
        tower=tower,
        exclude_id=chosen.corpus_id,
    )
    if isinstance(method, edits.AtomSteering) and not _in_code(result, method):
        st.info(
            f"Atom {method.atom} is not in this image's code; "
            "removing it changes nothing."
        )
    return result


def _in_code(result: edits.EditResult, method: edits.AtomSteering) -> bool:
    return method.action != "remove" or bool(result.before.codes[0, method.atom] > 0)


render()
