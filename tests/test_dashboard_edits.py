"""AppTest of the Edits page against the tiny real fixture cache.

The page runs inside the real router; the generator is a freshly initialised
one saved for the tiny cache's model (pointed to by ``ATLAS_GENERATOR_DIR``),
so the pictures appear whatever the shipped weights are.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

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
    meta = {"model": {"spec": tiny_model, "fingerprint": encoder.fingerprint}}
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
