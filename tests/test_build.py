"""The build pipeline end to end on a tiny real corpus: files, rerun, kill, damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from backend import REPO_ROOT, cache
from backend.build import STAGES, build_cache
from tests.conftest import TINY_IMAGES, TINY_SETTINGS

DOC_FILES = [
    "activations/items.parquet",
    "activations/acts.npy",
    "sae/mp/weights.safetensors",
    "sae/topk/config.json",
    "codes/mp_atoms.npy",
    "codes/mp_coefficients.npy",
    "codes/mp_residual_norms.npy",
    "codes/mp_fvu.npy",
    "codes/topk_atoms.npy",
    "codes/topk_residual_norms.npy",
    "stats/atoms.parquet",
    "stats/pick_steps.npy",
    "stats/coef_hist.npy",
    "stats/top_items.parquet",
    "stats/neighbors.parquet",
    "stats/transitions.parquet",
    "stats/fvu_by_k.parquet",
    "stats/l0.parquet",
    "stats/hierarchy.parquet",
    "stats/summary.json",
]


def test_tiny_build_has_every_file_and_consistent_shapes(tiny_cache):
    manifest = cache.open_cache(tiny_cache)
    assert manifest["complete"] and set(manifest["stages"]) == set(STAGES)
    for rel in DOC_FILES:
        assert (tiny_cache / rel).is_file(), rel
        assert rel in manifest["checksums"] or rel.startswith("sae/")
    items = pd.read_parquet(tiny_cache / "activations" / "items.parquet")
    acts = np.load(tiny_cache / "activations" / "acts.npy")
    n = len(items)
    assert (items.modality == "image").sum() == TINY_IMAGES
    assert manifest["n_items"] == n == len(acts)
    np.testing.assert_allclose(np.linalg.norm(acts, axis=1), 1, atol=1e-5)
    # pairs point across modalities and back
    texts = items[items.modality == "text"]
    assert (items.modality[texts.pair_row].to_numpy() == "image").all()
    assert (items.corpus_id[texts.pair_row].to_numpy() == texts.corpus_id).all()

    k = TINY_SETTINGS.sae.k
    assert np.load(tiny_cache / "codes" / "mp_atoms.npy").shape == (n, k)
    assert np.load(tiny_cache / "codes" / "mp_residual_norms.npy").shape == (n, k + 1)
    atoms = pd.read_parquet(tiny_cache / "stats" / "atoms.parquet")
    assert len(atoms) == TINY_SETTINGS.sae.n_atoms
    assert atoms[["umap_x", "umap_y"]].notna().all().all()
    assert atoms.label.str.len().gt(0).all()


def test_tiny_build_figures_are_real(tiny_cache):
    """The stored figures agree with the stored traces and the SAE weights."""
    from backend.sae import load_sae

    items = pd.read_parquet(tiny_cache / "activations" / "items.parquet")
    acts = np.load(tiny_cache / "activations" / "acts.npy")
    sae = load_sae(tiny_cache / "sae" / "mp")
    result = sae.encode(np.array(acts))
    stored = np.load(tiny_cache / "codes" / "mp_atoms.npy")
    agree = (result.atoms.numpy() == stored).mean()
    assert agree > 0.99

    fvu = pd.read_parquet(tiny_cache / "stats" / "fvu_by_k.parquet")
    mp = fvu.query("sae == 'mp' and modality == 'image'").set_index("k").fvu
    image = (items.modality == "image").to_numpy()
    x = acts[image]
    recon = sae.decode(result.codes[torch.tensor(image)]).detach().numpy()
    want = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert mp[TINY_SETTINGS.sae.k] == pytest.approx(want, rel=1e-3)
    assert (np.diff(mp.to_numpy()) <= 1e-6).all()  # MP residual never grows

    summary = json.loads((tiny_cache / "stats" / "summary.json").read_text())
    atoms = pd.read_parquet(tiny_cache / "stats" / "atoms.parquet")
    assert summary["mp"]["dead_fraction"] == pytest.approx(atoms.dead.mean())
    split = summary["mp"]["atoms"]
    assert sum(split.values()) == len(atoms)


def test_rerun_does_nothing(tiny_cache, tiny_cache_root, tiny_model, caplog):
    before = (tiny_cache / "manifest.json").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in tiny_cache.rglob("*") if p.is_file()}
    with caplog.at_level("INFO", logger="backend.build"):
        again = build_cache(
            model=tiny_model,
            settings=TINY_SETTINGS,
            cache_root=tiny_cache_root,
            limit=TINY_IMAGES,
        )
    assert again == tiny_cache
    assert (tiny_cache / "manifest.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert "nothing to do" in caplog.text


def _copy(folder: Path, root: Path) -> Path:
    target = root / folder.name
    shutil.copytree(folder, target)
    return target


def test_damaged_file_is_detected_and_redone(tiny_cache, tmp_path, tiny_model):
    copy = _copy(tiny_cache, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    path = copy / "codes" / "mp_coefficients.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # same size, one flipped bit in the last value
    path.write_bytes(bytes(data))
    with pytest.raises(cache.DamagedCacheError, match="mp_coefficients"):
        cache.open_cache(copy)

    build_cache(
        model=tiny_model, settings=TINY_SETTINGS, cache_root=tmp_path, limit=TINY_IMAGES
    )
    redone = json.loads((copy / "manifest.json").read_text())
    for stage in ("activations", "train_mp", "train_topk"):
        assert redone["stages"][stage] == manifest["stages"][stage]
    assert redone["checksums"] == manifest["checksums"]
    cache.open_cache(copy)


def test_killed_build_resumes_to_the_same_result(tiny_cache, tmp_path, tiny_model):
    """SIGKILL after two activation chunks, rerun, compare every file's checksum."""
    script = (
        "from tests.conftest import TINY_IMAGES, TINY_SETTINGS\n"
        "from backend.build import build_cache\n"
        f"build_cache(model={tiny_model!r}, settings=TINY_SETTINGS, "
        f"cache_root={str(tmp_path)!r}, limit=TINY_IMAGES)\n"
    )
    args = [sys.executable, "-c", script]
    env = {**os.environ, "ATLAS_KILL_AFTER_CHUNKS": "2"}
    killed = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name == tiny_cache.name
    chunks = sorted((folder / "activations" / "chunks").glob("*.npy"))
    assert [c.name for c in chunks] == ["00000.npy", "00001.npy"]
    assert not json.loads((folder / "manifest.json").read_text())["stages"]

    build_cache(
        model=tiny_model, settings=TINY_SETTINGS, cache_root=tmp_path, limit=TINY_IMAGES
    )
    resumed = cache.open_cache(folder)["checksums"]
    original = cache.open_cache(tiny_cache)["checksums"]
    # The training logs hold wall-clock seconds; everything else is bit-equal.
    logs = [rel for rel in original if rel.endswith("_metrics.csv")]
    assert {r: resumed[r] for r in resumed if r not in logs} == {
        r: original[r] for r in original if r not in logs
    }
    for rel in logs:
        pd.testing.assert_frame_equal(
            pd.read_csv(folder / rel).drop(columns="seconds"),
            pd.read_csv(tiny_cache / rel).drop(columns="seconds"),
        )
    assert not (folder / "activations" / "chunks").exists()


def test_pick_captions_keeps_first_and_last():
    from backend.activations import pick_captions

    captions = ["name", "name, group", "a drawing of group: name", "rich name"]
    assert pick_captions(captions, 2) == ["name", "rich name"]
    assert pick_captions(captions, None) == captions
    assert pick_captions(captions[:1], 2) == ["name"]
    assert pick_captions(captions, 3) == [captions[0], captions[2], captions[3]]


def test_build_with_a_given_sae(tiny_cache, tmp_path, tiny_model):
    """``--sae PATH`` uses those weights as they are and trains only the TopK."""
    folder = build_cache(
        model=tiny_model,
        settings=TINY_SETTINGS,
        cache_root=tmp_path,
        limit=TINY_IMAGES,
        sae_path=tiny_cache / "sae" / "mp",
    )
    assert folder.name != tiny_cache.name  # the SAE's checksums are in the key
    manifest = cache.open_cache(folder)
    assert manifest["stages"]["train_mp"]["loaded_from"].endswith("sae/mp")
    for rel in ("sae/mp/weights.safetensors", "codes/mp_atoms.npy"):
        assert (folder / rel).read_bytes() == (tiny_cache / rel).read_bytes()


def test_key_does_not_depend_on_where_the_weights_lie():
    from backend.build import _location_free
    from backend.cache import cache_key

    def inputs(path, fingerprint="abc"):
        card = {"name": "mini", "details": {"weights": path, "layers": 4}}
        return {"model": {"spec": "mini", "fingerprint": fingerprint, "card": card}}

    here, there = inputs("/a/weights.safetensors"), inputs("/b/weights.safetensors")
    assert cache_key(_location_free(here)) == cache_key(_location_free(there))
    other = inputs("/a/weights.safetensors", fingerprint="def")
    assert cache_key(_location_free(here)) != cache_key(_location_free(other))
    assert here["model"]["card"]["details"]["weights"] == "/a/weights.safetensors"


def test_key_holds_the_source_of_the_modules_that_compute_the_cache(
    tiny_cache, tmp_path
):
    import backend
    from backend.build import CODE_MODULES, code_digest

    manifest = cache.open_cache(tiny_cache)
    assert manifest["inputs"]["code"] == code_digest()
    for name in CODE_MODULES:
        shutil.copy(Path(backend.__file__).with_name(f"{name}.py"), tmp_path)
    assert code_digest(tmp_path) == code_digest()
    with open(tmp_path / "stats.py", "a") as handle:
        handle.write("\n# changed\n")
    assert code_digest(tmp_path) != code_digest()


def test_manifest_records_the_build_line_of_its_inputs(tiny_cache, tiny_cache_root):
    from backend.build import build_command

    assert build_command() == "python -m backend build"
    recorded = cache.read_manifest(tiny_cache)["build_command"]
    assert recorded.startswith("python -m backend build ")
    assert f"--limit {TINY_IMAGES}" in recorded
    assert "--atoms 64 --k 8 --steps 60" in recorded
    assert f"--cache-root {Path(tiny_cache_root).resolve()}" in recorded
