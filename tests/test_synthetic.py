"""The synthetic hierarchy: its structure, and MP-SAE against TopK on it."""

from __future__ import annotations

import numpy as np
import pytest

from backend.synthetic import (
    HierarchyConfig,
    compare_on_hierarchy,
    make_hierarchy,
    recovery,
    sample_hierarchy,
)
from backend.training import TrainConfig


def test_tree_geometry():
    config = HierarchyConfig(d=32, n_parents=5, children_per_parent=3, child_cosine=0.7)
    tree = make_hierarchy(config)
    assert tree.features_fd.shape == (20, 32)
    np.testing.assert_allclose(np.linalg.norm(tree.features_fd, axis=1), 1, atol=1e-6)
    for parent in range(5):
        children = tree.children(parent)
        assert len(children) == 3
        cosines = tree.features_fd[children] @ tree.features_fd[parent]
        np.testing.assert_allclose(cosines, 0.7, atol=1e-6)


def test_samples_follow_the_tree():
    config = HierarchyConfig(d=32, n_parents=5, children_per_parent=3, noise=0.0)
    tree = make_hierarchy(config)
    sample = sample_hierarchy(tree, 5000, seed=1)
    active = sample.codes_nf > 0
    parents, children = active[:, :5], active[:, 5:]
    # At most one parent and one child; a child only with its own parent.
    assert parents.sum(1).max() == 1 and children.sum(1).max() == 1
    rows, child = np.nonzero(children)
    assert parents[rows, tree.parent_of_f[5 + child]].all()
    # Rates close to the configured probabilities.
    assert abs(parents.any(1).mean() - config.p_parent) < 0.02
    with_parent = parents.any(1)
    assert abs(children[with_parent].any(1).mean() - config.p_child) < 0.03
    np.testing.assert_allclose(
        sample.x_nd, sample.codes_nf @ tree.features_fd, atol=1e-5
    )


def test_recovery_scores_a_perfect_and_a_random_dictionary():
    tree = make_hierarchy(HierarchyConfig())
    permuted = tree.features_fd[np.random.default_rng(0).permutation(60)]
    assert recovery(tree, permuted).mean_cosine == pytest.approx(1.0)
    random_md = np.random.default_rng(1).standard_normal((60, 64))
    assert recovery(tree, random_md).mean_cosine < 0.5


@pytest.mark.slow
def test_mp_sae_recovers_the_hierarchy_better_than_topk():
    # Equal size (one atom per true feature) and sparsity (k = 2), same data,
    # seed and training settings.
    config = HierarchyConfig(seed=0)
    train_config = TrainConfig(
        steps=400, batch_size=256, lr=3e-3, progress=False, threads=1
    )
    result = compare_on_hierarchy(config, train_config, n_samples=10000, k=2)
    assert result.n_atoms == config.n_features
    assert result.mp.mean_cosine > result.topk.mean_cosine + 0.03
    assert result.mp.child_cosine > result.topk.child_cosine
    assert result.mp_fvu < result.topk_fvu
