"""Streaming statistics against a dense reference computed row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from backend.sae import MatchingPursuitSAE, TopKSAE
from backend.stats import (
    StatsConfig,
    TopN,
    Traces,
    centred_energy,
    histogram_quantiles,
    modality_split,
    nearest_atoms,
    sparse_codes,
    suggest_labels,
    trace_stats,
)

N_ATOMS = 24
K = 5


def _items(n_images: int, captions_per_image: int, seed: int) -> pd.DataFrame:
    """Images first, then their captions; two-level labels; a test split."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, n_images)
    sub = groups * 10 + rng.integers(0, 2, n_images)
    rows = []
    for i in range(n_images):
        rows.append(("image", i, "", i % 4 == 0, groups[i], sub[i]))
    for c in range(captions_per_image):
        for i in range(n_images):
            rows.append(
                (
                    "text",
                    i,
                    f"a picture of thing{sub[i]} word{c}",
                    i % 4 == 0,
                    groups[i],
                    sub[i],
                )
            )
    table = pd.DataFrame(
        rows, columns=["modality", "image", "text", "test", "level0", "level1"]
    )
    # An image's partner is its first caption; a caption's partner its image.
    table["pair_row"] = np.where(
        table.modality == "image", n_images + table.image, table.image
    )
    table["split"] = np.where(table.test, "test", "train")
    table["level0"] = "g" + table.level0.astype(str)
    table["level1"] = "s" + table.level1.astype(str)
    return table


def _real_traces(sae, acts_nd: np.ndarray) -> Traces:
    result = sae.encode(torch.from_numpy(acts_nd))
    return Traces(
        result.atoms.numpy().astype(np.int32),
        result.coefficients.numpy().astype(np.float32),
        result.residual_norms.numpy().astype(np.float32),
    )


@pytest.fixture(scope="module")
def data():
    items = _items(n_images=30, captions_per_image=2, seed=0)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    acts = centres[items.level0.str[1:].astype(int)] + 0.7 * rng.normal(
        size=(len(items), 16)
    )
    acts = (acts / np.linalg.norm(acts, axis=1, keepdims=True)).astype(np.float32)
    sae = MatchingPursuitSAE(16, N_ATOMS, K, seed=3)
    with torch.no_grad():
        sae.bias_d.copy_(torch.from_numpy(acts.mean(0)))
    traces = _real_traces(sae, acts)
    energy, _ = centred_energy(acts, items["modality"].to_numpy())
    return items, acts, sae, traces, energy


def _dense_codes(traces: Traces) -> np.ndarray:
    codes = np.zeros((len(traces.atoms), N_ATOMS))
    for i, (atoms, coefs) in enumerate(
        zip(traces.atoms, traces.coefficients, strict=True)
    ):
        for a, c in zip(atoms, coefs, strict=True):
            if a >= 0:
                codes[i, a] += c
    return codes


def test_matches_dense_reference(data):
    items, acts, sae, traces, energy = data
    stats = trace_stats(traces, items, energy, N_ATOMS, StatsConfig(chunk_rows=7))
    codes = _dense_codes(traces)
    fires = codes != 0
    image = (items.modality == "image").to_numpy()
    table = stats.atoms.set_index("atom")

    np.testing.assert_allclose(table.frequency, fires.mean(0))
    np.testing.assert_allclose(table.frequency_image, fires[image].mean(0))
    np.testing.assert_allclose(table.frequency_text, fires[~image].mean(0))
    alive = fires.any(0)
    assert (table.dead.to_numpy() == ~alive).all()
    mean = codes.sum(0)[alive] / fires.sum(0)[alive]
    np.testing.assert_allclose(table.mean_coefficient[alive], mean, rtol=1e-5)
    np.testing.assert_allclose(
        table.max_coefficient[alive], codes.max(0)[alive], rtol=1e-5
    )
    width = np.diff(stats.coef_hist_edges).max()
    for atom in np.flatnonzero(alive):
        values = codes[fires[:, atom], atom]
        for q, column in ((0.5, "q50"), (0.9, "q90")):
            exact = np.quantile(values, q, method="inverted_cdf")
            assert abs(table[column][atom] - exact) <= width + 1e-6
    assert stats.coef_hist_edges[-1] == pytest.approx(codes.max())
    mass_image = codes[image].sum(0)
    np.testing.assert_allclose(
        table.modality_score[alive], (mass_image / codes.sum(0))[alive], rtol=1e-5
    )


def test_pick_steps_l0_and_fvu(data):
    items, acts, sae, traces, energy = data
    stats = trace_stats(traces, items, energy, N_ATOMS, StatsConfig(chunk_rows=11))
    expected = np.zeros((N_ATOMS, K), np.int64)
    for atoms in traces.atoms:
        for t, a in enumerate(atoms):
            if a >= 0:
                expected[a, t] += 1
    np.testing.assert_array_equal(stats.pick_steps, expected)

    l0 = (_dense_codes(traces) != 0).sum(1)
    got = stats.l0.groupby("l0")["count"].sum()
    np.testing.assert_array_equal(got.index, np.unique(l0))
    np.testing.assert_array_equal(got.to_numpy(), np.unique(l0, return_counts=True)[1])

    # FVU from the real reconstruction, per modality, at every k.
    for modality in ("image", "text"):
        mask = (items.modality == modality).to_numpy()
        x = acts[mask]
        centred = ((x - x.mean(0)) ** 2).sum()
        for k in (1, 3, K):
            recon = (
                sae.decode(
                    torch.from_numpy(_dense_codes(_real_traces_k(sae, x, k))).float()
                )
                .detach()
                .numpy()
            )
            want = ((x - recon) ** 2).sum() / centred
            got = stats.fvu_by_k.query("modality == @modality and k == @k").fvu
            np.testing.assert_allclose(got.item(), want, rtol=1e-4)
    assert stats.fvu.shape == (len(items),)
    row_fvu = traces.residual_norms[:, -1] ** 2 / energy
    np.testing.assert_allclose(stats.fvu, row_fvu, rtol=1e-5)


def _real_traces_k(sae, x, k):
    result = sae.encode(torch.from_numpy(x).float(), k=k)
    return Traces(
        result.atoms.numpy(),
        result.coefficients.numpy().astype(np.float64),
        result.residual_norms.numpy(),
    )


def test_chunking_does_not_change_anything(data):
    items, acts, sae, traces, energy = data
    small = trace_stats(traces, items, energy, N_ATOMS, StatsConfig(chunk_rows=4))
    large = trace_stats(traces, items, energy, N_ATOMS, StatsConfig(chunk_rows=10_000))
    pd.testing.assert_frame_equal(small.atoms, large.atoms)
    pd.testing.assert_frame_equal(small.top_items, large.top_items)
    pd.testing.assert_frame_equal(small.transitions, large.transitions)
    pd.testing.assert_frame_equal(small.hierarchy, large.hierarchy)
    np.testing.assert_array_equal(small.coef_hist, large.coef_hist)


def test_top_items_transitions_bridge(data):
    items, acts, sae, traces, energy = data
    stats = trace_stats(
        traces, items, energy, N_ATOMS, StatsConfig(chunk_rows=9, top_n=3)
    )
    codes = _dense_codes(traces)
    for modality in ("image", "text"):
        rows = np.nonzero((items.modality == modality).to_numpy())[0]
        for atom in range(N_ATOMS):
            col = codes[rows, atom]
            want = rows[np.lexsort((rows, -col))][:3]
            want = [r for r in want if codes[r, atom] != 0]
            got = stats.top_items.query("atom == @atom and modality == @modality")
            assert got.sort_values("rank").row.tolist() == want

    pairs = {}
    for atoms in traces.atoms:
        for t in range(K - 1):
            a, b = atoms[t], atoms[t + 1]
            if a >= 0 and b >= 0:
                pairs[(t + 1, a, b)] = pairs.get((t + 1, a, b), 0) + 1
    got = {(s, f, t): c for s, f, t, c in stats.transitions.itertuples(index=False)}
    assert got == pairs

    text_rows = np.nonzero((items.modality == "text").to_numpy())[0]
    fires = codes != 0
    both = np.zeros(N_ATOMS)
    either = np.zeros(N_ATOMS)
    for r in text_rows:
        p = items.pair_row[r]
        both += fires[r] & fires[p]
        either += fires[r] | fires[p]
    with np.errstate(invalid="ignore"):
        want = both / either
    np.testing.assert_allclose(stats.atoms.bridge_score, want, equal_nan=True)


def test_hierarchy_accuracy_by_hand():
    """Step 1 picks the group's atom, step 2 a random one: accuracy 1 then lower."""
    rng = np.random.default_rng(0)
    n = 400
    group = rng.integers(0, 4, n)
    atoms = np.stack([group, rng.integers(4, 20, n)], 1).astype(np.int32)
    traces = Traces(
        atoms,
        np.ones((n, 2), np.float32),
        np.tile(np.array([1.0, 0.5, 0.2], np.float32), (n, 1)),
    )
    items = pd.DataFrame(
        {
            "modality": np.where(np.arange(n) % 2, "text", "image"),
            "pair_row": -1,
            "text": "",
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
            "level0": [f"g{g}" for g in group],
        }
    )
    stats = trace_stats(traces, items, np.ones(n), 20)
    table = stats.hierarchy.query("modality == 'all' and level == 'level0'")
    table = table.set_index("step")
    assert table.accuracy[1] == 1.0
    assert table.accuracy[2] < 0.6
    assert table.n[1] == (items.split == "test").sum()
    assert not table.in_sample.any()
    # chance is the majority group's share among test rows
    train_major = pd.Series(group[items.split == "train"]).mode()[0]
    test_groups = group[(items.split == "test").to_numpy()]
    assert table.chance[1] == pytest.approx((test_groups == train_major).mean())

    labels = suggest_labels(stats, items)
    assert [lab.label for lab in labels[:4]] == ["g0", "g1", "g2", "g3"]
    assert labels[0].source == "level0"


def test_topk_traces_work_too(data):
    items, acts, _, _, energy = data
    sae = TopKSAE(16, N_ATOMS, K, seed=2)
    traces = _real_traces(sae, acts)
    stats = trace_stats(traces, items, energy, N_ATOMS)
    fvu = stats.fvu_by_k.query("modality == 'all'").fvu.to_numpy()
    assert fvu.shape == (K + 1,)
    assert fvu[-1] < fvu[0]
    assert stats.atoms.frequency.sum() > 0


def test_sparse_codes_sums_repeats():
    atoms = np.array([[1, 1, 2], [0, -1, -1]])
    coefs = np.array([[0.5, 0.25, 0.1], [0.3, 0.0, 0.0]])
    codes = sparse_codes(atoms, coefs, first_row=10, n_atoms=3)
    assert codes.rows.tolist() == [10, 10, 11]
    assert codes.atoms.tolist() == [1, 2, 0]
    np.testing.assert_allclose(codes.values, [0.75, 0.1, 0.3])


def test_topn_keeps_largest_across_updates():
    top = TopN(n_atoms=2, n=2)
    top.update(np.array([0, 0, 1]), np.array([5, 6, 7]), np.array([0.1, 0.9, 0.3]))
    top.update(np.array([0, 1]), np.array([8, 9]), np.array([0.5, 0.2]))
    table = top.table("image")
    assert table.query("atom == 0").row.tolist() == [6, 8]
    assert table.query("atom == 1").row.tolist() == [7, 9]


def test_histogram_quantiles_and_neighbors():
    values = np.linspace(0, 1, 1001)
    edges = np.linspace(0, 1, 101)
    hist = np.histogram(values, edges)[0][None]
    q = histogram_quantiles(hist, edges, (0.5, 0.9))
    np.testing.assert_allclose(q[0], [0.5, 0.9], atol=0.011)
    assert np.isnan(histogram_quantiles(np.zeros((1, 100), int), edges, (0.5,))).all()

    atoms = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    table = nearest_atoms(atoms, 2, block=3)
    assert table.query("atom == 0").neighbor.tolist() == [1, 2]
    assert table.query("atom == 3 and rank == 0").neighbor.item() == 2


def test_modality_split_counts():
    atoms = pd.DataFrame(
        {"dead": [False, False, False, True], "modality_score": [1.0, 0.0, 0.5, np.nan]}
    )
    assert modality_split(atoms, 0.95) == {
        "image_only": 1,
        "text_only": 1,
        "shared": 1,
        "dead": 1,
    }


def test_word_labels_prefer_distinctive_words():
    """Without categories, an atom is named by the words that set its top
    captions apart, not by the caption template they all share."""
    others = ["fish", "bird", "mouse", "horse", "cow", "goat"]
    words = ["cat"] * 3 + ["dog"] * 3 + others
    texts = [f"a picture of a {w} in the category" for w in words]
    items = pd.DataFrame({"modality": "text", "pair_row": -1, "text": texts})
    atoms = np.array([[0]] * 3 + [[1]] * 3 + [[2]] * 6, np.int32)
    ones = np.ones((12, 1), np.float32)
    traces = Traces(atoms, ones, np.ones((12, 2), np.float32))
    stats = trace_stats(traces, items, np.ones(12), 3)
    labels = suggest_labels(stats, items)
    assert labels[0].label.split(", ")[0] == "cat"
    assert labels[1].label.split(", ")[0] == "dog"
    assert labels[0].source == "words"


def test_word_labels_leave_out_words_of_a_single_top_text():
    """An atom whose top items share "frog" but each add a one-off name is
    named "frog", not "frog" plus the rarest names; two captions of one item
    do not make its name recur."""
    names = ["alpha", "beta", "gamma"]
    texts = [f"frog {n}" for n in names] + ["alpha pond"]
    texts += ["toad", "newt", "lizard", "gecko"] * 3
    owners = ["a", "b", "c", "a"] + [f"x{i}" for i in range(12)]
    items = pd.DataFrame(
        {"modality": "text", "pair_row": -1, "text": texts, "corpus_id": owners}
    )
    atoms = np.array([[0]] * 4 + [[1]] * 12, np.int32)
    ones = np.ones((16, 1), np.float32)
    traces = Traces(atoms, ones, np.ones((16, 2), np.float32))
    stats = trace_stats(traces, items, np.ones(16), 2)
    labels = suggest_labels(stats, items)
    assert labels[0].label == "frog"
    assert labels[1].label.split(", ")[0] in {"toad", "newt", "lizard", "gecko"}


def test_word_labels_never_use_caption_template_words():
    """Words in the captions of most items ("picture", "category") name no
    atom, even where they are all its top items share."""
    names = ["kalzium", "oliv", "peace", "rikva"] + [f"n{i}" for i in range(8)]
    texts = [f"a picture of {n} in the category" for n in names]
    items = pd.DataFrame({"modality": "text", "pair_row": -1, "text": texts})
    atoms = np.array([[0]] * 4 + [[1]] * 8, np.int32)
    traces = Traces(atoms, np.ones((12, 1), np.float32), np.ones((12, 2), np.float32))
    stats = trace_stats(traces, items, np.ones(12), 2)
    label = suggest_labels(stats, items)[0].label
    assert not {"picture", "category"} & set(label.split(", "))
    assert set(label.split(", ")) <= {"kalzium", "oliv", "peace", "rikva"}


def test_image_atoms_are_named_from_their_images_captions():
    """An atom that fires mostly on images is named by the captions of its top
    images, not by the few texts it also fires on."""
    colours = ["green", "red", "blue", "grey", "white", "black", "pink", "gold"]
    image_ids = [f"p{i}" for i in range(4)] + [f"q{i}" for i in range(8)]
    captions = [f"{c} parrot" for c in colours[:4]] + [f"{c} lamp" for c in colours]
    captions += ["zebra stripes", "zebra stripes", "tall post", "tiny post"]
    text_ids = image_ids + ["z0", "z1", "z2", "z3"]
    items = pd.DataFrame(
        {
            "modality": ["image"] * 12 + ["text"] * 16,
            "corpus_id": image_ids + text_ids,
            "pair_row": [-1] * 12 + list(range(12)) + [-1] * 4,
            "text": [""] * 12 + captions,
        }
    )
    # Atom 0: the parrot images (strongly) and the zebra texts (weakly);
    # atom 1: the lamp images and every other caption.
    atoms = np.array([[0]] * 4 + [[1]] * 8 + [[1]] * 12 + [[0]] * 2 + [[1]] * 2)
    coefs = np.array([[1.0]] * 12 + [[0.5]] * 12 + [[0.1]] * 2 + [[0.5]] * 2)
    n = len(items)
    traces = Traces(atoms.astype(np.int32), coefs.astype(np.float32), np.ones((n, 2)))
    stats = trace_stats(traces, items, np.ones(n), 2)
    labels = suggest_labels(stats, items)
    assert stats.atoms.modality_score[0] > 0.9
    assert labels[0].label == "parrot"
