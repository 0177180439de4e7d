"""CLIP activations of a corpus: the items table and the embedding matrix.

One activation per image and one per caption, in a fixed row order: every
image of the corpus table first (table order), then every caption (image by
image, caption by caption). ``items.parquet`` describes the rows;
``acts.npy`` holds the ``(n_items, d)`` float32 L2-normalised embeddings.

The matrix is computed in chunks of rows (a chunk is all images or all
texts). Each finished chunk is saved atomically under ``chunks/``, so a
build that is killed resumes at the first missing chunk; when all are there
they are joined into ``acts.npy`` and the chunk folder is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from backend.atomic import atomic_path
from backend.corpus import Corpus
from backend.models import Encoder

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
ACTS_FILE = "acts.npy"
CHUNKS_DIR = "chunks"
ITEM_COLUMNS = [
    "row",
    "modality",
    "corpus_id",
    "text",
    "split",
    "level0",
    "level1",
    "level2",
    "pair_row",
]

# Test hook: after this many newly written chunks the process kills itself
# with SIGKILL (no cleanup runs), the way an out-of-memory kill or a pulled
# plug would end it. Used by the resume test; unset in normal use.
KILL_AFTER_CHUNKS_ENV = "ATLAS_KILL_AFTER_CHUNKS"


@dataclass(frozen=True)
class ActivationConfig:
    """How activations are computed.

    Attributes
    ----------
    chunk_rows : int
        Rows per saved chunk (the unit of resumption).
    image_batch : int
        Images per forward pass.
    text_batch : int
        Texts per forward pass.
    """

    chunk_rows: int = 2048
    image_batch: int = 64
    text_batch: int = 64


def pick_captions(captions: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` captions, evenly spread over the list (first and last
    kept), so a short name and a caption with the hierarchy words both stay."""
    if limit is None or len(captions) <= limit:
        return list(captions)
    if limit < 1:
        raise ValueError(f"captions per image must be >= 1 or None, got {limit}")
    index = np.unique(np.linspace(0, len(captions) - 1, limit).round().astype(int))
    return [captions[i] for i in index]


def build_items(corpus: Corpus, captions_per_image: int | None = None) -> pd.DataFrame:
    """The items table: one row per image, then one per caption.

    ``pair_row`` links an image to its first caption and a caption to its
    image (``-1`` for an image without captions). ``captions_per_image``
    keeps at most that many captions of each image (see
    :func:`pick_captions`); None keeps all.
    """
    table = corpus.table.reset_index(drop=True)
    n_images = len(table)
    levels = {lv: table[lv].tolist() for lv in ("level0", "level1", "level2")}
    caption_image, caption_text = [], []
    for i, captions in enumerate(table["captions"]):
        for caption in pick_captions(captions, captions_per_image):
            caption_image.append(i)
            caption_text.append(str(caption))
    caption_image = np.asarray(caption_image, np.int64)
    first_caption = np.full(n_images, -1, np.int64)
    caption_rows = n_images + np.arange(len(caption_image))
    # First caption of each image: reversed assignment keeps the smallest row.
    first_caption[caption_image[::-1]] = caption_rows[::-1]
    image_index = np.r_[np.arange(n_images), caption_image]
    items = pd.DataFrame(
        {
            "row": np.arange(len(image_index), dtype=np.int64),
            "modality": ["image"] * n_images + ["text"] * len(caption_image),
            "corpus_id": table["id"].astype(str).to_numpy()[image_index],
            "text": [""] * n_images + caption_text,
            "split": table["split"].astype(str).to_numpy()[image_index],
            **{
                lv: pd.array(np.asarray(v, dtype=object)[image_index], dtype="string")
                for lv, v in levels.items()
            },
            "pair_row": np.r_[first_caption, caption_image],
        }
    )
    return items[ITEM_COLUMNS]


def _chunk_plan(items: pd.DataFrame, chunk_rows: int) -> list[tuple[int, int]]:
    """Row ranges that never mix modalities."""
    modality = items["modality"].to_numpy()
    bounds = [0, *np.nonzero(modality[1:] != modality[:-1])[0] + 1, len(items)]
    plan = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        plan += [(s, min(hi, s + chunk_rows)) for s in range(lo, hi, chunk_rows)]
    return plan


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / CHUNKS_DIR / f"{index:05d}.npy"


def _load_chunk(path: Path, rows: int, d: int) -> np.ndarray | None:
    """A saved chunk, or None when it is missing or not the expected array."""
    if not path.exists():
        return None
    try:
        chunk = np.load(path)
    except (ValueError, OSError, EOFError) as err:
        log.warning("chunk %s is unreadable (%s); recomputing it", path.name, err)
        return None
    if chunk.shape != (rows, d) or chunk.dtype != np.float32:
        log.warning(
            "chunk %s has shape %s, expected %s; recomputing it",
            path.name,
            chunk.shape,
            (rows, d),
        )
        return None
    return chunk


def _encode_chunk(
    encoder: Encoder, corpus: Corpus, items: pd.DataFrame, config: ActivationConfig
) -> np.ndarray:
    if (items["modality"] == "text").all():
        # Batches of similar length waste little on padding; undo the order.
        texts = items["text"].to_numpy()
        order = np.argsort([len(t) for t in texts], kind="stable")
        acts_sorted = encoder.encode_texts(
            list(texts[order]), batch_size=config.text_batch
        )
        acts = torch.empty_like(acts_sorted)
        acts[torch.from_numpy(order)] = acts_sorted
    else:
        images = [corpus.open_image(i) for i in items["corpus_id"]]
        acts = encoder.encode_images(images, batch_size=config.image_batch)
    return acts.numpy().astype(np.float32, copy=False)


def compute_activations(
    encoder: Encoder,
    corpus: Corpus,
    items: pd.DataFrame,
    folder: Path,
    config: ActivationConfig = ActivationConfig(),
) -> Path:
    """Write ``folder/acts.npy`` for ``items``, resuming from saved chunks.

    Returns the path of ``acts.npy``. Chunks already on disk with the right
    shape are kept; the others are computed and saved one by one.
    """
    folder = Path(folder)
    d = encoder.card.embed_dim
    plan = _chunk_plan(items, config.chunk_rows)
    kill_after = int(os.environ.get(KILL_AFTER_CHUNKS_ENV, "0") or 0)
    written = 0
    missing = [
        i
        for i, (s, e) in enumerate(plan)
        if _load_chunk(_chunk_path(folder, i), e - s, d) is None
    ]
    if len(missing) < len(plan):
        log.info(
            "activations: %d of %d chunks already saved, resuming",
            len(plan) - len(missing),
            len(plan),
        )
    for index in tqdm(missing, desc="activations", unit="chunk"):
        start, stop = plan[index]
        acts = _encode_chunk(encoder, corpus, items.iloc[start:stop], config)
        with atomic_path(_chunk_path(folder, index)) as tmp:
            np.save(tmp, acts)
        written += 1
        if kill_after and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return _join_chunks(folder, plan, d)


def _join_chunks(folder: Path, plan: list[tuple[int, int]], d: int) -> Path:
    """Stream the chunks into ``acts.npy`` (a memory map), then drop them."""
    n = plan[-1][1] if plan else 0
    target = folder / ACTS_FILE
    with atomic_path(target) as tmp:
        acts_nd = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(n, d)
        )
        for index, (start, stop) in enumerate(plan):
            acts_nd[start:stop] = np.load(_chunk_path(folder, index))
        acts_nd.flush()
        del acts_nd
    shutil.rmtree(folder / CHUNKS_DIR, ignore_errors=True)
    return target
