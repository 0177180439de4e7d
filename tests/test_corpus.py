"""The default corpus and user folders load into the same table contract."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from backend.corpus import COLUMNS, DEFAULT_ROOT, load_corpus

EMOJI = DEFAULT_ROOT / "images" / "emoji"
DOG, CAT, FROG = "1f436.webp", "1f431.webp", "1f438.webp"


@pytest.fixture(scope="module")
def default():
    return load_corpus()


def test_default_corpus_columns_and_contract(default):
    table = default.table
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert len(table) == default.meta["n_images"] > 10_000
    assert table["id"].is_unique
    assert set(table["split"]) == {"train", "test"}
    assert 0.05 < (table["split"] == "test").mean() < 0.15
    assert table["captions"].map(len).min() >= 3
    assert set(table["source"]) == {"noto-emoji", "openclipart"}
    assert default.report.n_skipped == 0
    assert set(default.meta["catch_all_level0"]) >= {"Component", "unsorted"}

    image = default.open_image("emoji-1f436")
    assert image.mode == "RGB" and image.size == (96, 96)


def test_default_captions_carry_hierarchy_words(default):
    row = default.table.set_index("id").loc["emoji-1f436"]
    assert (row.level0, row.level1, row.level2) == (
        "Animals & Nature",
        "animal-mammal",
        "dog face",
    )
    joined = " | ".join(row.captions)
    assert "dog face" in row.captions
    assert "animal mammal" in joined and "animals and nature" in joined

    clipart = default.table[default.table["source"] == "openclipart"]
    for _, row in clipart.head(50).iterrows():
        assert any(row.level0.replace("_", " ") in c for c in row.captions)


def _emoji_base(name: str) -> str:
    """An independent base name: drop a ': ...skin tone' tail and a gender word."""
    name = re.sub(r": .*skin tone.*$", "", name)
    return re.sub(r"^(man|woman|person) ", "", name)


def test_emoji_variants_share_a_split(default):
    emoji = default.table[default.table["source"] == "noto-emoji"]
    bases = emoji["level2"].map(_emoji_base)
    splits_per_base = emoji.groupby(bases)["split"].nunique()
    assert splits_per_base.max() == 1
    # the groups are real: skin-tone and gender variants were merged
    assert emoji.groupby(bases).size()["raising hand"] >= 18


def test_clipart_same_name_shares_a_split(default):
    table = default.table
    assert table.groupby("group")["split"].nunique().max() == 1
    jigsaw = table[table["image"].str.contains("shapes/jigsaw/jigsaw_blue_")]
    assert len(jigsaw) > 5 and jigsaw["split"].nunique() == 1


def _user_folder(root: Path) -> Path:
    (root / "pets").mkdir(parents=True)
    (root / "wild").mkdir()
    shutil.copy(EMOJI / DOG, root / "pets" / "dog_01.webp")
    shutil.copy(EMOJI / CAT, root / "pets" / "cat_01.webp")
    with Image.open(EMOJI / FROG) as frog:
        frog.convert("RGB").save(root / "wild" / "frog.png")
    return root


def test_captions_csv_folder(tmp_path):
    root = _user_folder(tmp_path)
    pd.DataFrame(
        {
            "file": ["pets/dog_01.webp", "pets/dog_01.webp", "wild/frog.png", "x.png"],
            "caption": ["a dog", "a happy puppy", "a green frog", "missing"],
            "level0": ["animal", "animal", "animal", ""],
            "split": ["test", "", "train", ""],
        }
    ).to_csv(root / "captions.csv", index=False)

    corpus = load_corpus(root)
    table = corpus.table.set_index("id")
    assert table.loc["pets/dog_01.webp", "captions"] == ["a dog", "a happy puppy"]
    assert table.loc["pets/dog_01.webp", "split"] == "test"
    assert table.loc["pets/dog_01.webp", "level0"] == "animal"
    # an image without a captions row is kept, labelled by its folder
    assert table.loc["pets/cat_01.webp", "captions"] == []
    assert table.loc["pets/cat_01.webp", "level0"] == "pets"
    # a row naming a missing file is skipped and counted
    assert corpus.report.skipped == {"missing file": 1}
    assert len(corpus) == 3


def test_captions_jsonl_folder(tmp_path):
    root = _user_folder(tmp_path)
    lines = [
        {"file": "pets/dog_01.webp", "captions": ["a dog", "puppy"], "level1": "dog"},
        {"file": "pets/cat_01.webp", "caption": "a cat"},
        {"file": "wild/frog.png", "captions": "a frog", "split": "test"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    table = load_corpus(root).table.set_index("id")
    assert table.loc["pets/dog_01.webp", "captions"] == ["a dog", "puppy"]
    assert table.loc["pets/dog_01.webp", "level1"] == "dog"
    assert table.loc["pets/cat_01.webp", "captions"] == ["a cat"]
    assert table.loc["wild/frog.png", "split"] == "test"


def test_bad_captions_file_is_a_clear_error(tmp_path):
    root = _user_folder(tmp_path)
    pd.DataFrame({"path": ["pets/dog_01.webp"]}).to_csv(root / "captions.csv")
    with pytest.raises(ValueError, match="'file' column"):
        load_corpus(root)


def test_folder_without_captions(tmp_path):
    root = _user_folder(tmp_path)
    corpus = load_corpus(root)
    table = corpus.table.set_index("id")
    assert sorted(table.index) == [
        "pets/cat_01.webp",
        "pets/dog_01.webp",
        "wild/frog.png",
    ]
    assert table["captions"].map(len).sum() == 0
    assert table.loc["wild/frog.png", "level0"] == "wild"
    assert table["level1"].isna().all()
    assert load_corpus(root).table["split"].tolist() == corpus.table["split"].tolist()
    assert corpus.open_image("wild/frog.png").mode == "RGB"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'default' nor"):
        load_corpus(tmp_path / "nowhere")


def test_fingerprint_follows_content(tmp_path):
    root = _user_folder(tmp_path / "a")
    before = load_corpus(root).fingerprint()

    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    assert load_corpus(copy).fingerprint() == before

    with Image.open(EMOJI / CAT) as cat:
        cat.convert("RGB").save(root / "wild" / "frog.png")
    assert load_corpus(root).fingerprint() != before


def test_build_is_reproducible(tmp_path):
    from backend.corpus_build import BuildConfig, build_corpus, check_sources

    try:
        check_sources()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    first = build_corpus(BuildConfig(out=tmp_path / "one", limit=15))
    second = build_corpus(BuildConfig(out=tmp_path / "two", limit=15))
    assert first == second and first["n_images"] == 30
    files = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")
    )
    for rel in files:
        if (tmp_path / "one" / rel).is_file():
            assert (tmp_path / "one" / rel).read_bytes() == (
                tmp_path / "two" / rel
            ).read_bytes(), rel
    assert len(load_corpus(tmp_path / "one")) == 30


def test_image_checks_are_kept_until_a_file_changes(tmp_path, monkeypatch):
    from backend import corpus as corpus_module

    root = _user_folder(tmp_path / "folder")
    monkeypatch.setattr(corpus_module, "CHECKS_DIR", tmp_path / "checks")
    monkeypatch.setattr(corpus_module, "CHECKS_MIN_IMAGES", 1)
    monkeypatch.setattr(corpus_module, "_CHECKED", {})
    assert len(load_corpus(root).table) == 3
    assert len(list((tmp_path / "checks").glob("*.json"))) == 1

    # A new process: nothing in memory, so only the kept results can help.
    checked = []
    real_check = corpus_module.check_image
    monkeypatch.setattr(corpus_module, "_CHECKED", {})
    monkeypatch.setattr(
        corpus_module,
        "check_image",
        lambda path, *args: checked.append(path) or real_check(path, *args),
    )
    assert len(load_corpus(root).table) == 3
    assert checked == []

    # An edited file is checked again, and its new state counts.
    frog = root / "wild" / "frog.png"
    frog.write_bytes(frog.read_bytes()[:100])
    corpus = load_corpus(root)
    assert checked == [frog]
    assert len(corpus.table) == 2
    assert corpus.report.n_skipped == 1
