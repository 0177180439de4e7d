"""The synthetic feature hierarchy of the MP-SAE paper, and the recovery test.

Data whose true features form a two-level tree:

- ``n_parents`` parent features, random unit directions in ``R^d``;
- each parent has ``children_per_parent`` children; a child's direction is
  correlated with its parent's (cosine ``child_cosine``), its other part
  random and orthogonal to the parent;
- a sample has at most one active parent (probability ``p_parent``, chosen
  uniformly); an active parent activates at most one of its children
  (probability ``p_child``): children are mutually exclusive and occur only
  with their parent;
- coefficients are uniform in ``[coef_low, coef_high]``; Gaussian noise of
  standard deviation ``noise`` per coordinate is added.

Recovery is scored by matching each true feature to one atom (Hungarian
assignment on cosine similarity, ``scipy.optimize.linear_sum_assignment``)
and averaging the matched cosines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from backend.sae import MatchingPursuitSAE, SparseAutoencoder, TopKSAE
from backend.training import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HierarchyConfig:
    """Shape of the synthetic tree and of its samples.

    Attributes
    ----------
    d : int
        Ambient dimension.
    n_parents : int
        Number of parent features.
    children_per_parent : int
        Children of each parent (mutually exclusive).
    child_cosine : float
        Cosine between a child's direction and its parent's.
    p_parent : float
        Probability that a sample has an active parent.
    p_child : float
        Probability that an active parent has an active child.
    coef_low, coef_high : float
        Range of the (uniform) feature coefficients.
    noise : float
        Standard deviation of the Gaussian noise per coordinate.
    seed : int
        Seed of the feature directions.
    """

    d: int = 64
    n_parents: int = 12
    children_per_parent: int = 4
    child_cosine: float = 0.6
    p_parent: float = 0.95
    p_child: float = 0.8
    coef_low: float = 0.5
    coef_high: float = 1.5
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.child_cosine < 1.0:
            raise ValueError(f"child_cosine must be in [0, 1), got {self.child_cosine}")
        if self.n_parents < 1 or self.children_per_parent < 1:
            raise ValueError("n_parents and children_per_parent must be >= 1")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent)


@dataclass
class Hierarchy:
    """The true features of a tree.

    Attributes
    ----------
    features_fd : numpy.ndarray
        ``(n_features, d)`` unit directions: parents first, then the children
        of parent 0, of parent 1, ...
    parent_of_f : numpy.ndarray
        ``(n_features,)`` parent index of each feature (-1 for parents).
    config : HierarchyConfig
    """

    features_fd: np.ndarray
    parent_of_f: np.ndarray
    config: HierarchyConfig

    def children(self, parent: int) -> np.ndarray:
        return np.flatnonzero(self.parent_of_f == parent)


def make_hierarchy(config: HierarchyConfig) -> Hierarchy:
    """Draw the parent and child directions of ``config``."""
    rng = np.random.default_rng([config.seed, 11])
    parents_pd = _unit(rng.standard_normal((config.n_parents, config.d)))
    rows, parent_of = [parents_pd], [np.full(config.n_parents, -1)]
    sine = np.sqrt(1.0 - config.child_cosine**2)
    for p in range(config.n_parents):
        other_cd = rng.standard_normal((config.children_per_parent, config.d))
        other_cd -= np.outer(other_cd @ parents_pd[p], parents_pd[p])
        children_cd = config.child_cosine * parents_pd[p] + sine * _unit(other_cd)
        rows.append(_unit(children_cd))
        parent_of.append(np.full(config.children_per_parent, p))
    features_fd = np.concatenate(rows).astype(np.float32)
    return Hierarchy(features_fd, np.concatenate(parent_of), config)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@dataclass
class HierarchySample:
    """Samples with their true codes.

    Attributes
    ----------
    x_nd : numpy.ndarray
        ``(n, d)`` float32 samples.
    codes_nf : numpy.ndarray
        ``(n, n_features)`` float32 true coefficients (at most two non-zero).
    """

    x_nd: np.ndarray
    codes_nf: np.ndarray


def sample_hierarchy(hierarchy: Hierarchy, n: int, seed: int = 0) -> HierarchySample:
    """Draw ``n`` samples: at most one parent, at most one of its children."""
    cfg = hierarchy.config
    rng = np.random.default_rng([seed, 23])
    codes_nf = np.zeros((n, cfg.n_features), dtype=np.float32)
    rows = np.arange(n)
    has_parent = rng.random(n) < cfg.p_parent
    parent_n = rng.integers(cfg.n_parents, size=n)
    codes_nf[rows[has_parent], parent_n[has_parent]] = _coefs(
        rng, cfg, has_parent.sum()
    )
    has_child = has_parent & (rng.random(n) < cfg.p_child)
    which_n = rng.integers(cfg.children_per_parent, size=n)
    child_n = cfg.n_parents + parent_n * cfg.children_per_parent + which_n
    codes_nf[rows[has_child], child_n[has_child]] = _coefs(rng, cfg, has_child.sum())
    noise_nd = cfg.noise * rng.standard_normal((n, cfg.d))
    x_nd = (codes_nf @ hierarchy.features_fd + noise_nd).astype(np.float32)
    return HierarchySample(x_nd, codes_nf)


def _coefs(rng: np.random.Generator, cfg: HierarchyConfig, count: int) -> np.ndarray:
    return rng.uniform(cfg.coef_low, cfg.coef_high, size=count).astype(np.float32)


@dataclass
class Recovery:
    """How well a dictionary recovers the true features.

    Attributes
    ----------
    mean_cosine : float
        Mean cosine of the Hungarian matching of true features to atoms.
    parent_cosine, child_cosine : float
        The same mean over parents only and over children only.
    matched_f : numpy.ndarray
        ``(n_features,)`` atom matched to each true feature.
    """

    mean_cosine: float
    parent_cosine: float
    child_cosine: float
    matched_f: np.ndarray = field(repr=False)


def recovery(hierarchy: Hierarchy, atoms_md: np.ndarray | torch.Tensor) -> Recovery:
    """Match true features to atoms one-to-one, maximising the total cosine."""
    atoms_md = _unit(np.asarray(torch.as_tensor(atoms_md).detach().cpu(), np.float64))
    cosine_fm = hierarchy.features_fd.astype(np.float64) @ atoms_md.T
    rows, cols = linear_sum_assignment(cosine_fm, maximize=True)
    matched = cosine_fm[rows, cols]
    is_parent = hierarchy.parent_of_f[rows] < 0
    return Recovery(
        mean_cosine=float(matched.mean()),
        parent_cosine=float(matched[is_parent].mean()),
        child_cosine=float(matched[~is_parent].mean()),
        matched_f=cols,
    )


@dataclass
class Comparison:
    """MP-SAE against TopK SAE on one synthetic hierarchy."""

    mp: Recovery
    topk: Recovery
    mp_fvu: float
    topk_fvu: float
    n_atoms: int
    k: int


def compare_on_hierarchy(
    config: HierarchyConfig,
    train_config: TrainConfig,
    n_samples: int = 20000,
    k: int = 2,
    n_atoms: int | None = None,
) -> Comparison:
    """Train both SAE kinds alike on one hierarchy and score their recovery.

    Both get ``n_atoms`` atoms (default: the number of true features), ``k``
    active atoms and the same data, seed and training settings; FVU is
    measured on fresh samples.
    """
    hierarchy = make_hierarchy(config)
    data = sample_hierarchy(hierarchy, n_samples, seed=config.seed)
    held_out = torch.from_numpy(
        sample_hierarchy(hierarchy, 4000, seed=config.seed + 1).x_nd
    )
    n_atoms = n_atoms or config.n_features
    results = {}
    for cls in (MatchingPursuitSAE, TopKSAE):
        sae = cls(config.d, n_atoms, k, seed=train_config.seed)
        train(sae, data.x_nd, train_config)
        results[cls.kind] = (recovery(hierarchy, sae.atoms_md), _fvu(sae, held_out))
        logger.info("%s: recovery %.3f", cls.kind, results[cls.kind][0].mean_cosine)
    return Comparison(
        mp=results["mp"][0],
        topk=results["topk"][0],
        mp_fvu=results["mp"][1],
        topk_fvu=results["topk"][1],
        n_atoms=n_atoms,
        k=k,
    )


def _fvu(sae: SparseAutoencoder, x_nd: torch.Tensor) -> float:
    residual_nd = sae.encode(x_nd).residual
    return float(residual_nd.pow(2).sum() / (x_nd - x_nd.mean(0)).pow(2).sum())
