"""MP-SAE Atlas backend: models, corpora, MP-SAEs, statistics and the cache.

Nothing in this package imports streamlit; the dashboard reads what it writes.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
CACHE_ROOT = REPO_ROOT / "cache"
