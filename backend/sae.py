"""Sparse autoencoders over CLIP activations: the MP-SAE and its TopK baseline.

``MatchingPursuitSAE`` encodes an input by matching pursuit over a dictionary
of unit-norm atoms (see ``DESIGN.md``, "The MP-SAE"):

1. residual ``r = x - b``, codes ``z = 0``;
2. for each step: correlations ``c = D r``; pick ``j = argmax c`` (or
   ``argmax |c|`` with signed codes); stop when the pick does not help
   (``max c <= 0``, or ``c == 0`` for signed codes); ``z[j] += c[j]``;
   ``r -= c[j] * D[j]``;
3. stop early once ``|r| <= threshold * |x - b|`` (adaptive sparsity);
4. decode ``x_hat = z D + b``.

With unit-norm atoms ``|r|`` never grows: ``|r - c_j D_j|^2 = |r|^2 - c_j^2``.

``TopKSAE`` is the baseline of the same size: a linear encoder, the ``k``
largest (positive) pre-activations, and a linear decoder with unit-norm atoms.

Both return an :class:`EncodeResult`, save as ``weights.safetensors`` plus
``config.json`` and load back through :func:`load_sae`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from backend.atomic import atomic_path, write_json

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class EncodeResult(NamedTuple):
    """Codes and pursuit trace of a batch of ``n`` inputs.

    Attributes
    ----------
    codes : Tensor or None
        ``(n, n_atoms)`` float32 coefficients; a re-picked atom's coefficients
        are summed. ``None`` when the caller asked for no dense codes
        (rebuild them with :func:`codes_from_trace`).
    residual : Tensor
        ``(n, d)``: ``x - decode(codes)``.
    atoms : Tensor
        ``(n, k)`` int64 atom picked at each step, in pick order; ``-1`` after
        the pursuit stopped. For the TopK SAE: atoms by decreasing
        coefficient.
    coefficients : Tensor
        ``(n, k)`` coefficient of each pick (``0`` after a stop).
    residual_norms : Tensor
        ``(n, k + 1)``: ``|x - b|`` then the residual norm after each step; it
        stays constant after a stop.
    """

    codes: Tensor | None
    residual: Tensor
    atoms: Tensor
    coefficients: Tensor
    residual_norms: Tensor


@dataclass(frozen=True)
class SAEConfig:
    """What it takes to rebuild an SAE: written to ``config.json``.

    Attributes
    ----------
    kind : str
        ``"mp"`` or ``"topk"``.
    d : int
        Width of the activations.
    n_atoms : int
        Number of dictionary atoms.
    k : int
        Default number of pursuit steps (MP) or active atoms (TopK).
    nonnegative : bool
        MP only: non-negative codes (pick the largest positive correlation)
        if True, classical signed selection by ``|c|`` if False.
    seed : int
        Seed of the random initialisation.
    """

    kind: str
    d: int
    n_atoms: int
    k: int
    nonnegative: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SAE_KINDS:
            raise ValueError(
                f"unknown SAE kind {self.kind!r}; known: {list(SAE_KINDS)}"
            )
        if min(self.d, self.n_atoms, self.k) < 1:
            raise ValueError(f"d, n_atoms and k must be >= 1, got {self}")


def codes_from_trace(atoms_nk: Tensor, coefficients_nk: Tensor, n_atoms: int) -> Tensor:
    """Dense ``(n, n_atoms)`` codes from a trace; repeated picks add up."""
    index_nk = atoms_nk.clamp(min=0)
    values_nk = torch.where(atoms_nk >= 0, coefficients_nk, 0.0)
    codes_nm = torch.zeros(
        atoms_nk.shape[0], n_atoms, dtype=coefficients_nk.dtype, device=atoms_nk.device
    )
    return codes_nm.scatter_add(1, index_nk, values_nk)


def check_threshold(threshold: float | None) -> None:
    """Raise ValueError unless ``threshold`` is None or a fraction in [0, 1)."""
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold is a fraction of |x - b| in [0, 1), got {threshold}"
        )


def plain_pursuit(
    x_nd: Tensor,
    atoms_md: Tensor,
    bias_d: Tensor,
    k: int,
    threshold: float | None = None,
    nonnegative: bool = True,
) -> EncodeResult:
    """Matching pursuit, one full correlation ``D r`` per step (the reference).

    Differentiable in ``x_nd``, ``atoms_md`` and ``bias_d`` (the picks are
    piecewise constant). Costs ``O(n * n_atoms * d)`` per step; see
    :mod:`backend.fast` for the Gram-matrix encoder used at inference.

    Parameters
    ----------
    x_nd : Tensor
        ``(n, d)`` inputs.
    atoms_md : Tensor
        ``(n_atoms, d)`` dictionary with unit-norm rows.
    bias_d : Tensor
        ``(d,)`` pre-centring bias.
    k : int
        Maximum number of steps.
    threshold : float, optional
        Stop an input once ``|r| <= threshold * |x - b|``.
    nonnegative : bool
        Select ``argmax c`` and stop when it is ``<= 0`` (True), or select
        ``argmax |c|`` with signed coefficients (False).
    """
    check_threshold(threshold)
    residual_nd = x_nd - bias_d
    norm0_n = residual_nd.norm(dim=-1)
    norms = [norm0_n]
    picks, coefs = [], []
    active_n = torch.ones_like(norm0_n, dtype=torch.bool)
    for _ in range(k):
        if threshold is not None:
            active_n = active_n & (norms[-1] > threshold * norm0_n)
        corr_nm = residual_nd @ atoms_md.T
        score_nm = corr_nm if nonnegative else corr_nm.abs()
        best_n, pick_n = score_nm.detach().max(dim=-1)
        active_n = active_n & (best_n > 0)
        coef_n = corr_nm.gather(1, pick_n[:, None]).squeeze(1) * active_n
        residual_nd = residual_nd - coef_n[:, None] * atoms_md[pick_n]
        norms.append(residual_nd.norm(dim=-1))
        picks.append(torch.where(active_n, pick_n, -1))
        coefs.append(coef_n)
    atoms_nk = torch.stack(picks, dim=1)
    coefficients_nk = torch.stack(coefs, dim=1)
    codes_nm = codes_from_trace(atoms_nk, coefficients_nk, atoms_md.shape[0])
    return EncodeResult(
        codes_nm, residual_nd, atoms_nk, coefficients_nk, torch.stack(norms, dim=1)
    )


class _GatherRows(torch.autograd.Function):
    """``table[index]`` whose backward adds rows in one serial pass.

    The gradient of a row gather is a scatter-add of ``index.numel()`` rows
    into the table; torch's CPU ``index_add_`` is several times slower at
    training sizes, and the serial loop is deterministic.
    """

    @staticmethod
    def forward(ctx, table_md: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.table_shape = table_md.shape
        flat = table_md.index_select(0, index.reshape(-1))
        return flat.view(*index.shape, table_md.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        grad_rd = grad.reshape(-1, grad.shape[-1]).contiguous()
        out_md = torch.zeros(ctx.table_shape, dtype=grad.dtype, device=grad.device)
        if grad.device.type != "cpu":
            return out_md.index_add_(0, index.reshape(-1), grad_rd), None
        from backend.fast import add_rows

        add_rows(out_md.numpy(), index.reshape(-1).numpy(), grad_rd.numpy())
        return out_md, None


def gather_rows(table_md: Tensor, index: Tensor) -> Tensor:
    """``table_md[index]`` (shape ``index.shape + (d,)``), differentiable."""
    return _GatherRows.apply(table_md, index)


def regather_pursuit(
    x_nd: Tensor, atoms_md: Tensor, bias_d: Tensor, atoms_nk: Tensor
) -> EncodeResult:
    """Replay given picks differentiably, as one triangular solve.

    The pursuit's coefficients ``c_t = <r_t, D[j_t]>`` with
    ``r_t = r_0 - sum_{s<t} c_s D[j_s]`` satisfy ``L c = D_j r_0``, where ``L``
    is the unit lower-triangular part of the picked atoms' Gram matrix. The
    solve gives the values and gradients of the unrolled loop that made the
    picks (the argmax has no gradient) in a handful of batched operations,
    ``O(n k^2 d)`` instead of ``O(n k n_atoms d)``. ``atoms_nk`` is ``-1``
    after a stop. Returns no dense codes; the residual norms (without
    gradient) follow from ``|r_t+1|^2 = |r_t|^2 - c_t^2``.
    """
    residual_nd = x_nd - bias_d
    live_nk1 = (atoms_nk >= 0).unsqueeze(-1).to(atoms_md.dtype)
    picked_nkd = gather_rows(atoms_md, atoms_nk.clamp(min=0)) * live_nk1
    start_nk1 = picked_nkd @ residual_nd.unsqueeze(-1)
    lower_nkk = (picked_nkd @ picked_nkd.transpose(1, 2)).tril(diagonal=-1)
    eye_kk = torch.eye(atoms_nk.shape[1], dtype=atoms_md.dtype, device=atoms_md.device)
    coefficients_nk = torch.linalg.solve_triangular(
        lower_nkk + eye_kk, start_nk1, upper=False, unitriangular=True
    ).squeeze(-1)
    residual_nd = residual_nd - (coefficients_nk.unsqueeze(1) @ picked_nkd).squeeze(1)
    norm0_n = (x_nd - bias_d).detach().norm(dim=-1)
    drops_nk = coefficients_nk.detach().pow(2).cumsum(dim=1)
    norms_nk = (norm0_n[:, None].pow(2) - drops_nk).clamp(min=0).sqrt()
    norms_nk1 = torch.cat([norm0_n[:, None], norms_nk], dim=1)
    return EncodeResult(None, residual_nd, atoms_nk, coefficients_nk, norms_nk1)


class SparseAutoencoder(nn.Module):
    """Shared parts: unit-norm dictionary ``atoms_md``, bias ``bias_d``, I/O.

    Parameters
    ----------
    d : int
        Width of the activations.
    n_atoms : int
        Number of atoms.
    k : int
        Default sparsity (steps or active atoms).
    nonnegative : bool
        Non-negative codes (MP; the TopK SAE is always non-negative).
    seed : int
        Seed of the random initialisation (Gaussian atoms, then normalised).
    """

    kind: ClassVar[str] = ""

    def __init__(
        self, d: int, n_atoms: int, k: int, nonnegative: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.config = SAEConfig(self.kind, d, n_atoms, k, nonnegative, seed)
        generator = torch.Generator().manual_seed(seed)
        atoms_md = torch.randn(n_atoms, d, generator=generator)
        self.atoms_md = nn.Parameter(atoms_md / atoms_md.norm(dim=-1, keepdim=True))
        self.bias_d = nn.Parameter(torch.zeros(d))

    @property
    def d(self) -> int:
        return self.config.d

    @property
    def n_atoms(self) -> int:
        return self.config.n_atoms

    @property
    def k(self) -> int:
        return self.config.k

    def decode(self, codes_nm: Tensor) -> Tensor:
        """``x_hat = codes D + b``: ``(n, n_atoms) -> (n, d)``."""
        return codes_nm @ self.atoms_md + self.bias_d

    @torch.no_grad()
    def normalize_atoms_(self) -> None:
        """Rescale every atom to unit L2 norm in place (after an optimiser step)."""
        norms_m1 = self.atoms_md.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        self.atoms_md.div_(norms_m1)

    def encode(
        self, x_nd: Tensor, k: int | None = None, threshold: float | None = None
    ) -> EncodeResult:
        raise NotImplementedError

    def forward(self, x_nd: Tensor) -> EncodeResult:
        """Differentiable encoding for training (``codes`` may be None)."""
        raise NotImplementedError

    def prepare_inputs(self, x_nd: Tensor, k: int | None) -> tuple[Tensor, int]:
        """Check ``(n, d)`` inputs and ``k`` (default: the SAE's); cast to its dtype."""
        x_nd = torch.as_tensor(x_nd)
        if x_nd.ndim != 2 or x_nd.shape[1] != self.d:
            raise ValueError(
                f"expected inputs of shape (n, {self.d}), got {tuple(x_nd.shape)}"
            )
        k = self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return x_nd.to(self.atoms_md.dtype), k

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``weights.safetensors`` and ``config.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
        }
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": self.kind})
        config: dict[str, Any] = asdict(self.config)
        config["format_version"] = FORMAT_VERSION
        write_json(directory / CONFIG_FILE, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SparseAutoencoder:
        """Load an SAE saved by :meth:`save`; the class must match its kind."""
        sae = load_sae(directory)
        if not isinstance(sae, cls):
            raise TypeError(f"{directory} holds a {sae.kind!r} SAE, not {cls.kind!r}")
        return sae


class MatchingPursuitSAE(SparseAutoencoder):
    """Matching-Pursuit SAE: codes chosen greedily against a unit-norm dictionary.

    ``encode`` runs the plain pursuit (one full correlation per step) and is
    the reference; ``backend.fast.fast_encode`` gives the same picks much
    faster through the Gram matrix. ``forward`` (training) makes the picks
    without gradient, then replays them differentiably, which has the same
    gradient as backpropagating through the whole unrolled loop.
    """

    kind = "mp"

    @torch.no_grad()
    def encode(
        self, x_nd: Tensor, k: int | None = None, threshold: float | None = None
    ) -> EncodeResult:
        """Encode ``(n, d)`` inputs by at most ``k`` pursuit steps (plain loop)."""
        x_nd, k = self.prepare_inputs(x_nd, k)
        return plain_pursuit(
            x_nd, self.atoms_md, self.bias_d, k, threshold, self.config.nonnegative
        )

    def forward(self, x_nd: Tensor, plain: bool = False) -> EncodeResult:
        """Training pass with ``k`` steps; the residual carries the gradient.

        ``plain=True`` backpropagates through the plain loop itself (slow; the
        reference the fast path is tested and benchmarked against).
        """
        x_nd, k = self.prepare_inputs(x_nd, None)
        if plain:
            return plain_pursuit(
                x_nd, self.atoms_md, self.bias_d, k, None, self.config.nonnegative
            )
        from backend.fast import pick_atoms

        atoms_nk = pick_atoms(self, x_nd.detach(), k)
        return regather_pursuit(x_nd, self.atoms_md, self.bias_d, atoms_nk)


class TopKSAE(SparseAutoencoder):
    """TopK SAE: ``z = topk(relu(W_enc (x - b) + b_enc))``, ``x_hat = z D + b``.

    The decoder rows ``atoms_md`` are unit-norm like the MP dictionary, so the
    two are compared at equal size and sparsity. ``encode`` reports the kept
    atoms by decreasing coefficient and the residual norm after adding each in
    that order; a threshold cuts that ordered list the way it stops the MP.
    """

    kind = "topk"

    def __init__(
        self, d: int, n_atoms: int, k: int, nonnegative: bool = True, seed: int = 0
    ) -> None:
        if not nonnegative:
            raise ValueError(
                "TopKSAE codes are always non-negative; use nonnegative=True"
            )
        super().__init__(d, n_atoms, k, True, seed)
        self.encoder_md = nn.Parameter(self.atoms_md.detach().clone())
        self.encoder_bias_m = nn.Parameter(torch.zeros(n_atoms))

    def _topk(self, x_nd: Tensor, k: int) -> tuple[Tensor, Tensor]:
        pre_nm = (x_nd - self.bias_d) @ self.encoder_md.T + self.encoder_bias_m
        values_nk, atoms_nk = pre_nm.topk(min(k, self.n_atoms), dim=-1)
        values_nk = values_nk.relu()
        atoms_nk = torch.where(values_nk > 0, atoms_nk, -1)
        return atoms_nk, values_nk

    def _result(
        self, x_nd: Tensor, atoms_nk: Tensor, coefs_nk: Tensor, threshold: float | None
    ) -> EncodeResult:
        start_nd = x_nd - self.bias_d
        picked_nkd = self.atoms_md[atoms_nk.clamp(min=0)]
        norms_nk1 = _prefix_norms(start_nd, picked_nkd, coefs_nk)
        if threshold is not None:
            # Keep step t only while the norm before it is above the threshold.
            keep_nk = norms_nk1[:, :-1] > threshold * norms_nk1[:, :1]
            keep_nk = keep_nk.cummin(dim=1).values & (atoms_nk >= 0)
            atoms_nk = torch.where(keep_nk, atoms_nk, -1)
            coefs_nk = coefs_nk * keep_nk
            return self._result(x_nd, atoms_nk, coefs_nk, None)
        codes_nm = codes_from_trace(atoms_nk, coefs_nk, self.n_atoms)
        residual_nd = start_nd - torch.einsum("nk,nkd->nd", coefs_nk, picked_nkd)
        norms_nk1[:, -1] = residual_nd.norm(dim=-1)
        return EncodeResult(codes_nm, residual_nd, atoms_nk, coefs_nk, norms_nk1)

    @torch.no_grad()
    def encode(
        self, x_nd: Tensor, k: int | None = None, threshold: float | None = None
    ) -> EncodeResult:
        """Encode ``(n, d)`` inputs with the ``k`` largest positive pre-activations."""
        check_threshold(threshold)
        x_nd, k = self.prepare_inputs(x_nd, k)
        atoms_nk, coefs_nk = self._topk(x_nd, k)
        return self._result(x_nd, atoms_nk, coefs_nk, threshold)

    def forward(self, x_nd: Tensor) -> EncodeResult:
        """Training pass: the residual ``x - x_hat`` carries the gradient."""
        x_nd, k = self.prepare_inputs(x_nd, None)
        atoms_nk, coefs_nk = self._topk(x_nd, k)
        index_nk = atoms_nk.clamp(min=0)
        x_hat_nd = (coefs_nk[..., None] * self.atoms_md[index_nk]).sum(1) + self.bias_d
        residual_nd = x_nd - x_hat_nd
        norms_n = residual_nd.norm(dim=-1)
        return EncodeResult(None, residual_nd, atoms_nk, coefs_nk, norms_n[:, None])


def _prefix_norms(start_nd: Tensor, picked_nkd: Tensor, coefs_nk: Tensor) -> Tensor:
    """``|r_t|`` after adding the first ``t`` atoms, ``t = 0..k``: ``(n, k + 1)``.

    ``|r_t|^2 = |r_0|^2 - 2 sum_{s<=t} a_s <r_0, D_s>
    + sum_{s,s'<=t} a_s a_s' <D_s, D_s'>``: small ``(n, k, k)`` products
    instead of ``k`` partial residuals of width ``d``, summed in float64.
    """
    dots_nk = (picked_nkd @ start_nd.unsqueeze(-1)).squeeze(-1).double()
    gram_nkk = (picked_nkd @ picked_nkd.transpose(1, 2)).double()
    coefs_nk = coefs_nk.double()
    linear_nk = (coefs_nk * dots_nk).cumsum(dim=1)
    quad_nkk = coefs_nk[:, :, None] * gram_nkk * coefs_nk[:, None, :]
    quad_nk = quad_nkk.cumsum(dim=1).cumsum(dim=2).diagonal(dim1=1, dim2=2)
    start_n = start_nd.double().pow(2).sum(-1)
    squares_nk = (start_n[:, None] - 2 * linear_nk + quad_nk).clamp(min=0)
    norms_nk1 = torch.cat([start_n[:, None], squares_nk], dim=1).sqrt()
    return norms_nk1.to(start_nd.dtype)


SAE_KINDS: dict[str, type[SparseAutoencoder]] = {
    MatchingPursuitSAE.kind: MatchingPursuitSAE,
    TopKSAE.kind: TopKSAE,
}


def build_sae(config: SAEConfig) -> SparseAutoencoder:
    """A fresh SAE of the kind and size ``config`` names."""
    cls = SAE_KINDS[config.kind]
    return cls(config.d, config.n_atoms, config.k, config.nonnegative, config.seed)


def load_sae(directory: str | os.PathLike) -> SparseAutoencoder:
    """Load either SAE kind from ``weights.safetensors`` + ``config.json``."""
    directory = Path(directory)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    version = raw.pop("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{directory} was saved in SAE format {version}; this code reads up to "
            f"{FORMAT_VERSION}; update the package"
        )
    sae = build_sae(SAEConfig(**raw))
    sae.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    logger.debug("loaded %s SAE from %s", sae.kind, directory)
    return sae
