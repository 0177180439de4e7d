"""Dashboard speed on a built cache: page reruns and live re-encoding.

Measures, in one run on this machine:

- the median wall time of rerunning each page with Streamlit's AppTest once
  its caches are warm (the first run of each page fills them and is reported
  apart); target: at most 300 ms per page. "traces, k moves" changes the k
  slider before every rerun, so each rerun re-encodes the input live;
- the median time of one live re-encode at k = 64 (CLIP embedding excluded:
  the input is a corpus activation), as the Traces page does it: Gram-matrix
  pursuit plus the running reconstruction; and the same plus the nearest
  corpus items at every step; target: at most 100 ms.

Usage::

    .venv/bin/python benchmarks/bench_dashboard.py [--cache cache/<key>] [--reruns 15]

Without ``--cache`` it takes the newest cache under ``$ATLAS_CACHE_ROOT`` or
``cache/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import streamlit.logger  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import live, loaders  # noqa: E402

PAGE_BUDGET_MS = 300.0
ENCODE_BUDGET_MS = 100.0
LIVE_K = 64
# (name, page file, query parameters, widget settings before the timed reruns)
SCENARIOS = [
    ("overview", None, {}, []),
    ("atoms ?atom=", "atoms", {"atom": "ATOM"}, []),
    ("atoms, free text", "atoms", {}, [("text_input", "text_query", "a red apple")]),
    ("cross-modal", "crossmodal", {}, []),
    ("traces, k=64", "traces", {}, [("slider", "trace_k", LIVE_K)]),
    ("traces, k moves", "traces", {}, [("slider", "trace_k", LIVE_K)]),
    ("atlas", "atlas", {}, []),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="a cache/<key> folder")
    parser.add_argument("--reruns", type=int, default=15, help="timed reruns")
    return parser.parse_args()


def pick_cache(folder: Path | None) -> loaders.CacheRef:
    if folder is not None:
        os.environ[loaders.CACHE_ROOT_ENV] = str(folder.resolve().parent)
        refs = [r for r in loaders.list_caches() if Path(r.path) == folder.resolve()]
    else:
        refs = loaders.list_caches()
    if not refs:
        raise SystemExit(
            f"no built cache found; build one with {loaders.BUILD_COMMAND}"
        )
    return refs[0]


def time_page(
    name, page, query, settings, atom: int, reruns: int
) -> tuple[float, float]:
    """First-run seconds and median warm rerun seconds of one page."""
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    at.query_params.update(
        {k: str(atom) if v == "ATOM" else v for k, v in query.items()}
    )
    start = time.perf_counter()
    at.run()
    if page:
        at.switch_page(f"dashboard/pages/{page}.py")
        at.run()
    for kind, key, value in settings:
        getattr(at, kind)(key=key).set_value(value)
        at.run()
    first = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"{name}: {at.exception[0].value}")
    at.run()  # one more warm-up after the widget settings
    times = []
    for i in range(reruns):
        if name == "traces, k moves":  # a live re-encode on every rerun
            at.slider(key="trace_k").set_value(LIVE_K - 1 - i % 2)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def time_encode(ref: loaders.CacheRef, reruns: int) -> tuple[float, float]:
    """Median seconds of a live k=64 re-encode, without and with neighbours."""
    data = loaders.items(ref)
    rows = np.random.default_rng(0).choice(len(data), size=reruns + 3, replace=False)
    acts_nd = loaders.acts(ref)
    encode, full = [], []
    for i, row in enumerate(rows):
        modality = data.loc[row, "modality"]
        start = time.perf_counter()
        code = live.code_of(ref, acts_nd[row], modality, "mp", LIVE_K)
        middle = time.perf_counter()
        live.step_table(ref, code, exclude=int(row))
        end = time.perf_counter()
        if i >= 3:  # the first calls load the SAE and JIT the encoder
            encode.append(middle - start)
            full.append(end - start)
    return statistics.median(encode), statistics.median(full)


def main() -> int:
    args = parse_args()
    streamlit.logger.set_log_level("error")  # AppTest's bare-mode warnings
    ref = pick_cache(args.cache)
    meta = loaders.manifest(ref)
    atoms = loaders.atoms(ref)
    atom = int(atoms["frequency"].idxmax())
    print(
        f"cache {ref.key}: {meta.get('n_items', '?')} activations, {len(atoms)} atoms; "
        f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}"
    )
    print(f"{'page':<20}{'first run ms':>14}{'median rerun ms':>18}{'budget':>9}")
    worst = 0.0
    for name, page, query, settings in SCENARIOS:
        first, median = time_page(name, page, query, settings, atom, args.reruns)
        worst = max(worst, median * 1000)
        flag = "ok" if median * 1000 <= PAGE_BUDGET_MS else "OVER"
        print(f"{name:<20}{first * 1000:>14.0f}{median * 1000:>18.1f}{flag:>9}")
    encode, full = time_encode(ref, args.reruns)
    print(
        f"live re-encode k={LIVE_K}: {encode * 1000:.1f} ms median "
        f"({'ok' if encode * 1000 <= ENCODE_BUDGET_MS else 'OVER'} against "
        f"{ENCODE_BUDGET_MS:.0f} ms); with nearest items per step: "
        f"{full * 1000:.1f} ms"
    )
    print(
        f"ratios to budget: slowest page {worst / PAGE_BUDGET_MS:.2f}, "
        f"re-encode {encode * 1000 / ENCODE_BUDGET_MS:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
