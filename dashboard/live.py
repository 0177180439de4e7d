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
    ``x_d`` (the input), ``energy`` (``|x - m|^2`` with ``m`` the mean
    activation of the input's modality, the cache's FVU denominator), and
    the SAE ``kind`` and input ``modality``.
    """

    atoms_k: np.ndarray
    coefficients_k: np.ndarray
    residual_norms_k1: np.ndarray
    recon_kd: np.ndarray
    x_d: np.ndarray
    energy: float
    kind: str
    modality: str

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
    atoms_md, bias_d = loaders.dictionary(ref, kind)
    picked_kd = atoms_md[np.maximum(atoms_k, 0)] * coefficients_k[:, None]
    picked_kd[atoms_k < 0] = 0.0
    recon_kd = bias_d + np.cumsum(picked_kd, axis=0)
    x_d = np.asarray(x_d, dtype=np.float32)
    # Norms from the reconstruction, so MP and TopK read alike.
    norms_k1 = np.linalg.norm(
        x_d[None, :] - np.vstack([bias_d[None, :], recon_kd]), axis=1
    )
    energy = float(np.sum((x_d - loaders.modality_means(ref)[modality]) ** 2))
    return Code(
        atoms_k, coefficients_k, norms_k1, recon_kd, x_d, energy, kind, modality
    )


def nearest_items(
    ref: CacheRef,
    queries_qd: np.ndarray,
    counts: dict[str, int],
    exclude: int | None = None,
) -> dict[str, list[pd.DataFrame]]:
    """For each query, the activations of each modality with top cosine.

    ``counts`` maps a modality to how many items to return for it. One pass
    over the activation matrix serves every query and modality, and the
    answer is cached by the queries' values (a rerun, or a k that leaves the
    viewed step unchanged, costs no search). Each result has columns row,
    cosine, corpus_id and text.
    """
    queries_qd = np.ascontiguousarray(queries_qd, dtype=np.float32)
    return _nearest_items(
        ref, queries_qd.tobytes(), queries_qd.shape, tuple(counts.items()), exclude
    )


@st.cache_data(show_spinner=False, max_entries=256)
def _nearest_items(
    ref: CacheRef,
    queries_bytes: bytes,
    shape: tuple[int, int],
    counts: tuple[tuple[str, int], ...],
    exclude: int | None,
) -> dict[str, list[pd.DataFrame]]:
    queries_qd = np.frombuffer(queries_bytes, dtype=np.float32).reshape(shape)
    norms_q = np.maximum(np.linalg.norm(queries_qd, axis=1), 1e-12)
    cosines_nq = (loaders.acts(ref) @ queries_qd.T) / norms_q
    if exclude is not None:
        cosines_nq[exclude] = -np.inf
    data = loaders.items(ref)
    corpus_ids, texts = data["corpus_id"].to_numpy(), data["text"].to_numpy()
    found = {}
    for modality, n in counts:
        rows = loaders.modality_rows(ref)[modality]
        found[modality] = []
        for cosines in cosines_nq[rows].T:
            best = np.argpartition(-cosines, min(n, len(rows) - 1))[:n]
            best = best[np.argsort(-cosines[best])]
            best = best[np.isfinite(cosines[best])]
            picked = rows[best]
            found[modality].append(
                pd.DataFrame(
                    {
                        "row": picked,
                        "cosine": cosines[best],
                        "corpus_id": corpus_ids[picked],
                        "text": texts[picked],
                    }
                )
            )
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
        names = loaders.item_names(ref).to_numpy()
        near = nearest_for(ref, code, exclude)
        steps["nearest to reconstruction"] = names[near.reconstruction_k]
        steps["nearest to residual"] = names[near.residual_k]
    return steps


class Nearest(NamedTuple):
    """Corpus rows nearest to the reconstruction and to the residual, per step."""

    reconstruction_k: np.ndarray
    residual_k: np.ndarray


def max_steps(ref: CacheRef) -> int:
    """The largest k the pages offer: 64, or twice the build's k if larger."""
    return max(64, 2 * int(loaders.traces(ref, "mp").atoms_nk.shape[1]))


@st.cache_data(show_spinner="Finding the nearest corpus items ...", max_entries=64)
def _nearest_full(
    ref: CacheRef, x_bytes: bytes, modality: str, kind: str, exclude: int | None
) -> tuple[np.ndarray, Nearest]:
    """Picks and nearest rows of one input's trace at ``max_steps`` steps."""
    x_d = np.frombuffer(x_bytes, dtype=np.float32).copy()
    full = code_of(ref, x_d, modality, kind, max_steps(ref))
    return full.atoms_k, nearest_along_trace(ref, full, exclude)


def nearest_for(ref: CacheRef, code: Code, exclude: int | None = None) -> Nearest:
    """Nearest rows per step of ``code``, from the input's longest trace.

    A pursuit with fewer steps or with a threshold is a prefix of the same
    input's pursuit at ``max_steps`` without one, so the nearest items of its
    steps are a prefix too. The full trace's answer is cached per input, so
    moving the k or threshold slider costs no search. When the picks differ
    from that prefix (a TopK code, or k above ``max_steps``) the search runs
    on ``code`` itself.
    """
    n = code.n_steps
    if code.kind == "mp" and n <= max_steps(ref):
        atoms_k, near = _nearest_full(
            ref,
            code.x_d.astype(np.float32).tobytes(),
            code.modality,
            code.kind,
            exclude,
        )
        if np.array_equal(atoms_k[:n], code.atoms_k[:n]):
            return Nearest(near.reconstruction_k[:n], near.residual_k[:n])
    return nearest_along_trace(ref, code, exclude)


def nearest_along_trace(
    ref: CacheRef, code: Code, exclude: int | None = None
) -> Nearest:
    """Nearest corpus activation (cosine) at every step, in one product.

    The reconstruction after step t is ``b + sum_{s<=t} c_s D[a_s]`` and the
    residual is ``x`` minus it, so their dot products with every activation
    follow from the products with the u distinct picked atoms, ``b`` and ``x``:
    one ``(n_items, u + 2)`` matrix product and a cumulative sum, instead of
    two ``(n_items, k)`` products. Activations have unit norm and each query's
    norm is a constant per step, so the largest dot product is the largest
    cosine. ``exclude`` leaves one row (the input itself) out.
    """
    n = code.n_steps
    atoms_md, bias_d = loaders.dictionary(ref, code.kind)
    picked_u, index_k = np.unique(code.atoms_k[:n], return_inverse=True)
    basis_bd = np.vstack([atoms_md[picked_u], bias_d, code.x_d])
    dots_nb = loaders.acts(ref) @ basis_bd.T
    terms_nk = dots_nb[:, index_k] * code.coefficients_k[:n]
    recon_nk = dots_nb[:, [-2]] + np.cumsum(terms_nk, axis=1)
    residual_nk = dots_nb[:, [-1]] - recon_nk
    if exclude is not None:
        recon_nk[exclude] = -np.inf
        residual_nk[exclude] = -np.inf
    return Nearest(recon_nk.argmax(axis=0), residual_nk.argmax(axis=0))


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
