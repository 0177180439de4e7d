"""The Gram-matrix encoder against the plain pursuit loop."""

from __future__ import annotations

import logging

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backend.fast import fast_encode, gram_bytes, pick_atoms
from backend.sae import MatchingPursuitSAE, TopKSAE, codes_from_trace

ENCODE_FIELDS = ("codes", "atoms", "coefficients", "residual_norms", "residual")


def make_sae(d, n_atoms, k, seed, nonnegative=True):
    sae = MatchingPursuitSAE(d, n_atoms, k, nonnegative=nonnegative, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.bias_d.copy_(0.1 * torch.randn(d, generator=generator))
    return sae


def gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def fvu(x_nd, residual_nd):
    return float(residual_nd.pow(2).sum() / (x_nd - x_nd.mean(0)).pow(2).sum())


def assert_same_until_rounding(fast, plain, atoms_md=None):
    """Picks agree step by step, or part where both correlations are rounding.

    Where the best correlation is at rounding level (a residual orthogonal
    to the atoms it could pick) either encoder may pick or stop; both
    coefficients are then tiny, and the two paths may differ from there on.
    Two atoms with the same direction (to float precision: random atoms in
    very few dimensions) are the same pick under either id.
    """
    norm0_n = plain.residual_norms[:, 0]
    tiny_n = 1e-4 * norm0_n + 1e-6
    for i in range(plain.atoms.shape[0]):
        same = plain.atoms.shape[1]
        for t in range(plain.atoms.shape[1]):
            a, b = int(fast.atoms[i, t]), int(plain.atoms[i, t])
            if a != b and atoms_md is not None and min(a, b) >= 0:
                if float(atoms_md[a] @ atoms_md[b]) > 1 - 1e-6:
                    continue  # one direction under two ids
            if a != b:
                assert abs(fast.coefficients[i, t]) <= tiny_n[i]
                assert abs(plain.coefficients[i, t]) <= tiny_n[i]
                same = t
                break
        scale = float(norm0_n[i]) + 1e-6
        torch.testing.assert_close(
            fast.coefficients[i, :same] / scale,
            plain.coefficients[i, :same] / scale,
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            fast.residual_norms[i] / scale,
            plain.residual_norms[i] / scale,
            atol=1e-3,
            rtol=0,
        )
        torch.testing.assert_close(
            fast.residual[i] / scale, plain.residual[i] / scale, atol=1e-3, rtol=0
        )


@example(d=2, n_atoms=156, k=1, seed=307, signed=True, threshold=None)
@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(2, 40),
    n_atoms=st.integers(1, 300),
    k=st.integers(1, 20),
    seed=st.integers(0, 10_000),
    signed=st.booleans(),
    threshold=st.one_of(st.none(), st.floats(0.0, 0.9)),
)
def test_fast_and_plain_encoders_agree(d, n_atoms, k, seed, signed, threshold):
    sae = make_sae(d, n_atoms, k, seed, nonnegative=not signed)
    x_nd = gaussian(16, d, seed + 2)
    plain = sae.encode(x_nd, threshold=threshold)
    fast = fast_encode(sae, x_nd, threshold=threshold)
    # A threshold met to rounding precision may stop one step apart.
    if threshold is not None:
        near = (plain.residual_norms / plain.residual_norms[:, :1] - threshold).abs()
        if bool((near < 1e-5).any()):
            return
    assert_same_until_rounding(fast, plain, sae.atoms_md.detach())
    torch.testing.assert_close(
        sae.decode(fast.codes) + fast.residual, x_nd, atol=1e-4, rtol=1e-4
    )


def test_agreement_at_scale_meets_the_contract():
    # The bar: >= 99.9% identical picks in fp32, FVU within 1e-4.
    sae = make_sae(128, 2048, 32, seed=5)
    x_nd = gaussian(1000, 128, 6)
    plain = sae.encode(x_nd)
    fast = fast_encode(sae, x_nd, batch_size=300)
    agreement = float((fast.atoms == plain.atoms).float().mean())
    assert agreement >= 0.999
    assert abs(fvu(x_nd, fast.residual) - fvu(x_nd, plain.residual)) <= 1e-4


def test_sparse_output_and_blocks_give_the_same_trace():
    sae = make_sae(24, 200, 10, seed=7)
    x_nd = gaussian(50, 24, 8)
    dense = fast_encode(sae, x_nd)
    sparse = fast_encode(sae, x_nd, dense=False, batch_size=7)
    assert sparse.codes is None
    # Block shapes change the BLAS summation order, so values match to rounding.
    assert torch.equal(dense.atoms, sparse.atoms)
    for name in ("coefficients", "residual_norms", "residual"):
        torch.testing.assert_close(getattr(dense, name), getattr(sparse, name))
    rebuilt = codes_from_trace(sparse.atoms, sparse.coefficients, 200)
    torch.testing.assert_close(rebuilt, dense.codes)


def test_too_large_gram_falls_back_to_plain_loop_and_says_so(caplog):
    sae = make_sae(16, 64, 6, seed=9)
    x_nd = gaussian(20, 16, 10)
    with caplog.at_level(logging.WARNING, logger="backend.fast"):
        result = fast_encode(sae, x_nd, max_gram_bytes=gram_bytes(64) - 1)
    assert "falling back to the plain pursuit loop" in caplog.text
    plain = sae.encode(x_nd)
    for name in ENCODE_FIELDS:
        assert torch.equal(getattr(result, name), getattr(plain, name)), name


def test_gram_cache_follows_changed_atoms():
    sae = make_sae(16, 64, 6, seed=11)
    x_nd = gaussian(30, 16, 12)
    fast_encode(sae, x_nd)
    with torch.no_grad():
        sae.atoms_md.copy_(sae.atoms_md.roll(1, dims=1))
    fast = fast_encode(sae, x_nd)
    assert_same_until_rounding(fast, sae.encode(x_nd))


def test_topk_sae_goes_through_its_own_encoder():
    sae = TopKSAE(16, 64, 5, seed=13)
    x_nd = gaussian(30, 16, 14)
    fast = fast_encode(sae, x_nd, batch_size=8)
    plain = sae.encode(x_nd)
    for name in ENCODE_FIELDS:
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name))


def test_training_picks_match_plain_picks():
    sae = make_sae(32, 256, 12, seed=15)
    x_nd = gaussian(64, 32, 16)
    plain = sae.encode(x_nd)
    assert_same_until_rounding(plain._replace(atoms=pick_atoms(sae, x_nd, 12)), plain)
