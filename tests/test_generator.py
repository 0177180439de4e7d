"""The embedding-to-picture generator (backend/generator.py) on real parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend import generator as gen
from backend.corpus import load_corpus
from backend.sae import MatchingPursuitSAE


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from backend.models import resolve_model

    return resolve_model(tiny_model)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None)


@pytest.fixture(scope="module")
def small_data(encoder, corpus):
    return gen.prepare_pictures(encoder, corpus, "train", 64, limit=16, progress=False)


TINY = gen.GeneratorTrainConfig(
    epochs=3, batch_size=8, lr=3e-3, channels=(32, 16, 16, 8, 8), threads=2
)


def test_generator_shapes_and_range():
    model = gen.Generator(gen.GeneratorConfig(embed_dim=20))
    out = model(F.normalize(torch.randn(3, 20), dim=-1))
    assert out.shape == (3, 3, 64, 64)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with pytest.raises(ValueError, match="image_size"):
        gen.GeneratorConfig(embed_dim=20, image_size=48)


def test_image_tower_equals_the_encoder_on_a_picture(encoder):
    """The differentiable tower reads a [0, 1] picture as encode_images does."""
    rng = np.random.default_rng(0)
    size = encoder.card.image_size
    pixels = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    tower = gen.image_tower(encoder)
    pictures = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    ours = tower(pictures)
    theirs = encoder.encode_images(images)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # Frozen: no parameter of the model asks for gradients.
    assert not any(p.requires_grad for p in tower.parameters())


def test_training_lowers_l1_and_repeats_for_a_seed(encoder, small_data):
    one = gen.train_generator(encoder, small_data, TINY, progress=False)
    two = gen.train_generator(encoder, small_data, TINY, progress=False)
    assert one.history[-1]["l1"] < one.history[0]["l1"]
    for a, b in zip(
        one.generator.state_dict().values(),
        two.generator.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_clip_term_trains_through_the_frozen_tower(encoder, small_data):
    """With the CLIP term on, the generator's pictures read closer to their
    embeddings through the tower than with it off; the tower is untouched."""
    tower = gen.image_tower(encoder)
    frozen = {k: v.clone() for k, v in tower.state_dict().items()}
    settings = {**TINY.__dict__, "epochs": 2, "clip_images": 8}

    def clip_loss(weight: float) -> float:
        config = gen.GeneratorTrainConfig(**{**settings, "clip_weight": weight})
        model = gen.train_generator(encoder, small_data, config, False).generator
        with torch.no_grad():
            seen = tower(model(small_data.emb_nd))
        return float((1 - (seen * small_data.emb_nd).sum(-1)).mean())

    assert clip_loss(20.0) < clip_loss(0.0)
    for name, tensor in gen.image_tower(encoder).state_dict().items():
        assert torch.equal(tensor, frozen[name])


def test_save_load_round_trip_and_model_check(tmp_path):
    torch.manual_seed(0)
    model = gen.Generator(gen.GeneratorConfig(embed_dim=20, channels=TINY.channels))
    meta = {"model": {"spec": "x", "fingerprint": "abc"}}
    gen.save_generator(model, tmp_path, meta)
    loaded = gen.load_generator(tmp_path, model_fingerprint="abc")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half().float())
    with pytest.raises(ValueError, match="trained for model 'x'"):
        gen.load_generator(tmp_path, model_fingerprint="other")
    with pytest.raises(FileNotFoundError, match="generator train"):
        gen.load_generator(tmp_path / "missing")


def test_atom_picture_decodes_bias_plus_scaled_atom():
    sae = MatchingPursuitSAE(20, 30, 4, seed=0)
    model = gen.Generator(gen.GeneratorConfig(embed_dim=20, channels=(8, 8, 8, 8, 8)))
    picture = gen.atom_picture(sae, model, atom=7, scale=0.5)
    assert picture.size == (64, 64) and picture.mode == "RGB"
    expected = F.normalize(sae.bias_d.detach() + 0.5 * sae.atoms_md[7].detach(), dim=0)
    torch.testing.assert_close(gen.atom_embedding(sae, 7, 0.5), expected)
    direct = gen.decode_pictures(model, expected[None])[0]
    assert np.array_equal(np.asarray(direct), np.asarray(picture))
    with pytest.raises(IndexError):
        gen.atom_picture(sae, model, atom=30)


def folder_corpus(root, corpus, n_train: int = 12, n_test: int = 4):
    """A folder of real corpus images with a captions.csv fixing the split."""
    rows = ["file,caption,split"]
    for i, cid in enumerate(corpus.table["id"][: n_train + n_test]):
        corpus.open_image(cid).save(root / f"{i}.png")
        split = "train" if i < n_train else "test"
        rows.append(f"{i}.png,{corpus.table['captions'].iloc[i][0]},{split}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_command_writes_weights_config_and_notes(tmp_path, tiny_model, corpus):
    from backend.cli import main

    (tmp_path / "images").mkdir()
    images = folder_corpus(tmp_path / "images", corpus)
    out = tmp_path / "gen"
    args = ["generator", "train", "--model", tiny_model, "--corpus", str(images)]
    args += ["--out", str(out), "--cache-root", str(tmp_path / "cache")]
    args += ["--epochs", "1", "--batch-size", "8"]
    assert main(args) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["n_train"] == 12 and meta["test"]["n"] == 4
    assert (out / "weights.safetensors").stat().st_size > 0
    notes = (out / "TRAINING.md").read_text()
    assert "python -m backend generator train" in notes and "--epochs 1" in notes
    # The corpus embeddings were kept for the next run.
    assert len(list((tmp_path / "cache" / "embeddings").glob("images-*.npz"))) == 1


def test_shipped_generator_beats_a_constant_picture(encoder, corpus):
    """The shipped weights decode held-out embeddings into pictures that CLIP
    reads closer to the input than the mean training picture."""
    meta = gen.generator_meta()
    model = gen.load_generator(model_fingerprint=None)
    if meta["model"]["fingerprint"] != gen.model_fingerprint(encoder):
        pytest.skip(
            "the tiny cache's model is not the one the generator was shipped for"
        )
    data = gen.prepare_pictures(encoder, corpus, "test", 64, limit=64, progress=False)
    report = gen.evaluate_generator(model, encoder, data)
    assert report.cosine > report.cosine_baseline + 0.05
    assert gen.DEFAULT_DIR.joinpath("weights.safetensors").stat().st_size <= 20e6
