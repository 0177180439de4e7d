"""``python -m backend build``: a model and a corpus in, a complete cache out.

Stages, each recorded in ``manifest.json`` when it finishes (docs/cache.md):

1. ``activations``: the items table and the CLIP embedding of every image and
   caption (chunked; a killed build resumes at the first missing chunk).
2. ``train_mp``: one MP-SAE on both modalities together (or ``--sae PATH``).
3. ``train_topk``: the TopK baseline of the same size on the same data.
4. ``encode``: every activation through both SAEs, keeping the traces.
5. ``stats``: per-atom, per-input and global statistics (backend.stats).

The cache key hashes everything that changes the output (model weights,
corpus content, SAE and training settings, statistics settings, seed,
limit, schema version). A stage whose manifest entry is complete and whose
files still match their checksums is skipped, so a rerun with the same inputs
does nothing, and a damaged file makes its stage (and the later ones) run
again instead of being used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from backend import CACHE_ROOT, cache
from backend.activations import (
    ActivationConfig,
    build_items,
    compute_activations,
)
from backend.atomic import atomic_path, write_json
from backend.corpus import Corpus, load_corpus
from backend.models import DEFAULT_SPEC, Encoder, resolve_model
from backend.stats import (
    StatsConfig,
    Traces,
    atom_map,
    centred_energy,
    coselected_cosine,
    modality_split,
    nearest_atoms,
    suggest_labels,
    trace_stats,
)

log = logging.getLogger(__name__)

SAE_KINDS = ("mp", "topk")
# Modules whose code decides what a build writes; their source is in the key,
# so a cache built by older code is never taken for this code's output.
CODE_MODULES = ("activations", "build", "fast", "sae", "stats", "training")
STAGES = ("activations", "train_mp", "train_topk", "encode", "stats")
REPORT_KS = (8, 16, 32)
CHECKPOINT_EVERY = 100


@dataclass(frozen=True)
class SAESettings:
    """The dictionaries a build trains (both SAEs share them).

    Attributes
    ----------
    n_atoms : int
        Atoms per dictionary. 2048 atoms for d = 384 is about 5x overcomplete,
        enough for the ~11k images and their captions of the default corpus.
    k : int
        Pursuit steps (MP) and active atoms (TopK).
    steps : int
        Optimiser steps of each SAE's training.
    batch_size : int
        Activations per optimiser step.
    lr : float
        Adam learning rate.
    seed : int
        Seed of the initialisation and of the batch order.
    threshold : float or None
        Residual stop for adaptive sparsity when encoding (None: always k).
    """

    n_atoms: int = 2048
    k: int = 32
    steps: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    threshold: float | None = None


@dataclass(frozen=True)
class BuildSettings:
    """Everything about a build except the model, the corpus and the limit.

    Attributes
    ----------
    sae : SAESettings
        Dictionary size, sparsity and training.
    activations : ActivationConfig
        Chunking and batching of the CLIP forward passes.
    stats : StatsConfig
        Statistics settings.
    encode_batch : int
        Activations encoded per block in the ``encode`` stage.
    threads : int
        torch threads (0: leave torch's default).
    captions_per_image : int or None
        Captions of each image that become text activations (evenly spread
        over its list; None: all). Two of the default corpus's four keep the
        bare name and the caption with the hierarchy words, and halve the
        text encoding time.
    """

    sae: SAESettings = field(default_factory=SAESettings)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    encode_batch: int = 4096
    threads: int = 2
    captions_per_image: int | None = 2

    def key_inputs(self) -> dict[str, Any]:
        """The settings that change the output (batching sizes do not)."""
        return {
            "sae": asdict(self.sae),
            "stats": asdict(self.stats),
            "captions_per_image": self.captions_per_image,
        }


@dataclass
class _Context:
    """What the stages share during one build."""

    folder: Path
    manifest: dict[str, Any]
    encoder: Encoder
    corpus: Corpus
    settings: BuildSettings
    sae_path: Path | None


def build_cache(
    model: str = DEFAULT_SPEC,
    corpus: str | Path | None = None,
    settings: BuildSettings | None = None,
    cache_root: str | Path = CACHE_ROOT,
    limit: int | None = None,
    sae_path: str | Path | None = None,
    command: str | None = None,
) -> Path:
    """Build (or finish, or confirm) the cache for these inputs; return its folder.

    Parameters
    ----------
    model
        Model spec for ``backend.models.resolve_model``.
    corpus
        Corpus spec for ``backend.corpus.load_corpus`` (None: the default).
    settings
        ``BuildSettings`` (None: the defaults).
    cache_root
        Folder holding one sub-folder per cache key.
    limit
        Use only this many images, evenly spread over the corpus table (and
        their captions); for quick builds and tests.
    sae_path
        A saved MP-SAE (``MatchingPursuitSAE.save`` folder) to use instead
        of training one; the TopK baseline is trained with its size.
    command
        The command line recorded in the manifest as the way to rebuild.
    """
    settings = settings or BuildSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    encoder = resolve_model(model)
    corp = _limited(load_corpus(corpus), limit)
    sae_dir = Path(sae_path).resolve() if sae_path else None
    inputs = _inputs(model, encoder, corpus, corp, settings, limit, sae_dir)
    key = cache.cache_key(_location_free(inputs))
    folder = Path(cache_root) / key
    command = command or build_command(
        model, corpus, settings, cache_root, limit, sae_dir
    )
    manifest = _open_manifest(folder, key, inputs, command)
    ctx = _Context(folder, manifest, encoder, corp, settings, sae_dir)
    log.info(
        "building %s (model %s, corpus %s, %d images)",
        folder,
        model,
        corp.name,
        len(corp),
    )
    ran = _run_stages(ctx)
    if ran or not manifest.get("complete"):
        _finish(ctx, time.perf_counter() - started)
    else:
        log.info("cache %s is complete and intact; nothing to do", folder)
    return folder


def _limited(corpus: Corpus, limit: int | None) -> Corpus:
    """The corpus restricted to ``limit`` evenly spaced images."""
    if limit is None or limit >= len(corpus):
        return corpus
    if limit < 2:
        raise ValueError(f"--limit must be at least 2 images, got {limit}")
    rows = np.unique(np.linspace(0, len(corpus) - 1, limit).round().astype(int))
    table = corpus.table.iloc[rows].reset_index(drop=True)
    return dataclasses.replace(corpus, table=table, _fingerprint=None)


def _inputs(
    model: str,
    encoder: Encoder,
    corpus_spec: Any,
    corpus: Corpus,
    settings: BuildSettings,
    limit: int | None,
    sae_dir: Path | None,
) -> dict[str, Any]:
    """Everything the key hashes, in the form the manifest records it."""
    sae_input = None
    if sae_dir is not None:
        sae_input = {
            "path": str(sae_dir),
            "sha256": {
                p.name: cache.file_sha256(p)
                for p in sorted(sae_dir.iterdir())
                if p.is_file()
            },
        }
    return {
        "model": {
            "spec": model,
            "fingerprint": encoder.fingerprint,
            "card": encoder.card.to_dict(),
        },
        "corpus": {
            "spec": None if corpus_spec is None else str(corpus_spec),
            "name": corpus.name,
            "fingerprint": corpus.fingerprint(),
            "n_images": len(corpus),
            "limit": limit,
        },
        "settings": settings.key_inputs(),
        "sae_path": sae_input,
        "code": code_digest(),
    }


def code_digest(folder: Path | None = None) -> str:
    """SHA-256 of the source of :data:`CODE_MODULES` (in ``folder``, default
    this package), in that order."""
    folder = Path(folder or Path(__file__).parent)
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        source = (folder / f"{name}.py").read_bytes()
        digest.update(f"{name}.py {len(source)}\n".encode())
        digest.update(source)
    return digest.hexdigest()


def _location_free(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` without the model's weights or checkpoint path, for the key.

    The weights fingerprint already hashes their content; the path only says
    where this checkout lies, and two clones must share keys.
    """
    card = dict(inputs["model"]["card"])
    card["details"] = {
        k: v
        for k, v in (card.get("details") or {}).items()
        if k not in ("weights", "checkpoint")
    }
    return {**inputs, "model": {**inputs["model"], "card": card}}


def build_command(
    model: str = DEFAULT_SPEC,
    corpus: str | Path | None = None,
    settings: BuildSettings | None = None,
    cache_root: str | Path = CACHE_ROOT,
    limit: int | None = None,
    sae_path: str | Path | None = None,
) -> str:
    """The ``python -m backend build`` line that asks for these inputs.

    Flags appear only where a value differs from the command's default, so
    the default build reads ``python -m backend build``. Settings the command
    line cannot express (activation or statistics details other than the
    seed) are left out.
    """
    settings = settings or BuildSettings()
    sae, d = settings.sae, SAESettings()
    args: list[str] = []

    def flag(name: str, value: Any, default: Any) -> None:
        if value != default:
            args.extend([name, str(value)])

    flag("--model", model, DEFAULT_SPEC)
    flag("--corpus", corpus, None)
    flag("--sae", sae_path, None)
    flag("--atoms", sae.n_atoms, d.n_atoms)
    flag("--k", sae.k, d.k)
    flag("--steps", sae.steps, d.steps)
    flag("--batch-size", sae.batch_size, d.batch_size)
    flag("--lr", sae.lr, d.lr)
    flag("--threshold", sae.threshold, d.threshold)
    flag("--seed", sae.seed, d.seed)
    flag("--limit", limit, None)
    flag(
        "--captions",
        settings.captions_per_image or 0,
        BuildSettings().captions_per_image,
    )
    flag("--cache-root", Path(cache_root).resolve(), Path(CACHE_ROOT).resolve())
    return shlex.join(["python", "-m", "backend", "build", *args])


def _open_manifest(
    folder: Path, key: str, inputs: dict[str, Any], command: str
) -> dict[str, Any]:
    """The folder's manifest when it is readable and compatible, else a new one."""
    if (folder / cache.MANIFEST).exists():
        try:
            manifest = cache.read_manifest(folder)
            manifest["build_command"] = command
            return manifest
        except cache.CacheError as err:
            log.warning("starting this cache over: %s", err)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = cache.new_manifest(key, inputs, command)
    cache.write_manifest(folder, manifest)
    return manifest


def _run_stages(ctx: _Context) -> list[str]:
    """Run every stage that is not done (and every stage after one that ran)."""
    stage_fns: dict[str, Callable[[_Context], tuple[list[str], dict]]] = {
        "activations": _stage_activations,
        "train_mp": _stage_train_mp,
        "train_topk": _stage_train_topk,
        "encode": _stage_encode,
        "stats": _stage_stats,
    }
    ran: list[str] = []
    for name in STAGES:
        if not ran and cache.stage_done(ctx.folder, ctx.manifest, name):
            log.info("stage %s: done already, skipped", name)
            continue
        ctx.manifest["complete"] = False
        cache.forget_stage(ctx.folder, ctx.manifest, name)
        log.info("stage %s: running", name)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        files, extra = stage_fns[name](ctx)
        seconds = time.perf_counter() - start
        # CPU time of all threads: on a loaded machine it says what the stage
        # costs better than the wall clock does.
        extra["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 3)
        cache.record_stage(ctx.folder, ctx.manifest, name, files, seconds, **extra)
        log.info(
            "stage %s: finished in %.1f s (%.1f CPU s)",
            name,
            seconds,
            extra["cpu_seconds"],
        )
        ran.append(name)
    return ran


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _finish(ctx: _Context, seconds: float) -> None:
    manifest = ctx.manifest
    manifest["versions"] = _versions()
    manifest["n_items"] = int(
        np.load(ctx.folder / "activations" / "acts.npy", mmap_mode="r").shape[0]
    )
    manifest["last_run_seconds"] = round(seconds, 3)
    manifest["build_seconds"] = round(
        sum(s["seconds"] for s in manifest["stages"].values()), 3
    )
    manifest["complete"] = True
    cache.write_manifest(ctx.folder, manifest)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import open_clip
    import umap

    try:
        package = version("mpsae-atlas")
    except PackageNotFoundError:
        package = "0.1.0 (source tree)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "umap": umap.__version__,
        "package": package,
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _save_parquet(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


# --- stages -----------------------------------------------------------------


def _stage_activations(ctx: _Context) -> tuple[list[str], dict]:
    folder = ctx.folder / "activations"
    items = build_items(ctx.corpus, ctx.settings.captions_per_image)
    if len(items) == 0:
        raise ValueError(f"corpus {ctx.corpus.name} has no usable images")
    _save_parquet(folder / "items.parquet", items)
    compute_activations(
        ctx.encoder, ctx.corpus, items, folder, ctx.settings.activations
    )
    counts = items["modality"].value_counts().to_dict()
    return (
        ["activations/items.parquet", "activations/acts.npy"],
        {
            "n_images": int(counts.get("image", 0)),
            "n_texts": int(counts.get("text", 0)),
        },
    )


def _stage_train_mp(ctx: _Context) -> tuple[list[str], dict]:
    from backend.sae import MatchingPursuitSAE, load_sae

    if ctx.sae_path is not None:
        sae = load_sae(ctx.sae_path)
        if not isinstance(sae, MatchingPursuitSAE):
            raise ValueError(
                f"--sae {ctx.sae_path} holds a {sae.kind!r} SAE; "
                "give a MatchingPursuitSAE folder"
            )
        if sae.d != ctx.encoder.card.embed_dim:
            raise ValueError(
                f"--sae {ctx.sae_path} has d={sae.d}, the model "
                f"embeds in d={ctx.encoder.card.embed_dim}"
            )
        sae.save(ctx.folder / "sae" / "mp")
        return _sae_files("mp"), {"loaded_from": str(ctx.sae_path)}
    return _train(ctx, "mp")


def _stage_train_topk(ctx: _Context) -> tuple[list[str], dict]:
    return _train(ctx, "topk")


def _sae_files(kind: str) -> list[str]:
    return [f"sae/{kind}/weights.safetensors", f"sae/{kind}/config.json"]


def _sae_size(ctx: _Context) -> tuple[int, int]:
    """(n_atoms, k): from the settings, or from the loaded MP-SAE."""
    if ctx.sae_path is None:
        return ctx.settings.sae.n_atoms, ctx.settings.sae.k
    from backend.sae import load_sae

    sae = load_sae(ctx.folder / "sae" / "mp")
    return sae.n_atoms, sae.k


def _train(ctx: _Context, kind: str) -> tuple[list[str], dict]:
    """Train one SAE on ``acts.npy`` with the shared settings; save it and its log."""
    from backend.sae import SAEConfig, build_sae
    from backend.training import TrainConfig, train, write_metrics

    s = ctx.settings.sae
    n_atoms, k = _sae_size(ctx)
    acts_path = ctx.folder / "activations" / "acts.npy"
    acts_nd = np.load(acts_path, mmap_mode="r")
    sae = build_sae(SAEConfig(kind, acts_nd.shape[1], n_atoms, k, seed=s.seed))
    config = TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        log_every=max(1, min(50, s.steps // 10)),
        checkpoint_every=CHECKPOINT_EVERY,
        threads=ctx.settings.threads or None,
    )
    # A killed build resumes training from the last checkpoint; the trainer
    # makes a resumed run equal to an uninterrupted one.
    checkpoint = ctx.folder / "sae" / f"{kind}_checkpoint"
    with _deterministic_torch():
        result = train(sae, acts_path, config, checkpoint_dir=checkpoint)
    sae.save(ctx.folder / "sae" / kind)
    write_metrics(result.metrics, ctx.folder / "sae" / f"{kind}_metrics.csv")
    shutil.rmtree(checkpoint, ignore_errors=True)
    last = result.metrics.iloc[-1].to_dict() if len(result.metrics) else {}
    extra = {
        "final": {name: float(value) for name, value in last.items()},
        "resumed_from": result.resumed_from,
        "resampled": result.resampled,
    }
    return [*_sae_files(kind), f"sae/{kind}_metrics.csv"], extra


@contextmanager
def _deterministic_torch() -> Iterator[None]:
    """Deterministic kernels while training, so a rebuild gives the same bits.

    Without it the TopK backward (a scatter-add into the dictionary) sums in
    a thread-dependent order on the CPU, and two runs drift apart by ~1e-8.
    """
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _stage_encode(ctx: _Context) -> tuple[list[str], dict]:
    """Traces of every activation through both SAEs, streamed into .npy files."""
    from backend.sae import load_sae

    acts_nd = np.load(ctx.folder / "activations" / "acts.npy", mmap_mode="r")
    items = pd.read_parquet(ctx.folder / "activations" / "items.parquet")
    energy_n, _ = centred_energy(acts_nd, items["modality"].to_numpy())
    files, extra = [], {}
    for kind in SAE_KINDS:
        sae = load_sae(ctx.folder / "sae" / kind)
        start = time.perf_counter()
        files += _encode_all(ctx, sae, acts_nd, energy_n)
        extra[f"{kind}_seconds"] = round(time.perf_counter() - start, 3)
    return files, extra


def _encode_all(
    ctx: _Context, sae, acts_nd: np.ndarray, energy_n: np.ndarray
) -> list[str]:
    from tqdm.auto import tqdm

    from backend.fast import fast_encode

    n, k, kind = len(acts_nd), sae.k, sae.kind
    shapes = {
        "atoms": ((n, k), np.int32),
        "coefficients": ((n, k), np.float32),
        "residual_norms": ((n, k + 1), np.float32),
        "fvu": ((n,), np.float32),
    }
    names = {name: f"codes/{kind}_{name}.npy" for name in shapes}
    batch = ctx.settings.encode_batch
    threshold = ctx.settings.sae.threshold
    with ExitStack() as stack:
        # Each file is filled through a memory map under a temporary name and
        # renamed into place only when every block has been written.
        tmps = {
            name: stack.enter_context(atomic_path(ctx.folder / rel))
            for name, rel in names.items()
        }
        outs = {
            name: np.lib.format.open_memmap(
                tmps[name], mode="w+", dtype=dtype, shape=shape
            )
            for name, (shape, dtype) in shapes.items()
        }
        for start in tqdm(range(0, n, batch), desc=f"encode {kind}", unit="block"):
            x_nd = torch.from_numpy(np.array(acts_nd[start : start + batch]))
            if kind == "mp":
                result = fast_encode(sae, x_nd, threshold=threshold, dense=False)
            else:
                result = sae.encode(x_nd, threshold=threshold)
            stop = start + len(x_nd)
            norms = result.residual_norms.numpy()
            outs["atoms"][start:stop] = result.atoms.numpy()
            outs["coefficients"][start:stop] = result.coefficients.numpy()
            outs["residual_norms"][start:stop] = norms
            outs["fvu"][start:stop] = norms[:, -1] ** 2 / np.maximum(
                energy_n[start:stop], 1e-12
            )
        for out in outs.values():
            out.flush()
        outs.clear()
    return list(names.values())


def _stage_stats(ctx: _Context) -> tuple[list[str], dict]:
    """All statistics files (docs/cache.md, stats/) and summary.json."""
    from backend.sae import load_sae

    config = ctx.settings.stats
    folder = ctx.folder / "stats"
    items = pd.read_parquet(ctx.folder / "activations" / "items.parquet")
    acts_nd = np.load(ctx.folder / "activations" / "acts.npy", mmap_mode="r")
    energy_n, means = centred_energy(acts_nd, items["modality"].to_numpy())
    timings: dict[str, float] = {}
    per_kind, traces, saes = {}, {}, {}
    for kind in SAE_KINDS:
        saes[kind] = load_sae(ctx.folder / "sae" / kind)
        traces[kind] = _load_traces(ctx.folder, kind)
        start = time.perf_counter()
        per_kind[kind] = trace_stats(
            traces[kind],
            items,
            energy_n,
            saes[kind].n_atoms,
            config,
            desc=f"statistics {kind}",
        )
        timings[f"trace_{kind}"] = time.perf_counter() - start

    files = []
    atoms_md = saes["mp"].atoms_md.detach().numpy()
    start = time.perf_counter()
    mp_atoms = _with_labels(per_kind["mp"], items, config)
    layout = atom_map(atoms_md, config)
    mp_atoms["umap_x"], mp_atoms["umap_y"] = layout[:, 0], layout[:, 1]
    timings["umap"] = time.perf_counter() - start
    neighbors = nearest_atoms(atoms_md, config.n_neighbors)
    topk_atoms = _with_labels(per_kind["topk"], items, config)
    mp = per_kind["mp"]
    tables = {
        "atoms": mp_atoms,
        "topk_atoms": topk_atoms,
        "top_items": mp.top_items,
        "topk_top_items": per_kind["topk"].top_items,
        "neighbors": neighbors,
        "transitions": mp.transitions,
        "fvu_by_k": _stacked(per_kind, "fvu_by_k"),
        "l0": _stacked(per_kind, "l0"),
        "hierarchy": _stacked(per_kind, "hierarchy"),
    }
    for name, table in tables.items():
        _save_parquet(folder / f"{name}.parquet", table)
        files.append(f"stats/{name}.parquet")
    arrays = {
        "pick_steps": mp.pick_steps,
        "coef_hist": mp.coef_hist,
        "coef_hist_edges": mp.coef_hist_edges,
    }
    for name, array in arrays.items():
        _save_npy(folder / f"{name}.npy", array)
        files.append(f"stats/{name}.npy")
    summary = _summary(per_kind, traces, saes, means, config)
    write_json(folder / "summary.json", summary)
    files.append("stats/summary.json")
    return files, {"seconds_by_part": {k: round(v, 3) for k, v in timings.items()}}


def _load_traces(folder: Path, kind: str) -> Traces:
    def load(name: str) -> np.ndarray:
        return np.load(folder / "codes" / f"{kind}_{name}.npy", mmap_mode="r")

    return Traces(load("atoms"), load("coefficients"), load("residual_norms"))


def _with_labels(stats, items: pd.DataFrame, config: StatsConfig) -> pd.DataFrame:
    labels = suggest_labels(stats, items, config)
    table = stats.atoms.copy()
    table.insert(1, "label", [lab.label for lab in labels])
    table.insert(2, "label_source", [lab.source for lab in labels])
    table.insert(3, "label_share", [lab.share for lab in labels])
    return table


def _stacked(per_kind: dict, name: str) -> pd.DataFrame:
    parts = [getattr(s, name).assign(sae=kind) for kind, s in per_kind.items()]
    table = pd.concat(parts, ignore_index=True)
    return table[["sae", *[c for c in table.columns if c != "sae"]]]


def _summary(
    per_kind: dict, traces: dict, saes: dict, means: dict, config: StatsConfig
) -> dict[str, Any]:
    """Global figures: FVU, dead atoms, modality split, hierarchy, geometry."""
    out: dict[str, Any] = {
        "modality_gap": float(np.linalg.norm(means["image"] - means["text"])),
        "only_share": config.only_share,
    }
    for kind, stats in per_kind.items():
        fvu = stats.fvu_by_k
        k = int(fvu["k"].max())
        ks = sorted({*[x for x in REPORT_KS if x <= k], k})
        atoms = stats.atoms
        hierarchy = stats.hierarchy.query("modality == 'all'")
        out[kind] = {
            "n_atoms": int(len(atoms)),
            "k": k,
            "fvu": {
                m: {str(x): float(g.set_index("k").fvu[x]) for x in ks}
                for m, g in fvu.groupby("modality")
            },
            "dead_fraction": float(atoms["dead"].mean()),
            "atoms": modality_split(atoms, config.only_share),
            "mean_l0": {
                m: float((g.l0 * g["count"]).sum() / g["count"].sum())
                for m, g in stats.l0.groupby("modality")
            },
            "hierarchy": {
                level: {
                    str(int(r.step)): {
                        "accuracy": _num(r.accuracy),
                        "chance": _num(r.chance),
                    }
                    for r in g.itertuples()
                    if r.step <= 8
                }
                for level, g in hierarchy.groupby("level")
            },
            **coselected_cosine(
                traces[kind], saes[kind].atoms_md.detach().numpy(), seed=config.seed
            ),
        }
    return out


def _num(value: float) -> float | None:
    return None if pd.isna(value) else float(value)


# --- command line -------------------------------------------------------------


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``python -m backend build``."""
    d = SAESettings()
    parser = subparsers.add_parser(
        "build",
        help="encode a corpus with a CLIP model, train the MP-SAE and TopK "
        "baseline, and cache every statistic the dashboard shows",
        description="Build cache/<key>/ for a model and a corpus (docs/cache.md). "
        "Stages that are already complete and intact are skipped, so a rerun "
        "does nothing and an interrupted build resumes.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_SPEC,
        help="model spec: mini | mini:DIR | ARCH:TAG | ARCH:PATH "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="corpus: 'default' or a folder (default: the shipped corpus)",
    )
    parser.add_argument(
        "--sae",
        type=Path,
        default=None,
        metavar="PATH",
        help="use this saved MP-SAE folder instead of training one",
    )
    parser.add_argument(
        "--atoms",
        type=int,
        default=d.n_atoms,
        help="atoms per dictionary (default: %(default)s)",
    )
    parser.add_argument(
        "--k",
        type=int,
        default=d.k,
        help="pursuit steps / TopK active atoms (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=d.steps,
        help="training steps of each SAE (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="activations per training step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help="Adam learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="adaptive sparsity: stop encoding once |r| <= "
        "threshold * |x - b| (default: always k steps)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of initialisation, batches and UMAP (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only this many images, evenly spread (quick runs)",
    )
    parser.add_argument(
        "--captions",
        type=int,
        default=BuildSettings().captions_per_image,
        help="captions per image to encode, evenly spread over its list; "
        "0 = all (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch threads (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-root",
        type=Path,
        default=CACHE_ROOT,
        help="where cache folders go (default: %(default)s)",
    )
    parser.set_defaults(func=_cmd_build)


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """``BuildSettings`` from parsed ``build`` arguments."""
    sae = SAESettings(
        n_atoms=args.atoms,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threshold=args.threshold,
    )
    return BuildSettings(
        sae=sae,
        stats=StatsConfig(seed=args.seed),
        threads=args.threads,
        captions_per_image=args.captions or None,
    )


def _cmd_build(args: argparse.Namespace) -> int:
    folder = build_cache(
        model=args.model,
        corpus=args.corpus,
        settings=settings_from_args(args),
        cache_root=args.cache_root,
        limit=args.limit,
        sae_path=args.sae,
    )
    manifest = cache.read_manifest(folder)
    print(f"cache: {folder}")
    print(f"  {'stage':12} {'wall s':>8} {'CPU s':>8}")
    for name in STAGES:
        stage = manifest["stages"][name]
        cpu = stage.get("cpu_seconds", float("nan"))
        print(f"  {name:12} {stage['seconds']:8.1f} {cpu:8.1f}")
    print(f"  {'total':12} {manifest['build_seconds']:8.1f}")
    summary = json.loads((folder / "stats" / "summary.json").read_text())
    for kind in SAE_KINDS:
        fvu = summary[kind]["fvu"]
        figures = ", ".join(
            f"{m} "
            + " ".join(f"k={k}: {fvu[m][k]:.3f}" for k in sorted(fvu[m], key=int))
            for m in ("image", "text")
            if m in fvu
        )
        print(f"  {kind} FVU {figures}; dead {summary[kind]['dead_fraction']:.3f}")
    return 0
