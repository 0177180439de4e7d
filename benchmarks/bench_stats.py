"""Statistics at scale: a million traces over 8192 atoms in bounded memory.

Writes synthetic pursuit traces (``n`` inputs, ``k`` steps, atoms drawn from
a Zipf-like popularity so some atoms are hot and some rare) to memory-mapped
``.npy`` files, runs :func:`backend.stats.trace_stats` over them, and prints
the wall time, rows per second and the peak resident memory the run added,
next to the size a dense ``n x n_atoms`` float32 code matrix would need.

    .venv/bin/python benchmarks/bench_stats.py            # n = 1,000,000
    .venv/bin/python benchmarks/bench_stats.py --n 200000 # quicker
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.stats import StatsConfig, Traces, trace_stats  # noqa: E402


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(folder: Path, n: int, k: int, n_atoms: int, seed: int) -> Traces:
    """Traces on disk, written in blocks so that making them stays small too."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_atoms + 1) ** 0.8
    popularity /= popularity.sum()
    atoms = np.lib.format.open_memmap(folder / "atoms.npy", "w+", np.int32, (n, k))
    coefs = np.lib.format.open_memmap(folder / "coefs.npy", "w+", np.float32, (n, k))
    norms = np.lib.format.open_memmap(
        folder / "norms.npy", "w+", np.float32, (n, k + 1)
    )
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        rows = stop - start
        atoms[start:stop] = rng.choice(n_atoms, size=(rows, k), p=popularity)
        decay = np.sort(rng.random((rows, k)).astype(np.float32), axis=1)[:, ::-1]
        coefs[start:stop] = decay * 0.5
        energy = np.cumsum(coefs[start:stop] ** 2, axis=1)[:, ::-1]
        norms[start:stop, 0] = np.sqrt(energy[:, 0] + 0.05)
        norms[start:stop, 1:] = np.sqrt(np.c_[energy[:, 1:], np.zeros(rows)] + 0.05)
    for array in (atoms, coefs, norms):
        array.flush()

    def load(name: str) -> np.ndarray:
        return np.load(folder / name, mmap_mode="r")

    return Traces(load("atoms.npy"), load("coefs.npy"), load("norms.npy"))


def items_table(n: int, seed: int) -> pd.DataFrame:
    """Half images, half captions paired row by row; a 3-level hierarchy."""
    rng = np.random.default_rng(seed)
    half = n // 2
    name = rng.integers(0, 4000, half)
    image_rows = np.arange(half)
    levels = {
        "level0": (name // 400).astype(str),
        "level1": (name // 40).astype(str),
        "level2": name.astype(str),
    }
    return pd.DataFrame(
        {
            "modality": np.r_[["image"] * half, ["text"] * (n - half)],
            "pair_row": np.r_[image_rows + half, image_rows[: n - half]],
            "split": np.where(np.r_[name, name[: n - half]] % 10 == 0, "test", "train"),
            "text": "",
            **{lv: np.r_[v, v[: n - half]] for lv, v in levels.items()},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="inputs")
    parser.add_argument("--k", type=int, default=32, help="steps per trace")
    parser.add_argument("--atoms", type=int, default=8192, help="dictionary size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        traces = synthetic(Path(tmp), args.n, args.k, args.atoms, args.seed)
        items = items_table(args.n, args.seed)
        energy = np.ones(args.n)
        made = time.perf_counter() - start
        before = peak_rss_mib()
        start = time.perf_counter()
        stats = trace_stats(traces, items, energy, args.atoms, StatsConfig())
        seconds = time.perf_counter() - start
        after = peak_rss_mib()

    dense_gib = args.n * args.atoms * 4 / 2**30
    trace_mib = args.n * (3 * args.k + 1) * 4 / 2**20
    print(
        f"threads: {os.cpu_count()} cores; n={args.n:,} k={args.k} n_atoms={args.atoms}"
    )
    print(f"synthetic traces written in {made:.1f} s ({trace_mib:.0f} MiB on disk)")
    print(f"trace_stats: {seconds:.1f} s, {args.n / seconds:,.0f} rows/s")
    print(
        f"peak RSS: {before:.0f} MiB before, {after:.0f} MiB after "
        f"(+{after - before:.0f} MiB)"
    )
    print(
        f"a dense n x n_atoms float32 code matrix would be {dense_gib:.1f} GiB: "
        f"ratio dense / added peak = {dense_gib * 1024 / max(after - before, 1):.0f}x"
    )
    print(
        f"tables: {len(stats.top_items):,} top items, {len(stats.transitions):,} "
        f"transitions, {len(stats.hierarchy)} hierarchy rows"
    )


if __name__ == "__main__":
    main()
