"""Small derived views of a cache that pages show: cheap, cached, testable.

Nothing here is heavy: samples of a few thousand rows, one pair of traces,
or a filter over the atom table. Functions take a :class:`CacheRef` and read
through :mod:`dashboard.loaders`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import live, loaders
from dashboard.loaders import CacheRef

SAMPLE_PAIRS = 20_000
GAP_SAMPLE = 1500


@st.cache_data(show_spinner="Sampling atom pairs ...", max_entries=8)
def pair_cosines(ref: CacheRef, n_pairs: int = SAMPLE_PAIRS) -> dict[str, np.ndarray]:
    """Cosines of atom pairs picked one after the other, and of random pairs.

    Consecutive pairs are sampled uniformly from the stored MP traces (step t
    and t + 1 of one input, both real picks); random pairs draw two atoms
    uniformly among the atoms that were ever picked (pairs of one atom with
    itself are dropped from both samples).
    """
    atoms_nk = loaders.traces(ref, "mp").atoms_nk
    atoms_md, _ = loaders.dictionary(ref, "mp")
    first, second = atoms_nk[:, :-1].ravel(), atoms_nk[:, 1:].ravel()
    valid = np.flatnonzero((first >= 0) & (second >= 0) & (first != second))
    rng = np.random.default_rng(0)
    chosen = rng.choice(valid, size=min(n_pairs, valid.size), replace=False)
    used = np.unique(atoms_nk[atoms_nk >= 0])
    rand_a = rng.choice(used, size=chosen.size)
    rand_b = rng.choice(used, size=chosen.size)
    keep = rand_a != rand_b

    def cosine(a, b):
        return np.einsum("nd,nd->n", atoms_md[a], atoms_md[b])

    return {
        "consecutive picks": cosine(first[chosen], second[chosen]),
        "random pairs": cosine(rand_a[keep], rand_b[keep]),
    }


def shared_atoms(ref: CacheRef, band: tuple[float, float], min_bridge: float):
    """Atoms with a modality score inside ``band`` and a high bridge score."""
    table = loaders.atoms(ref)
    keep = (
        table["modality_score"].between(*band)
        & (table["bridge_score"] >= min_bridge)
        & ~table["dead"].astype(bool)
    )
    return table[keep].sort_values("bridge_score", ascending=False)


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
