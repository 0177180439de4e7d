"""Shared fixtures: a tiny real cache built once per test session.

``tiny_cache`` runs the real pipeline (``backend.build.build_cache``) on 40
images of the shipped default corpus and their captions, with the embedded
mini-CLIP and a small SAE, into a temporary cache root. Tests of the build
and of the dashboard read it; nothing is mocked.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

from backend.activations import ActivationConfig
from backend.build import BuildSettings, SAESettings
from backend.stats import StatsConfig

TINY_IMAGES = 40
TINY_SETTINGS = BuildSettings(
    sae=SAESettings(n_atoms=64, k=8, steps=60, batch_size=64, lr=3e-3, seed=0),
    activations=ActivationConfig(chunk_rows=32, image_batch=16, text_batch=64),
    stats=StatsConfig(top_n=5, umap_neighbors=8, chunk_rows=64),
    encode_batch=64,
    threads=2,
)


def tiny_model_spec(folder: Path) -> str:
    """``mini`` when the shipped weights exist, else an untrained mini saved
    under ``folder`` (only while the trained weights are not yet committed)."""
    from backend import miniclip

    if (miniclip.DEFAULT_WEIGHTS_DIR / miniclip.WEIGHTS_FILE).is_file():
        return "mini"
    warnings.warn(
        "assets/miniclip has no weights yet: the tiny cache uses an untrained "
        "mini-CLIP image tower",
        stacklevel=2,
    )
    target = folder / "untrained-mini"
    if not (target / miniclip.WEIGHTS_FILE).is_file():
        miniclip.save(miniclip.build(seed=0), target, {"note": "untrained, tests"})
    return f"mini:{target}"


@pytest.fixture(scope="session")
def tiny_cache_root(tmp_path_factory) -> Path:
    """A cache root holding one complete tiny build (see ``tiny_cache``)."""
    return tmp_path_factory.mktemp("cache-root")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The model spec the tiny cache uses."""
    return tiny_model_spec(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_cache(tiny_cache_root, tiny_model) -> Path:
    """Folder of a complete cache built from 40 default-corpus images.

    The build's wall time is in ``manifest.json`` (``last_run_seconds``) and
    in the attribute ``tiny_cache_seconds`` of this module after the build.
    """
    from backend.build import build_cache

    start = time.perf_counter()
    folder = build_cache(
        model=tiny_model,
        corpus=None,
        settings=TINY_SETTINGS,
        cache_root=tiny_cache_root,
        limit=TINY_IMAGES,
    )
    globals()["tiny_cache_seconds"] = time.perf_counter() - start
    return folder
