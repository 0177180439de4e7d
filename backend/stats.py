"""Streaming statistics of SAE traces: per atom, per input and global.

Everything here reads the pursuit traces of an SAE, never dense codes:
``atoms_nk`` (int, atom picked at each step, ``-1`` after a stop),
``coefficients_nk`` (float, coefficient of each pick) and
``residual_norms_nk1`` (``|x - b|`` then the residual norm after each step),
plus the items table (one row per activation: ``modality``, ``pair_row``,
``split``, ``level0..2``, ``text``). The arrays may be memory maps; they are
read in chunks of rows, and every accumulator has a size that depends on
``n_atoms``, ``k`` and the number of labels, not on the number of inputs
(top-N tables, sparse counters compacted as they grow). A chunk becomes sparse
codes (row, atom, value), with a re-picked atom's coefficients summed, so a
million activations with 8192 atoms never need an ``n x n_atoms`` matrix.

Definitions
-----------
- fires: an input's summed code for the atom is non-zero.
- frequency: share of inputs on which the atom fires (also per modality).
- modality score: image share of the atom's coefficient mass,
  ``sum_image / (sum_image + sum_text)``; 1 = image only, 0 = text only.
- bridge score: over (caption, its own image) pairs where the atom fires on
  at least one of the two, the share where it fires on both.
- FVU at k: ``sum |r_k|^2 / sum |x - mean|^2`` over a modality, with the
  modality's own mean; the residual after ``k`` steps of the same trace (MP
  with fewer steps is a prefix of the pursuit; TopK with fewer atoms keeps
  the largest coefficients, also a prefix).
- hierarchy accuracy at step t for level L: each atom predicts the label most
  common among train inputs that picked it at step t; accuracy on test
  inputs (in-sample when the corpus has no test split). ``chance`` is the
  share of the most common train label among the same test inputs.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LEVELS = ("level0", "level1", "level2")
MODALITIES = ("image", "text")
_WORD = re.compile(r"[a-z][a-z'-]+")
_STOP = frozenset(
    "a an and are as at be by for from has in is it its of on or that the this "
    "to with without".split()
)


@dataclass(frozen=True)
class StatsConfig:
    """How the statistics are computed.

    Attributes
    ----------
    chunk_rows : int
        Rows read per chunk; memory grows with ``chunk_rows * k``.
    top_n : int
        Top inputs kept per atom and modality.
    n_bins : int
        Coefficient histogram bins per atom (quantiles come from it, so their
        error is at most one bin width).
    n_neighbors : int
        Nearest atoms (by cosine) kept per atom.
    transition_steps : int
        Transitions are counted from step 1 to step ``transition_steps + 1``
        (steps beyond it add little to a hierarchy view and much to the table).
    hierarchy_steps : int
        Steps for which hierarchy accuracy is measured (at most k); its
        counters grow with ``n * hierarchy_steps`` distinct keys at worst.
    only_share : float
        An alive atom is image-only when its modality score is at least this,
        text-only when at most ``1 - only_share``, shared otherwise.
    label_share : float
        A category label needs this share of the atom's labelled firings;
        below it the label falls back to caption words.
    template_share : float
        A word in the captions of more than this share of the items is a
        caption-template word and never part of a word label.
    umap_neighbors : int
        ``n_neighbors`` of the UMAP of the atoms.
    seed : int
        Seed of the UMAP layout and of any sampling.
    """

    chunk_rows: int = 32768
    top_n: int = 16
    n_bins: int = 128
    n_neighbors: int = 10
    transition_steps: int = 8
    hierarchy_steps: int = 16
    only_share: float = 0.95
    label_share: float = 0.5
    template_share: float = 0.25
    umap_neighbors: int = 15
    seed: int = 0


class Traces(NamedTuple):
    """Pursuit traces of ``n`` inputs (arrays or memory maps).

    Attributes
    ----------
    atoms : ndarray
        ``(n, k)`` int, pick order, ``-1`` after a stop.
    coefficients : ndarray
        ``(n, k)`` float32.
    residual_norms : ndarray
        ``(n, k + 1)`` float32, ``|x - b|`` then after each step.
    """

    atoms: np.ndarray
    coefficients: np.ndarray
    residual_norms: np.ndarray


@dataclass
class TraceStats:
    """Everything :func:`trace_stats` measures for one SAE.

    Attributes
    ----------
    atoms : DataFrame
        One row per atom: frequency, per-modality frequency, coefficient
        mean/max/quantiles, modality and bridge scores, mean pick step, dead.
    pick_steps : ndarray
        ``(n_atoms, k)`` int64: times the atom was picked at step t + 1.
    coef_hist, coef_hist_edges : ndarray
        ``(n_atoms, n_bins)`` int64 histogram of summed codes where the atom
        fires, and its ``(n_bins + 1,)`` edges.
    top_items : DataFrame
        atom, modality, rank, row, coefficient (top N per atom and modality).
    transitions : DataFrame
        step, atom_from, atom_to, count.
    fvu_by_k : DataFrame
        modality, k, fvu for k = 0..K.
    l0 : DataFrame
        modality, l0, count (distinct atoms per input).
    hierarchy : DataFrame
        modality, step, level, accuracy, chance, n, in_sample.
    label_counts : dict
        level -> (labels, ``(n_atoms, n_labels)`` int64 firing counts).
    fvu : ndarray
        ``(n,)`` float32 per-input FVU, ``|r_K|^2 / |x - mean|^2``.
    """

    atoms: pd.DataFrame
    pick_steps: np.ndarray
    coef_hist: np.ndarray
    coef_hist_edges: np.ndarray
    top_items: pd.DataFrame
    transitions: pd.DataFrame
    fvu_by_k: pd.DataFrame
    l0: pd.DataFrame
    hierarchy: pd.DataFrame
    label_counts: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    fvu: np.ndarray = field(repr=False)


class SparseCounter:
    """Counts of int64 keys, compacted with :func:`group_sum` as the buffer grows.

    The buffer is merged into the distinct keys once it holds more entries
    than ``compact_at`` and than the distinct keys themselves, so each entry
    is merged O(log) times and memory stays within about three times the
    number of distinct keys.
    """

    def __init__(self, compact_at: int = 4_000_000) -> None:
        self._keys: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self._distinct = 0
        self._compact_at = compact_at

    def add(self, keys: np.ndarray) -> None:
        """Count each key once per occurrence."""
        uniq, counts = group_sum(keys)
        self._keys.append(uniq)
        self._counts.append(counts.astype(np.int64))
        self._pending += uniq.size
        if self._pending > max(self._compact_at, self._distinct):
            self._compact()

    def _compact(self) -> None:
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.int64)
        counts = np.concatenate(self._counts) if self._counts else keys
        uniq, summed = group_sum(keys, counts)
        self._keys, self._counts = [uniq], [summed.astype(np.int64)]
        self._pending, self._distinct = 0, uniq.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct keys and their counts."""
        self._compact()
        return self._keys[0], self._counts[0]


class TopN:
    """The ``n`` largest values per atom with their rows, updated chunk by chunk.

    Ties are broken by the smaller row, so the result does not depend on
    chunking.
    """

    def __init__(self, n_atoms: int, n: int) -> None:
        self.n = n
        self.values_mn = np.full((n_atoms, n), -np.inf, np.float32)
        self.rows_mn = np.full((n_atoms, n), -1, np.int64)

    def update(self, atoms: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
        """Merge candidate ``(atom, row, value)`` triples into the tables."""
        held = self.rows_mn >= 0
        held_atoms = np.nonzero(held)[0]
        all_atoms = np.concatenate([held_atoms, atoms])
        all_rows = np.concatenate([self.rows_mn[held], rows])
        all_values = np.concatenate([self.values_mn[held], values.astype(np.float32)])
        order = np.lexsort((all_rows, -all_values, all_atoms))
        all_atoms, all_rows = all_atoms[order], all_rows[order]
        all_values = all_values[order]
        rank = _rank_within(all_atoms)
        keep = rank < self.n
        self.values_mn[all_atoms[keep], rank[keep]] = all_values[keep]
        self.rows_mn[all_atoms[keep], rank[keep]] = all_rows[keep]

    def table(self, modality: str) -> pd.DataFrame:
        """Rows ``atom, modality, rank, row, coefficient`` of the held entries."""
        atoms, ranks = np.nonzero(self.rows_mn >= 0)
        return pd.DataFrame(
            {
                "atom": atoms.astype(np.int32),
                "modality": modality,
                "rank": ranks.astype(np.int16),
                "row": self.rows_mn[atoms, ranks],
                "coefficient": self.values_mn[atoms, ranks],
            }
        )


def _rank_within(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (input sorted)."""
    n = sorted_groups.size
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]
    run_lengths = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, run_lengths)


class SparseCodes(NamedTuple):
    """Sparse codes of a chunk: one entry per (row, atom) with a non-zero code."""

    rows: np.ndarray
    atoms: np.ndarray
    values: np.ndarray


def sparse_codes(
    atoms_ck: np.ndarray, coefficients_ck: np.ndarray, first_row: int, n_atoms: int
) -> SparseCodes:
    """Sum re-picked atoms' coefficients per row; drop stops and zero codes."""
    rows_ck = np.broadcast_to(
        np.arange(first_row, first_row + atoms_ck.shape[0])[:, None], atoms_ck.shape
    )
    valid = atoms_ck >= 0
    keys = rows_ck[valid].astype(np.int64) * n_atoms + atoms_ck[valid]
    uniq, values = group_sum(keys, coefficients_ck[valid].astype(np.float64))
    nonzero = values != 0
    uniq, values = uniq[nonzero], values[nonzero]
    return SparseCodes(uniq // n_atoms, uniq % n_atoms, values.astype(np.float32))


def group_sum(
    keys: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``keys`` (sorted) and the sum of ``weights`` (or the count) of each.

    Sort-based: a stable argsort, then one ``reduceat``. (NumPy 2's plain
    ``np.unique`` takes a hash path that is two orders of magnitude slower on
    millions of int64 keys.)
    """
    keys = np.asarray(keys, np.int64)
    if keys.size == 0:
        empty = np.zeros(0, np.int64 if weights is None else np.float64)
        return keys, empty
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    if weights is None:
        sums = np.diff(np.r_[starts, keys.size])
    else:
        sums = np.add.reduceat(np.asarray(weights)[order], starts)
    return sorted_keys[starts], sums


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering ``0..n``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def centred_energy(
    acts_nd: np.ndarray, modality_n: np.ndarray, chunk_rows: int = 32768
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``|x - mean_modality|^2`` per row, and each modality's mean vector.

    Two streaming passes (means, then energies); float64 accumulation.
    """
    n, d = acts_nd.shape
    sums = {m: np.zeros(d) for m in MODALITIES}
    counts = dict.fromkeys(MODALITIES, 0)
    for start, stop in chunks(n, chunk_rows):
        block = np.asarray(acts_nd[start:stop], np.float64)
        for m in MODALITIES:
            mask = modality_n[start:stop] == m
            sums[m] += block[mask].sum(0)
            counts[m] += int(mask.sum())
    means = {m: sums[m] / max(counts[m], 1) for m in MODALITIES}
    energy_n = np.empty(n, np.float64)
    for start, stop in chunks(n, chunk_rows):
        block = np.asarray(acts_nd[start:stop], np.float64)
        mod = modality_n[start:stop]
        centre = np.where((mod == "image")[:, None], means["image"], means["text"])
        energy_n[start:stop] = ((block - centre) ** 2).sum(1)
    return energy_n, means


class _LabelCodes(NamedTuple):
    labels: np.ndarray  # distinct label strings, sorted
    codes_n: np.ndarray  # int32 label index per row, -1 where missing


def _encode_labels(items: pd.DataFrame) -> dict[str, _LabelCodes]:
    """Integer codes of each hierarchy level present in the items table."""
    out = {}
    for level in LEVELS:
        if level not in items:
            continue
        column = items[level].astype("string")
        present = column.notna() & (column != "")
        if not present.any():
            continue
        codes, labels = pd.factorize(column.where(present), sort=True)
        out[level] = _LabelCodes(
            np.asarray(labels, dtype=object), codes.astype(np.int32)
        )
    return out


class _Accumulators:
    """Per-atom and global running sums for one pass over the traces."""

    def __init__(
        self,
        n_atoms: int,
        k: int,
        config: StatsConfig,
        edges: np.ndarray,
        label_codes: dict[str, _LabelCodes],
    ) -> None:
        self.n_atoms, self.k, self.config, self.edges = n_atoms, k, config, edges
        self.fires = {m: np.zeros(n_atoms, np.int64) for m in MODALITIES}
        self.mass = {m: np.zeros(n_atoms) for m in MODALITIES}
        self.max_coef = np.full(n_atoms, -np.inf)
        self.hist = np.zeros(n_atoms * config.n_bins, np.int64)
        self.picks = np.zeros(n_atoms * k, np.int64)
        self.top = {m: TopN(n_atoms, config.top_n) for m in MODALITIES}
        self.bridge_both = np.zeros(n_atoms, np.int64)
        self.bridge_either = np.zeros(n_atoms, np.int64)
        self.rnorm_sq = {m: np.zeros(k + 1) for m in MODALITIES}
        self.energy = dict.fromkeys(MODALITIES, 0.0)
        self.l0 = {m: np.zeros(k + 1, np.int64) for m in MODALITIES}
        self.transitions = SparseCounter()
        self.label_codes = label_codes
        self.label_fires = {
            lv: np.zeros(n_atoms * len(lc.labels), np.int64)
            for lv, lc in label_codes.items()
            if n_atoms * len(lc.labels) <= 1 << 24
        }
        self.hierarchy = {lv: SparseCounter() for lv in label_codes}


def trace_stats(
    traces: Traces,
    items: pd.DataFrame,
    energy_n: np.ndarray,
    n_atoms: int,
    config: StatsConfig = StatsConfig(),
    desc: str = "statistics",
) -> TraceStats:
    """Stream over the traces once and measure everything per atom and per input.

    Parameters
    ----------
    traces
        ``Traces`` of all ``n`` inputs (arrays or memory maps).
    items
        ``n`` rows in matrix order with ``modality`` and ``pair_row``
        (``split`` and ``level0..2`` optional).
    energy_n
        ``(n,)`` ``|x - mean_modality|^2`` from :func:`centred_energy`.
    n_atoms
        Dictionary size.
    config
        See :class:`StatsConfig`.
    desc
        Progress bar label.
    """
    n, k = traces.atoms.shape
    if len(items) != n or energy_n.shape != (n,):
        raise ValueError(
            f"traces have {n} rows, items {len(items)}, "
            f"energy {energy_n.shape}; they must match"
        )
    modality_n = items["modality"].to_numpy()
    edges = _histogram_edges(traces, n_atoms, config)
    acc = _Accumulators(n_atoms, k, config, edges, _encode_labels(items))
    is_train_n = _train_mask(items)
    fvu_n = np.empty(n, np.float32)
    for start, stop in tqdm(
        list(chunks(n, config.chunk_rows)), desc=desc, unit="chunk"
    ):
        atoms_ck = np.asarray(traces.atoms[start:stop]).astype(np.int64)
        coefs_ck = np.asarray(traces.coefficients[start:stop], np.float64)
        norms_ck1 = np.asarray(traces.residual_norms[start:stop], np.float64)
        codes = sparse_codes(atoms_ck, coefs_ck, start, n_atoms)
        mod_c = modality_n[start:stop]
        _add_codes(acc, codes, modality_n)
        _add_picks(acc, atoms_ck)
        _add_residuals(acc, norms_ck1, energy_n[start:stop], mod_c)
        _add_l0(acc, codes, start, stop, mod_c)
        _add_transitions(acc, atoms_ck)
        _add_hierarchy(acc, atoms_ck, start, mod_c, is_train_n[start:stop])
        _add_bridge(acc, traces, items, start, stop)
        fvu_n[start:stop] = norms_ck1[:, -1] ** 2 / np.maximum(
            energy_n[start:stop], 1e-12
        )
    return _finish(acc, modality_n, is_train_n, fvu_n)


def _histogram_edges(traces: Traces, n_atoms: int, config: StatsConfig) -> np.ndarray:
    """Linear edges from 0 (or the smallest code) to the largest summed code.

    One extra pass over the traces; exact edges keep the bins (and so the
    quantiles) as fine as ``n_bins`` allows.
    """
    low, high = 0.0, 0.0
    for start, stop in chunks(len(traces.atoms), config.chunk_rows):
        atoms_ck = np.asarray(traces.atoms[start:stop]).astype(np.int64)
        coefs_ck = np.asarray(traces.coefficients[start:stop], np.float64)
        values = sparse_codes(atoms_ck, coefs_ck, start, n_atoms).values
        high = max(high, float(values.max(initial=0.0)))
        low = min(low, float(values.min(initial=0.0)))
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, config.n_bins + 1)


def _train_mask(items: pd.DataFrame) -> np.ndarray:
    if "split" not in items:
        return np.ones(len(items), bool)
    return (items["split"] != "test").to_numpy()


def _add_codes(acc: _Accumulators, codes: SparseCodes, modality_n: np.ndarray) -> None:
    """Firing counts, coefficient mass, max, histogram, top inputs, labels."""
    m = acc.n_atoms
    mod = modality_n[codes.rows]
    for name in MODALITIES:
        sel = mod == name
        atoms, rows, values = codes.atoms[sel], codes.rows[sel], codes.values[sel]
        acc.fires[name] += np.bincount(atoms, minlength=m)
        acc.mass[name] += np.bincount(atoms, weights=values, minlength=m)
        acc.top[name].update(atoms, rows, values)
    np.maximum.at(acc.max_coef, codes.atoms, codes.values)
    bins = np.clip(
        np.searchsorted(acc.edges, codes.values, side="right") - 1,
        0,
        acc.config.n_bins - 1,
    )
    acc.hist += np.bincount(
        codes.atoms * acc.config.n_bins + bins, minlength=acc.hist.size
    )
    for level, counts in acc.label_fires.items():
        label_n = acc.label_codes[level].codes_n[codes.rows]
        has = label_n >= 0
        n_labels = len(acc.label_codes[level].labels)
        counts += np.bincount(
            codes.atoms[has] * n_labels + label_n[has], minlength=counts.size
        )


def _add_picks(acc: _Accumulators, atoms_ck: np.ndarray) -> None:
    steps_ck = np.broadcast_to(np.arange(acc.k), atoms_ck.shape)
    valid = atoms_ck >= 0
    acc.picks += np.bincount(
        atoms_ck[valid] * acc.k + steps_ck[valid], minlength=acc.picks.size
    )


def _add_residuals(
    acc: _Accumulators, norms_ck1: np.ndarray, energy_c: np.ndarray, mod_c: np.ndarray
) -> None:
    for name in MODALITIES:
        sel = mod_c == name
        acc.rnorm_sq[name] += (norms_ck1[sel] ** 2).sum(0)
        acc.energy[name] += float(energy_c[sel].sum())


def _add_l0(
    acc: _Accumulators, codes: SparseCodes, start: int, stop: int, mod_c: np.ndarray
) -> None:
    l0_c = np.bincount(codes.rows - start, minlength=stop - start)
    for name in MODALITIES:
        acc.l0[name] += np.bincount(l0_c[mod_c == name], minlength=acc.k + 1)


def _add_transitions(acc: _Accumulators, atoms_ck: np.ndarray) -> None:
    m = acc.n_atoms
    for t in range(min(acc.config.transition_steps, acc.k - 1)):
        a, b = atoms_ck[:, t], atoms_ck[:, t + 1]
        both = (a >= 0) & (b >= 0)
        acc.transitions.add((t * m + a[both]) * m + b[both])


def _add_hierarchy(
    acc: _Accumulators,
    atoms_ck: np.ndarray,
    start: int,
    mod_c: np.ndarray,
    train_c: np.ndarray,
) -> None:
    """Count (split, modality, step, atom, label) for each level."""
    steps = min(acc.config.hierarchy_steps, acc.k)
    is_text_c = (mod_c == "text").astype(np.int64)
    stop = start + atoms_ck.shape[0]
    for level, lc in acc.label_codes.items():
        label_c = lc.codes_n[start:stop].astype(np.int64)
        n_labels = len(lc.labels)
        for t in range(steps):
            atom_c = atoms_ck[:, t]
            ok = (atom_c >= 0) & (label_c >= 0)
            key = ((t * acc.n_atoms + atom_c[ok]) * n_labels + label_c[ok]) * 4
            acc.hierarchy[level].add(key + is_text_c[ok] * 2 + train_c[ok])


def _add_bridge(
    acc: _Accumulators, traces: Traces, items: pd.DataFrame, start: int, stop: int
) -> None:
    """Per caption row in the chunk: atoms firing on it, on its image, on both."""
    block = items.iloc[start:stop]
    text = (block["modality"] == "text").to_numpy() & (
        block["pair_row"] >= 0
    ).to_numpy()
    if not text.any():
        return
    text_rows = np.arange(start, stop)[text]
    image_rows = block["pair_row"].to_numpy()[text].astype(np.int64)
    order = np.argsort(image_rows, kind="stable")
    local = np.arange(text_rows.size)
    m = acc.n_atoms
    sets = []
    for rows in (text_rows, image_rows[order]):
        atoms = np.asarray(traces.atoms[rows]).astype(np.int64)
        coefs = np.asarray(traces.coefficients[rows], np.float64)
        codes = sparse_codes(atoms, coefs, 0, m)
        sets.append(codes)
    text_keys = local[sets[0].rows] * m + sets[0].atoms
    image_keys = local[order][sets[1].rows] * m + sets[1].atoms
    # Each side's keys are distinct, so a key seen twice is on both sides.
    pooled = np.sort(np.concatenate([text_keys, image_keys]))
    both = np.bincount(pooled[1:][pooled[1:] == pooled[:-1]] % m, minlength=m)
    either = np.bincount(pooled % m, minlength=m) - both
    acc.bridge_both += both
    acc.bridge_either += either


def _finish(
    acc: _Accumulators,
    modality_n: np.ndarray,
    is_train_n: np.ndarray,
    fvu_n: np.ndarray,
) -> TraceStats:
    hist_mb = acc.hist.reshape(acc.n_atoms, acc.config.n_bins)
    picks_mk = acc.picks.reshape(acc.n_atoms, acc.k)
    return TraceStats(
        atoms=_atom_table(acc, modality_n, hist_mb, picks_mk),
        pick_steps=picks_mk,
        coef_hist=hist_mb,
        coef_hist_edges=acc.edges,
        top_items=pd.concat(
            [acc.top[m].table(m) for m in MODALITIES], ignore_index=True
        ),
        transitions=_transition_table(acc),
        fvu_by_k=_fvu_table(acc),
        l0=_l0_table(acc),
        hierarchy=_hierarchy_table(acc, modality_n, is_train_n),
        label_counts={
            lv: (
                acc.label_codes[lv].labels,
                counts.reshape(acc.n_atoms, len(acc.label_codes[lv].labels)),
            )
            for lv, counts in acc.label_fires.items()
        },
        fvu=fvu_n,
    )


def _atom_table(
    acc: _Accumulators,
    modality_n: np.ndarray,
    hist_mb: np.ndarray,
    picks_mk: np.ndarray,
) -> pd.DataFrame:
    n_image = max(int((modality_n == "image").sum()), 1)
    n_text = max(int((modality_n == "text").sum()), 1)
    fires = acc.fires["image"] + acc.fires["text"]
    mass = acc.mass["image"] + acc.mass["text"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_coef = np.where(fires > 0, mass / fires, np.nan)
        modality_score = np.where(mass != 0, acc.mass["image"] / mass, np.nan)
        bridge = np.where(
            acc.bridge_either > 0, acc.bridge_both / acc.bridge_either, np.nan
        )
        steps = np.arange(1, acc.k + 1)
        total_picks = picks_mk.sum(1)
        mean_step = np.where(
            total_picks > 0, (picks_mk * steps).sum(1) / total_picks, np.nan
        )
    quantiles = histogram_quantiles(hist_mb, acc.edges, (0.5, 0.9, 0.99))
    return pd.DataFrame(
        {
            "atom": np.arange(acc.n_atoms, dtype=np.int32),
            "frequency": fires / len(modality_n),
            "frequency_image": acc.fires["image"] / n_image,
            "frequency_text": acc.fires["text"] / n_text,
            "fires": fires,
            "mean_coefficient": mean_coef,
            "max_coefficient": np.where(fires > 0, acc.max_coef, np.nan),
            "q50": quantiles[:, 0],
            "q90": quantiles[:, 1],
            "q99": quantiles[:, 2],
            "modality_score": modality_score,
            "bridge_score": bridge,
            "mean_pick_step": mean_step,
            "dead": fires == 0,
        }
    )


def histogram_quantiles(
    hist_mb: np.ndarray, edges: np.ndarray, qs: tuple[float, ...]
) -> np.ndarray:
    """Quantiles per row of a histogram, linear within a bin; NaN for empty rows.

    Returns ``(n_rows, len(qs))``.
    """
    cum_mb = np.cumsum(hist_mb, axis=1)
    total_m = cum_mb[:, -1]
    out = np.full((hist_mb.shape[0], len(qs)), np.nan)
    for j, q in enumerate(qs):
        target_m = q * total_m
        bin_m = np.argmax(cum_mb >= target_m[:, None], axis=1)
        before_m = np.where(bin_m > 0, cum_mb[np.arange(len(bin_m)), bin_m - 1], 0)
        inside_m = hist_mb[np.arange(len(bin_m)), bin_m]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac_m = np.clip((target_m - before_m) / inside_m, 0, 1)
        value_m = edges[bin_m] + frac_m * (edges[bin_m + 1] - edges[bin_m])
        out[:, j] = np.where(total_m > 0, value_m, np.nan)
    return out


def _transition_table(acc: _Accumulators) -> pd.DataFrame:
    keys, counts = acc.transitions.result()
    m = acc.n_atoms
    return pd.DataFrame(
        {
            "step": (keys // (m * m) + 1).astype(np.int16),
            "atom_from": (keys // m % m).astype(np.int32),
            "atom_to": (keys % m).astype(np.int32),
            "count": counts,
        }
    )


def _fvu_table(acc: _Accumulators) -> pd.DataFrame:
    parts = []
    for name in MODALITIES:
        if acc.energy[name] <= 0:
            continue
        parts.append(
            pd.DataFrame(
                {
                    "modality": name,
                    "k": np.arange(acc.k + 1, dtype=np.int16),
                    "fvu": acc.rnorm_sq[name] / acc.energy[name],
                }
            )
        )
    both = sum(acc.rnorm_sq.values()) / max(sum(acc.energy.values()), 1e-12)
    parts.append(
        pd.DataFrame(
            {"modality": "all", "k": np.arange(acc.k + 1, dtype=np.int16), "fvu": both}
        )
    )
    return pd.concat(parts, ignore_index=True)


def _l0_table(acc: _Accumulators) -> pd.DataFrame:
    parts = [
        pd.DataFrame(
            {"modality": name, "l0": np.arange(acc.k + 1), "count": acc.l0[name]}
        )
        for name in MODALITIES
    ]
    table = pd.concat(parts, ignore_index=True)
    return table[table["count"] > 0].reset_index(drop=True)


def _hierarchy_table(
    acc: _Accumulators, modality_n: np.ndarray, is_train_n: np.ndarray
) -> pd.DataFrame:
    """Accuracy of "atom at step t -> its most common train label" per level."""
    in_sample = bool(is_train_n.all())
    steps = min(acc.config.hierarchy_steps, acc.k)
    frames = []
    for level, counter in acc.hierarchy.items():
        keys, counts = counter.result()
        n_labels = len(acc.label_codes[level].labels)
        train, text = keys % 2 == 1, keys // 2 % 2 == 1
        step_atom_label = keys // 4
        for modality in ("all", *MODALITIES):
            sel = (
                np.ones_like(text)
                if modality == "all"
                else text == (modality == "text")
            )
            test = sel if in_sample else sel & ~train
            table = _step_accuracy(
                group_sum(step_atom_label[sel & train], counts[sel & train]),
                group_sum(step_atom_label[test], counts[test]),
                n_labels,
                acc.n_atoms,
                steps,
            )
            frames.append(
                table.assign(modality=modality, level=level, in_sample=in_sample)
            )
    columns = ["modality", "step", "level", "accuracy", "chance", "n", "in_sample"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _first_per_group(
    groups: np.ndarray, labels: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each group, the label with the largest count (ties: smaller label).

    Inputs are sorted by group, then label (as :func:`group_sum` returns
    them), so one pass with ``reduceat`` replaces a three-key sort.
    """
    if groups.size == 0:
        return groups, labels
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    sizes = np.diff(np.r_[starts, groups.size])
    maxima = np.repeat(np.maximum.reduceat(counts, starts), sizes)
    best = np.flatnonzero(counts == maxima)
    group_of_best = np.repeat(np.arange(starts.size), sizes)[best]
    first = np.r_[True, group_of_best[1:] != group_of_best[:-1]]
    return groups[starts], labels[best[first]]


def _step_accuracy(
    fit: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_labels: int,
    n_atoms: int,
    steps: int,
) -> pd.DataFrame:
    """Per step: accuracy and chance of the train-fitted atom -> label map.

    ``fit`` and ``test`` are (keys, counts) with key ``(step * n_atoms + atom)
    * n_labels + label``. An atom never seen at that step in train predicts
    the step's most common train label (the chance predictor).
    """
    fit_keys, fit_counts = fit
    test_keys, test_counts = test
    fit_sa, fit_label = fit_keys // n_labels, fit_keys % n_labels
    pred_sa, pred_label = _first_per_group(fit_sa, fit_label, fit_counts)
    step_label, step_counts = group_sum(
        fit_sa // n_atoms * n_labels + fit_label, fit_counts
    )
    major_step, major_label = _first_per_group(
        step_label // n_labels, step_label % n_labels, step_counts
    )
    majority = np.full(steps, -1, np.int64)
    majority[major_step] = major_label

    test_sa, test_label = test_keys // n_labels, test_keys % n_labels
    test_step = test_sa // n_atoms
    guess = majority[test_step]
    if pred_sa.size:
        pos = np.clip(np.searchsorted(pred_sa, test_sa), 0, pred_sa.size - 1)
        found = pred_sa[pos] == test_sa
        guess = np.where(found, pred_label[pos], guess)
    weights = test_counts.astype(np.float64)
    n = np.bincount(test_step, weights=weights, minlength=steps)
    correct = np.bincount(
        test_step, weights=weights * (guess == test_label), minlength=steps
    )
    chance = np.bincount(
        test_step,
        weights=weights * (majority[test_step] == test_label),
        minlength=steps,
    )
    has_fit = majority >= 0
    present = (n > 0) | has_fit
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (n > 0) & has_fit
        accuracy = np.where(ok, correct / n, np.nan)
        chance_share = np.where(ok, chance / n, np.nan)
    return pd.DataFrame(
        {
            "step": np.arange(1, steps + 1)[present],
            "accuracy": accuracy[present],
            "chance": chance_share[present],
            "n": n[present].astype(np.int64),
        }
    )


def nearest_atoms(
    atoms_md: np.ndarray, n_neighbors: int, block: int = 1024
) -> pd.DataFrame:
    """The ``n_neighbors`` atoms of highest cosine to each atom (itself excluded).

    Works in row blocks, so memory is ``block x n_atoms``, not ``n_atoms^2``.
    """
    unit_md = atoms_md / np.maximum(
        np.linalg.norm(atoms_md, axis=1, keepdims=True), 1e-12
    )
    m = unit_md.shape[0]
    n_neighbors = min(n_neighbors, m - 1)
    frames = []
    for start, stop in chunks(m, block):
        cos_bm = unit_md[start:stop] @ unit_md.T
        cos_bm[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        best_bn = np.argpartition(-cos_bm, n_neighbors - 1, axis=1)[:, :n_neighbors]
        best_cos = np.take_along_axis(cos_bm, best_bn, axis=1)
        order = np.argsort(-best_cos, axis=1, kind="stable")
        frames.append(
            pd.DataFrame(
                {
                    "atom": np.repeat(np.arange(start, stop), n_neighbors).astype(
                        np.int32
                    ),
                    "rank": np.tile(np.arange(n_neighbors), stop - start).astype(
                        np.int16
                    ),
                    "neighbor": np.take_along_axis(best_bn, order, 1)
                    .ravel()
                    .astype(np.int32),
                    "cosine": np.take_along_axis(best_cos, order, 1)
                    .ravel()
                    .astype(np.float32),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def atom_map(atoms_md: np.ndarray, config: StatsConfig = StatsConfig()) -> np.ndarray:
    """A 2-D UMAP layout of the atoms (cosine metric), ``(n_atoms, 2)`` float32."""
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(config.umap_neighbors, len(atoms_md) - 1),
        metric="cosine",
        min_dist=0.1,
        random_state=config.seed,
        n_jobs=1,  # a seeded UMAP runs on one thread anyway
    )
    return reducer.fit_transform(atoms_md).astype(np.float32)


class AtomLabel(NamedTuple):
    """A suggested name for an atom and where it came from."""

    label: str
    source: str  # "level0" | "level1" | "level2" | "words" | "dead"
    share: float  # share of labelled firings with that label (words: NaN)


def suggest_labels(
    stats: TraceStats, items: pd.DataFrame, config: StatsConfig = StatsConfig()
) -> list[AtomLabel]:
    """Name every atom by the category it fires on most, else its caption words.

    Levels are tried fine to coarse; the first whose most common label holds
    at least ``config.label_share`` of the atom's labelled firings wins.
    Otherwise the label is the (up to) three words of its top items'
    captions (top images for an atom with modality score >= 0.5, else top
    texts) with the largest coefficient-weighted inverse document frequency
    over all captions, so that caption-template words ("picture", "category") give
    way to the words that set these captions apart; only words found in the
    captions of at least two different corpus items count, unless none is,
    and never a template word (in the captions of more than
    ``config.template_share`` of all items).
    """
    order = [lv for lv in reversed(LEVELS) if lv in stats.label_counts]
    words = _WordLabeller(items, config.template_share)
    tops_by_atom = {
        (int(atom), str(modality)): group
        for (atom, modality), group in stats.top_items.groupby(["atom", "modality"])
    }
    score_m = stats.atoms["modality_score"].to_numpy()
    out = []
    for atom, dead in enumerate(stats.atoms["dead"].to_numpy()):
        if dead:
            out.append(AtomLabel("(dead)", "dead", np.nan))
            continue
        # An image-heavy atom is named from its top images' captions, a
        # text-heavy one from its top texts; the other side if one is empty.
        sides = ("image", "text") if score_m[atom] >= 0.5 else ("text", "image")
        tops = next(
            (tops_by_atom[atom, m] for m in sides if (atom, m) in tops_by_atom), None
        )
        out.append(
            _label_one(atom, stats, order, config.label_share) or words.label(tops)
        )
    return out


class _WordLabeller:
    """Word labels from the captions of an atom's top items.

    A top text contributes its own words; a top image the words of all the
    captions of its corpus item. Each item's words are weighted by the
    atom's coefficient on it times the word's IDF over all captions.
    """

    def __init__(self, items: pd.DataFrame, template_share: float) -> None:
        n = len(items)
        self.has_text = "text" in items
        self.text_n = items["text"].astype(str).to_numpy() if self.has_text else None
        # Captions of one corpus item count once when a word's support is counted.
        self.owner_n = (
            items["corpus_id"].astype(str).to_numpy()
            if "corpus_id" in items
            else np.arange(n).astype(str)
        )
        self.modality_n = items["modality"].astype(str).to_numpy()
        is_text = self.modality_n == "text"
        self.captions_of: dict[str, list[str]] = {}
        self.idf: dict[str, float] = {}
        self.template: set[str] = set()
        if not self.has_text:
            return
        texts, owners = self.text_n[is_text], self.owner_n[is_text]
        for text, owner in zip(texts, owners, strict=True):
            self.captions_of.setdefault(owner, []).append(text)
        self.idf = _idf(self.text_n[is_text])
        self.template = _template_words(
            self.text_n[is_text], self.owner_n[is_text], template_share
        )

    def words_of(self, row: int) -> set[str]:
        if self.modality_n[row] == "text":
            texts = [self.text_n[row]]
        else:
            texts = self.captions_of.get(self.owner_n[row], [])
        found = {w for t in texts for w in _WORD.findall(t.lower())}
        return found - _STOP - self.template

    def label(self, tops: pd.DataFrame | None) -> AtomLabel:
        if tops is None or not self.has_text or tops.empty:
            return AtomLabel("(no text)", "words", np.nan)
        weights: Counter[str] = Counter()
        owners: dict[str, set[str]] = {}
        for row, coef in zip(tops["row"], tops["coefficient"], strict=True):
            for word in self.words_of(int(row)):
                weights[word] += float(coef) * self.idf.get(word, 1.0)
                owners.setdefault(word, set()).add(self.owner_n[row])
        ranked = [w for w, _ in weights.most_common()]
        # A word of one item only (a name, a file-name fragment) is not what
        # the atom is about; it names the atom only when no word recurs.
        chosen = [w for w in ranked if len(owners[w]) >= 2][:3] or ranked[:3]
        return AtomLabel(", ".join(chosen) or "(no words)", "words", np.nan)


def _template_words(texts: np.ndarray, owners: np.ndarray, share: float) -> set[str]:
    """Words in the captions of more than ``share`` of the corpus items: the
    caption templates' words ("picture", "category", "emoji")."""
    words_of: dict[str, set[str]] = {}
    for text, owner in zip(texts, owners, strict=True):
        words_of.setdefault(owner, set()).update(_WORD.findall(text.lower()))
    df: Counter[str] = Counter(w for words in words_of.values() for w in words)
    n = max(len(words_of), 1)
    return {word for word, count in df.items() if count > share * n}


def _idf(texts: np.ndarray) -> dict[str, float]:
    """``log(n / df)`` of every content word over ``texts``."""
    df: Counter[str] = Counter()
    for text in texts:
        df.update(set(_WORD.findall(text.lower())) - _STOP)
    n = max(len(texts), 1)
    return {word: float(np.log(n / count)) for word, count in df.items()}


def _label_one(
    atom: int, stats: TraceStats, order: list[str], min_share: float
) -> AtomLabel | None:
    for level in order:
        labels, counts_ml = stats.label_counts[level]
        row = counts_ml[atom]
        total = row.sum()
        if total == 0:
            continue
        best = int(row.argmax())
        share = float(row[best] / total)
        if share >= min_share:
            return AtomLabel(str(labels[best]), level, share)
    return None


def modality_split(atoms: pd.DataFrame, only_share: float) -> dict[str, int]:
    """Counts of alive atoms that are image-only, text-only and shared."""
    alive = atoms[~atoms["dead"]]
    score = alive["modality_score"]
    image_only = int((score >= only_share).sum())
    text_only = int((score <= 1 - only_share).sum())
    return {
        "image_only": image_only,
        "text_only": text_only,
        "shared": len(alive) - image_only - text_only,
        "dead": int(atoms["dead"].sum()),
    }


def coselected_cosine(
    traces: Traces, atoms_md: np.ndarray, max_rows: int = 4096, seed: int = 0
) -> dict[str, float]:
    """Mean |cosine| between atoms picked in the same trace, and between random
    alive atom pairs, on a sample of ``max_rows`` inputs.

    MP picks each next atom against a residual orthogonal to the last pick, so
    it can co-select correlated atoms a TopK encoder would not separate.
    """
    rng = np.random.default_rng(seed)
    n, k = traces.atoms.shape
    rows = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    atoms_sk = np.asarray(traces.atoms[rows]).astype(np.int64)
    unit_md = atoms_md / np.maximum(
        np.linalg.norm(atoms_md, axis=1, keepdims=True), 1e-12
    )
    first, second = np.triu_indices(k, 1)
    a, b = atoms_sk[:, first].ravel(), atoms_sk[:, second].ravel()
    ok = (a >= 0) & (b >= 0) & (a != b)
    co = np.abs((unit_md[a[ok]] * unit_md[b[ok]]).sum(1))
    alive = group_sum(atoms_sk[atoms_sk >= 0])[0]
    ra, rb = rng.choice(alive, size=(2, 20000)) if alive.size > 1 else (a[:0], b[:0])
    keep = ra != rb
    rand = np.abs((unit_md[ra[keep]] * unit_md[rb[keep]]).sum(1))
    return {
        "coselected_abs_cosine": float(co.mean()) if co.size else float("nan"),
        "random_abs_cosine": float(rand.mean()) if rand.size else float("nan"),
    }
