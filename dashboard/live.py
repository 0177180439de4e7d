"""Live work the pages do on one input: embed, encode, and read a trace.

Everything here is small: one input (or a handful) through CLIP and the SAE,
and one (k x n_items) similarity product to name the corpus items nearest to
the running reconstruction. The cached model and SAE come from
:mod:`dashboard.loaders`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image

from dashboard import loaders
from dashboard.loaders import CacheRef


class Code(NamedTuple):
    """One input's code: its trace and what it reconstructs.

    ``atoms_k`` (-1 after a stop), ``coefficients_k``, ``residual_norms_k1``
    (``|x - b|`` then the norm after each step), ``recon_kd`` (the running
    reconstruction ``b + sum of the first t picks`` after each step t),
    ``x_d`` (the input) and ``energy`` (``|x - m|^2`` with ``m`` the mean
    activation of the input's modality, the cache's FVU denominator).
    """

    atoms_k: np.ndarray
    coefficients_k: np.ndarray
    residual_norms_k1: np.ndarray
    recon_kd: np.ndarray
    x_d: np.ndarray
    energy: float

    @property
    def n_steps(self) -> int:
        """Steps actually taken (the pursuit may stop before k)."""
        return int((self.atoms_k >= 0).sum())

    @property
    def fvu_k(self) -> np.ndarray:
        """FVU after each step: ``|r_t|^2 / |x - m|^2`` as in the cache."""
        return self.residual_norms_k1[1:] ** 2 / max(self.energy, 1e-12)


@st.cache_data(show_spinner=False, max_entries=256)
def embed_texts(ref: CacheRef, texts: list[str]) -> np.ndarray:
    """CLIP text embeddings (n, d) of the cache's model, L2-normalised.

    Cached by text, so a page rerun with the same text costs nothing.
    """
    model = loaders.encoder(loaders.model_spec(ref))
    with torch.no_grad():
        return model.encode_texts(list(texts)).float().cpu().numpy()


@st.cache_data(show_spinner=False, max_entries=32)
def embed_image(ref: CacheRef, image: Image.Image) -> np.ndarray:
    """CLIP image embedding (d,) of the cache's model, L2-normalised.

    Cached by the image's content, so reruns do not encode an upload again.
    """
    model = loaders.encoder(loaders.model_spec(ref))
    with torch.no_grad():
        return model.encode_images([image]).float().cpu().numpy()[0]


def encode(
    ref: CacheRef,
    x_nd: np.ndarray,
    kind: str = "mp",
    k: int | None = None,
    threshold: float | None = None,
):
    """Encode inputs with the cache's SAE of ``kind``; returns EncodeResult.

    The MP-SAE goes through the Gram-matrix encoder of :mod:`backend.fast`,
    the TopK SAE through its own ``encode`` (a TopK code has no threshold).
    """
    model = loaders.sae(ref, kind)
    x_nd = torch.as_tensor(np.asarray(x_nd, dtype=np.float32))
    with torch.no_grad():
        if kind == "mp":
            from backend.fast import fast_encode

            return fast_encode(model, x_nd, k=k, threshold=threshold)
        return model.encode(x_nd, k=k)


def code_of(
    ref: CacheRef,
    x_d: np.ndarray,
    modality: str,
    kind: str,
    k: int,
    threshold: float | None = None,
) -> Code:
    """Encode one input and rebuild its running reconstruction (a Code).

    ``modality`` ("image" or "text") picks the mean the FVU is measured from.
    """
    result = encode(ref, x_d[None, :], kind, k, threshold)
    atoms_k = result.atoms[0].cpu().numpy()
    coefficients_k = result.coefficients[0].cpu().numpy()
    model = loaders.sae(ref, kind)
    atoms_md = model.atoms_md.detach().cpu().numpy()
    bias_d = model.bias_d.detach().cpu().numpy()
    picked_kd = atoms_md[np.maximum(atoms_k, 0)] * coefficients_k[:, None]
    picked_kd[atoms_k < 0] = 0.0
    recon_kd = bias_d + np.cumsum(picked_kd, axis=0)
    x_d = np.asarray(x_d, dtype=np.float32)
    # Norms from the reconstruction, so MP and TopK read alike.
    norms_k1 = np.linalg.norm(
        x_d[None, :] - np.vstack([bias_d[None, :], recon_kd]), axis=1
    )
    energy = float(np.sum((x_d - loaders.modality_means(ref)[modality]) ** 2))
    return Code(atoms_k, coefficients_k, norms_k1, recon_kd, x_d, energy)


def nearest_rows(
    queries_qd: np.ndarray, acts_nd: np.ndarray, exclude: int | None = None
) -> np.ndarray:
    """Row of the corpus activation with the highest cosine to each query."""
    norms_q = np.linalg.norm(queries_qd, axis=1, keepdims=True)
    cosines_qn = (queries_qd / np.maximum(norms_q, 1e-12)) @ acts_nd.T
    if exclude is not None:
        cosines_qn[:, exclude] = -np.inf
    return cosines_qn.argmax(axis=1)


def nearest_items(
    ref: CacheRef,
    query_d: np.ndarray,
    modality: str,
    n: int = 4,
    exclude: int | None = None,
) -> pd.DataFrame:
    """The ``n`` corpus activations of ``modality`` closest (cosine) to a query.

    Returns rows with columns row, cosine, corpus_id and text.
    """
    data = loaders.items(ref)
    rows = loaders.modality_rows(ref)[modality]
    if exclude is not None:
        rows = rows[rows != exclude]
    acts_nd = loaders.acts(ref)
    query_d = query_d / max(float(np.linalg.norm(query_d)), 1e-12)
    cosines = acts_nd[rows] @ query_d
    best = np.argsort(-cosines)[:n]
    found = data.loc[rows[best], ["row", "corpus_id", "text"]].copy()
    found.insert(1, "cosine", cosines[best])
    return found


def step_table(
    ref: CacheRef, code: Code, with_neighbors: bool = True, exclude=None
) -> pd.DataFrame:
    """One row per step taken: atom, label, coefficient, residual, FVU.

    With ``with_neighbors``, also the corpus item nearest (cosine) to the
    running reconstruction and the one nearest to the residual after that
    step; ``exclude`` leaves the input's own row out of that search.
    """
    n = code.n_steps
    labels = loaders.atoms(ref)["label"]
    atoms_k = code.atoms_k[:n]
    steps = pd.DataFrame(
        {
            "step": np.arange(1, n + 1),
            "atom": atoms_k,
            "label": labels.reindex(atoms_k).fillna("").to_numpy(),
            "coefficient": code.coefficients_k[:n],
            "residual norm": code.residual_norms_k1[1 : n + 1],
            "cumulative FVU": code.fvu_k[:n],
        }
    )
    if with_neighbors and n:
        acts_nd = loaders.acts(ref)
        names = loaders.item_names(ref)
        recon_kd = code.recon_kd[:n]
        residual_kd = code.x_d[None, :] - recon_kd
        steps["nearest to reconstruction"] = names.iloc[
            nearest_rows(recon_kd, acts_nd, exclude)
        ].to_numpy()
        steps["nearest to residual"] = names.iloc[
            nearest_rows(residual_kd, acts_nd, exclude)
        ].to_numpy()
    return steps


def curve(code: Code) -> pd.DataFrame:
    """Residual norm and FVU from step 0 (nothing picked) to the last step."""
    n = code.n_steps
    norms = code.residual_norms_k1[: n + 1]
    return pd.DataFrame(
        {
            "step": np.arange(n + 1),
            "residual norm": norms,
            "cumulative FVU": norms**2 / max(code.energy, 1e-12),
        }
    )


def stored_code(ref: CacheRef, row: int, kind: str = "mp") -> pd.DataFrame:
    """The trace the build stored for one activation row, as a table."""
    trace = loaders.traces(ref, kind)
    atoms_k = trace.atoms_nk[row]
    keep = atoms_k >= 0
    labels = loaders.atoms(ref)["label"]
    return pd.DataFrame(
        {
            "step": np.arange(1, keep.sum() + 1),
            "atom": atoms_k[keep],
            "label": labels.reindex(atoms_k[keep]).fillna("").to_numpy(),
            "coefficient": trace.coefficients_nk[row][keep],
        }
    )


def summed_codes(table: pd.DataFrame) -> pd.Series:
    """Coefficient per atom with re-picks summed, from a step table."""
    return table.groupby("atom")["coefficient"].sum()
