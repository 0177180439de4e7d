"""``python -m backend sae``: train an SAE, run the synthetic test, benchmark."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from backend.sae import SAE_KINDS, SAEConfig, build_sae
from backend.training import TrainConfig, train, write_metrics

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sae.py"


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "sae",
        help="train an MP-SAE or TopK SAE; synthetic hierarchy test; benchmark",
        description="The SAE core on its own: train on an activation matrix, "
        "compare MP-SAE and TopK SAE on the synthetic feature hierarchy, or "
        "run the encoder and training benchmark.",
    )
    actions = parser.add_subparsers(dest="sae_command", metavar="ACTION")
    _add_train(actions)
    _add_synthetic(actions)
    _add_bench(actions)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _add_train(actions) -> None:
    defaults = TrainConfig()
    cmd = actions.add_parser(
        "train",
        help="train an SAE on a .npy activation matrix",
        description="Train an SAE on an (n, d) float .npy matrix (memory-mapped) "
        "and write weights.safetensors, config.json and metrics.csv to --out. "
        "A checkpoint in --out/checkpoint lets an interrupted run resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cmd.add_argument("--acts", type=Path, required=True, help="(n, d) .npy matrix")
    cmd.add_argument("--out", type=Path, required=True, help="output folder")
    cmd.add_argument("--kind", choices=sorted(SAE_KINDS), default="mp", help="SAE kind")
    cmd.add_argument("--n-atoms", type=int, default=2048, help="dictionary size")
    cmd.add_argument("--k", type=int, default=32, help="pursuit steps / active atoms")
    cmd.add_argument(
        "--signed",
        action="store_true",
        help="MP only: classical selection by |correlation| with signed codes",
    )
    cmd.add_argument(
        "--steps", type=int, default=defaults.steps, help="optimiser steps"
    )
    cmd.add_argument("--batch-size", type=int, default=defaults.batch_size)
    cmd.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    cmd.add_argument("--seed", type=int, default=defaults.seed)
    cmd.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/numba threads (None: the process default)",
    )
    cmd.add_argument(
        "--checkpoint-every", type=int, default=200, help="steps between checkpoints"
    )
    cmd.set_defaults(func=_run_train)


def _run_train(args) -> int:
    import numpy as np

    d = np.load(args.acts, mmap_mode="r").shape[-1]
    config = SAEConfig(args.kind, d, args.n_atoms, args.k, not args.signed, args.seed)
    sae = build_sae(config)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
    )
    result = train(sae, args.acts, train_config, checkpoint_dir=args.out / "checkpoint")
    sae.save(args.out)
    write_metrics(result.metrics, args.out / "metrics.csv")
    last = result.metrics.iloc[-1]
    print(
        f"{sae.kind} SAE ({sae.n_atoms} atoms, k={sae.k}) trained for {result.steps} "
        f"steps in {result.seconds:.1f} s: fvu {last['fvu']:.4f}, l0 {last['l0']:.1f}, "
        f"dead {last['dead_fraction']:.3f}, {result.resampled} atoms resampled; "
        f"saved to {args.out}"
    )
    return 0


def _add_synthetic(actions) -> None:
    cmd = actions.add_parser(
        "synthetic",
        help="MP-SAE vs TopK SAE on the synthetic feature hierarchy",
        description="Train both SAE kinds alike on data drawn from a two-level "
        "feature tree and print how well each recovers the true features "
        "(mean matched cosine after Hungarian matching) and its FVU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cmd.add_argument("--steps", type=int, default=600)
    cmd.add_argument("--k", type=int, default=2, help="sparsity of both SAEs")
    cmd.add_argument("--samples", type=int, default=10000, help="training samples")
    cmd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmd.add_argument("--threads", type=int, default=1)
    cmd.set_defaults(func=_run_synthetic)


def _run_synthetic(args) -> int:
    from backend.synthetic import HierarchyConfig, compare_on_hierarchy

    base = TrainConfig(
        steps=args.steps, batch_size=256, lr=3e-3, progress=False, threads=args.threads
    )
    print("seed  sae   recovery (parents / children)   fvu")
    for seed in args.seeds:
        config = HierarchyConfig(seed=seed)
        result = compare_on_hierarchy(
            config, replace(base, seed=seed), n_samples=args.samples, k=args.k
        )
        for kind, rec, fvu in (
            ("mp", result.mp, result.mp_fvu),
            ("topk", result.topk, result.topk_fvu),
        ):
            print(
                f"{seed:>4}  {kind:<5} {rec.mean_cosine:.3f} "
                f"({rec.parent_cosine:.3f} / {rec.child_cosine:.3f})"
                f"           {fvu:.4f}"
            )
    return 0


def _add_bench(actions) -> None:
    cmd = actions.add_parser(
        "bench",
        help="run benchmarks/bench_sae.py (B1 encoder, B2 vs TopK, B3 training)",
        description="Run the SAE benchmark; it prints ratios measured in one run.",
    )
    cmd.add_argument("--quick", action="store_true", help="small sizes")
    cmd.add_argument("--only", choices=["B1", "B2", "B3"])
    cmd.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    command = [sys.executable, str(BENCHMARK)]
    command += ["--quick"] if args.quick else []
    command += ["--only", args.only] if args.only else []
    return subprocess.run(command, check=False).returncode
