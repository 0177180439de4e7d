"""The model resolver: specs, checkpoint files, safety, the embedded default."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from backend.corpus import load_corpus
from backend.models import (
    CheckpointError,
    ModelSpecError,
    parse_spec,
    resolve_model,
)

# A small open_clip architecture (ViT-S/32 image tower, 10-layer text tower).
ARCH = "ViT-S-32-alt"


@pytest.fixture(scope="module")
def images():
    corpus = load_corpus(None)
    ids = corpus.table["id"].iloc[:: max(1, len(corpus.table) // 6)][:6]
    return [corpus.open_image(i) for i in ids]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A randomly initialised open_clip model, saved in both file formats."""
    torch.manual_seed(7)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(state, str(folder / "model.safetensors"))
    torch.save({"state_dict": state}, folder / "model.pt")
    return model.eval(), preprocess, folder


TEXTS = ["a dog face", "clip art of a red car", "an emoji of food and drink: pizza"]


@pytest.mark.parametrize("filename", ["model.safetensors", "model.pt"])
def test_checkpoint_file_gives_open_clip_embeddings_exactly(
    reference, images, filename
):
    model, preprocess, folder = reference
    encoder = resolve_model(f"{ARCH}:{folder / filename}")

    with torch.no_grad():
        want_images = model.encode_image(torch.stack([preprocess(i) for i in images]))
        want_texts = model.encode_text(open_clip.get_tokenizer(ARCH)(TEXTS))

    assert torch.equal(encoder.encode_images(images), F.normalize(want_images, dim=-1))
    assert torch.equal(encoder.encode_texts(TEXTS), F.normalize(want_texts, dim=-1))
    assert encoder.card.arch == ARCH
    assert encoder.card.embed_dim == 256
    assert encoder.card.image_size == 224
    assert encoder.card.source == "checkpoint file"


def test_fingerprint_follows_the_weights_not_the_file(reference):
    _, _, folder = reference
    from_safetensors = resolve_model(f"{ARCH}:{folder / 'model.safetensors'}")
    from_pickle = resolve_model(f"{ARCH}:{folder / 'model.pt'}")
    assert from_safetensors.fingerprint == from_pickle.fingerprint

    with torch.no_grad():
        from_pickle.model.logit_scale += 1e-3
    del from_pickle.__dict__["fingerprint"]
    assert from_pickle.fingerprint != from_safetensors.fingerprint


def test_checkpoint_of_another_architecture_names_the_mismatch(reference, tmp_path):
    _, _, folder = reference
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv1\.weight"):
        resolve_model(f"ViT-S-16-alt:{folder / 'model.safetensors'}")


def test_checkpoint_missing_a_tensor_names_it(reference, tmp_path):
    model, _, _ = reference
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["visual.proj"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing from file: 1: visual\.proj"):
        resolve_model(f"{ARCH}:{tmp_path / 'cut.safetensors'}")


class _Payload:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"visual.proj": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="unpickling can run code"):
        resolve_model(f"{ARCH}:{tmp_path / 'evil.pt'}")
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "jit.pt")
    with pytest.raises(CheckpointError, match="TorchScript"):
        resolve_model(f"{ARCH}:{tmp_path / 'jit.pt'}")


@pytest.mark.parametrize(
    ("spec", "kind", "arch", "target"),
    [
        ("mini", "mini", "mini-clip", None),
        ("mini:/some/folder", "mini", "mini-clip", "/some/folder"),
        ("ViT-B-32:laion2b_s34b_b79k", "tag", "ViT-B-32", "laion2b_s34b_b79k"),
        (
            "ViT-B-32:/no/such/file.safetensors",
            "file",
            "ViT-B-32",
            "/no/such/file.safetensors",
        ),
        ("RN50:openai", "tag", "RN50", "openai"),
    ],
)
def test_parse_spec(spec, kind, arch, target):
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.arch, parsed.target) == (kind, arch, target)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("ViT-B-32", ModelSpecError, "not 'mini', 'ARCH:TAG' or 'ARCH:PATH'"),
        ("No-Such-Arch:openai", ModelSpecError, "unknown open_clip architecture"),
        (f"{ARCH}:not_a_tag", ModelSpecError, "neither a pretrained tag"),
        (f"{ARCH}:/no/such/file.pt", CheckpointError, "not found"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, error, match):
    with pytest.raises(error, match=match):
        resolve_model(spec)


def test_mini_is_the_default_and_normalises(images):
    encoder = resolve_model()
    card = encoder.card
    assert (card.arch, card.source, card.embed_dim) == ("mini-clip", "embedded", 384)
    assert card.preprocess["size"] == card.image_size

    image_nd = encoder.encode_images(images, batch_size=4)
    text_nd = encoder.encode_texts(TEXTS, batch_size=2)
    assert image_nd.shape == (len(images), 384) and image_nd.dtype == torch.float32
    assert text_nd.shape == (len(TEXTS), 384) and text_nd.dtype == torch.float32
    norms = torch.cat([image_nd, text_nd]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)

    # Batching does not change an embedding beyond float noise.
    one_by_one = torch.cat([encoder.encode_images([im]) for im in images])
    assert torch.allclose(one_by_one, image_nd, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, 384)
    assert encoder.encode_images([]).shape == (0, 384)


def test_mini_card_round_trips_through_json():
    import json

    card = resolve_model("mini").card.to_dict()
    assert json.loads(json.dumps(card)) == card
    assert card["preprocess"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
