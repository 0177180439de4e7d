"""Benchmark of the SAE core; prints ratios measured in one run.

B1  Gram-matrix encoder (``backend.fast.fast_encode``) against the plain
    reference loop (``MatchingPursuitSAE.encode``: one full ``D r`` per step),
    d=512, n_atoms=8192, k=32, batch 4096: speed ratio, pick agreement and
    FVU difference. The Gram matrix is built once per dictionary, so the
    ratio is given with its build amortised and with it included.
B2  MP encode + decode (fast encoder) against TopK encode + decode at the
    same size.
B3  One MP training step (picks through the Gram matrix, gradient through the
    replayed pursuit) against a step that backpropagates through the plain
    loop, at the default build's size (d=384, n_atoms=4096, k=32, batch 1024),
    with a TopK step for reference.

Every case runs in its own process so that its peak memory (above the
process's baseline once inputs exist) can be read from ``ru_maxrss``. The
plain loop is timed once (it is the slow side); the other encoders report
the median of three runs; training steps the mean of three (plain: one).
The load average is printed because other work on the machine changes the
memory-bound Gram encoder more than the compute-bound plain loop.

Usage: ``python benchmarks/bench_sae.py [--quick] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {
    "encode": {"d": 512, "n_atoms": 8192, "k": 32, "n": 4096},
    "train": {"d": 384, "n_atoms": 4096, "k": 32, "n": 1024},
}
QUICK = {
    "encode": {"d": 128, "n_atoms": 1024, "k": 16, "n": 512},
    "train": {"d": 64, "n_atoms": 512, "k": 16, "n": 256},
}


REPEATS = 3


def timed(fn, repeats: int = REPEATS):
    """Median wall time of ``repeats`` calls of ``fn`` and its last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(size: dict):
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randn(size["n"], size["d"], generator=generator)


def make_sae(kind: str, size: dict):
    from backend.sae import MatchingPursuitSAE, TopKSAE

    cls = MatchingPursuitSAE if kind == "mp" else TopKSAE
    return cls(size["d"], size["n_atoms"], size["k"], seed=0)


def case_plain_encode(size, out):
    import numpy as np

    sae, x_nd = make_sae("mp", size), inputs(size)
    base = rss_mib()
    start = time.perf_counter()
    result = sae.encode(x_nd)
    seconds = time.perf_counter() - start
    np.save(out / "plain_atoms.npy", result.atoms.numpy())
    np.save(out / "plain_residual.npy", result.residual.numpy())
    return {"seconds": seconds, "peak_mib": peak_mib() - base}


def warm_numba():
    from backend.fast import fast_encode
    from backend.sae import MatchingPursuitSAE

    tiny = MatchingPursuitSAE(8, 16, 4)
    fast_encode(tiny, inputs({"n": 4, "d": 8}))


def case_fast_encode(size, out):
    import numpy as np

    from backend.fast import fast_encode, gram_matrix

    warm_numba()
    sae, x_nd = make_sae("mp", size), inputs(size)
    base = rss_mib()
    start = time.perf_counter()
    gram_matrix(sae)
    gram_seconds = time.perf_counter() - start
    seconds, result = timed(lambda: fast_encode(sae, x_nd))
    np.save(out / "fast_atoms.npy", result.atoms.numpy())
    np.save(out / "fast_residual.npy", result.residual.numpy())
    return {
        "seconds": seconds,
        "gram_seconds": gram_seconds,
        "peak_mib": peak_mib() - base,
    }


def case_mp_encode_decode(size, out):
    from backend.fast import fast_encode, gram_matrix

    warm_numba()
    sae, x_nd = make_sae("mp", size), inputs(size)
    base = rss_mib()
    start = time.perf_counter()
    gram_matrix(sae)
    gram_seconds = time.perf_counter() - start
    seconds, _ = timed(lambda: sae.decode(fast_encode(sae, x_nd).codes))
    return {
        "seconds": seconds,
        "gram_seconds": gram_seconds,
        "peak_mib": peak_mib() - base,
    }


def case_topk_encode_decode(size, out):
    import torch

    sae, x_nd = make_sae("topk", size), inputs(size)
    base = rss_mib()
    with torch.no_grad():
        seconds, _ = timed(lambda: sae.decode(sae.encode(x_nd).codes))
    return {"seconds": seconds, "peak_mib": peak_mib() - base}


def _train_case(kind: str, plain: bool, size: dict, repeats: int):
    from backend.training import TrainConfig, Trainer

    warm_numba()
    sae = make_sae(kind, size)
    acts_nd = inputs({"n": size["n"] * 4, "d": size["d"]}).numpy()
    config = TrainConfig(steps=repeats + 1, batch_size=size["n"], progress=False)
    trainer = Trainer(sae, acts_nd, config)
    trainer.start()
    if plain:
        # The reference step: backpropagate through the plain loop itself.
        sae.forward = lambda x_nd: type(sae).forward(sae, x_nd, plain=True)
    base = rss_mib()
    trainer.train_step()  # warm-up: allocations, Adam state
    start = time.perf_counter()
    for _ in range(repeats):
        trainer.train_step()
    seconds = (time.perf_counter() - start) / repeats
    return {"seconds": seconds, "peak_mib": peak_mib() - base}


def case_train_fast(size, out):
    return _train_case("mp", False, size, repeats=3)


def case_train_plain(size, out):
    return _train_case("mp", True, size, repeats=1)


def case_train_topk(size, out):
    return _train_case("topk", False, size, repeats=3)


CASES = {
    "plain_encode": ("encode", case_plain_encode),
    "fast_encode": ("encode", case_fast_encode),
    "mp_encode_decode": ("encode", case_mp_encode_decode),
    "topk_encode_decode": ("encode", case_topk_encode_decode),
    "train_fast": ("train", case_train_fast),
    "train_plain": ("train", case_train_plain),
    "train_topk": ("train", case_train_topk),
}


def run_child(name: str, args, out: Path) -> dict:
    command = [sys.executable, __file__, "--case", name, "--out", str(out)]
    command += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def line(label: str, result: dict, note: str = "") -> str:
    seconds, peak = result["seconds"], result["peak_mib"]
    return f"  {label:<15} {seconds:8.2f} s   peak +{peak:.0f} MiB{note}"


def fvu(x_nd, residual_nd) -> float:
    centred = x_nd - x_nd.mean(0)
    return float((residual_nd**2).sum() / (centred**2).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch and numba threads"
    )
    parser.add_argument(
        "--only", choices=["B1", "B2", "B3"], help="run one benchmark instead of all"
    )
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        kind, case = CASES[args.case]
        print(json.dumps(case(sizes[kind], args.out)))
        return 0
    return report(args, sizes)


GROUPS = {
    "B1": ["plain_encode", "fast_encode"],
    "B2": ["mp_encode_decode", "topk_encode_decode"],
    "B3": ["train_plain", "train_fast", "train_topk"],
}


def report(args, sizes) -> int:
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads for torch and numba, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    groups = [args.only] if args.only else list(GROUPS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for group in groups:
            res = {name: run_child(name, args, out) for name in GROUPS[group]}
            REPORTS[group](res, sizes, out)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


def report_b1(res, sizes, out) -> None:
    import numpy as np

    enc = sizes["encode"]
    x_nd = inputs(enc).numpy()
    plain_atoms = np.load(out / "plain_atoms.npy")
    fast_atoms = np.load(out / "fast_atoms.npy")
    agreement = float((plain_atoms == fast_atoms).mean())
    fvu_plain = fvu(x_nd, np.load(out / "plain_residual.npy"))
    fvu_fast = fvu(x_nd, np.load(out / "fast_residual.npy"))
    plain, fast = res["plain_encode"], res["fast_encode"]
    print(
        f"\nB1 encoder, d={enc['d']} n_atoms={enc['n_atoms']} k={enc['k']} "
        f"batch={enc['n']}"
    )
    print(line("plain loop", plain))
    gram_note = f" (Gram build {fast['gram_seconds']:.2f} s, once per dictionary)"
    print(line("Gram encoder", fast, gram_note))
    print(
        f"  speed ratio     {plain['seconds'] / fast['seconds']:8.1f} x  "
        f"({plain['seconds'] / (fast['seconds'] + fast['gram_seconds']):.1f} x "
        "counting the Gram build)"
    )
    print(f"  pick agreement  {agreement:.5%}")
    print(
        f"  FVU plain {fvu_plain:.6f}  fast {fvu_fast:.6f}  "
        f"difference {abs(fvu_plain - fvu_fast):.2e}"
    )


def report_b2(res, sizes, out) -> None:
    mp, topk = res["mp_encode_decode"], res["topk_encode_decode"]
    print("\nB2 encode + decode at equal size (same as B1)")
    print(line("MP (Gram)", mp))
    print(line("TopK", topk))
    print(
        f"  MP / TopK       {mp['seconds'] / topk['seconds']:8.2f} x  "
        f"({(mp['seconds'] + mp['gram_seconds']) / topk['seconds']:.2f} x "
        "counting the Gram build)"
    )


def report_b3(res, sizes, out) -> None:
    tr = sizes["train"]
    tf, tp, tt = res["train_fast"], res["train_plain"], res["train_topk"]
    print(
        f"\nB3 one training step, d={tr['d']} n_atoms={tr['n_atoms']} k={tr['k']} "
        f"batch={tr['n']}"
    )
    print(line("MP, plain loop", tp))
    print(line("MP, Gram picks", tf))
    print(line("TopK", tt))
    print(f"  speed ratio     {tp['seconds'] / tf['seconds']:8.1f} x (plain / Gram)")
    print(f"  MP / TopK       {tf['seconds'] / tt['seconds']:8.2f} x")


REPORTS = {"B1": report_b1, "B2": report_b2, "B3": report_b3}


if __name__ == "__main__":
    sys.exit(main())
