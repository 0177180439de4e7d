"""Contracts of the edit methods (backend/edits.py) on real parts.

The model is the tiny cache's mini-CLIP (real text tower), the SAE the one the
tiny cache trained, the embeddings its stored image activations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from backend import edits
from backend.sae import MatchingPursuitSAE, load_sae


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from backend.models import resolve_model

    return resolve_model(tiny_model)


@pytest.fixture(scope="module")
def parts(tiny_cache):
    """(sae, items, acts, index) of the tiny cache."""
    sae = load_sae(tiny_cache / "sae" / "mp")
    items = pd.read_parquet(tiny_cache / "activations" / "items.parquet")
    acts = np.load(tiny_cache / "activations" / "acts.npy")
    return sae, items, acts, edits.retrieval_index(items, acts)


def image_embedding(parts, i: int = 0) -> tuple[torch.Tensor, str]:
    _, items, acts, _ = parts
    images = items[items["modality"] == "image"]
    row = images.iloc[i]
    return torch.from_numpy(acts[int(row["row"])]), str(row["corpus_id"])


def first_atom(sae, e_d) -> int:
    return int(sae.encode(e_d[None]).atoms[0, 0])


# ------------------------------------------------------------ the pursuit


def test_steered_pursuit_without_steering_is_the_plain_pursuit():
    torch.manual_seed(0)
    sae = MatchingPursuitSAE(24, 80, 10, seed=3)
    with torch.no_grad():
        sae.bias_d.copy_(torch.randn(24) * 0.1)
    x_nd = torch.randn(50, 24)
    ours = edits.steered_pursuit(sae, x_nd)
    ref = sae.encode(x_nd)
    assert torch.equal(ours.atoms, ref.atoms)
    torch.testing.assert_close(ours.coefficients, ref.coefficients)
    torch.testing.assert_close(ours.residual_norms, ref.residual_norms)
    torch.testing.assert_close(ours.codes, ref.codes)


def test_banned_atoms_are_never_picked():
    sae = MatchingPursuitSAE(16, 40, 12, seed=1)
    x_nd = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    banned = set(sae.encode(x_nd).atoms[:, 0].tolist())
    result = edits.steered_pursuit(sae, x_nd, banned=banned)
    assert not set(result.atoms.flatten().tolist()) & banned
    # Reconstruction identity still holds.
    torch.testing.assert_close(sae.decode(result.codes) + result.residual, x_nd)


# ------------------------------------------------------------ text direction


def test_text_direction_alpha_zero_changes_nothing(encoder, parts):
    sae, _, _, index = parts
    e_d, cid = image_embedding(parts)
    result = edits.run_edit(
        edits.TextDirection(alpha=0.0),
        e_d,
        encoder=encoder,
        sae=sae,
        source="dog face",
        target="cat face",
        index=index,
        exclude_id=cid,
    )
    assert torch.equal(result.edited_d, result.original_d)
    assert result.changes.empty
    assert result.neighbours_before.equals(result.neighbours_after)
    sim = result.similarity.set_index("role")
    assert np.allclose(sim["before"], sim["after"])


def test_text_direction_follows_its_formula(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts, 1)
    alpha = 2.0
    result = edits.run_edit(
        edits.TextDirection(alpha=alpha),
        e_d,
        encoder=encoder,
        sae=sae,
        source="a cat",
        target="a red car",
    )
    templates = edits.DEFAULT_TEMPLATES

    def mean_text(phrase):
        embs = encoder.encode_texts([t.format(phrase) for t in templates])
        return F.normalize(embs.mean(0), dim=0)

    expected = F.normalize(
        e_d + alpha * (mean_text("a red car") - mean_text("a cat")), dim=0
    )
    torch.testing.assert_close(result.edited_d, expected, atol=1e-5, rtol=0)
    sim = result.similarity.set_index("role")[["before", "after"]]
    # The margin target - source grows along the direction.
    margin = sim.loc["target"] - sim.loc["source"]
    assert margin["after"] > margin["before"]
    assert not result.changes.empty


# ------------------------------------------------------------ CLIP-guided


def test_clip_guided_without_pull_or_jitter_changes_nothing(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts)
    method = edits.ClipGuided(target_weight=0.0, jitter=0.0, steps=20)
    result = edits.run_edit(
        method, e_d, encoder=encoder, sae=sae, source="dog", target="cat"
    )
    torch.testing.assert_close(result.edited_d, result.original_d, atol=1e-6, rtol=0)


def test_clip_guided_pulls_to_target_and_repeats_for_a_seed(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts, 2)
    kwargs = dict(encoder=encoder, sae=sae, source="a dog", target="a yellow star")
    one = edits.run_edit(edits.ClipGuided(seed=5), e_d, **kwargs)
    two = edits.run_edit(edits.ClipGuided(seed=5), e_d, **kwargs)
    other = edits.run_edit(edits.ClipGuided(seed=6, jitter=0.05), e_d, **kwargs)
    assert torch.equal(one.edited_d, two.edited_d)
    assert not torch.equal(one.edited_d, other.edited_d)
    sim = one.similarity.set_index("role")
    assert sim.at["target", "after"] > sim.at["target", "before"] + 0.01
    # The keep term holds the edit nearer the original when it weighs more.
    held = edits.run_edit(edits.ClipGuided(seed=5, keep_weight=5.0), e_d, **kwargs)
    assert float(held.edited_d @ held.original_d) > float(one.edited_d @ one.original_d)


def test_clip_guided_picture_term_needs_a_generator(parts):
    e_nd = torch.from_numpy(parts[2][:1])
    with pytest.raises(ValueError, match="generator"):
        edits.clip_guided(e_nd, e_nd, e_nd, edits.ClipGuided(picture_weight=1.0))


# ------------------------------------------------------------ atom steering


def test_removed_atom_is_absent_from_the_new_code(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts, 3)
    atom = first_atom(sae, e_d)
    before = sae.encode(e_d[None])
    result = edits.run_edit(
        edits.AtomSteering(atom, "remove", 1.0), e_d, encoder=encoder, sae=sae
    )
    assert result.steered.codes[0, atom] == 0
    assert atom not in result.steered.atoms[0].tolist()
    # The edit subtracts exactly the atom's contribution.
    removed = e_d - before.codes[0, atom] * sae.atoms_md[atom].detach()
    torch.testing.assert_close(result.edited_d, F.normalize(removed, dim=0))
    lost = result.changes.set_index("atom")
    assert lost.at[atom, "delta"] < 0


def test_added_atom_grows_by_its_strength(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts, 4)
    before = sae.encode(e_d[None])
    atom = int(before.codes[0].argmin())
    result = edits.run_edit(
        edits.AtomSteering(atom, "add", 0.4), e_d, encoder=encoder, sae=sae
    )
    gain = result.steered.codes[0, atom] - before.codes[0, atom]
    assert gain == pytest.approx(0.4, abs=1e-6)
    added = e_d + 0.4 * sae.atoms_md[atom].detach()
    torch.testing.assert_close(result.edited_d, F.normalize(added, dim=0))
    # The steered trace ends at the original residual.
    torch.testing.assert_close(result.steered.residual[0], before.residual[0])


def test_forced_atom_appears_at_its_step(encoder, parts):
    sae = parts[0]
    e_d, _ = image_embedding(parts, 5)
    before = sae.encode(e_d[None])
    atom = int(before.codes[0].argmin())
    step = 3
    result = edits.run_edit(
        edits.AtomSteering(atom, "force", 0.25, step=step),
        e_d,
        encoder=encoder,
        sae=sae,
    )
    trace = edits.trace_table(result.steered)
    assert trace.loc[trace["step"] == step, "atom"].item() == atom
    assert trace.loc[trace["step"] == step, "coefficient"].item() == pytest.approx(0.25)
    # Steps before the forced one are the plain pursuit's.
    assert result.steered.atoms[0, : step - 1].tolist() == (
        before.atoms[0, : step - 1].tolist()
    )
    assert result.steered.codes[0, atom] >= 0.25 - 1e-6


def test_steering_rejects_bad_settings(parts):
    sae = parts[0]
    with pytest.raises(ValueError, match="outside the dictionary"):
        edits.atom_steering(
            sae, torch.from_numpy(parts[2][:1]), edits.AtomSteering(10**6)
        )
    with pytest.raises(ValueError, match="fraction"):
        edits.AtomSteering(0, "remove", 1.5)
    with pytest.raises(ValueError, match="forced step"):
        edits.steered_pursuit(
            sae, torch.from_numpy(parts[2][:1]), forced={sae.config.k + 1: (0, 0.1)}
        )


# ------------------------------------------------------------ effects


def test_code_changes_statuses():
    before = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3])
    after = torch.tensor([0.4, 0.0, 0.25, 0.0, 0.3])
    table = edits.code_changes(before, after, ["a", "b", "c", "d", "e"])
    assert table["atom"].tolist() == [1, 0, 2]
    assert table["status"].tolist() == ["lost", "gained", "changed"]
    assert table["label"].tolist() == ["b", "a", "c"]


def test_neighbours_leave_out_the_edited_image(encoder, parts):
    sae, _, _, index = parts
    e_d, cid = image_embedding(parts)
    result = edits.run_edit(
        edits.TextDirection(alpha=1.0),
        e_d,
        encoder=encoder,
        sae=sae,
        source="x",
        target="y",
        index=index,
        exclude_id=cid,
    )
    for table in (result.neighbours_before, result.neighbours_after):
        assert cid not in set(table["corpus_id"])
        assert table["cosine"].is_monotonic_decreasing
    # Without the exclusion the image is its own nearest neighbour.
    assert index.nearest(e_d, 1)["corpus_id"].item() == cid


# ------------------------------------------------------------ evaluation


def test_edit_pairs_follow_the_hierarchy_rule(parts):
    items = parts[1]
    pairs = edits.edit_pairs(items, 1000, seed=0, catch_all=())
    again = edits.edit_pairs(items, 1000, seed=0, catch_all=())
    assert pairs == again
    labelled = edits._labelled_images(items, ())
    by_label = labelled.drop_duplicates("label").set_index("label")
    images = items[items["modality"] == "image"]
    split = images.set_index("corpus_id")["split"]
    for pair in pairs:
        assert split[pair.corpus_id] == "test"
        assert pair.target != pair.source
        assert by_label.at[pair.target, "parent"] == by_label.at[pair.source, "parent"]
        assert ":" not in pair.target


def test_evaluate_edits_reports_shares(encoder, parts):
    sae, items, acts, index = parts
    pairs = edits.edit_pairs(items, 20, catch_all=())
    if not pairs:
        # The tiny corpus may hold no test image with a sibling; use train ones.
        items = items.assign(split="test")
        pairs = edits.edit_pairs(items, 20, catch_all=())
    rows = edits.evaluate_edits(
        pairs,
        {"none": None, "text": edits.TextDirection(alpha=3.0)},
        encoder=encoder,
        sae=sae,
        index=index,
        acts_nd=acts,
    )
    none, text = rows
    assert none.kept == pytest.approx(1.0, abs=1e-5)
    assert none.target_gain == pytest.approx(0.0, abs=1e-6)
    assert text.target_gain > 0
    for row in rows:
        assert 0 <= row.embedding_top <= 1
        assert np.isnan(row.picture_top)


def test_clip_guided_picture_term_runs_through_generator_and_tower(encoder, parts):
    """The CLIPInverter-style term: the loss reads the decoded picture."""
    from backend import generator as gen

    torch.manual_seed(0)
    model = gen.Generator(
        gen.GeneratorConfig(encoder.card.embed_dim, channels=(16, 8, 8, 8, 8))
    ).requires_grad_(False)
    tower = gen.image_tower(encoder)
    e_nd = torch.from_numpy(parts[2][:2])
    text_nd = edits.phrase_embedding(encoder, ["a dog", "a star"])
    source_nd, target_nd = text_nd[:1], text_nd[1:]
    base = edits.ClipGuided(steps=5)
    plain = edits.clip_guided(e_nd, source_nd, target_nd, base)
    with_picture = edits.clip_guided(
        e_nd,
        source_nd,
        target_nd,
        edits.ClipGuided(steps=5, picture_weight=5.0),
        model,
        tower,
    )
    assert with_picture.shape == e_nd.shape
    assert not torch.allclose(plain, with_picture)
