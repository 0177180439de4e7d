"""A generator that turns CLIP image embeddings back into pictures.

The edits of :mod:`backend.edits` move an image's embedding on CLIP's unit
sphere; to *see* an edit, this module decodes an embedding into a small RGB
picture. The :class:`Generator` is a plain convolutional decoder:

    e (d,) -> linear -> (C, 4, 4) -> [upsample x2, (conv, norm, SiLU) x c] x 4
           -> conv (+ base picture logits) -> sigmoid -> picture (3, 64, 64) in [0, 1]

It is trained on the corpus with the CLIP image tower frozen, minimising

    L = |G(e) - x|_1  +  clip_weight * (1 - cos(I(G(e)), e))

where ``x`` is the image the embedding ``e`` came from (resized to the output
size) and ``I`` is the frozen image tower applied differentiably to the
generated picture. The first term asks for the right pixels, the second for a
picture that CLIP reads as the same thing. Embeddings are jittered during
training (``e + noise``, renormalised) so that the edited embeddings, which
lie a little off the corpus, still decode to sensible pictures.

A generator belongs to one CLIP embedding space: its ``config.json`` records
the model spec and weight fingerprint, and :func:`load_generator` refuses a
generator trained for another model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from backend.atomic import atomic_path, write_json, write_text

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "generator"


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of a :class:`Generator`.

    Attributes
    ----------
    embed_dim:
        Width ``d`` of the CLIP joint space the generator reads.
    image_size:
        Side of the square output picture in pixels; a power of two times 4.
    channels:
        Feature channels at 4x4, 8x8, ... up to ``image_size``; one entry per
        resolution from 4 up to ``image_size / 2``, so ``len(channels) ==
        log2(image_size / 4)`` upsampling blocks follow the 4x4 seed.
    convs_per_block:
        3x3 convolutions (each with GroupNorm and SiLU) after each upsampling.
    """

    embed_dim: int
    image_size: int = 64
    channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    convs_per_block: int = 1

    def __post_init__(self) -> None:
        blocks = math.log2(self.image_size / 4)
        if blocks != int(blocks) or blocks < 1:
            raise ValueError(
                f"image_size {self.image_size} is not 4 * 2**n; use 32, 64 or 128"
            )
        if len(self.channels) != int(blocks) + 1:
            raise ValueError(
                f"image_size {self.image_size} needs {int(blocks) + 1} channel "
                f"entries (4x4 seed plus one per upsampling), got {self.channels}"
            )


class Generator(nn.Module):
    """Convolutional decoder from a CLIP embedding to an RGB picture.

    ``forward(emb_nd)`` maps ``(n, embed_dim)`` float32 embeddings (expected
    L2-normalised) to ``(n, 3, image_size, image_size)`` pictures in [0, 1].
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        first = config.channels[0]
        self.seed = nn.Linear(config.embed_dim, first * 16)
        blocks = []
        for c_in, c_out in zip(config.channels[:-1], config.channels[1:], strict=True):
            blocks.append(_up_block(c_in, c_out, config.convs_per_block))
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(config.channels[-1], 3, kernel_size=3, padding=1)
        # Logits of a base picture the network adds to (training sets it to
        # the mean training picture, so learning starts from there).
        size = config.image_size
        self.base_3hw = nn.Parameter(torch.zeros(3, size, size))

    def forward(self, emb_nd: torch.Tensor) -> torch.Tensor:
        # Scale up: unit-norm inputs have entries of size ~1/sqrt(d).
        x = self.seed(emb_nd * math.sqrt(self.config.embed_dim))
        x = x.view(len(emb_nd), self.config.channels[0], 4, 4)
        x = self.blocks(F.silu(x))
        return torch.sigmoid(self.to_rgb(x) + self.base_3hw)


def _up_block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")]
    for k in range(convs):
        layers += [
            nn.Conv2d(c_in if k == 0 else c_out, c_out, kernel_size=3, padding=1),
            nn.GroupNorm(math.gcd(8, c_out), c_out),
            nn.SiLU(),
        ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# The frozen image tower, differentiable in the picture.


class ImageTower(nn.Module):
    """CLIP's image tower as a differentiable function of a [0, 1] picture.

    Does what the model's own preprocessing does to a square picture
    (resize to the tower's input size, normalise by its mean and std), then
    ``encode_image`` and L2 normalisation. The weights are frozen.

    Parameters
    ----------
    clip_model:
        An open_clip model (anything with ``encode_image``).
    image_size, mean, std:
        The tower's input side and normalisation constants, as the model's
        card records them.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.clip_model = clip_model.eval()
        for param in self.clip_model.parameters():
            param.requires_grad_(False)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pictures_n3hw: torch.Tensor) -> torch.Tensor:
        if pictures_n3hw.shape[-1] != self.image_size:
            pictures_n3hw = F.interpolate(
                pictures_n3hw,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        x = (pictures_n3hw - self.mean) / self.std
        return F.normalize(self.clip_model.encode_image(x), dim=-1)


def image_tower(encoder) -> ImageTower:
    """Build the frozen differentiable :class:`ImageTower` of an encoder.

    Reads the open_clip model and the normalisation constants from the
    encoder returned by :func:`backend.models.resolve_model`.
    """
    clip_model = _clip_model(encoder)
    mean, std = _normalisation(encoder)
    return ImageTower(clip_model, encoder.card.image_size, mean, std)


def _clip_model(encoder) -> nn.Module:
    for name in ("model", "clip_model", "clip"):
        model = getattr(encoder, name, None)
        if model is not None and hasattr(model, "encode_image"):
            return model
    raise TypeError(
        f"{type(encoder).__name__} exposes no open_clip model with encode_image; "
        "the generator needs the image tower to train (use backend.models."
        "resolve_model)"
    )


def _normalisation(encoder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the encoder's preprocessing (its card's PreprocessCfg)."""
    preprocess = encoder.card.preprocess
    if "mean" not in preprocess or "std" not in preprocess:
        raise TypeError(
            "the encoder's card records no normalisation mean/std; cannot feed "
            "generated pictures to its image tower"
        )
    return _triple(preprocess["mean"]), _triple(preprocess["std"])


def _triple(value) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


# --------------------------------------------------------------------------
# Pictures in and out.


def pictures_to_pil(pictures_n3hw: torch.Tensor) -> list[Image.Image]:
    """Convert ``(n, 3, h, w)`` pictures in [0, 1] to RGB PIL images."""
    arr = (pictures_n3hw.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]


def pil_to_pictures(images: list[Image.Image], size: int) -> torch.Tensor:
    """Resize RGB PIL images to ``size`` x ``size``; ``(n, 3, size, size)`` uint8."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def decode_pictures(
    generator: Generator, emb_nd: torch.Tensor, batch_size: int = 256
) -> list[Image.Image]:
    """Decode embeddings ``(n, d)`` into ``n`` PIL pictures.

    Inputs are L2-normalised first, as during training.
    """
    generator.eval()
    emb_nd = F.normalize(torch.as_tensor(emb_nd, dtype=torch.float32), dim=-1)
    out: list[Image.Image] = []
    for start in range(0, len(emb_nd), batch_size):
        out += pictures_to_pil(generator(emb_nd[start : start + batch_size]))
    return out


def atom_embedding(sae, atom: int, scale: float) -> torch.Tensor:
    """The embedding ``normalise(bias + scale * atom)`` of one atom, ``(d,)``."""
    atoms_md = torch.as_tensor(sae.atoms_md).detach().float()
    bias_d = torch.as_tensor(sae.bias_d).detach().float()
    if not 0 <= atom < len(atoms_md):
        raise IndexError(
            f"atom {atom} is outside the dictionary (0..{len(atoms_md) - 1})"
        )
    return F.normalize(bias_d + scale * atoms_md[atom], dim=-1)


def atom_picture(
    sae, generator: Generator, atom: int, scale: float = 1.0
) -> Image.Image:
    """A picture of a single atom: the generator's view of bias plus scaled atom.

    Parameters
    ----------
    sae:
        An SAE exposing ``atoms_md`` (unit-norm rows) and ``bias_d``.
    generator:
        A generator trained for the same CLIP space.
    atom:
        Row of the dictionary.
    scale:
        Coefficient given to the atom; CLIP embeddings have unit norm, so
        scales of about 0.3-2 span "a hint of" to "dominated by" the atom.
    """
    return decode_pictures(generator, atom_embedding(sae, atom, scale)[None])[0]


# --------------------------------------------------------------------------
# Save and load.


def save_generator(generator: Generator, out_dir: str | Path, meta: dict) -> None:
    """Write ``weights.safetensors`` (float16) and ``config.json`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().half().contiguous() for k, v in generator.state_dict().items()
    }
    with atomic_path(out_dir / "weights.safetensors") as tmp:
        save_file(tensors, str(tmp))
    config = dataclasses.asdict(generator.config)
    write_json(out_dir / "config.json", {"generator": config, **meta})


def load_generator(
    directory: str | Path = DEFAULT_DIR, model_fingerprint: str | None = None
) -> Generator:
    """Load a generator saved by :func:`save_generator`.

    Parameters
    ----------
    directory:
        Folder with ``weights.safetensors`` and ``config.json``.
    model_fingerprint:
        When given, the fingerprint of the CLIP model the caller works with;
        a generator trained for a different model raises ``ValueError``.
    """
    directory = Path(directory)
    if not (directory / "weights.safetensors").exists():
        raise FileNotFoundError(
            f"no generator in {directory}; train one with "
            "`python -m backend generator train --out DIR`"
        )
    meta = json.loads((directory / "config.json").read_text())
    trained_for = meta.get("model", {}).get("fingerprint")
    if model_fingerprint and trained_for and trained_for != model_fingerprint:
        raise ValueError(
            f"the generator in {directory} was trained for model "
            f"{meta['model'].get('spec')!r} (fingerprint {trained_for}), not for "
            f"this model ({model_fingerprint}); train one for it with "
            "`python -m backend generator train --model SPEC --out DIR`"
        )
    cfg = meta["generator"]
    generator = Generator(
        GeneratorConfig(
            embed_dim=cfg["embed_dim"],
            image_size=cfg["image_size"],
            channels=tuple(cfg["channels"]),
            convs_per_block=cfg.get("convs_per_block", 2),
        )
    )
    state = {
        k: v.float()
        for k, v in load_file(str(directory / "weights.safetensors")).items()
    }
    generator.load_state_dict(state)
    # Inference only: gradients may flow through it (CLIP-guided edits with a
    # picture term) but never into its weights.
    generator.requires_grad_(False)
    return generator.eval()


def generator_meta(directory: str | Path = DEFAULT_DIR) -> dict:
    """The ``config.json`` of a saved generator (training settings, metrics)."""
    return json.loads((Path(directory) / "config.json").read_text())


# --------------------------------------------------------------------------
# Training and evaluation.


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Settings of :func:`train_generator`.

    Attributes
    ----------
    epochs:
        Passes over the training split (unless ``steps`` is set).
    steps:
        Total optimiser steps; overrides ``epochs`` (the last epoch may be
        partial).
    batch_size:
        Pictures per optimiser step.
    lr:
        Peak AdamW learning rate (linear warm-up over the first 100 steps or
        fifth of the run, then cosine decay to 5% of it).
    weight_decay:
        AdamW weight decay.
    clip_weight:
        Weight of the CLIP consistency term ``1 - cos(I(G(e)), e)`` against
        the per-pixel L1 term (both averaged over the batch).
    clip_images:
        How many pictures of each batch go through the tower for the CLIP
        term (the tower's backward pass is the costliest part of a step).
    noise:
        Norm of the Gaussian jitter added to each training embedding before
        renormalisation (0 = none).
    image_size:
        Side of the generated picture.
    channels, convs_per_block:
        Generator shape, see :class:`GeneratorConfig`.
    seed:
        Seed for initialisation, batch order and jitter.
    threads:
        torch CPU threads.
    limit:
        Use only the first ``limit`` training images (tests, pilots).
    """

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    clip_weight: float = 0.5
    clip_images: int = 8
    noise: float = 0.05
    image_size: int = 64
    channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    convs_per_block: int = 1
    seed: int = 0
    threads: int = 2
    limit: int | None = None


class PictureData(NamedTuple):
    """Corpus images prepared for the generator.

    ``emb_nd`` float32 CLIP image embeddings (L2-normalised), ``pixels_n3hw``
    uint8 pictures at the generator's size, ``ids`` corpus ids in row order.
    """

    emb_nd: torch.Tensor
    pixels_n3hw: torch.Tensor
    ids: list[str]


class ReconstructionReport(NamedTuple):
    """How well the generator reproduces held-out images.

    ``cosine``: mean cosine between an image's embedding and the embedding of
    its decoded picture encoded again by the model (8-bit picture, the
    model's own preprocessing); ``cosine_baseline``: the same for the mean
    training picture (what a generator that ignores its input would score);
    ``pixel_mse`` and ``psnr`` (dB) against the image at the generator's size,
    pixels in [0, 1]; ``pixel_mse_baseline``: the mean picture's pixel MSE.
    """

    n: int
    cosine: float
    cosine_baseline: float
    pixel_mse: float
    psnr: float
    pixel_mse_baseline: float


class GeneratorTrainResult(NamedTuple):
    generator: Generator
    history: list[dict]
    seconds: float
    n_train: int


class StoredEmbeddings(NamedTuple):
    """Image embeddings a build already computed: ``acts_nd`` (rows of a
    cache's ``activations/acts.npy``) and ``row_of`` (corpus id -> row)."""

    acts_nd: np.ndarray
    row_of: dict[str, int]


def stored_embeddings(cache_dir: str | Path, encoder) -> StoredEmbeddings:
    """The image embeddings of a built cache made with the same model.

    Raises ``ValueError`` when the cache's model fingerprint differs from the
    encoder's (its embeddings would belong to another space).
    """
    import pandas as pd

    cache_dir = Path(cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    theirs = manifest.get("inputs", {}).get("model", {}).get("fingerprint")
    if theirs != model_fingerprint(encoder):
        raise ValueError(
            f"{cache_dir} was built with another model (fingerprint {theirs}); "
            "drop --acts to encode the corpus with this model"
        )
    items = pd.read_parquet(cache_dir / "activations" / "items.parquet")
    images = items[items["modality"] == "image"]
    acts_nd = np.load(cache_dir / "activations" / "acts.npy", mmap_mode="r")
    return StoredEmbeddings(
        acts_nd, dict(zip(images["corpus_id"], images["row"], strict=True))
    )


def corpus_embeddings(
    encoder, corpus, cache_root: str | Path | None = None, progress: bool = True
) -> StoredEmbeddings:
    """CLIP image embeddings of every corpus image, computed once and kept.

    Stored in ``<cache_root>/embeddings/images-<model fp>-<corpus fp>.npz``
    (ids and float32 embeddings, written atomically), so that training the
    generator and evaluating edits encode the corpus only once per model.
    """
    from backend import CACHE_ROOT

    corpus_fp = corpus.fingerprint()
    name = f"images-{model_fingerprint(encoder)}-{corpus_fp}.npz"
    path = Path(cache_root or CACHE_ROOT) / "embeddings" / name
    if path.exists():
        with np.load(path) as stored:
            ids, acts_nd = list(stored["ids"]), stored["acts"]
    else:
        ids = list(corpus.table["id"])
        acts_nd = _encode_ids(encoder, corpus, ids, progress).numpy()
        with atomic_path(path) as tmp:
            np.savez(tmp, ids=np.array(ids), acts=acts_nd)
        logger.info("stored %d image embeddings in %s", len(ids), path)
    return StoredEmbeddings(acts_nd, {i: row for row, i in enumerate(ids)})


def _encode_ids(encoder, corpus, ids, progress, batch_size: int = 256) -> torch.Tensor:
    chunks = []
    for start in tqdm(
        range(0, len(ids), batch_size), desc="encode corpus", disable=not progress
    ):
        images = [corpus.open_image(i) for i in ids[start : start + batch_size]]
        chunks.append(torch.as_tensor(encoder.encode_images(images)).float())
    return torch.cat(chunks)


def prepare_pictures(
    encoder,
    corpus,
    split: str | None,
    size: int,
    limit: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    stored: StoredEmbeddings | None = None,
) -> PictureData:
    """Encode a corpus split with the model and resize it for the generator.

    ``split`` is ``"train"``, ``"test"`` or None for every image; ``limit``
    keeps the first rows only. With ``stored`` the embeddings are read from
    a build of the same model instead of encoded again (a missing id raises
    ``KeyError``).
    """
    table = corpus.table
    if split is not None:
        table = table[table["split"] == split]
    ids = list(table["id"])[:limit]
    if not ids:
        raise ValueError(f"the corpus has no images in split {split!r}")
    embs, pixels = [], []
    for start in tqdm(
        range(0, len(ids), batch_size),
        desc=f"encode {split or 'all'}",
        disable=not progress,
    ):
        chunk = ids[start : start + batch_size]
        images = [corpus.open_image(i) for i in chunk]
        if stored is None:
            embs.append(torch.as_tensor(encoder.encode_images(images)).float())
        else:
            rows = [stored.row_of[i] for i in chunk]
            embs.append(torch.from_numpy(np.asarray(stored.acts_nd[rows])).float())
        pixels.append(pil_to_pictures(images, size))
    return PictureData(torch.cat(embs), torch.cat(pixels), ids)


def train_generator(
    encoder,
    data: PictureData,
    config: GeneratorTrainConfig = GeneratorTrainConfig(),
    progress: bool = True,
) -> GeneratorTrainResult:
    """Train a :class:`Generator` on prepared pictures with the tower frozen.

    Loss per batch: mean L1 pixel error plus ``config.clip_weight`` times the
    mean ``1 - cos(I(G(e)), e)``, where ``I`` is the frozen image tower.
    Deterministic for a seed and thread count on CPU.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    emb_nd = data.emb_nd
    generator = Generator(
        GeneratorConfig(
            emb_nd.shape[1], config.image_size, config.channels, config.convs_per_block
        )
    )
    with torch.no_grad():
        mean_3hw = data.pixels_n3hw.float().mean(0) / 255
        generator.base_3hw.copy_(torch.logit(mean_3hw.clamp(0.01, 0.99)))
    tower = image_tower(encoder)
    total = total_steps(config, len(emb_nd))
    optimiser = torch.optim.AdamW(
        generator.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: _lr_factor(step, total)
    )
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc="generator", disable=not progress)
    step, epoch = 0, 0
    while step < total:
        sums = {"l1": 0.0, "clip": 0.0, "n": 0}
        order = torch.randperm(len(emb_nd), generator=gen)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            l1, clip = _train_step(generator, tower, optimiser, data, rows, config, gen)
            schedule.step()
            sums["l1"] += l1
            sums["clip"] += clip
            sums["n"] += 1
            step += 1
            bar.update(1)
            bar.set_postfix(l1=f"{l1:.4f}", clip=f"{clip:.3f}")
            if step == total:
                break
        epoch += 1
        history.append(_epoch_row(epoch, step, sums, started))
        logger.info(
            "epoch %(epoch)d (step %(step)d): l1 %(l1).4f clip loss "
            "%(clip_loss).4f (%(seconds).0f s)",
            history[-1],
        )
    bar.close()
    generator.eval()
    return GeneratorTrainResult(
        generator, history, time.perf_counter() - started, len(emb_nd)
    )


def total_steps(config: GeneratorTrainConfig, n_train: int) -> int:
    """Optimiser steps of a run: ``config.steps``, else whole epochs."""
    if config.steps is not None:
        return int(config.steps)
    return config.epochs * math.ceil(n_train / config.batch_size)


def _epoch_row(epoch: int, step: int, sums: dict, started: float) -> dict:
    return {
        "epoch": epoch,
        "step": step,
        "l1": sums["l1"] / max(sums["n"], 1),
        "clip_loss": sums["clip"] / max(sums["n"], 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _lr_factor(step: int, total: int) -> float:
    warmup = min(100, max(total // 5, 1))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _train_step(generator, tower, optimiser, data, rows, config, gen):
    emb_nd = data.emb_nd[rows]
    target = data.pixels_n3hw[rows].float() / 255
    noisy_nd = emb_nd
    if config.noise > 0:
        jitter = torch.randn(emb_nd.shape, generator=gen)
        jitter = jitter * (config.noise / math.sqrt(emb_nd.shape[1]))
        noisy_nd = F.normalize(emb_nd + jitter, dim=-1)
    pictures = generator(noisy_nd)
    l1 = (pictures - target).abs().mean()
    loss = l1
    clip = torch.zeros(())
    if config.clip_weight > 0 and config.clip_images > 0:
        # Batches are shuffled, so the first rows are a random subset. The
        # target is the clean embedding: the jitter must decode back.
        n = config.clip_images
        clip = (1 - (tower(pictures[:n]) * emb_nd[:n]).sum(-1)).mean()
        loss = loss + config.clip_weight * clip
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(l1.detach()), float(clip.detach())


@torch.no_grad()
def evaluate_generator(
    generator: Generator,
    encoder,
    data: PictureData,
    mean_picture_3hw: torch.Tensor | None = None,
    batch_size: int = 256,
) -> ReconstructionReport:
    """Reconstruction quality of ``generator`` on prepared held-out pictures.

    Each embedding is decoded, the picture is encoded again by ``encoder``
    (as PIL, through the model's own preprocessing) and compared with the
    original embedding; pixel error is measured against the original image at
    the generator's size. ``mean_picture_3hw`` (float, [0, 1]) gives the
    baseline cosine of a constant picture; defaults to the mean of ``data``.
    """
    generator.eval()
    cosines, sq_errors = [], []
    for start in range(0, len(data.ids), batch_size):
        emb_nd = data.emb_nd[start : start + batch_size]
        pictures = generator(emb_nd)
        target = data.pixels_n3hw[start : start + batch_size].float() / 255
        quantised = (pictures * 255).round() / 255
        sq_errors.append(((quantised - target) ** 2).mean(dim=(1, 2, 3)))
        again_nd = torch.as_tensor(encoder.encode_images(pictures_to_pil(pictures)))
        cosines.append((again_nd.float() * emb_nd).sum(-1))
    if mean_picture_3hw is None:
        mean_picture_3hw = data.pixels_n3hw.float().mean(0) / 255
    mean_emb = torch.as_tensor(
        encoder.encode_images(pictures_to_pil(mean_picture_3hw[None]))
    ).float()
    baseline = float((data.emb_nd @ mean_emb[0]).mean())
    mse = float(torch.cat(sq_errors).mean())
    mean_quantised = (mean_picture_3hw * 255).round() / 255
    targets = data.pixels_n3hw.float() / 255
    mse_baseline = float(((mean_quantised - targets) ** 2).mean())
    return ReconstructionReport(
        n=len(data.ids),
        cosine=float(torch.cat(cosines).mean()),
        cosine_baseline=baseline,
        pixel_mse=mse,
        psnr=float(10 * math.log10(1.0 / max(mse, 1e-12))),
        pixel_mse_baseline=mse_baseline,
    )


def model_fingerprint(encoder) -> str | None:
    """The encoder's weight fingerprint (attribute or method), if it has one."""
    value = getattr(encoder, "fingerprint", None)
    return value() if callable(value) else value


# --------------------------------------------------------------------------
# Command line: python -m backend generator {train,evaluate}


def add_command(subparsers) -> None:
    """Add ``generator train`` and ``generator evaluate`` to the CLI."""
    parser = subparsers.add_parser(
        "generator",
        help="train or evaluate the embedding-to-picture generator",
        description="A small conv decoder that turns CLIP image embeddings "
        "into 64x64 pictures, trained on the corpus with the image tower frozen.",
    )
    sub = parser.add_subparsers(dest="generator_command", metavar="ACTION")
    train = sub.add_parser(
        "train",
        help="train a generator on a corpus's train split",
        description="Train with L1 pixel loss plus a CLIP consistency loss, "
        "evaluate on the test split, and write weights.safetensors, "
        "config.json and TRAINING.md to --out.",
    )
    _add_common(train)
    defaults = GeneratorTrainConfig()
    train.add_argument("--out", default=str(DEFAULT_DIR), help="output folder")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument(
        "--clip-weight",
        type=float,
        default=defaults.clip_weight,
        help="weight of 1 - cos(tower(G(e)), e) against the L1 pixel loss",
    )
    train.add_argument(
        "--clip-images",
        type=int,
        default=defaults.clip_images,
        help="pictures per batch that go through the tower for the CLIP term",
    )
    train.add_argument(
        "--steps", type=int, default=None, help="total steps (overrides --epochs)"
    )
    train.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="choose --steps to fit this many minutes, from a short speed probe "
        "(the chosen steps are recorded, so the run can be repeated exactly)",
    )
    train.add_argument(
        "--noise", type=float, default=defaults.noise, help="embedding jitter norm"
    )
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--threads", type=int, default=defaults.threads)
    train.add_argument(
        "--limit", type=int, default=None, help="use only the first N train images"
    )
    train.add_argument(
        "--acts",
        default=None,
        help="a cache/<key> folder built with the same model: read the image "
        "embeddings from it (default: encode the corpus once and keep the "
        "embeddings in cache/embeddings/)",
    )
    train.add_argument(
        "--cache-root",
        default=None,
        help="where cache/embeddings/ lives (default: the project's cache/)",
    )
    train.add_argument(
        "--test-limit",
        type=int,
        default=None,
        help="evaluate on the first N test images only",
    )
    train.set_defaults(func=_cmd_train)
    evaluate = sub.add_parser(
        "evaluate",
        help="reconstruction quality of a trained generator on held-out images",
        description="Decode the test split's embeddings, encode the pictures "
        "again, and report embedding cosine and pixel error.",
    )
    _add_common(evaluate)
    evaluate.add_argument("--dir", default=str(DEFAULT_DIR), help="generator folder")
    evaluate.add_argument("--limit", type=int, default=None, help="first N test images")
    evaluate.set_defaults(func=_cmd_evaluate)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _add_common(parser) -> None:
    parser.add_argument("--model", default="mini", help="model spec (default mini)")
    parser.add_argument(
        "--corpus", default=None, help="corpus spec: default, or a folder of images"
    )


def _load_model_and_corpus(args):
    from backend.corpus import load_corpus
    from backend.models import resolve_model

    return resolve_model(args.model), load_corpus(args.corpus)


def _cmd_train(args) -> int:
    config = GeneratorTrainConfig(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        clip_weight=args.clip_weight,
        clip_images=args.clip_images,
        noise=args.noise,
        seed=args.seed,
        threads=args.threads,
        limit=args.limit,
    )
    torch.set_num_threads(config.threads)
    encoder, corpus = _load_model_and_corpus(args)
    if args.acts:
        stored = stored_embeddings(args.acts, encoder)
    else:
        stored = corpus_embeddings(encoder, corpus, args.cache_root)
    train = prepare_pictures(
        encoder, corpus, "train", config.image_size, args.limit, stored=stored
    )
    if args.minutes is not None:
        config = dataclasses.replace(
            config, steps=steps_for_minutes(encoder, train, config, args.minutes)
        )
        args.steps = config.steps
    test = prepare_pictures(
        encoder, corpus, "test", config.image_size, args.test_limit, stored=stored
    )
    result = train_generator(encoder, train, config)
    mean_picture = train.pixels_n3hw.float().mean(0) / 255
    report = evaluate_generator(result.generator, encoder, test, mean_picture)
    meta = {
        "model": {"spec": args.model, "fingerprint": model_fingerprint(encoder)},
        "corpus": args.corpus or "default",
        "training": dataclasses.asdict(config),
        "n_train": result.n_train,
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "test": report._asdict(),
    }
    save_generator(result.generator, args.out, meta)
    write_text(Path(args.out) / "TRAINING.md", _training_notes(args, meta))
    print(_format_report(report))
    print(f"saved to {args.out} ({result.seconds / 60:.1f} min of training)")
    return 0


def _cmd_evaluate(args) -> int:
    encoder, corpus = _load_model_and_corpus(args)
    generator = load_generator(args.dir, model_fingerprint(encoder))
    size = generator.config.image_size
    test = prepare_pictures(encoder, corpus, "test", size, args.limit)
    report = evaluate_generator(generator, encoder, test)
    print(_format_report(report))
    return 0


def _format_report(report: ReconstructionReport) -> str:
    return (
        f"held-out images: {report.n}\n"
        f"embedding cosine (input vs decoded picture re-encoded): {report.cosine:.3f}"
        f" (constant mean picture: {report.cosine_baseline:.3f})\n"
        f"pixel MSE: {report.pixel_mse:.4f}  PSNR: {report.psnr:.1f} dB"
        f" (constant mean picture: {report.pixel_mse_baseline:.4f})"
    )


_REPRODUCE = {"model", "epochs", "steps", "batch_size", "lr", "clip_weight"} | {
    "clip_images",
    "noise",
    "seed",
    "threads",
    "limit",
}


def steps_for_minutes(encoder, data: PictureData, config, minutes: float) -> int:
    """Steps that fit ``minutes`` of training, measured on a throwaway model.

    Times ``probe`` steps after one warm-up step on a copy of the setup (the
    real run starts afresh from its seed), then scales.
    """
    probe = 4
    trial = dataclasses.replace(config, steps=probe + 1, seed=config.seed + 1)
    started = time.perf_counter()
    train_generator(encoder, data, dataclasses.replace(trial, steps=1), False)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    train_generator(encoder, data, trial, False)
    per_step = max((time.perf_counter() - started - warm) / probe, 1e-3)
    steps = max(1, int(minutes * 60 / per_step))
    logger.info("%.2f s per step: %d steps fit %.1f minutes", per_step, steps, minutes)
    return steps


def _training_notes(args, meta: dict) -> str:
    test = meta["test"]
    lines = [
        "# Generator training",
        "",
        "Embedding-to-picture decoder for the edits (backend/generator.py).",
        "Reproduce with:",
        "",
        "```bash",
        "python -m backend generator train "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in sorted(vars(args).items())
            if k in _REPRODUCE and v is not None and not (k == "epochs" and args.steps)
        ),
        "```",
        "",
        f"Model: `{meta['model']['spec']}` (fingerprint "
        f"`{meta['model']['fingerprint']}`); corpus: {meta['corpus']}; "
        f"{meta['n_train']} training images; {meta['seconds'] / 60:.1f} min.",
        "",
        "| epoch | step | L1 | CLIP loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in meta["history"]:
        lines.append(
            f"| {row['epoch']} | {row['step']} | {row['l1']:.4f} "
            f"| {row['clip_loss']:.4f} "
            f"| {row['seconds']} |"
        )
    lines += [
        "",
        f"Held-out ({test['n']} test images): embedding cosine "
        f"{test['cosine']:.3f} (a constant mean picture scores "
        f"{test['cosine_baseline']:.3f}), pixel MSE {test['pixel_mse']:.4f} "
        f"(the mean picture: {test.get('pixel_mse_baseline', float('nan')):.4f}), "
        f"PSNR {test['psnr']:.1f} dB.",
        "",
    ]
    return "\n".join(lines)
