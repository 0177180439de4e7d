"""AppTest of the Edits page against the tiny real fixture cache.

The page runs inside the real router; the generator is a freshly initialised
one saved for the tiny cache's model (pointed to by ``ATLAS_GENERATOR_DIR``),
so the pictures appear whatever the shipped weights are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from backend import edits
from backend import generator as gen

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "streamlit_app.py")
PAGE = "dashboard/pages/edits.py"
TIMEOUT = 180


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tiny_cache, tiny_model):
    from backend.models import resolve_model

    encoder = resolve_model(tiny_model)
    torch.manual_seed(0)
    model = gen.Generator(
        gen.GeneratorConfig(encoder.card.embed_dim, channels=(16, 8, 8, 8, 8))
    )
    folder = tmp_path_factory.mktemp("generator")
    meta = {
        "model": {"spec": tiny_model, "fingerprint": encoder.fingerprint},
        "test": {"cosine": 0.5, "cosine_baseline": 0.25},
    }
    gen.save_generator(model, folder, meta)
    return folder


@pytest.fixture
def env(tiny_cache, tiny_cache_root, generator_dir, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(tiny_cache_root))
    monkeypatch.setenv("ATLAS_GENERATOR_DIR", str(generator_dir))
    return tiny_cache


def open_edits(source: str = "", target: str = "") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.switch_page(PAGE)
    at.run()
    if source or target:
        at.text_input(key="edit_source_text").input(source)
        at.text_input(key="edit_target_text").input(target)
        at.run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def changes_of(at: AppTest) -> pd.DataFrame:
    return next(f for f in frames(at) if "status" in f.columns)


def traces_of(at: AppTest) -> list[pd.DataFrame]:
    return [f for f in frames(at) if "residual_norm" in f.columns]


def test_page_asks_for_texts_then_shows_the_edit(env):
    at = open_edits()
    assert_clean(at)
    assert any("source and a target" in i.value for i in at.info)
    at.text_input(key="edit_source_text").input("dog face")
    at.text_input(key="edit_target_text").input("cat face")
    at.run()
    assert_clean(at)
    assert [s.value for s in at.subheader] == [
        "Code changes",
        "Traces",
        "Nearest corpus images",
    ]
    similarity = next(f for f in frames(at) if "role" in f.columns)
    assert similarity["text"].tolist() == ["dog face", "cat face"]
    assert len(traces_of(at)) == 2
    captions = [c for image in at.image for c in image.captions]
    assert {"original", "reconstruction G(e)", "edited G(e')"} <= set(captions)
    # Five neighbours before and five after, each captioned "label · cosine".
    assert sum(" · " in c for c in captions) == 10
    # How far to trust the pictures, with the generator's held-out cosine.
    note = next(c.value for c in at.caption if "rough shape only" in c.value)
    assert "0.500" in note and "0.250" in note
    assert "nearest corpus images below are the reliable read-out" in note


def test_same_seed_same_result(env):
    at = open_edits("a dog", "a star")
    at.radio(key="edit_method").set_value("CLIP-guided").run()
    assert_clean(at)
    first = changes_of(at)
    at.run()
    pd.testing.assert_frame_equal(first, changes_of(at))
    again = open_edits("a dog", "a star")
    again.radio(key="edit_method").set_value("CLIP-guided").run()
    pd.testing.assert_frame_equal(first, changes_of(again))


def test_alpha_zero_shows_no_change(env):
    at = open_edits("a dog", "a star")
    at.slider(key="edit_alpha").set_value(0.0).run()
    assert_clean(at)
    assert changes_of(at).empty
    assert any("0 atoms gained, 0 lost, 0 changed" in m.value for m in at.markdown)


def test_removing_an_atom_of_the_code(env):
    at = open_edits()
    at.radio(key="edit_method").set_value("Atom steering").run()
    assert_clean(at)
    before = traces_of(at)[0]
    atom = int(before["atom"].iloc[0])
    at.number_input(key="edit_atom").set_value(atom)
    at.radio(key="edit_action").set_value("remove").run()
    assert_clean(at)
    before, after, steered = traces_of(at)
    assert atom in before["atom"].tolist()
    assert atom not in steered["atom"].tolist()
    lost = changes_of(at).set_index("atom")
    assert lost.at[atom, "delta"] < 0


def captions_of(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def neighbour_labels(at: AppTest) -> tuple[list[str], list[str]]:
    """Labels of the nearest corpus images before and after, by rank."""
    labels = [c.rsplit(" · ", 1)[0] for c in captions_of(at) if " · " in c]
    half = len(labels) // 2
    return labels[:half], labels[half:]


def verdicts(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**Target ")]


def test_verdict_gives_the_rank_of_the_target_label(env):
    at = open_edits("a face", "anything")
    at.slider(key="edit_alpha").set_value(0.0).run()
    before, after = neighbour_labels(at)
    assert before == after and len(after) == 5
    # The nearest label, typed in capitals: matched case-insensitively.
    target = after[0].upper()
    at.text_input(key="edit_target_text").input(target).run()
    assert_clean(at)
    assert verdicts(at) == [
        f"**Target reached:** '{target}' is the 1st nearest corpus image after "
        "the edit (it was already the 1st before)."
    ]
    # The verdict comes right after the pictures, before the code changes.
    texts = [m.value for m in at.markdown]
    counts = next(i for i, t in enumerate(texts) if "atoms gained" in t)
    assert texts.index(verdicts(at)[0]) < counts
    at.text_input(key="edit_target_text").input("zebra crossing").run()
    assert verdicts(at) == [
        "**Target not among the 5 nearest corpus images** after the edit: no "
        "corpus image has a label matching 'zebra crossing'."
    ]
    # A whole word of a label matches; part of a word does not.
    label = next(lab for lab in after if len(lab.split()) > 1)
    word = label.split()[-1].strip(":,")
    rank = next(
        r
        for r, lab in enumerate(after, 1)
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", lab, re.IGNORECASE)
    )
    at.text_input(key="edit_target_text").input(word).run()
    assert verdicts(at)[0].startswith(f"**Target reached:** '{word}' is the {rank}")
    at.text_input(key="edit_target_text").input(word[:-1]).run()
    assert verdicts(at)[0].startswith("**Target not among the 5 nearest")


def closest_atom(cache: Path, model: str, text: str) -> int:
    """The MP atom whose direction is closest to T(text), computed here."""
    from backend.models import resolve_model
    from backend.sae import load_sae

    atoms_md = load_sae(Path(cache) / "sae/mp").atoms_md.detach().float()
    text_d = edits.phrase_embedding(resolve_model(model), [text])[0]
    return int((atoms_md @ text_d).argmax())


def test_steering_atom_is_prefilled_from_the_target_text(env, tiny_model):
    texts = ["cat face", "a red car", "stars", "music", "a tree", "the sea"]
    best = {t: closest_atom(env, tiny_model, t) for t in texts}
    first = next(t for t in texts if best[t] != 0)
    second = next(t for t in texts if best[t] not in (0, best[first]))
    at = open_edits("", first)
    at.radio(key="edit_method").set_value("Atom steering").run()
    assert_clean(at)
    assert at.number_input(key="edit_atom").value == best[first]
    assert any(
        f"Atom {best[first]} " in c.value and "chosen from the target text" in c.value
        for c in at.caption
    )
    # A hand-picked atom stays, also across another method ...
    mine = 0
    at.number_input(key="edit_atom").set_value(mine).run()
    assert at.number_input(key="edit_atom").value == mine
    at.radio(key="edit_method").set_value("Text direction").run()
    at.radio(key="edit_method").set_value("Atom steering").run()
    assert at.number_input(key="edit_atom").value == mine
    assert any(
        f"closest to the target text '{first}' is {best[first]}" in c.value
        for c in at.caption
    )
    # ... until the target text changes.
    at.text_input(key="edit_target_text").input(second).run()
    assert_clean(at)
    assert at.number_input(key="edit_atom").value == best[second]


def test_a_large_edit_says_how_much_of_the_code_it_replaced(env):
    at = open_edits("a face", "anything")
    at.slider(key="edit_alpha").set_value(4.0).run()
    assert_clean(at)
    lost = int((changes_of(at)["status"] == "lost").sum())
    n_code = len(traces_of(at)[0])
    assert 2 * lost > n_code  # with alpha 4 most of the code is replaced
    said = [m.value for m in at.markdown if m.value.startswith("The edit replaced")]
    expected = f"The edit replaced {lost} of the {n_code} atoms of the code"
    assert [s.startswith(expected) for s in said] == ([True] * (2 * lost > n_code))
    at.slider(key="edit_alpha").set_value(0.0).run()
    assert not [m for m in at.markdown if m.value.startswith("The edit replaced")]
