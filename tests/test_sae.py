"""Contract and property tests of backend.sae (both SAE kinds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.sae import (
    EncodeResult,
    MatchingPursuitSAE,
    SAEConfig,
    TopKSAE,
    codes_from_trace,
    load_sae,
    plain_pursuit,
)

SETTINGS = settings(max_examples=25, deadline=None)


def make_sae(kind: str, d: int, n_atoms: int, k: int, seed: int, nonnegative=True):
    cls = MatchingPursuitSAE if kind == "mp" else TopKSAE
    sae = cls(d, n_atoms, k, nonnegative=nonnegative, seed=seed)
    with torch.no_grad():
        sae.bias_d.copy_(
            0.1 * torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
        )
    return sae


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def numpy_pursuit(x_d, atoms_md, bias_d, k, nonnegative):
    """An independent per-input reference in float64.

    Returns the picks, their coefficients, the residual, and whether the
    pursuit reached correlations at rounding level (there the picks of two
    correct implementations may differ, so comparison stops).
    """
    residual = x_d - bias_d
    tiny = 1e-9 * np.linalg.norm(residual)
    picks, coefs = [], []
    for _ in range(k):
        corr = atoms_md @ residual
        j = int(np.argmax(corr if nonnegative else np.abs(corr)))
        best = corr[j] if nonnegative else abs(corr[j])
        if abs(best) <= tiny:
            return picks, coefs, residual, True
        if best <= 0:
            break
        picks.append(j)
        coefs.append(corr[j])
        residual = residual - corr[j] * atoms_md[j]
    return picks, coefs, residual, False


sizes = st.tuples(
    st.integers(2, 24),  # d
    st.integers(1, 80),  # n_atoms
    st.integers(1, 12),  # k
    st.integers(0, 10_000),  # seed
)


@SETTINGS
@given(sizes=sizes, kind=st.sampled_from(["mp", "topk"]), signed=st.booleans())
def test_trace_properties(sizes, kind, signed):
    d, n_atoms, k, seed = sizes
    nonnegative = kind == "topk" or not signed
    sae = make_sae(kind, d, n_atoms, k, seed, nonnegative)
    x_nd = gaussian(7, d, seed + 2)
    result = sae.encode(x_nd)

    assert isinstance(result, EncodeResult)
    assert result.codes.shape == (7, n_atoms)
    assert (
        result.atoms.shape
        == result.coefficients.shape
        == (7, min(k, n_atoms) if kind == "topk" else k)
    )
    # At most k picks; once stopped, stopped for good.
    stopped = result.atoms < 0
    assert torch.equal(stopped, stopped.cummax(dim=1).values)
    assert torch.all(result.coefficients[stopped] == 0)
    assert torch.all((result.codes != 0).sum(1) <= k)
    # Codes and residual reconstruct the input.
    torch.testing.assert_close(
        sae.decode(result.codes) + result.residual, x_nd, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        result.residual_norms[:, -1], result.residual.norm(dim=-1), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        result.residual_norms[:, 0], (x_nd - sae.bias_d).norm(dim=-1)
    )
    if nonnegative:
        assert torch.all(result.codes >= 0)
    if kind == "mp":
        # The residual norm never grows along the pursuit.
        steps = result.residual_norms.diff(dim=1)
        assert torch.all(steps <= 1e-5 * result.residual_norms[:, :1])


@SETTINGS
@given(sizes=sizes, signed=st.booleans())
def test_plain_pursuit_matches_independent_reference(sizes, signed):
    d, n_atoms, k, seed = sizes
    sae = make_sae("mp", d, n_atoms, k, seed, nonnegative=not signed).double()
    x_nd = gaussian(5, d, seed + 3).double()
    result = sae.encode(x_nd)
    atoms_md = sae.atoms_md.detach().numpy()
    bias_d = sae.bias_d.detach().numpy()
    for i in range(5):
        picks, coefs, residual, rounding = numpy_pursuit(
            x_nd[i].numpy(), atoms_md, bias_d, k, not signed
        )
        got = result.atoms[i].tolist()
        assert got[: len(picks)] == picks
        got_coefs = result.coefficients[i, : len(picks)].numpy()
        np.testing.assert_allclose(got_coefs, coefs, atol=1e-10)
        if not rounding:
            assert all(j == -1 for j in got[len(picks) :])
            np.testing.assert_allclose(result.residual[i].numpy(), residual, atol=1e-10)


def test_repicked_atom_coefficients_add_up():
    # Two non-orthogonal atoms, signed codes: each pick leaves a residual
    # orthogonal to that atom only, so the pursuit alternates between the two
    # and each atom's code is the sum of its coefficients.
    atoms_md = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    x_nd = torch.tensor([[0.5, 2.0]])
    result = plain_pursuit(x_nd, atoms_md, torch.zeros(2), k=6, nonnegative=False)
    picks = result.atoms[0].tolist()
    assert len(set(picks)) < len([p for p in picks if p >= 0])
    for j in (0, 1):
        expected = result.coefficients[0][result.atoms[0] == j].sum()
        torch.testing.assert_close(result.codes[0, j], expected)


def test_nonnegative_stops_when_no_positive_correlation():
    atoms_md = torch.eye(3)
    x_nd = torch.tensor([[2.0, -1.0, -3.0], [-1.0, -1.0, -1.0]])
    result = plain_pursuit(x_nd, atoms_md, torch.zeros(3), k=3)
    assert result.atoms.tolist() == [[0, -1, -1], [-1, -1, -1]]
    signed = plain_pursuit(x_nd, atoms_md, torch.zeros(3), k=3, nonnegative=False)
    assert signed.atoms.tolist() == [[2, 0, 1], [0, 1, 2]]
    torch.testing.assert_close(signed.codes, x_nd)


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["mp", "topk"]))
def test_threshold_gives_fewer_picks_to_easier_inputs(seed, kind):
    d, k = 32, 16
    n_atoms = 64 if kind == "mp" else d
    sae = make_sae(kind, d, n_atoms, k, seed)
    gen = torch.Generator().manual_seed(seed + 5)
    if kind == "topk":
        # An orthonormal dictionary and encoder, so one atom is easy for it too.
        basis_dd = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].T
        with torch.no_grad():
            sae.atoms_md.copy_(basis_dd)
            sae.encoder_md.copy_(basis_dd)
    # Easy: one atom plus 1% noise; hard: isotropic noise of the same size.
    atom_d = sae.atoms_md.detach()[int(torch.randint(n_atoms, (1,), generator=gen))]
    noise_2d = torch.randn(2, d, generator=gen) / d**0.5
    x_2d = sae.bias_d.detach() + torch.stack([atom_d + 0.01 * noise_2d[0], noise_2d[1]])
    result = sae.encode(x_2d, threshold=0.1)
    n_picks = (result.atoms >= 0).sum(1)
    assert n_picks[0] == 1 < n_picks[1]
    below = result.residual_norms[:, :-1] <= 0.1 * result.residual_norms[:, :1]
    assert torch.all(result.atoms[below] == -1)


@SETTINGS
@given(sizes=sizes, low=st.floats(0.0, 0.9), high=st.floats(0.0, 0.9))
def test_higher_threshold_never_adds_picks(sizes, low, high):
    d, n_atoms, k, seed = sizes
    low, high = min(low, high), max(low, high)
    sae = make_sae("mp", d, n_atoms, k, seed)
    x_nd = gaussian(6, d, seed + 7)
    loose = sae.encode(x_nd, threshold=high)
    tight = sae.encode(x_nd, threshold=low)
    assert torch.all((loose.atoms >= 0).sum(1) <= (tight.atoms >= 0).sum(1))
    # Same path, stopped earlier.
    kept = loose.atoms >= 0
    assert torch.equal(loose.atoms[kept], tight.atoms[kept])


@pytest.mark.parametrize("kind", ["mp", "topk"])
def test_save_load_round_trip(tmp_path, kind):
    sae = make_sae(kind, 16, 40, 5, seed=3, nonnegative=True)
    x_nd = gaussian(9, 16, 4)
    sae.save(tmp_path / kind)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert config["kind"] == kind and config["n_atoms"] == 40
    loaded = load_sae(tmp_path / kind)
    assert type(loaded) is type(sae)
    assert loaded.config == sae.config
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert torch.equal(loaded.encode(x_nd).codes, sae.encode(x_nd).codes)
    with pytest.raises(TypeError):
        (TopKSAE if kind == "mp" else MatchingPursuitSAE).load(tmp_path / kind)


@settings(max_examples=10, deadline=None)
@given(sizes=sizes, kind=st.sampled_from(["mp", "topk"]), signed=st.booleans())
def test_save_load_round_trip_property(tmp_path_factory, sizes, kind, signed):
    d, n_atoms, k, seed = sizes
    sae = make_sae(kind, d, n_atoms, k, seed, nonnegative=kind == "topk" or not signed)
    folder = tmp_path_factory.mktemp("sae")
    loaded = load_sae(sae.save(folder))
    assert loaded.config == sae.config
    x_nd = gaussian(5, d, seed + 4)
    for before, after in zip(sae.encode(x_nd), loaded.encode(x_nd), strict=True):
        assert torch.equal(before, after)


def test_bad_input_is_a_clear_error():
    sae = MatchingPursuitSAE(8, 10, 3)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        sae.encode(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="threshold"):
        sae.encode(torch.zeros(2, 8), threshold=1.5)
    with pytest.raises(ValueError, match="kind"):
        SAEConfig("pca", 8, 10, 3)
    with pytest.raises(ValueError, match="non-negative"):
        TopKSAE(8, 10, 3, nonnegative=False)


def test_topk_trace_is_sorted_and_matches_codes():
    sae = make_sae("topk", 12, 30, 6, seed=8)
    x_nd = gaussian(20, 12, 9)
    result = sae.encode(x_nd)
    coefs = result.coefficients
    assert torch.all(coefs[:, :-1] >= coefs[:, 1:])
    torch.testing.assert_close(codes_from_trace(result.atoms, coefs, 30), result.codes)
    # Residual norms after adding the atoms one by one, computed directly.
    atoms_nkd = sae.atoms_md.detach()[result.atoms.clamp(min=0)]
    added_nkd = (coefs[..., None] * atoms_nkd).cumsum(dim=1)
    partial_nkd = (x_nd - sae.bias_d.detach())[:, None] - added_nkd
    expected = torch.cat(
        [result.residual_norms[:, :1], partial_nkd.norm(dim=-1)], dim=1
    )
    torch.testing.assert_close(result.residual_norms, expected, atol=1e-5, rtol=1e-4)


def test_mp_forward_gradient_equals_unrolled_loop():
    sae = make_sae("mp", 24, 96, 8, seed=11)
    x_nd = gaussian(32, 24, 12)
    grads = []
    for plain in (False, True):
        sae.zero_grad()
        out = sae(x_nd, plain=plain)
        out.residual.pow(2).sum(-1).mean().backward()
        grads.append((sae.atoms_md.grad.clone(), sae.bias_d.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)
