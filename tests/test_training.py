"""The SAE trainer: learning, determinism, resume, dead atoms, bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.sae import MatchingPursuitSAE, TopKSAE, load_sae
from backend.training import (
    METRIC_COLUMNS,
    BatchSampler,
    TrainConfig,
    train,
    write_metrics,
)

D, N_ATOMS, K = 24, 48, 4


def sparse_data(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Sparse non-negative mixtures of 48 fixed random unit directions + noise."""
    atoms_md = np.random.default_rng(12345).standard_normal((N_ATOMS, D))
    atoms_md /= np.linalg.norm(atoms_md, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    active_nm = rng.random((n, N_ATOMS)) < 3 / N_ATOMS
    codes_nm = active_nm * rng.uniform(0.5, 1.5, (n, N_ATOMS))
    noise_nd = 0.01 * rng.standard_normal((n, D))
    return (codes_nm @ atoms_md + noise_nd + 0.3).astype(np.float32)


def config(**overrides) -> TrainConfig:
    base = dict(
        steps=60, batch_size=128, lr=3e-3, log_every=20, progress=False, threads=1
    )
    return TrainConfig(**(base | overrides))


def make(kind: str, seed: int = 0):
    cls = MatchingPursuitSAE if kind == "mp" else TopKSAE
    return cls(D, N_ATOMS, K, seed=seed)


@pytest.mark.parametrize("kind", ["mp", "topk"])
def test_training_lowers_the_error_and_logs_metrics(kind):
    acts_nd = sparse_data()
    result = train(make(kind), acts_nd, config(steps=80, lr=5e-3))
    metrics = result.metrics
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["step"].tolist() == [20, 40, 60, 80]
    assert metrics["fvu"].is_monotonic_decreasing
    assert metrics["fvu"].iloc[-1] < 0.75 * metrics["fvu"].iloc[0]
    assert (metrics["l0"] <= K).all() and (metrics["l0"] > 0).all()
    assert metrics["dead_fraction"].between(0, 1).all()
    norms = result.sae.atoms_md.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(N_ATOMS))
    # The held-out error matches the logged one in size.
    held_out = torch.from_numpy(sparse_data(500, seed=1))
    encoded = result.sae.encode(held_out)
    fvu = encoded.residual.pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
    assert float(fvu) < 1.2 * metrics["fvu"].iloc[-1]


def test_same_seed_same_weights_other_seed_other_weights():
    acts_nd = sparse_data()
    first = train(make("mp"), acts_nd, config(seed=3)).sae
    second = train(make("mp"), acts_nd, config(seed=3)).sae
    other = train(make("mp"), acts_nd, config(seed=4)).sae
    assert torch.equal(first.atoms_md, second.atoms_md)
    assert torch.equal(first.bias_d, second.bias_d)
    assert not torch.equal(first.atoms_md, other.atoms_md)


@pytest.mark.parametrize("kind", ["mp", "topk"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kind):
    acts_nd = sparse_data()
    straight = train(make(kind), acts_nd, config(steps=40, resample_every=10))
    half = train(
        make(kind),
        acts_nd,
        config(steps=20, resample_every=10),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert half.steps == 20 and half.resumed_from is None
    resumed = train(
        make(kind),
        acts_nd,
        config(steps=40, resample_every=10),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert resumed.resumed_from == 20 and resumed.steps == 40
    for name, tensor in straight.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    assert resumed.metrics["step"].tolist() == [20, 40]
    np.testing.assert_allclose(resumed.metrics["fvu"], straight.metrics["fvu"])
    # The checkpoint folder is also a loadable SAE.
    assert torch.equal(load_sae(tmp_path / "ckpt").atoms_md, resumed.sae.atoms_md)


def test_memory_mapped_file_trains_like_the_array(tmp_path):
    acts_nd = sparse_data()
    path = tmp_path / "acts.npy"
    np.save(path, acts_nd)
    from_file = train(make("mp"), path, config(steps=20)).sae
    from_array = train(make("mp"), torch.from_numpy(acts_nd), config(steps=20)).sae
    assert torch.equal(from_file.atoms_md, from_array.atoms_md)


def test_dead_atoms_are_resampled():
    # Data with an empty last coordinate, and half the atoms equal to that
    # coordinate's axis: they never correlate with a residual, so they are
    # never picked and never learn; only the remedy brings them back.
    acts_nd = sparse_data()
    acts_nd[:, -1] = 0.0

    def stuck_sae():
        sae = make("mp")
        with torch.no_grad():
            sae.atoms_md[:, -1] = 0.0
            sae.atoms_md[N_ATOMS // 2 :] = torch.eye(D)[-1]
            sae.normalize_atoms_()
        return sae

    cfg = config(steps=40, init_from_data=False, dead_after_steps=5, resample_every=10)
    without = train(stuck_sae(), acts_nd, replace(cfg, resample_every=0))
    assert without.resampled == 0
    assert without.metrics["dead_fraction"].iloc[-1] >= 0.5
    result = train(stuck_sae(), acts_nd, cfg)
    assert result.resampled >= N_ATOMS // 2
    assert result.metrics["dead_fraction"].iloc[-1] < 0.5
    assert result.metrics["fvu"].iloc[-1] < without.metrics["fvu"].iloc[-1]


def test_returned_topk_sae_reconstructs_as_its_last_training_window():
    # Atoms resampled on the very last step would enter the TopK code of
    # every input untrained (encoder row = a residual direction, zero bias)
    # and undo the run, so the remedy never runs on the last step.
    acts_nd = sparse_data()
    acts_nd[:, -1] = 0.0

    def stuck_topk():
        sae = make("topk")
        with torch.no_grad():
            for rows in (sae.atoms_md, sae.encoder_md):
                rows[:, -1] = 0.0
                rows[N_ATOMS // 2 :] = torch.eye(D)[-1]
        return sae

    x_nd = torch.from_numpy(acts_nd)
    sst = float((x_nd - x_nd.mean(0)).pow(2).sum())
    cfg = config(steps=40, init_from_data=False, dead_after_steps=5, log_every=10)
    mid_run = train(stuck_topk(), acts_nd, replace(cfg, resample_every=30))
    assert mid_run.resampled > 0
    at_end = train(stuck_topk(), acts_nd, replace(cfg, resample_every=40))
    assert at_end.resampled == 0
    for result in (mid_run, at_end):
        fvu = float(result.sae.encode(x_nd).residual.pow(2).sum()) / sst
        assert fvu < 1.25 * result.metrics["fvu"].iloc[-1]


def test_bad_input_is_refused_with_the_row():
    acts_nd = sparse_data(200)
    acts_nd[57, 3] = np.nan
    with pytest.raises(ValueError, match="row 57"):
        train(make("mp"), acts_nd, config(steps=2))
    with pytest.raises(ValueError, match="width"):
        train(make("mp"), np.zeros((10, D + 1), np.float32), config(steps=2))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_sampler_covers_every_row_once_per_epoch():
    sampler = BatchSampler(n_rows=10, batch_size=4, seed=0)
    rows = np.concatenate([sampler.rows(step) for step in range(5)])
    counts = np.bincount(rows, minlength=10)
    assert counts.sum() == 20 and set(counts) == {2}


def test_metrics_csv_round_trips(tmp_path):
    result = train(make("topk"), sparse_data(), config(steps=20))
    write_metrics(result.metrics, tmp_path / "m.csv")
    import pandas as pd

    back = pd.read_csv(tmp_path / "m.csv")
    assert list(back.columns) == METRIC_COLUMNS
    np.testing.assert_allclose(back["fvu"], result.metrics["fvu"], rtol=1e-5)
