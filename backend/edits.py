"""Text-guided edits of image embeddings, read through the MP-SAE.

After CLIPInverter, an edit moves a real image's CLIP image embedding ``e``
(unit norm, ``(d,)``) towards a target description; here the latent being
edited *is* the embedding, and the edit is shown as a change of MP codes, a
change of retrieval and (with :mod:`backend.generator`) a picture. Three
methods, each a typed config:

:class:`TextDirection`
    ``e' = normalise(e + alpha * (T(target) - T(source)))``, where ``T``
    averages the normalised text embeddings of a phrase over prompt
    templates and normalises the mean. ``alpha = 0`` returns ``e``.

:class:`ClipGuided`
    Gradient descent (SGD with momentum) on ``e'``, parametrised as
    ``normalise(v)`` with ``v`` starting at ``e`` plus seeded jitter, of

        - target_weight    * cos(e', T(target))
        + keep_weight      * (1 - cos(e', e))
        + direction_weight * |P_perp (e' - e)|^2
        + picture_weight   * (1 - cos(I(G(e')), T(target)))

    where ``P_perp`` removes the component along ``T(target) - T(source)``:
    the change is pulled towards the target, kept small, and kept along the
    source-to-target direction. The optional last term is the CLIPInverter
    refinement: the generator ``G`` decodes ``e'`` into a picture that the
    frozen image tower ``I`` must read as the target. With zero target and
    picture weights and no jitter, ``e'`` stays ``e``.

:class:`AtomSteering`
    Work on the MP code of ``e`` itself. ``add``: the atom's coefficient grows
    by ``strength``; ``remove``: the atom's coefficient is scaled by
    ``1 - strength`` (``strength = 1`` removes it); ``force``: the pursuit runs
    normally up to step ``step``, is made to pick the atom there with
    coefficient ``strength``, and continues from the new residual. The edited
    embedding is ``normalise(decode(steered codes) + r)``, where ``r`` is the
    original residual, so what the SAE does not explain is kept unchanged.

Every method is deterministic for its seed. :func:`run_edit` applies a method
and measures its effects (:class:`EditResult`): codes before and after with
the atoms gained, lost and changed, both traces, similarity to the source and
target texts, and the nearest corpus images before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.sae import EncodeResult, codes_from_trace

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a picture of {}",
    "an emoji of {}",
    "a drawing of {}",
    "clip art of {}",
)


# --------------------------------------------------------------------------
# Method configs.


@dataclass(frozen=True)
class TextDirection:
    """Move along the text direction ``T(target) - T(source)``.

    Attributes
    ----------
    alpha:
        Step length along the (unnormalised) difference of the two mean text
        embeddings; 0 leaves the embedding unchanged, 1-3 is a typical edit.
    templates:
        Prompt templates ``T`` averages over (``{}`` is the phrase).
    seed:
        Recorded for symmetry; the method is deterministic.
    """

    alpha: float = 1.5
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    seed: int = 0
    name: str = field(default="text direction", init=False)


@dataclass(frozen=True)
class ClipGuided:
    """Optimise the embedding under a CLIP loss (see the module docstring).

    Attributes
    ----------
    target_weight:
        Pull of ``cos(e', T(target))``, or with ``contrastive`` of
        ``cos(e', T(target)) - cos(e', T(source))``.
    keep_weight:
        Pull back towards the original, ``1 - cos(e', e)``.
    direction_weight:
        Penalty on the part of the change orthogonal to the source-to-target
        direction, ``|P_perp (e' - e)|^2``.
    picture_weight:
        Weight of ``1 - cos(I(G(e')), T(target))`` through the generator and
        the frozen image tower; needs both (0 = off).
    contrastive:
        Pull towards the target *and away from the source*. Text embeddings
        sit apart from image embeddings (CLIP's modality gap); the plain pull
        drags the image embedding towards the text cluster, while the
        difference of the two cosines has its gradient along ``T(target) -
        T(source)``, in which the gap cancels.
    steps:
        Gradient steps (SGD with momentum 0.9).
    lr:
        Learning rate on ``v``. Plain SGD rather than Adam: Adam rescales
        even round-off gradients to full-size steps, so an edit with nothing
        pulling it would still wander.
    jitter:
        Norm of the seeded Gaussian start offset of ``v``.
    templates:
        Prompt templates for ``T``.
    seed:
        Seed of the jitter.
    """

    target_weight: float = 3.0
    keep_weight: float = 1.0
    direction_weight: float = 1.0
    picture_weight: float = 0.0
    contrastive: bool = True
    steps: int = 60
    lr: float = 0.1
    jitter: float = 0.01
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    seed: int = 0
    name: str = field(default="CLIP-guided", init=False)


@dataclass(frozen=True)
class AtomSteering:
    """Add, remove or force one atom in the MP code (see the module docstring).

    Attributes
    ----------
    atom:
        Dictionary row to steer.
    action:
        ``"add"``, ``"remove"`` or ``"force"``.
    strength:
        ``add``: coefficient added; ``remove``: fraction of the atom's
        coefficient taken away (0..1); ``force``: coefficient given at the
        forced step.
    step:
        ``force`` only: 1-based pursuit step at which the atom is picked.
    k:
        Pursuit steps (default: the SAE's ``k``).
    seed:
        Recorded for symmetry; the method is deterministic.
    """

    atom: int
    action: Literal["add", "remove", "force"] = "add"
    strength: float = 0.3
    step: int = 1
    k: int | None = None
    seed: int = 0
    name: str = field(default="atom steering", init=False)

    def __post_init__(self) -> None:
        if self.action not in ("add", "remove", "force"):
            raise ValueError(
                f"unknown steering action {self.action!r}; use add, remove or force"
            )
        if self.action == "remove" and not 0 <= self.strength <= 1:
            raise ValueError(
                f"remove takes a strength in [0, 1] (fraction removed), "
                f"got {self.strength}"
            )


EditMethod = TextDirection | ClipGuided | AtomSteering


# --------------------------------------------------------------------------
# Text embeddings.


def phrase_embedding(
    encoder, phrases: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES
) -> Tensor:
    """``T(phrase)`` for each phrase: ``(n, d)``, unit norm.

    Each phrase is put into every template, the normalised text embeddings
    are averaged, and the mean is normalised again.
    """
    if not templates:
        raise ValueError("give at least one prompt template, e.g. '{}'")
    texts = [t.format(p) for p in phrases for t in templates]
    emb_ntd = encoder.encode_texts(texts).float().view(len(phrases), len(templates), -1)
    return F.normalize(emb_ntd.mean(dim=1), dim=-1)


# --------------------------------------------------------------------------
# The methods, batched over rows: e_nd (n, d) unit norm.


def text_direction(
    e_nd: Tensor, source_nd: Tensor, target_nd: Tensor, alpha: float
) -> Tensor:
    """``normalise(e + alpha * (target - source))`` row by row, ``(n, d)``."""
    if alpha == 0:
        return e_nd.clone()
    return F.normalize(e_nd + alpha * (target_nd - source_nd), dim=-1)


def clip_guided(
    e_nd: Tensor,
    source_nd: Tensor,
    target_nd: Tensor,
    config: ClipGuided,
    generator=None,
    tower=None,
) -> Tensor:
    """Optimise ``e'`` row by row under the CLIP-guided loss; ``(n, d)``.

    ``generator`` and ``tower`` (:class:`backend.generator.ImageTower`) are
    needed only when ``config.picture_weight > 0``.
    """
    if config.picture_weight > 0 and (generator is None or tower is None):
        raise ValueError(
            "picture_weight > 0 needs a generator and the image tower; load them "
            "(backend.generator.load_generator, image_tower) or set it to 0"
        )
    direction_nd = F.normalize(target_nd - source_nd, dim=-1)
    seed_gen = torch.Generator().manual_seed(config.seed)
    jitter = torch.randn(e_nd.shape, generator=seed_gen) / e_nd.shape[1] ** 0.5
    v_nd = (e_nd + config.jitter * jitter).clone().requires_grad_(True)
    optimiser = torch.optim.SGD([v_nd], lr=config.lr, momentum=0.9)
    for _ in range(config.steps):
        loss = _clip_guided_loss(
            F.normalize(v_nd, dim=-1),
            e_nd,
            source_nd,
            target_nd,
            direction_nd,
            config,
            generator,
            tower,
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return F.normalize(v_nd.detach(), dim=-1)


def _clip_guided_loss(
    edited_nd, e_nd, source_nd, target_nd, direction_nd, config, generator, tower
):
    change_nd = edited_nd - e_nd
    along_n = (change_nd * direction_nd).sum(-1, keepdim=True)
    off_direction_n = (change_nd - along_n * direction_nd).pow(2).sum(-1)
    pull_n = (edited_nd * target_nd).sum(-1)
    if config.contrastive:
        pull_n = pull_n - (edited_nd * source_nd).sum(-1)
    loss_n = (
        -config.target_weight * pull_n
        + config.keep_weight * (1 - (edited_nd * e_nd).sum(-1))
        + config.direction_weight * off_direction_n
    )
    if config.picture_weight > 0:
        seen_nd = tower(generator(edited_nd))
        loss_n = loss_n + config.picture_weight * (1 - (seen_nd * target_nd).sum(-1))
    return loss_n.sum()


def steered_pursuit(
    sae,
    x_nd: Tensor,
    k: int | None = None,
    forced: dict[int, tuple[int, float]] | None = None,
    banned: set[int] | frozenset[int] = frozenset(),
) -> EncodeResult:
    """Matching pursuit that accepts forced picks and banned atoms.

    The plain pursuit of DESIGN.md over the SAE's public ``atoms_md`` and
    ``bias_d``, except that at each 1-based step ``t`` in ``forced`` the pick
    is ``forced[t] = (atom, coefficient)`` whatever the correlations say, and
    atoms in ``banned`` are never picked. After a forced step the pursuit
    continues from the new residual; the stop rule (no positive correlation
    with non-negative codes) applies to free steps only, and an input whose
    pursuit has stopped stays stopped. Without ``forced`` and ``banned`` it
    equals ``sae.encode(x_nd, k)``.

    Returns an :class:`EncodeResult` for the ``(n, d)`` inputs (all rows get
    the same forced picks).
    """
    forced = forced or {}
    atoms_md = sae.atoms_md.detach().float()
    bias_d = sae.bias_d.detach().float()
    k = int(k or sae.config.k)
    for step, (atom, _) in forced.items():
        _check_atom(atom, len(atoms_md))
        if not 1 <= step <= k:
            raise ValueError(f"forced step {step} is outside the pursuit (1..{k})")
    nonnegative = getattr(sae.config, "nonnegative", True)
    residual_nd = x_nd.float() - bias_d
    norms, picks, coefs = [residual_nd.norm(dim=-1)], [], []
    active_n = torch.ones(len(x_nd), dtype=torch.bool)
    ban_m = torch.zeros(len(atoms_md), dtype=torch.bool)
    ban_m[list(banned)] = True
    for step in range(1, k + 1):
        if step in forced:
            atom, coef = forced[step]
            pick_n = torch.full((len(x_nd),), atom)
            coef_n = torch.full((len(x_nd),), float(coef)) * active_n
        else:
            corr_nm = residual_nd @ atoms_md.T
            score_nm = (corr_nm if nonnegative else corr_nm.abs()).masked_fill(
                ban_m, -torch.inf
            )
            best_n, pick_n = score_nm.max(dim=-1)
            active_n = active_n & (best_n > 0)
            coef_n = corr_nm.gather(1, pick_n[:, None]).squeeze(1) * active_n
        residual_nd = residual_nd - coef_n[:, None] * atoms_md[pick_n]
        norms.append(residual_nd.norm(dim=-1))
        picks.append(torch.where(active_n, pick_n, -1))
        coefs.append(coef_n)
    atoms_nk = torch.stack(picks, dim=1)
    coefficients_nk = torch.stack(coefs, dim=1)
    codes_nm = codes_from_trace(atoms_nk, coefficients_nk, len(atoms_md))
    return EncodeResult(
        codes_nm, residual_nd, atoms_nk, coefficients_nk, torch.stack(norms, dim=1)
    )


def atom_steering(
    sae, e_nd: Tensor, config: AtomSteering
) -> tuple[Tensor, EncodeResult]:
    """Steer the MP code of each row; returns ``(edited_nd, steered)``.

    ``steered`` decomposes the unnormalised edited embedding ``decode(codes) +
    r`` in pick order and ends at the original residual ``r``: for ``add`` the
    original trace plus one pick of the atom with coefficient ``strength``;
    for ``remove`` the original trace with the atom's coefficients scaled by
    ``1 - strength`` (its picks become ``-1`` when ``strength = 1``); for
    ``force`` the trace of the forced pursuit. ``edited_nd`` is that
    embedding normalised.
    """
    _check_atom(config.atom, sae.atoms_md.shape[0])
    original = steered_pursuit(sae, e_nd, config.k)
    if config.action == "force":
        forced = {config.step: (config.atom, config.strength)}
        trace = steered_pursuit(sae, e_nd, config.k, forced=forced)
        atoms_nk, coefs_nk = trace.atoms, trace.coefficients
    else:
        atoms_nk, coefs_nk = _scale_atom(original, config)
    atoms_md = sae.atoms_md.detach().float()
    bias_d = sae.bias_d.detach().float()
    codes_nm = codes_from_trace(atoms_nk, coefs_nk, len(atoms_md))
    unnormalised_nd = codes_nm @ atoms_md + bias_d + original.residual
    steered = _replay(unnormalised_nd, atoms_md, bias_d, atoms_nk, coefs_nk)
    return F.normalize(unnormalised_nd, dim=-1), steered


def _scale_atom(original: EncodeResult, config: AtomSteering) -> tuple[Tensor, Tensor]:
    atoms_nk, coefs_nk = original.atoms, original.coefficients
    hit_nk = atoms_nk == config.atom
    if config.action == "remove":
        coefs_nk = torch.where(hit_nk, coefs_nk * (1 - config.strength), coefs_nk)
        if config.strength == 1:
            atoms_nk = torch.where(hit_nk, -1, atoms_nk)
            coefs_nk = torch.where(hit_nk, 0.0, coefs_nk)
        return atoms_nk, coefs_nk
    extra_atoms = torch.full_like(atoms_nk[:, :1], config.atom)
    extra_coefs = torch.full_like(coefs_nk[:, :1], config.strength)
    return torch.cat([atoms_nk, extra_atoms], 1), torch.cat([coefs_nk, extra_coefs], 1)


def _replay(x_nd, atoms_md, bias_d, atoms_nk, coefs_nk) -> EncodeResult:
    """The trace of given picks and coefficients on ``x_nd`` (norms, residual)."""
    residual_nd = x_nd - bias_d
    norms = [residual_nd.norm(dim=-1)]
    for t in range(atoms_nk.shape[1]):
        pick_n = atoms_nk[:, t]
        contribution_nd = coefs_nk[:, t, None] * atoms_md[pick_n.clamp(min=0)]
        residual_nd = residual_nd - contribution_nd * (pick_n >= 0)[:, None]
        norms.append(residual_nd.norm(dim=-1))
    codes_nm = codes_from_trace(atoms_nk, coefs_nk, len(atoms_md))
    return EncodeResult(
        codes_nm, residual_nd, atoms_nk, coefs_nk, torch.stack(norms, dim=1)
    )


def _check_atom(atom: int, n_atoms: int) -> None:
    if not 0 <= atom < n_atoms:
        raise ValueError(f"atom {atom} is outside the dictionary (0..{n_atoms - 1})")


# --------------------------------------------------------------------------
# Applying a method and measuring its effects.


class RetrievalIndex(NamedTuple):
    """Corpus images to retrieve: ``emb_nd`` (n, d) unit-norm image
    embeddings, their corpus ``ids`` and ``labels`` (finest hierarchy label,
    ``""`` when there is none)."""

    emb_nd: Tensor
    ids: list[str]
    labels: list[str]

    def nearest(
        self, query_d: Tensor, n: int = 5, exclude: str | None = None
    ) -> pd.DataFrame:
        """The ``n`` images with the highest cosine to ``query_d``.

        Columns rank (1-based), corpus_id, label, cosine. ``exclude`` drops
        one corpus id (the edited image itself).
        """
        scores_n = self.emb_nd @ F.normalize(query_d.float(), dim=-1)
        if exclude is not None:
            scores_n = scores_n.masked_fill(_id_mask(self.ids, exclude), -torch.inf)
        values, rows = scores_n.topk(min(n, len(self.ids)))
        return pd.DataFrame(
            {
                "rank": np.arange(1, len(rows) + 1),
                "corpus_id": [self.ids[r] for r in rows.tolist()],
                "label": [self.labels[r] for r in rows.tolist()],
                "cosine": values.numpy(),
            }
        )


def _id_mask(ids: list[str], exclude: str) -> Tensor:
    return torch.tensor([i == exclude for i in ids], dtype=torch.bool)


def finest_label(items: pd.DataFrame) -> pd.Series:
    """The finest hierarchy label of each row: level2, else level1, else level0."""
    label = items["level2"].where(items["level2"].notna(), items["level1"])
    label = label.where(label.notna(), items["level0"])
    return label.fillna("").astype(str)


def retrieval_index(items: pd.DataFrame, acts_nd: np.ndarray) -> RetrievalIndex:
    """The image rows of a cache's activation table as a :class:`RetrievalIndex`.

    ``items`` and ``acts_nd`` follow docs/cache.md (``activations/``).
    """
    images = items[items["modality"] == "image"]
    rows = images["row"].to_numpy()
    emb_nd = torch.from_numpy(np.asarray(acts_nd[rows], dtype=np.float32))
    return RetrievalIndex(emb_nd, list(images["corpus_id"]), list(finest_label(images)))


class EditResult(NamedTuple):
    """What one edit did.

    Attributes
    ----------
    method:
        The method config applied.
    original_d, edited_d:
        The embedding before and after, ``(d,)`` unit norm.
    before, after:
        MP encodings (one row) of the original and of the edited embedding,
        fresh pursuits with the same ``k``.
    steered:
        Atom steering only: the steered trace the edit was built from (see
        :func:`atom_steering`); None otherwise.
    changes:
        One row per atom whose code moved: atom, label, before, after, delta,
        status (``gained``, ``lost`` or ``changed``), by decreasing ``|delta|``.
    similarity:
        Rows ``source`` and ``target`` (with the text): cosine of the mean
        text embedding with the original and the edited embedding.
    neighbours_before, neighbours_after:
        Nearest corpus images (see :meth:`RetrievalIndex.nearest`), or None
        without an index.
    """

    method: EditMethod
    original_d: Tensor
    edited_d: Tensor
    before: EncodeResult
    after: EncodeResult
    steered: EncodeResult | None
    changes: pd.DataFrame
    similarity: pd.DataFrame
    neighbours_before: pd.DataFrame | None
    neighbours_after: pd.DataFrame | None


def apply_edit(
    method: EditMethod,
    e_nd: Tensor,
    *,
    sae=None,
    source_nd: Tensor | None = None,
    target_nd: Tensor | None = None,
    generator=None,
    tower=None,
) -> tuple[Tensor, EncodeResult | None]:
    """Apply ``method`` to ``(n, d)`` unit-norm embeddings.

    ``source_nd``/``target_nd`` are the mean text embeddings ``T(source)`` and
    ``T(target)`` (one row, or one per input) for the text methods; ``sae``
    is needed for atom steering. Returns ``(edited_nd, steered)``, where
    ``steered`` is None except for atom steering.
    """
    if isinstance(method, AtomSteering):
        if sae is None:
            raise ValueError("atom steering needs the SAE")
        return atom_steering(sae, e_nd, method)
    if source_nd is None or target_nd is None:
        raise ValueError(f"the {method.name} method needs source and target texts")
    if isinstance(method, TextDirection):
        return text_direction(e_nd, source_nd, target_nd, method.alpha), None
    if isinstance(method, ClipGuided):
        return clip_guided(e_nd, source_nd, target_nd, method, generator, tower), None
    raise TypeError(f"unknown edit method {method!r}")


def run_edit(
    method: EditMethod,
    e_d: Tensor,
    *,
    encoder,
    sae,
    source: str = "",
    target: str = "",
    index: RetrievalIndex | None = None,
    atom_labels: list[str] | None = None,
    generator=None,
    tower=None,
    k: int | None = None,
    exclude_id: str | None = None,
    n_neighbours: int = 5,
) -> EditResult:
    """Edit one image embedding ``e_d`` and measure the effects.

    Parameters
    ----------
    method:
        A :class:`TextDirection`, :class:`ClipGuided` or :class:`AtomSteering`.
    e_d:
        ``(d,)`` CLIP image embedding (normalised here).
    encoder:
        The model's encoder (text tower for ``T``).
    sae:
        The MP-SAE that reads both embeddings.
    source, target:
        Texts; optional for atom steering (then no similarity rows for the
        missing ones).
    index:
        Corpus images for the nearest-neighbour lists.
    atom_labels:
        Label of each atom (``stats/atoms.parquet``), for the change table.
    generator, tower:
        Only for :class:`ClipGuided` with ``picture_weight > 0``.
    k:
        Pursuit steps for the before/after codes (default: the SAE's ``k``).
    exclude_id:
        Corpus id of the edited image, left out of the neighbour lists.
    """
    e_nd = F.normalize(torch.as_tensor(e_d, dtype=torch.float32).reshape(1, -1), dim=-1)
    templates = getattr(method, "templates", DEFAULT_TEMPLATES)
    texts = {"source": source, "target": target}
    text_nd = _text_vectors(encoder, texts, templates)
    edited_nd, steered = apply_edit(
        method,
        e_nd,
        sae=sae,
        source_nd=text_nd.get("source"),
        target_nd=text_nd.get("target"),
        generator=generator,
        tower=tower,
    )
    k = k or (method.k if isinstance(method, AtomSteering) else None)
    before = steered_pursuit(sae, e_nd, k)
    after = steered_pursuit(sae, edited_nd, k)
    similarity = pd.DataFrame(
        [
            {
                "role": role,
                "text": texts[role].strip(),
                "before": float(e_nd[0] @ vec_1d[0]),
                "after": float(edited_nd[0] @ vec_1d[0]),
            }
            for role, vec_1d in text_nd.items()
        ],
        columns=["role", "text", "before", "after"],
    )
    neighbours = [None, None]
    if index is not None:
        neighbours = [
            index.nearest(x_nd[0], n_neighbours, exclude_id)
            for x_nd in (e_nd, edited_nd)
        ]
    return EditResult(
        method,
        e_nd[0],
        edited_nd[0],
        before,
        after,
        steered,
        code_changes(before.codes[0], after.codes[0], atom_labels),
        similarity,
        *neighbours,
    )


def _text_vectors(encoder, texts: dict[str, str], templates) -> dict[str, Tensor]:
    """``T(text)`` (one row) per role, leaving out blank texts."""
    texts = {role: text.strip() for role, text in texts.items() if text.strip()}
    if not texts:
        return {}
    vectors_nd = phrase_embedding(encoder, list(texts.values()), templates)
    return {role: vectors_nd[i : i + 1] for i, role in enumerate(texts)}


def code_changes(
    before_m: Tensor,
    after_m: Tensor,
    labels: list[str] | None = None,
    tol: float = 1e-4,
) -> pd.DataFrame:
    """Atoms whose coefficient moved by more than ``tol`` between two codes.

    ``gained``: zero before, non-zero after; ``lost``: the reverse;
    ``changed``: non-zero in both. Sorted by decreasing ``|delta|``.
    """
    delta_m = after_m - before_m
    atoms = torch.nonzero(delta_m.abs() > tol).flatten()
    b, a = before_m[atoms], after_m[atoms]
    status = np.where(b == 0, "gained", np.where(a == 0, "lost", "changed"))
    table = pd.DataFrame(
        {
            "atom": atoms.numpy(),
            "label": [labels[i] if labels else "" for i in atoms.tolist()],
            "before": b.numpy(),
            "after": a.numpy(),
            "delta": delta_m[atoms].numpy(),
            "status": status if len(atoms) else np.array([], dtype=str),
        }
    )
    order = table["delta"].abs().sort_values(ascending=False).index
    return table.loc[order].reset_index(drop=True)


def trace_table(
    result: EncodeResult, row: int = 0, labels: list[str] | None = None
) -> pd.DataFrame:
    """The pursuit trace of one row: step, atom, label, coefficient, residual_norm.

    Steps after a stop (atom ``-1``) are left out; ``residual_norm`` is the
    norm after the step.
    """
    atoms = result.atoms[row].tolist()
    coefs = result.coefficients[row].tolist()
    norms = result.residual_norms[row].tolist()
    rows = [
        {
            "step": t + 1,
            "atom": atom,
            "label": labels[atom] if labels else "",
            "coefficient": coefs[t],
            "residual_norm": norms[t + 1],
        }
        for t, atom in enumerate(atoms)
        if atom >= 0
    ]
    columns = ["step", "atom", "label", "coefficient", "residual_norm"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------
# Evaluation over held-out edit pairs.

DEFAULT_CATCH_ALL = ("Component", "unsorted", "special")


class EditPair(NamedTuple):
    """One held-out edit: move image ``corpus_id`` (activation ``row``) from
    its own category ``source`` towards the sibling category ``target``.
    ``source_text``/``target_text`` are the readable phrases given to ``T``;
    ``group`` is the image's corpus source (e.g. ``noto-emoji``), if known."""

    corpus_id: str
    row: int
    source: str
    target: str
    source_text: str
    target_text: str
    group: str = ""


def readable(label: str) -> str:
    """A category label as words: last path part, ``_``/``-`` as spaces."""
    return label.rsplit("/", 1)[-1].replace("_", " ").replace("-", " ").strip()


def edit_pairs(
    items: pd.DataFrame,
    n_pairs: int,
    seed: int = 0,
    catch_all: tuple[str, ...] = DEFAULT_CATCH_ALL,
) -> list[EditPair]:
    """Draw held-out edit pairs from the corpus hierarchy.

    The rule: every test-split image gets its finest label (level2, else
    level1; see :func:`finest_label`) as source; the candidate targets are the
    other labels at the same depth under the same parent (the coarser
    levels), over the whole corpus, leaving out emoji variant names (labels
    with a ``:``, such as skin tones) and top-level catch-alls. A seeded
    generator picks one target per image and then ``n_pairs`` images.
    Example: "dog face" (emoji subgroup animal-mammal) -> "cat face".
    """
    table = _labelled_images(items, catch_all)
    siblings = (
        table[~table["label"].str.contains(":")]
        .groupby(["parent", "depth"])["label"]
        .agg(lambda s: sorted(set(s)))
    )
    rng = np.random.default_rng(seed)
    pairs = []
    for rec in table[table["split"] == "test"].itertuples():
        options = [
            x for x in siblings.get((rec.parent, rec.depth), []) if x != rec.label
        ]
        if options:
            target = options[rng.integers(len(options))]
            pairs.append(
                EditPair(
                    rec.corpus_id,
                    int(rec.row),
                    rec.label,
                    target,
                    readable(rec.label),
                    readable(target),
                    rec.group,
                )
            )
    chosen = rng.permutation(len(pairs))[:n_pairs]
    return [pairs[i] for i in sorted(chosen)]


def _labelled_images(items: pd.DataFrame, catch_all: tuple[str, ...]) -> pd.DataFrame:
    images = items[(items["modality"] == "image") & ~items["level0"].isin(catch_all)]
    images = images[images["level1"].notna()]
    has2 = images["level2"].notna()
    return pd.DataFrame(
        {
            "corpus_id": images["corpus_id"],
            "row": images["row"],
            "split": images["split"],
            "label": finest_label(images),
            "parent": np.where(
                has2,
                images["level0"].astype(str) + "/" + images["level1"].astype(str),
                images["level0"].astype(str),
            ),
            "depth": np.where(has2, 2, 1),
            "group": images["source"].fillna("").astype(str)
            if "source" in images
            else "",
        }
    )


class EditEvalRow(NamedTuple):
    """Result of one method over the pairs.

    ``embedding_top``: share of pairs whose edited embedding has an image of
    the target category among its ``top`` nearest corpus images (the edited
    image itself left out); ``picture_top``: the same for the generator's
    picture of the edited embedding, encoded again; ``target_gain``: mean
    increase of the cosine to ``T(target)``; ``kept``: mean cosine between
    the original and edited embedding; ``by_group``: the two shares per
    corpus source (``{group: (embedding_top, picture_top)}``).
    """

    method: str
    embedding_top: float
    picture_top: float
    target_gain: float
    kept: float
    by_group: dict[str, tuple[float, float]] = {}


def evaluate_edits(
    pairs: list[EditPair],
    methods: dict[str, EditMethod | None],
    *,
    encoder,
    sae,
    index: RetrievalIndex,
    acts_nd: np.ndarray,
    generator=None,
    top: int = 5,
) -> list[EditEvalRow]:
    """Score each method on the pairs (see :class:`EditEvalRow`).

    ``methods`` maps a row name to a method config; ``None`` is the no-edit
    baseline (the original embedding; its picture is the reconstruction).
    :class:`AtomSteering` configs are used as templates: for each pair the
    steered atom is the one whose MP code grows most from ``T(source)`` to
    ``T(target)``. Without a generator ``picture_top`` is NaN.
    """
    e_nd = F.normalize(
        torch.from_numpy(np.asarray(acts_nd[[p.row for p in pairs]])), dim=-1
    )
    phrases = sorted({p.source_text for p in pairs} | {p.target_text for p in pairs})
    text_nd = dict(zip(phrases, phrase_embedding(encoder, phrases), strict=True))
    source_nd = torch.stack([text_nd[p.source_text] for p in pairs])
    target_nd = torch.stack([text_nd[p.target_text] for p in pairs])
    rows = []
    for name, method in methods.items():
        edited_nd = _edit_batch(method, e_nd, source_nd, target_nd, sae)
        hits_n = _hits(index, edited_nd, pairs, top)
        picture_hits_n = _picture_hits(generator, encoder, index, edited_nd, pairs, top)
        rows.append(
            EditEvalRow(
                name,
                float(hits_n.mean()),
                float(picture_hits_n.mean()),
                float(((edited_nd - e_nd) * target_nd).sum(-1).mean()),
                float((edited_nd * e_nd).sum(-1).mean()),
                _by_group(pairs, hits_n, picture_hits_n),
            )
        )
        logger.info("%s: %s", name, rows[-1])
    return rows


def _edit_batch(method, e_nd, source_nd, target_nd, sae) -> Tensor:
    if method is None:
        return e_nd
    if not isinstance(method, AtomSteering):
        return apply_edit(method, e_nd, source_nd=source_nd, target_nd=target_nd)[0]
    gain_nm = _text_codes(sae, target_nd) - _text_codes(sae, source_nd)
    atoms = gain_nm.argmax(dim=-1).tolist()
    return torch.cat(
        [
            atom_steering(sae, e_nd[i : i + 1], _with_atom(method, atom))[0]
            for i, atom in enumerate(atoms)
        ]
    )


def _text_codes(sae, x_nd: Tensor) -> Tensor:
    return steered_pursuit(sae, x_nd).codes


def _with_atom(method: AtomSteering, atom: int) -> AtomSteering:
    return AtomSteering(
        atom, method.action, method.strength, method.step, method.k, method.seed
    )


def _hits(index, edited_nd, pairs, top) -> np.ndarray:
    """1.0 where the target label is among the ``top`` nearest images."""
    return np.array(
        [
            pair.target in set(index.nearest(x_d, top, pair.corpus_id)["label"])
            for x_d, pair in zip(edited_nd, pairs, strict=True)
        ],
        dtype=float,
    )


def _picture_hits(generator, encoder, index, edited_nd, pairs, top) -> np.ndarray:
    if generator is None:
        return np.full(len(pairs), np.nan)
    from backend.generator import decode_pictures

    again_nd = encoder.encode_images(decode_pictures(generator, edited_nd))
    return _hits(index, again_nd, pairs, top)


def _by_group(pairs, hits_n, picture_hits_n) -> dict[str, tuple[float, float]]:
    groups = np.array([p.group for p in pairs])
    return {
        str(g): (
            float(hits_n[groups == g].mean()),
            float(picture_hits_n[groups == g].mean()),
        )
        for g in sorted(set(groups))
        if g
    }


# --------------------------------------------------------------------------
# Command line: python -m backend edits evaluate


def add_command(subparsers) -> None:
    """Add ``edits evaluate`` to the CLI."""
    parser = subparsers.add_parser(
        "edits",
        help="evaluate text-guided edits on held-out pairs",
        description="Text-guided edits of image embeddings read through the MP-SAE.",
    )
    sub = parser.add_subparsers(dest="edits_command", metavar="ACTION")
    evaluate = sub.add_parser(
        "evaluate",
        help="share of held-out edits that retrieve the target category",
        description="Draw held-out edit pairs from the corpus hierarchy (a "
        "test image's category towards a sibling category), apply each edit "
        "method, and report how often the edited embedding, and the "
        "generator's picture of it encoded again, has an image of the target "
        "category among its nearest corpus images. Embeddings of the corpus "
        "images are computed once per model and kept in cache/embeddings/.",
    )
    evaluate.add_argument("--model", default="mini", help="model spec (default mini)")
    evaluate.add_argument(
        "--corpus", default=None, help="corpus spec: default, or a folder of images"
    )
    evaluate.add_argument(
        "--sae",
        default=None,
        help="MP-SAE folder for the atom steering row (e.g. cache/<key>/sae/mp)",
    )
    evaluate.add_argument(
        "--cache-root",
        default=None,
        help="where cache/embeddings/ lives (default: the project's cache/)",
    )
    evaluate.add_argument(
        "--generator", default=None, help="generator folder (default assets/generator)"
    )
    evaluate.add_argument(
        "--no-pictures", action="store_true", help="skip the picture column"
    )
    evaluate.add_argument("--pairs", type=int, default=200, help="number of pairs")
    evaluate.add_argument("--top", type=int, default=5, help="retrieval depth")
    evaluate.add_argument("--seed", type=int, default=0, help="pair sampling seed")
    evaluate.add_argument(
        "--alpha", type=float, default=TextDirection.alpha, help="text direction"
    )
    evaluate.add_argument(
        "--steer-strength",
        type=float,
        default=AtomSteering.strength,
        help="coefficient added by atom steering",
    )
    evaluate.add_argument("--json", default=None, help="also write results here")
    evaluate.add_argument("--threads", type=int, default=2, help="torch threads")
    evaluate.set_defaults(func=_cmd_evaluate)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _cmd_evaluate(args) -> int:
    from backend.atomic import write_json
    from backend.corpus import load_corpus
    from backend.generator import (
        DEFAULT_DIR,
        corpus_embeddings,
        load_generator,
        model_fingerprint,
    )
    from backend.models import resolve_model

    torch.set_num_threads(args.threads)
    encoder = resolve_model(args.model)
    corpus = load_corpus(args.corpus)
    catch_all = tuple(corpus.meta.get("catch_all_level0", DEFAULT_CATCH_ALL))
    stored = corpus_embeddings(encoder, corpus, args.cache_root)
    items = corpus_items(corpus, stored.row_of)
    acts_nd = np.asarray(stored.acts_nd, dtype=np.float32)
    sae = _evaluation_sae(args, encoder)
    generator = None
    if not args.no_pictures:
        generator = load_generator(
            args.generator or DEFAULT_DIR, model_fingerprint(encoder)
        )
    pairs = edit_pairs(items, args.pairs, args.seed, catch_all)
    methods: dict[str, EditMethod | None] = {
        "no edit": None,
        f"text direction (alpha {args.alpha})": TextDirection(alpha=args.alpha),
        "CLIP-guided": ClipGuided(),
    }
    if sae is not None:
        methods[f"atom steering (add {args.steer_strength})"] = AtomSteering(
            0, "add", args.steer_strength
        )
    rows = evaluate_edits(
        pairs,
        methods,
        encoder=encoder,
        sae=sae,
        index=retrieval_index(items, acts_nd),
        acts_nd=acts_nd,
        generator=generator,
        top=args.top,
    )
    print(_format_rows(rows, pairs, args.top, corpus.name))
    if sae is None:
        print("atom steering: skipped (no MP-SAE for this model; pass --sae DIR)")
    if args.json:
        write_json(
            args.json,
            {
                "model": args.model,
                "corpus": corpus.name,
                "pairs": [p._asdict() for p in pairs],
                "top": args.top,
                "rows": [r._asdict() for r in rows],
            },
        )
    return 0


def corpus_items(corpus, row_of: dict[str, int]) -> pd.DataFrame:
    """A corpus table in the shape of a cache's image rows (``items.parquet``).

    ``row`` is each image's row in the embedding matrix ``row_of`` indexes.
    """
    table = corpus.table
    return pd.DataFrame(
        {
            "row": [row_of[i] for i in table["id"]],
            "modality": "image",
            "corpus_id": table["id"].to_numpy(),
            "split": table["split"].to_numpy(),
            "level0": table["level0"].to_numpy(),
            "level1": table["level1"].to_numpy(),
            "level2": table["level2"].to_numpy(),
            "source": table["source"].to_numpy() if "source" in table else "",
        }
    )


def _evaluation_sae(args, encoder):
    """The MP-SAE for the steering row: ``--sae DIR``, else None."""
    if not args.sae:
        return None
    from backend.sae import load_sae

    sae = load_sae(args.sae)
    if sae.d != encoder.card.embed_dim:
        raise ValueError(
            f"the SAE in {args.sae} reads width {sae.d}, the model gives "
            f"{encoder.card.embed_dim}; pass an SAE trained on this model"
        )
    return sae


def _spec(value) -> str | None:
    return value.get("spec") if isinstance(value, dict) else value


def _share(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.1%}"


def _format_rows(rows, pairs, top, corpus_name) -> str:
    lines = [
        f"{len(pairs)} held-out edit pairs from {corpus_name} "
        f"(e.g. {pairs[0].source_text!r} -> {pairs[0].target_text!r})"
        if pairs
        else "no edit pairs",
        f"{'method':<28} {'emb top' + str(top):>9} {'pic top' + str(top):>9} "
        f"{'target gain':>12} {'cos kept':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.method:<28} {r.embedding_top:>9.1%} {_share(r.picture_top):>9} "
            f"{r.target_gain:>12.3f} {r.kept:>9.3f}"
        )
        for group, (emb, pic) in r.by_group.items():
            n = sum(p.group == group for p in pairs)
            lines.append(f"{'  ' + group + f' ({n})':<28} {emb:>9.1%} {_share(pic):>9}")
    return "\n".join(lines)
