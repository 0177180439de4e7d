"""Fast matching-pursuit inference through the Gram matrix ``G = D D^T``.

After the first full correlation ``c = D (x - b)``, a pursuit step
``r -= c_j D_j`` changes the correlations by ``c -= c_j G_j``: one row of
``G`` (``n_atoms`` numbers) instead of a product with the whole dictionary
(``n_atoms * d``). The numba kernel does each step as one vectorised pass per
input that updates the correlations block by block and takes each block's
maximum while it is in cache; inputs run in parallel, in small groups whose
``G`` rows are read interleaved (the step is bound by memory traffic).

``G`` is stored as int16 fixed point (half the traffic of float32). Each
input carries a bound on how far its updated correlations may be from the
exact ``D r`` (quantisation and float32 rounding); every entry within twice
that bound of the largest is re-computed exactly from the residual, which the
kernel keeps, before a pick is made. So the picks are those of the exact
pursuit: they match the plain loop (:func:`backend.sae.plain_pursuit`) except
at float32 near-ties, and coefficients are exact dot products. The squared
residual norm follows from ``|r - c_j D_j|^2 = |r|^2 - c_j^2`` (unit-norm
atoms), kept in float64.

When ``G`` would exceed ``max_gram_bytes`` the encoder falls back to the plain
loop, in blocks of inputs, and logs a warning saying so (once per size).
Measured against the plain loop by ``benchmarks/bench_sae.py`` (B1).
"""

from __future__ import annotations

import logging
import math
import weakref

import numba
import numpy as np
import torch
from torch import Tensor

from backend.sae import (
    EncodeResult,
    SparseAutoencoder,
    check_threshold,
    codes_from_trace,
    plain_pursuit,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRAM_BYTES = 2 * 1024**3
DEFAULT_BATCH_SIZE = 4096

# sae -> (atoms version, data pointer, Gram matrix as a numpy array)
_GRAM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# (n_atoms, budget) pairs already warned about (the fallback is logged once).
_WARNED: set[tuple[int, int]] = set()


# The argmax runs on integer keys of the float bits: the compiler vectorises
# integer max reductions, not float ones (NaN rules). With sign-magnitude
# bits flipped for negatives, key order is float order; ``|c|`` is the bits
# without the sign. Maxima are kept per block of KEY_BLOCK entries, so the
# winner's index is found by scanning one block.
KEY_BLOCK = 256
GROUP = 4
STRIDE = 64

# G is stored as int16 fixed point, round(G * GRAM_SCALE): half the memory
# traffic of float32, an absolute error of at most 0.5 / GRAM_SCALE per entry.
GRAM_SCALE = 32767.0
# Error added to the correlation bound per unit of coefficient and step
# (quantisation plus float32 rounding of the update), and the float32
# rounding slack per step relative to |x - b|.
ERROR_PER_COEF = 0.5 / GRAM_SCALE + 2.0**-20
ROUNDING = 2.0**-18


@numba.njit(cache=True, inline="always")
def _key(bits, nonnegative):
    if nonnegative:
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits & 0x7FFFFFFF


@numba.njit(cache=True, inline="always")
def _block_max(bits_m, start, stop, nonnegative):
    best = np.int32(-2147483648)
    if nonnegative:
        for q in range(start, stop):
            key = bits_m[q] ^ ((bits_m[q] >> 31) & 0x7FFFFFFF)
            best = key if key > best else best
    else:
        for q in range(start, stop):
            key = bits_m[q] & 0x7FFFFFFF
            best = key if key > best else best
    return best


@numba.njit(cache=True, inline="always")
def _update(c_m, g_m, coef, start, stop):
    """``c -= coef * G_j`` over ``[start, stop)``, from the int16 row ``g_m``."""
    scaled = coef * np.float32(1.0 / GRAM_SCALE)
    for q in range(start, stop):
        c_m[q] -= scaled * np.float32(g_m[q])


@numba.njit(cache=True, inline="always")
def _block_maxima(c_m, nonnegative, block_max):
    """Fill ``block_max`` with the largest key of each block of ``c_m``."""
    bits_m = c_m.view(np.int32)
    m = c_m.shape[0]
    for b in range(m // KEY_BLOCK):
        start = b * KEY_BLOCK
        block_max[b] = _block_max(bits_m, start, start + KEY_BLOCK, nonnegative)
    if m % KEY_BLOCK:
        block_max[-1] = _block_max(bits_m, m - m % KEY_BLOCK, m, nonnegative)


@numba.njit(cache=True, inline="always")
def _score(value, nonnegative):
    return value if nonnegative else abs(value)


@numba.njit(cache=True, fastmath=True, inline="always")
def _dot(a_d, b_d):
    total = np.float32(0.0)
    for e in range(a_d.shape[0]):
        total += a_d[e] * b_d[e]
    return total


@numba.njit(cache=True, inline="always")
def _verified_pick(c_m, atoms_md, residual_d, error, nonnegative, block_max, scratch):
    """The pick of the exact pursuit, from approximate correlations.

    ``block_max`` holds the largest key of each block of ``c_m``. Every entry
    of ``c_m`` is within ``error`` of ``<r, D_q>``. Entries whose
    score is within ``2 * error`` of the largest could be the true best: their
    exact correlations are computed from the residual (and written back),
    and the best exact one wins (first index on ties). Returns the pick and
    its exact correlation.
    """
    # Key -> float: the key transform is its own inverse.
    top = block_max.max()
    scratch[0] = top ^ ((top >> 31) & 0x7FFFFFFF)
    threshold = _score(scratch.view(np.float32)[0], nonnegative) - 2.0 * error
    # Blocks below this key cannot hold a candidate (lowered a little so that
    # rounding the threshold to float32 never excludes one).
    scratch.view(np.float32)[0] = np.float32(threshold - abs(threshold) * 1e-6)
    floor = _key(scratch[0], nonnegative) if threshold >= 0 or nonnegative else -1
    pick = -1
    best = -np.inf
    for b in range(block_max.shape[0]):
        if block_max[b] < floor:
            continue
        for q in range(b * KEY_BLOCK, min((b + 1) * KEY_BLOCK, c_m.shape[0])):
            if _score(c_m[q], nonnegative) >= threshold:
                c_m[q] = _dot(residual_d, atoms_md[q])
                if _score(c_m[q], nonnegative) > best:
                    best = _score(c_m[q], nonnegative)
                    pick = q
    return pick, c_m[pick]


def _gram_pursuit(
    corr_nm,
    gram_qmm,
    centred_nd,
    atoms_md,
    stop_n,
    k,
    nonnegative,
    atoms_nk,
    coefs_nk,
    norms_nk1,
):
    """Pursue every input for at most ``k`` steps through the Gram matrix.

    ``corr_nm`` holds ``D (x - b)`` and is overwritten; ``gram_qmm`` is
    ``round(G * GRAM_SCALE)`` as int16; ``centred_nd`` holds ``x - b`` and
    becomes the residual. ``stop_n`` is the residual norm at or below which
    an input stops (``-1`` for no threshold). Fills ``atoms_nk`` (-1 after a
    stop), ``coefs_nk`` and ``norms_nk1``.

    Each input carries a bound on how far its updated correlations may be
    from the exact ones (half a quantisation step of ``G`` and float32
    rounding, per unit of coefficient); picks are verified against it, so
    the quantised ``G`` changes the cost, not the picks. Inputs go in groups
    of GROUP that step together: their ``G`` rows are read interleaved,
    STRIDE entries at a time, keeping several memory streams in flight (the
    update is bound by memory, not arithmetic).
    """
    n, m = corr_nm.shape
    n_blocks = (m + KEY_BLOCK - 1) // KEY_BLOCK
    for group in numba.prange((n + GROUP - 1) // GROUP):
        first = group * GROUP
        size = min(GROUP, n - first)
        block_max = np.empty((GROUP, n_blocks), dtype=np.int32)
        scratch = np.empty(1, dtype=np.int32)
        picks = np.zeros(GROUP, dtype=np.int64)
        coefs = np.zeros(GROUP, dtype=np.float32)
        live = np.zeros(GROUP, dtype=np.bool_)
        r2s = np.zeros(GROUP, dtype=np.float64)
        errors = np.zeros(GROUP, dtype=np.float64)
        slack = np.zeros(GROUP, dtype=np.float64)
        for s in range(size):
            i = first + s
            for v in centred_nd[i]:
                r2s[s] += np.float64(v) * v
            norms_nk1[i, 0] = math.sqrt(r2s[s])
            slack[s] = ROUNDING * norms_nk1[i, 0]
            errors[s] = slack[s]
            _block_maxima(corr_nm[i], nonnegative, block_max[s])
            picks[s], coefs[s] = _verified_pick(
                corr_nm[i],
                atoms_md,
                centred_nd[i],
                errors[s],
                nonnegative,
                block_max[s],
                scratch,
            )
            live[s] = True
        for t in range(k):
            n_live = 0
            for s in range(size):
                if live[s]:
                    live[s] = _record_step(
                        s,
                        first + s,
                        t,
                        k,
                        centred_nd,
                        atoms_md,
                        stop_n,
                        nonnegative,
                        picks,
                        coefs,
                        r2s,
                        atoms_nk,
                        coefs_nk,
                        norms_nk1,
                    )
                    n_live += live[s]
            if n_live == 0 or t == k - 1:
                break
            # One pass per block: update it from G, then take its maximum key
            # while it is in cache. Full blocks have constant bounds (which
            # the compiler vectorises); a last partial block goes apart.
            for b in range(m // KEY_BLOCK):
                block_start = b * KEY_BLOCK
                for start in range(block_start, block_start + KEY_BLOCK, STRIDE):
                    for s in range(size):
                        if live[s]:
                            _update(
                                corr_nm[first + s],
                                gram_qmm[picks[s]],
                                coefs[s],
                                start,
                                start + STRIDE,
                            )
                for s in range(size):
                    if live[s]:
                        block_max[s, b] = _block_max(
                            corr_nm[first + s].view(np.int32),
                            block_start,
                            block_start + KEY_BLOCK,
                            nonnegative,
                        )
            if m % KEY_BLOCK:
                tail = m - m % KEY_BLOCK
                for s in range(size):
                    if live[s]:
                        _update(
                            corr_nm[first + s], gram_qmm[picks[s]], coefs[s], tail, m
                        )
                        block_max[s, n_blocks - 1] = _block_max(
                            corr_nm[first + s].view(np.int32), tail, m, nonnegative
                        )
            for s in range(size):
                if live[s]:
                    errors[s] += abs(coefs[s]) * ERROR_PER_COEF + slack[s]
                    picks[s], coefs[s] = _verified_pick(
                        corr_nm[first + s],
                        atoms_md,
                        centred_nd[first + s],
                        errors[s],
                        nonnegative,
                        block_max[s],
                        scratch,
                    )


@numba.njit(cache=True, inline="always")
def _record_step(
    s,
    i,
    t,
    k,
    centred_nd,
    atoms_md,
    stop_n,
    nonnegative,
    picks,
    coefs,
    r2s,
    atoms_nk,
    coefs_nk,
    norms_nk1,
):
    """Take step ``t`` of input ``i`` (slot ``s``), or stop it; True if taken."""
    norm = math.sqrt(r2s[s])
    coef = coefs[s]
    if picks[s] < 0 or norm <= stop_n[i] or not _score(coef, nonnegative) > 0:
        for u in range(t, k):
            atoms_nk[i, u] = -1
            coefs_nk[i, u] = 0.0
            norms_nk1[i, u + 1] = norm
        return False
    atoms_nk[i, t] = picks[s]
    coefs_nk[i, t] = coef
    r2s[s] = max(r2s[s] - np.float64(coef) * coef, 0.0)
    norms_nk1[i, t + 1] = math.sqrt(r2s[s])
    for e in range(centred_nd.shape[1]):
        centred_nd[i, e] -= coef * atoms_md[picks[s], e]
    return True


_gram_pursuit_parallel = numba.njit(parallel=True, cache=True)(_gram_pursuit)
_gram_pursuit_serial = numba.njit(cache=True)(_gram_pursuit)

# Below this many element updates (n * k * n_atoms) a block runs on one thread:
# starting numba's threads costs more than it saves on small blocks, and far
# more on a busy machine.
PARALLEL_MIN_WORK = 1 << 23


@numba.njit(cache=True)
def add_rows(out_md, index_r, rows_rd):
    """``out_md[index_r[i]] += rows_rd[i]`` for every ``i``, in order."""
    for i in range(index_r.shape[0]):
        row = index_r[i]
        for e in range(rows_rd.shape[1]):
            out_md[row, e] += rows_rd[i, e]


def gram_bytes(n_atoms: int) -> int:
    """Bytes of the (int16) Gram matrix of ``n_atoms`` atoms."""
    return 2 * n_atoms * n_atoms


def gram_matrix(sae: SparseAutoencoder) -> np.ndarray:
    """``round(D D^T * GRAM_SCALE)`` as int16 numpy, cached until the atoms change."""
    atoms_md = sae.atoms_md
    key = (atoms_md._version, atoms_md.data_ptr())
    cached = _GRAM_CACHE.get(sae)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        atoms_md = atoms_md.detach().float().cpu()
        gram_mm = (atoms_md @ atoms_md.T).mul_(GRAM_SCALE).round_()
        gram_mm = gram_mm.clamp_(-GRAM_SCALE, GRAM_SCALE).to(torch.int16).numpy()
    _GRAM_CACHE[sae] = (key, gram_mm)
    return gram_mm


def _gram_fits(sae: SparseAutoencoder, max_gram_bytes: int) -> bool:
    """Whether ``G`` fits the budget; warns once per dictionary size if not."""
    needed = gram_bytes(sae.n_atoms)
    if needed <= max_gram_bytes:
        return True
    if (sae.n_atoms, max_gram_bytes) in _WARNED:
        return False
    _WARNED.add((sae.n_atoms, max_gram_bytes))
    logger.warning(
        "Gram matrix of %d atoms needs %.1f GiB (> max_gram_bytes %.1f GiB): "
        "falling back to the plain pursuit loop in blocks, which is much slower",
        sae.n_atoms,
        needed / 1024**3,
        max_gram_bytes / 1024**3,
    )
    return False


def _trace_block(
    sae: SparseAutoencoder, x_nd: Tensor, k: int, threshold: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gram pursuit of one block: ``atoms_nk``, ``coefs_nk``, ``norms_nk1``,
    ``residual_nd``."""
    with torch.no_grad():
        atoms_md = sae.atoms_md.detach().float().cpu().contiguous()
        centred_nd = (x_nd.float() - sae.bias_d.detach().float().cpu()).contiguous()
        corr_nm = (centred_nd @ atoms_md.T).numpy()
    n = x_nd.shape[0]
    if threshold is None:
        stop_n = np.full(n, -1.0, dtype=np.float32)
    else:
        stop_n = threshold * centred_nd.norm(dim=-1).numpy()
    atoms_nk = np.empty((n, k), dtype=np.int64)
    coefs_nk = np.empty((n, k), dtype=np.float32)
    norms_nk1 = np.empty((n, k + 1), dtype=np.float32)
    residual_nd = centred_nd.numpy()
    work = n * k * sae.n_atoms
    kernel = (
        _gram_pursuit_parallel if work >= PARALLEL_MIN_WORK else _gram_pursuit_serial
    )
    kernel(
        corr_nm,
        gram_matrix(sae),
        residual_nd,
        atoms_md.numpy(),
        stop_n,
        k,
        sae.config.nonnegative,
        atoms_nk,
        coefs_nk,
        norms_nk1,
    )
    return (
        torch.from_numpy(atoms_nk),
        torch.from_numpy(coefs_nk),
        torch.from_numpy(norms_nk1),
        torch.from_numpy(residual_nd),
    )


def _concat(parts: list[EncodeResult], dense: bool) -> EncodeResult:
    if len(parts) == 1:
        return parts[0]
    fields = []
    for name in EncodeResult._fields:
        if name == "codes" and not dense:
            fields.append(None)
        else:
            fields.append(torch.cat([getattr(p, name) for p in parts]))
    return EncodeResult(*fields)


def fast_encode(
    sae: SparseAutoencoder,
    x_nd: Tensor | np.ndarray,
    k: int | None = None,
    threshold: float | None = None,
    dense: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
) -> EncodeResult:
    """Encode ``(n, d)`` inputs with the Gram-matrix pursuit, in blocks.

    Same contract as ``MatchingPursuitSAE.encode`` (a TopK SAE is encoded by
    its own ``encode``), on the CPU in float32. With ``dense=False`` the
    result carries no ``(n, n_atoms)`` codes; the trace (``atoms``,
    ``coefficients``) holds them sparsely (see
    :func:`backend.sae.codes_from_trace`). Memory per block is about
    ``batch_size * n_atoms * 4`` bytes plus the Gram matrix.
    """
    check_threshold(threshold)
    x_nd, k = sae.prepare_inputs(torch.as_tensor(x_nd), k)
    x_nd = x_nd.detach().float().cpu()
    use_gram = sae.kind == "mp" and _gram_fits(sae, max_gram_bytes)
    parts = []
    for start in range(0, x_nd.shape[0], batch_size):
        block_nd = x_nd[start : start + batch_size]
        parts.append(_encode_block(sae, block_nd, k, threshold, dense, use_gram))
    if not parts:
        return sae.encode(x_nd, k, threshold)
    return _concat(parts, dense)


def _encode_block(
    sae: SparseAutoencoder,
    x_nd: Tensor,
    k: int,
    threshold: float | None,
    dense: bool,
    use_gram: bool,
) -> EncodeResult:
    if not use_gram:
        result = sae.encode(x_nd, k, threshold)
        return result if dense else result._replace(codes=None)
    atoms_nk, coefs_nk, norms_nk1, residual_nd = _trace_block(sae, x_nd, k, threshold)
    codes_nm = codes_from_trace(atoms_nk, coefs_nk, sae.n_atoms) if dense else None
    return EncodeResult(codes_nm, residual_nd, atoms_nk, coefs_nk, norms_nk1)


def pick_atoms(
    sae: SparseAutoencoder,
    x_nd: Tensor,
    k: int,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
) -> Tensor:
    """The ``(n, k)`` picks of the pursuit, without gradient (for training)."""
    with torch.no_grad():
        if not _gram_fits(sae, max_gram_bytes):
            return plain_pursuit(
                x_nd, sae.atoms_md, sae.bias_d, k, None, sae.config.nonnegative
            ).atoms
        atoms_nk = _trace_block(sae, x_nd, k, None)[0]
    return atoms_nk.to(x_nd.device)
