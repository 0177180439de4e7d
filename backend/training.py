"""Train an SAE (either kind) on an activation matrix.

One trainer for the MP-SAE and the TopK baseline: Adam on the reconstruction
MSE, mini-batches drawn from a seeded permutation per epoch, the atoms
renormalised to unit norm after every step, and dead atoms (not used for
``dead_after_steps`` steps) re-initialised every ``resample_every`` steps to
the directions of badly reconstructed inputs. For the MP-SAE the gradient
flows through the unrolled pursuit (see ``MatchingPursuitSAE.forward``).

Metrics (MSE, fraction of variance unexplained, L0, dead fraction) are
averaged over each ``log_every`` window. Checkpoints hold the SAE
(``weights.safetensors`` + ``config.json``), the optimiser moments
(``optimizer.safetensors``) and ``trainer_state.json``; a run resumed from a
checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from backend.atomic import atomic_path, write_json, write_text
from backend.sae import SparseAutoencoder, load_sae

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
METRIC_COLUMNS = ["step", "mse", "fvu", "l0", "dead_fraction", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Attributes
    ----------
    steps : int
        Number of optimiser steps.
    batch_size : int
        Inputs per step (capped at the number of rows).
    lr : float
        Adam learning rate.
    seed : int
        Seed of the batch order and of dead-atom resampling. A run is
        deterministic for a given seed, SAE initialisation and thread count
        (float sums may differ between thread counts).
    log_every : int
        Steps per metrics row (metrics are averaged over the window).
    init_from_data : bool
        Set the bias to the data mean and the atoms to random centred inputs
        (normalised) before the first step; otherwise keep the SAE's own
        initialisation.
    dead_after_steps : int
        An atom not used by any input for this many steps is dead.
    resample_every : int
        Steps between dead-atom checks (0 disables the remedy); there is no
        check on the last step.
    checkpoint_every : int
        Steps between checkpoints when a checkpoint folder is given (0: only
        at the end).
    progress : bool
        Show a tqdm progress bar.
    threads : int or None
        Torch and numba threads while training (restored afterwards); None
        keeps the process's settings. On small problems one thread is often
        fastest: thread start-up dominates, and more so on a busy machine.
    """

    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 50
    init_from_data: bool = True
    dead_after_steps: int = 200
    resample_every: int = 100
    checkpoint_every: int = 0
    progress: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "dead_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {self}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """What a run returns.

    Attributes
    ----------
    sae : SparseAutoencoder
        The trained SAE (the object passed in, trained in place).
    metrics : pandas.DataFrame
        One row per log window: step, mse, fvu, l0, dead_fraction, seconds.
    steps : int
        Steps done in total (including those before a resume).
    seconds : float
        Wall time of this call.
    resumed_from : int or None
        Step of the checkpoint this run resumed from.
    resampled : int
        Atoms re-initialised by the dead-atom remedy (whole run).
    """

    sae: SparseAutoencoder
    metrics: pd.DataFrame
    steps: int
    seconds: float
    resumed_from: int | None
    resampled: int


def open_activations(acts: np.ndarray | Tensor | str | os.PathLike) -> np.ndarray:
    """A 2-D float array view of ``acts``; a ``.npy`` path is memory-mapped."""
    if isinstance(acts, str | os.PathLike):
        path = Path(acts)
        if path.suffix != ".npy":
            raise ValueError(f"activations file must be a .npy matrix, got {path}")
        array = np.load(path, mmap_mode="r")
    elif isinstance(acts, Tensor):
        array = acts.detach().cpu().numpy()
    else:
        array = np.asarray(acts)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(
            f"activations must be a non-empty (n, d) matrix, got {array.shape}"
        )
    return array


def check_finite(acts_nd: np.ndarray, chunk: int = 65536) -> None:
    """Raise ValueError naming the first row with a NaN or infinity."""
    for start in range(0, acts_nd.shape[0], chunk):
        block = np.asarray(acts_nd[start : start + chunk])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            rows = start + np.flatnonzero(bad)
            raise ValueError(
                f"activations hold non-finite values in {bad.sum()} row(s) of this "
                f"chunk, first at row {rows[0]}; drop or fix those rows before training"
            )


class BatchSampler:
    """Batches of rows for step ``s``: a seeded permutation per epoch.

    The batch of a step depends only on (seed, step), so a resumed run draws
    the same batches as an uninterrupted one.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n_rows = n_rows
        self.batch_size = min(batch_size, n_rows)
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_rows)
            self._epoch = epoch
        return self._perm

    def rows(self, step: int) -> np.ndarray:
        """Sorted row indices of the batch of ``step`` (sorted for mmap reads)."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = np.divmod(positions, self.n_rows)
        rows = np.concatenate(
            [self._permutation(e)[offsets[epochs == e]] for e in np.unique(epochs)]
        )
        return np.sort(rows)


def _batch(acts_nd: np.ndarray, rows: np.ndarray, device: torch.device) -> Tensor:
    block = np.asarray(acts_nd[rows], dtype=np.float32)
    return torch.from_numpy(block).to(device)


def _sample(acts_nd: np.ndarray, seed: int, device, max_rows: int = 65536) -> Tensor:
    """Up to ``max_rows`` random rows, the same for a given seed."""
    rng = np.random.default_rng([seed, 1_000_003])
    n = acts_nd.shape[0]
    return _batch(
        acts_nd, np.sort(rng.choice(n, size=min(n, max_rows), replace=False)), device
    )


@torch.no_grad()
def initialise_from_data(
    sae: SparseAutoencoder, acts_nd: np.ndarray, seed: int
) -> None:
    """Bias := mean of (up to 65536) random rows; atoms := random centred rows."""
    x_nd = _sample(acts_nd, seed, sae.atoms_md.device)
    rng = np.random.default_rng([seed, 2_000_003])
    mean_d = x_nd.mean(0)
    sae.bias_d.copy_(mean_d)
    n = x_nd.shape[0]
    picks = rng.choice(n, size=sae.n_atoms, replace=sae.n_atoms > n)
    centred_md = x_nd[torch.from_numpy(picks)] - mean_d
    # Duplicated rows (fewer rows than atoms) get a little noise to differ.
    generator = torch.Generator().manual_seed(seed)
    noise_md = torch.randn(centred_md.shape, generator=generator) * 1e-2
    centred_md = centred_md + noise_md.to(centred_md) * centred_md.norm(dim=-1).mean()
    sae.atoms_md.copy_(centred_md)
    sae.normalize_atoms_()
    if hasattr(sae, "encoder_md"):
        sae.encoder_md.copy_(sae.atoms_md)


def distinct_atoms(atoms_nk: Tensor) -> Tensor:
    """Number of distinct atoms per row (``-1`` ignored): the L0 of the codes."""
    sorted_nk = atoms_nk.sort(dim=1).values
    new_nk = torch.ones_like(sorted_nk, dtype=torch.bool)
    new_nk[:, 1:] = sorted_nk[:, 1:] != sorted_nk[:, :-1]
    return (new_nk & (sorted_nk >= 0)).sum(1)


@dataclass
class _Window:
    """Sums of the metrics over the current log window."""

    sse: float = 0.0
    sst: float = 0.0
    elements: int = 0
    l0: float = 0.0
    steps: int = 0

    def add(
        self, residual_nd: Tensor, x_nd: Tensor, mean_d: Tensor, l0_n: Tensor
    ) -> None:
        self.sse += float(residual_nd.detach().pow(2).sum())
        self.sst += float((x_nd - mean_d).pow(2).sum())
        self.elements += residual_nd.numel()
        self.l0 += float(l0_n.float().mean())
        self.steps += 1


class Trainer:
    """The training loop; use :func:`train` unless stepping by hand."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        acts: np.ndarray | Tensor | str | os.PathLike,
        config: TrainConfig,
    ) -> None:
        self.sae = sae
        self.config = config
        self.acts_nd = open_activations(acts)
        if self.acts_nd.shape[1] != sae.d:
            raise ValueError(
                f"activations have width {self.acts_nd.shape[1]}, "
                f"the SAE expects {sae.d}"
            )
        check_finite(self.acts_nd)
        self.device = sae.atoms_md.device
        self.sampler = BatchSampler(
            self.acts_nd.shape[0], config.batch_size, config.seed
        )
        if self.sampler.batch_size < config.batch_size:
            logger.warning(
                "batch_size %d > %d rows: using batches of %d",
                config.batch_size,
                self.acts_nd.shape[0],
                self.sampler.batch_size,
            )
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
        self.step = 0
        self.last_used_m = torch.zeros(sae.n_atoms, dtype=torch.long)
        self.resampled = 0
        self.rows: list[dict] = []
        self.window = _Window()
        self.window_start = time.perf_counter()
        self.mean_d = sae.bias_d.detach().clone()

    def start(self) -> None:
        """Initialise from the data (when configured) before the first step."""
        if self.config.init_from_data:
            initialise_from_data(self.sae, self.acts_nd, self.config.seed)
        self.mean_d = _sample(self.acts_nd, self.config.seed, self.device).mean(0)

    def train_step(self) -> None:
        """One optimiser step on the batch of the current step."""
        x_nd = _batch(self.acts_nd, self.sampler.rows(self.step), self.device)
        result = self.sae(x_nd)
        loss = result.residual.pow(2).sum(-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sae.normalize_atoms_()
        self.step += 1
        picked = result.atoms[result.atoms >= 0].cpu()
        self.last_used_m[picked] = self.step
        self.window.add(
            result.residual, x_nd, self.mean_d, distinct_atoms(result.atoms)
        )
        if (
            self.config.resample_every
            and self.step % self.config.resample_every == 0
            and self.step < self.config.steps
        ):
            # Never on the last step: a resampled atom needs steps to settle
            # (a fresh TopK atom would join every input's code untrained).
            self.resample_dead(x_nd, result.residual.detach())
        if self.step % self.config.log_every == 0 or self.step == self.config.steps:
            self.log_window()

    def dead_mask(self) -> Tensor:
        """Atoms unused for ``dead_after_steps`` steps (none before that many)."""
        return self.last_used_m < self.step - self.config.dead_after_steps

    @torch.no_grad()
    def resample_dead(self, x_nd: Tensor, residual_nd: Tensor) -> None:
        """Point dead atoms at badly reconstructed inputs; reset their moments.

        Inputs are drawn with probability proportional to their squared
        residual; the new atom is that input's residual direction.
        """
        dead_m = self.dead_mask()
        n_dead = int(dead_m.sum())
        if n_dead == 0:
            return
        generator = torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + self.step
        )
        weights_n = residual_nd.pow(2).sum(-1).cpu() + 1e-12
        replace = n_dead > x_nd.shape[0]
        chosen = torch.multinomial(weights_n, n_dead, replace, generator=generator)
        directions_kd = residual_nd[chosen.to(residual_nd.device)]
        directions_kd = directions_kd / directions_kd.norm(dim=-1, keepdim=True).clamp(
            min=1e-12
        )
        index = dead_m.nonzero().squeeze(1).to(self.device)
        self.sae.atoms_md[index] = directions_kd
        encoder = getattr(self.sae, "encoder_md", None)
        if encoder is not None:
            encoder[index] = directions_kd
            self.sae.encoder_bias_m[index] = 0.0
        self._reset_moments(index)
        self.last_used_m[dead_m] = self.step
        self.resampled += n_dead
        logger.debug("step %d: resampled %d dead atoms", self.step, n_dead)

    def _reset_moments(self, index: Tensor) -> None:
        for name, param in self.sae.named_parameters():
            if name not in ("atoms_md", "encoder_md", "encoder_bias_m"):
                continue
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0

    def log_window(self) -> None:
        w = self.window
        if w.steps == 0:
            return
        row = {
            "step": self.step,
            "mse": w.sse / w.elements,
            "fvu": w.sse / max(w.sst, 1e-30),
            "l0": w.l0 / w.steps,
            "dead_fraction": float(self.dead_mask().float().mean()),
            "seconds": time.perf_counter() - self.window_start,
        }
        self.rows.append(row)
        logger.info(
            "step %d: mse %.3g fvu %.4f l0 %.1f dead %.3f",
            row["step"],
            row["mse"],
            row["fvu"],
            row["l0"],
            row["dead_fraction"],
        )
        self.window = _Window()
        self.window_start = time.perf_counter()

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=METRIC_COLUMNS)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """SAE, optimiser moments and loop state, each written atomically."""
        directory = Path(directory)
        self.sae.save(directory)
        tensors = {}
        names = dict(self.sae.named_parameters())
        for name, param in names.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        tensors["last_used_m"] = self.last_used_m.contiguous()
        tensors["mean_d"] = self.mean_d.detach().cpu().contiguous()
        with atomic_path(directory / OPTIMIZER_FILE) as tmp:
            save_file(tensors, str(tmp))
        state = {
            "step": self.step,
            "resampled": self.resampled,
            "rows": self.rows,
            "config": asdict(self.config),
        }
        write_json(directory / STATE_FILE, state)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        directory = Path(directory)
        saved = load_sae(directory)
        if saved.config != self.sae.config:
            raise ValueError(
                f"checkpoint {directory} holds {saved.config}, not {self.sae.config}; "
                "resume with the SAE settings it was made with, or start afresh"
            )
        self.sae.load_state_dict(saved.state_dict())
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        for name, param in self.sae.named_parameters():
            state = {
                key.rsplit(".", 1)[1]: value.to(param.device)
                for key, value in tensors.items()
                if key.rsplit(".", 1)[0] == name
            }
            if state:
                self.optimizer.state[param] = state
        self.last_used_m = tensors["last_used_m"].clone()
        self.mean_d = tensors["mean_d"].to(self.device)
        state = json.loads((directory / STATE_FILE).read_text())
        self.step = int(state["step"])
        self.resampled = int(state["resampled"])
        self.rows = list(state["rows"])


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds a complete checkpoint."""
    if directory is None:
        return False
    directory = Path(directory)
    return (directory / STATE_FILE).exists() and (directory / OPTIMIZER_FILE).exists()


def train(
    sae: SparseAutoencoder,
    acts: np.ndarray | Tensor | str | os.PathLike,
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``sae`` in place on ``acts`` (array, tensor or ``.npy`` path).

    With ``checkpoint_dir``, checkpoints are written there every
    ``checkpoint_every`` steps and at the end, and (``resume=True``) a run
    continues from the checkpoint found there.
    """
    with _threads(config.threads):
        return _train(sae, acts, config, checkpoint_dir, resume)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Set torch and numba threads for the block, then restore them."""
    if count is None:
        yield
        return
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def _train(
    sae: SparseAutoencoder,
    acts: np.ndarray | Tensor | str | os.PathLike,
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
) -> TrainResult:
    started = time.perf_counter()
    trainer = Trainer(sae, acts, config)
    resumed_from = None
    if resume and has_checkpoint(checkpoint_dir):
        trainer.load_checkpoint(checkpoint_dir)
        resumed_from = trainer.step
        logger.info("resuming from step %d in %s", trainer.step, checkpoint_dir)
    else:
        trainer.start()
    sae.train()
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        desc=f"train {sae.kind}",
        disable=not config.progress,
        mininterval=1.0,
    )
    with bar:
        while trainer.step < config.steps:
            trainer.train_step()
            bar.update(1)
            if trainer.rows:
                bar.set_postfix(fvu=f"{trainer.rows[-1]['fvu']:.4f}", refresh=False)
            every = config.checkpoint_every
            if checkpoint_dir is not None and every and trainer.step % every == 0:
                trainer.save_checkpoint(checkpoint_dir)
    if checkpoint_dir is not None:
        trainer.save_checkpoint(checkpoint_dir)
    sae.eval()
    return TrainResult(
        sae=sae,
        metrics=trainer.metrics(),
        steps=trainer.step,
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
        resampled=trainer.resampled,
    )


def write_metrics(metrics: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the metrics log as CSV, atomically."""
    write_text(path, metrics.to_csv(index=False, float_format="%.6g"))
