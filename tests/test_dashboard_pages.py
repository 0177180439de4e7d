"""AppTest drives every dashboard page against the tiny real fixture cache.

Each test runs the real router (``streamlit_app.py``), switches to a page,
works its widgets and checks what the page shows against the cache files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "streamlit_app.py")
TIMEOUT = 120


@pytest.fixture
def cache_env(tiny_cache, monkeypatch):
    """Point the dashboard at the fixture cache's root; return the cache folder."""
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(Path(tiny_cache).parent))
    return Path(tiny_cache)


def open_page(page: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(query)
    at.run()
    if page:
        at.switch_page(f"dashboard/pages/{page}.py")
        at.run()
    return at


def assert_clean(at: AppTest) -> None:
    """No exception element and no error message on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def texts(at: AppTest) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption]
    parts += [e.value for e in at.header] + [e.value for e in at.title]
    return "\n".join(str(p) for p in parts)


def link_labels(at: AppTest) -> list[str]:
    return [link.proto.label for link in at.get("page_link")]


# ---------------------------------------------------------------- no cache


def test_missing_cache_shows_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(tmp_path / "empty"))
    for page in (None, "atoms", "crossmodal", "traces", "atlas"):
        at = open_page(page)
        assert not at.exception
        assert "No built cache" in at.warning[0].value
        assert "python -m backend build" in at.code[0].value


def test_incompatible_cache_says_how_to_rebuild(cache_env, tmp_path, monkeypatch):
    copy = tmp_path / "root" / cache_env.name
    shutil.copytree(cache_env, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(tmp_path / "root"))
    at = open_page()
    assert not at.exception
    assert "schema version 999" in at.error[0].value
    assert "python -m backend build" in at.code[0].value


def test_damaged_cache_is_reported_in_the_page(cache_env, tmp_path, monkeypatch):
    from backend.cache import read_manifest, rebuild_command

    copy = tmp_path / "root" / cache_env.name
    shutil.copytree(cache_env, copy)
    target = copy / "stats/atoms.parquet"
    target.write_bytes(b"garbage" + target.read_bytes()[7:])
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(tmp_path / "root"))
    for page in (None, "atoms", "atlas"):
        at = open_page(page)
        assert not at.exception
        assert "stats/atoms.parquet" in at.error[0].value
        assert at.code[0].value == rebuild_command(read_manifest(copy))


def test_sidebar_switches_between_caches(cache_env, tmp_path, monkeypatch):
    root = tmp_path / "root"
    for name in ("aaaa", "bbbb"):
        shutil.copytree(cache_env, root / name)
    monkeypatch.setenv("ATLAS_CACHE_ROOT", str(root))
    at = open_page()
    picker = at.sidebar.selectbox(key="cache_picker")
    assert sorted(picker.options[i].split(" · ")[0] for i in range(2)) == [
        "aaaa",
        "bbbb",
    ]
    other = next(k for k in ("aaaa", "bbbb") if k != picker.value)
    picker.set_value(other).run()
    assert_clean(at)
    assert f"Cache `{other}`" in texts(at)


# ---------------------------------------------------------------- overview


def test_overview_shows_settings_curves_and_hierarchy(cache_env):
    at = open_page()
    assert_clean(at)
    assert at.title[0].value == "Overview"
    assert at.sidebar.selectbox[0].value == cache_env.name
    fvu = pd.read_parquet(cache_env / "stats/fvu_by_k.parquet")
    fvu = fvu[fvu["modality"].isin(["image", "text"])]
    top = fvu[fvu["k"] == fvu["k"].max()]
    shown = {m.label: m.value for m in at.metric}
    for row in top.itertuples():
        label = next(
            lbl
            for lbl in shown
            if row.modality in lbl
            and ("TopK" in lbl) == (row.sae == "topk")
            and "FVU" in lbl
        )
        assert shown[label] == f"{row.fvu:.3f}"
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    assert shown["dead atoms"] == f"{int(atoms['dead'].sum()):,}"
    assert len(at.get("plotly_chart")) >= 4


def test_overview_pair_cosines_are_real_atom_cosines(cache_env):
    from dashboard import analysis, loaders

    ref = loaders.list_caches(cache_env.parent)[0]
    samples = analysis.pair_cosines(ref, n_pairs=500)
    assert set(samples) == {"consecutive picks", "random pairs"}
    for values in samples.values():
        assert values.size > 0
        assert np.all(np.abs(values) <= 1 + 1e-5)


def test_overview_charts_read_clearly_and_stages_keep_pipeline_order(cache_env):
    from backend.build import STAGES

    at = open_page()
    assert_clean(at)
    manifest = json.loads((cache_env / "manifest.json").read_text())
    stages = at.dataframe[1].value["stage"].tolist()
    assert stages == [s for s in STAGES if s in manifest["stages"]]
    assert stages != sorted(stages)
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    fvu = next(s for s in specs if "FVU" in s["layout"]["title"]["text"])
    y = fvu["layout"]["yaxis"]
    assert y["type"] == "log"
    assert len(y["tickvals"]) >= 2
    for value, text in zip(y["tickvals"], y["ticktext"], strict=True):
        assert float(text) == pytest.approx(value)
        mantissa = value / 10 ** np.floor(np.log10(value))
        assert round(mantissa, 6) in (1, 2, 3, 4, 5, 6, 7, 8, 9)
    styles = {}
    for trace in fvu["data"]:
        sae = "TopK" if "TopK" in trace["name"] else "MP"
        assert sae in trace["name"]
        style = (trace["line"]["color"], trace["line"]["dash"])
        styles.setdefault(sae, set()).add(style + (trace["marker"]["symbol"],))
    assert set(styles) == {"MP", "TopK"}
    mp_look = {(d, s.split("-")[0]) for _, d, s in styles["MP"]}
    topk_look = {(d, s.split("-")[0]) for _, d, s in styles["TopK"]}
    assert not mp_look & topk_look
    assert not {c for c, _, _ in styles["MP"]} & {c for c, _, _ in styles["TopK"]}
    l0 = next(s for s in specs if "L0" in s["layout"]["title"]["text"])
    x_titles = [
        v["title"]["text"] for k, v in l0["layout"].items() if k.startswith("xaxis")
    ]
    assert len(x_titles) == 2 and all(len(t) <= 12 for t in x_titles)
    assert all("=" not in a["text"] for a in l0["layout"].get("annotations", []))


def test_overview_dead_atom_share_is_text_not_a_delta(cache_env):
    at = open_page()
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    dead = next(m for m in at.metric if m.label == "dead atoms")
    assert dead.proto.delta == ""
    share = f"{atoms['dead'].mean():.1%} of the {len(atoms):,} atoms"
    assert share in texts(at)


# ---------------------------------------------------------------- atoms


def test_atom_url_parameter_opens_that_atom(cache_env):
    at = open_page("atoms", atom="3")
    assert_clean(at)
    assert at.header[0].value.startswith("Atom #3")
    assert at.number_input[0].value == 3


def test_atom_id_input_updates_the_url(cache_env):
    at = open_page("atoms", atom="1")
    at.number_input[0].set_value(2).run()
    assert_clean(at)
    assert at.query_params["atom"] == "2"
    assert at.header[0].value.startswith("Atom #2")


def test_atom_page_lists_top_items_and_related_atoms(cache_env):
    tops = pd.read_parquet(cache_env / "stats/top_items.parquet")
    items = pd.read_parquet(cache_env / "activations/items.parquet")
    atom = int(tops[tops["modality"] == "text"]["atom"].iloc[0])
    at = open_page("atoms", atom=str(atom))
    assert_clean(at)
    expected = tops[(tops["atom"] == atom) & (tops["modality"] == "text")]
    shown = at.dataframe[0].value
    want = items.set_index("row").loc[expected.sort_values("rank")["row"], "text"]
    assert shown["text"].tolist() == want.tolist()[: len(shown)]
    neighbors = pd.read_parquet(cache_env / "stats/neighbors.parquet")
    nearest = neighbors[neighbors["atom"] == atom].sort_values("rank")
    labels = link_labels(at)
    assert any(lbl.startswith(f"#{nearest['neighbor'].iloc[0]} ") for lbl in labels)
    assert len(at.get("plotly_chart")) == 3


def test_atom_picture_on_request(cache_env):
    at = open_page("atoms", atom="1")
    before = len(at.get("image"))
    at.toggle(key="atom_picture").set_value(True).run()
    assert_clean(at)
    # A picture when a generator for this model is shipped, else why not.
    notes = [i.value for i in at.info if i.value.startswith("No picture")]
    assert len(at.get("image")) == before + 1 or notes


def test_unknown_atom_and_bad_parameter_are_explained(cache_env):
    at = open_page("atoms", atom="99999999")
    assert not at.exception
    assert "There is no atom 99999999" in at.error[0].value
    at = open_page("atoms", atom="abc")
    assert not at.exception
    assert "not a number" in at.warning[0].value


def test_label_search_links_matching_atoms(cache_env):
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    live = atoms[~atoms["dead"] & (atoms["label"].str.len() > 2)]
    label = str(live.sort_values("frequency").iloc[-1]["label"])
    at = open_page("atoms")
    at.text_input(key="label_query").set_value(label).run()
    assert_clean(at)
    matching = atoms[
        atoms["label"].str.lower().str.contains(label.lower(), regex=False)
    ]
    labels = link_labels(at)
    assert any(lbl.startswith(f"#{matching['atom'].iloc[0]} ") for lbl in labels)


def test_free_text_search_lists_the_atoms_the_pursuit_picks(cache_env):
    at = open_page("atoms")
    at.text_input(key="text_query").set_value("a red heart").run()
    assert_clean(at)
    picked = [lbl for lbl in link_labels(at) if "step 1," in lbl]
    assert len(picked) == 1
    assert "The MP-SAE picks" in texts(at)


def _label_words(label: str) -> set[str]:
    import re

    return set(re.findall(r"[0-9a-z]+", str(label).lower()))


def _search_hits(at: AppTest) -> list[int]:
    """Atom ids the label search lists, in order (its links note a frequency)."""
    return [
        int(lbl[1:].split(" ", 1)[0])
        for lbl in link_labels(at)
        if "· frequency " in lbl
    ]


def test_atoms_label_search_matches_whole_words_only(cache_env):
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet").set_index("atom")
    words = atoms["label"].map(_label_words)
    every = sorted({w for ws in words for w in ws if len(w) >= 3})
    cases = []
    for query in every:
        whole = words[words.map(lambda ws, q=query: q in ws)].index
        inside = words[
            words.map(lambda ws, q=query: q not in ws and any(q in w for w in ws))
        ].index
        if len(inside):
            cases.append((len(whole) == 0, query, set(whole), set(inside)))
    # A query that is a whole word of some labels and only part of a longer
    # word ("car" in "cards") of others; the substring rule listed both.
    _, query, whole, inside = min(cases)
    assert whole, "the tiny cache should have a word inside a longer word"
    at = open_page("atoms")
    at.text_input(key="label_query").set_value(query).run()
    assert_clean(at)
    hits = _search_hits(at)
    assert set(hits) == whole
    assert not set(hits) & inside
    assert f"{len(whole)} atom" in texts(at)


def test_atoms_label_search_ranks_exact_labels_first(cache_env):
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet").set_index("atom")
    words = atoms["label"].map(_label_words)

    # A label also found, as words, inside a longer label if there is one.
    def inside_longer(ws):
        return any(ws < other for other in words)

    pick = words[words.map(inside_longer)]
    query = str(atoms.loc[(pick if len(pick) else words).index[0], "label"])
    at = open_page("atoms")
    at.text_input(key="label_query").set_value(query).run()
    assert_clean(at)
    hits = _search_hits(at)
    exact = set(words[words == _label_words(query)].index)
    assert set(hits[: len(exact)]) == exact
    matching = set(words[words.map(lambda ws: _label_words(query) <= ws)].index)
    assert set(hits) == matching if len(matching) <= 20 else set(hits) < matching
    freq = atoms.loc[hits[: len(exact)], "frequency"].tolist()
    assert freq == sorted(freq, reverse=True)


def test_atoms_label_search_without_match_says_so_and_shows_no_atom(cache_env):
    at = open_page("atoms", atom="2")
    at.text_input(key="label_query").set_value("zzzqqq").run()
    assert_clean(at)
    assert "No atom label matches 'zzzqqq'." in [i.value for i in at.info]
    assert not _search_hits(at)
    # Another tab open: its atom is still shown.
    assert at.header[0].value.startswith("Atom #2")
    at.session_state["atom_tab"] = "By label"
    at.run()
    assert_clean(at)
    assert "No atom label matches 'zzzqqq'." in [i.value for i in at.info]
    assert not [h.value for h in at.header if h.value.startswith("Atom #")]
    at.text_input(key="label_query").set_value("").run()
    assert at.header[0].value.startswith("Atom #2")


def test_atom_page_explains_coefficients_and_one_modality_atoms(cache_env):
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    middle = atoms[atoms["modality_score"].between(0.2, 0.8)]["atom"].iloc[0]
    at = open_page("atoms", atom=str(middle))
    assert_clean(at)
    assert "coefficient on that image" in texts(at)
    assert not [i for i in at.info if "-only atom" in i.value]
    text_only = atoms[atoms["modality_score"] <= 0.05]["atom"]
    image_only = atoms[atoms["modality_score"] >= 0.95]["atom"]
    assert len(text_only) + len(image_only) > 0
    for ids, note in ((text_only, "Text-only atom"), (image_only, "Image-only atom")):
        if len(ids):
            at = open_page("atoms", atom=str(ids.iloc[0]))
            assert_clean(at)
            assert [i for i in at.info if i.value.startswith(note)]


# ---------------------------------------------------------------- cross-modal


def test_crossmodal_page_and_its_widgets(cache_env):
    at = open_page("crossmodal")
    assert_clean(at)
    at.slider(key="band").set_value((0.0, 1.0)).run()
    at.slider(key="min_bridge").set_value(0.0).run()
    assert_clean(at)
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    live = atoms[~atoms["dead"] & atoms["modality_score"].between(0, 1)]
    assert f"{len(live):,} atoms with a modality score 0.00-1.00" in texts(at)
    assert any("cosine" in m for m in texts(at).splitlines())
    # The stat card names its own definition of shared.
    summary = json.loads((cache_env / "stats/summary.json").read_text())
    card = next(m for m in at.metric if m.label.startswith("shared atoms"))
    assert card.label == "shared atoms (score 0.05-0.95)"
    assert card.value == f"{summary['mp']['atoms']['shared']:,}"
    # The stored gap is rounded.
    assert f"(summary.json): {summary['modality_gap']:.3f}" in texts(at)
    assert str(summary["modality_gap"]) not in texts(at)


def _bridge_links(at: AppTest) -> list[str]:
    return [label for label in link_labels(at) if ", bridge " in label]


def test_crossmodal_bridge_slider_ends_where_atoms_remain(cache_env):
    at = open_page("crossmodal")
    band = at.slider(key="band").value
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    in_band = atoms[~atoms["dead"] & atoms["modality_score"].between(*band)]
    slider = at.slider(key="min_bridge")
    assert slider.max == pytest.approx(in_band["bridge_score"].max(), abs=1e-3)
    top = slider.max
    slider.set_value(top).run()
    assert_clean(at)
    best = in_band[in_band["bridge_score"] >= top - 1e-9]
    links = _bridge_links(at)
    assert len(links) == min(len(best), 6) >= 1
    n = len(best)
    assert f"{n} atom{'' if n == 1 else 's'} with a modality score" in texts(at)


def test_crossmodal_empty_modality_range_says_so(cache_env):
    atoms = pd.read_parquet(cache_env / "stats/atoms.parquet")
    live = atoms.loc[~atoms["dead"], "modality_score"].to_numpy()
    edges = np.round(np.arange(0.0, 0.96, 0.05), 2)
    bands = [(float(a), round(float(a) + 0.05, 2)) for a in edges]
    empty = [(a, b) for a, b in bands if not ((live >= a) & (live <= b)).any()]
    assert empty, "the fixture cache has atoms in every modality band"
    at = open_page("crossmodal")
    at.slider(key="band").set_value(empty[0]).run()
    assert_clean(at)
    assert any("No live atom has a modality score" in i.value for i in at.info)
    assert not _bridge_links(at)
    assert "highest bridge score" not in texts(at)


def _shared_count(cache: Path, image_row: int, text_row: int) -> int:
    atoms_nk = np.load(cache / "codes/mp_atoms.npy")
    image, text = atoms_nk[image_row], atoms_nk[text_row]
    return len(set(image[image >= 0]) & set(text[text >= 0]))


def _attribution_table(at: AppTest) -> pd.DataFrame | None:
    tables = [df.value for df in at.dataframe if "adds to cosine" in df.value]
    return tables[0] if tables else None


def test_crossmodal_starts_on_a_pair_that_shares_atoms(cache_env):
    items = pd.read_parquet(cache_env / "activations/items.parquet")
    images = items[(items["modality"] == "image") & (items["pair_row"] >= 0)]
    pairs = zip(images["row"], images["pair_row"], strict=True)
    sharing = images[[_shared_count(cache_env, r, p) > 0 for r, p in pairs]]
    test = sharing[sharing["split"] == "test"]
    expected = int((test if not test.empty else sharing)["row"].iloc[0])
    at = open_page("crossmodal")
    assert_clean(at)
    assert at.selectbox(key="pair_image_row").value == expected
    caption = at.selectbox(key="pair_caption").value
    assert caption == int(items.set_index("row").loc[expected, "pair_row"])
    n = _shared_count(cache_env, expected, caption)
    table = _attribution_table(at)
    assert len(table) == n
    assert (table["atom"] >= 0).all()
    assert not table.isna().any().any()
    word = "atom adds" if n == 1 else "atoms add"
    assert f"the {n} shared {word} " in texts(at)


def test_crossmodal_pair_without_shared_atoms_says_so(cache_env):
    items = pd.read_parquet(cache_env / "activations/items.parquet")
    texts_ = items[items["modality"] == "text"]
    image_row = {int(r) for r in items.loc[items["modality"] == "image", "row"]}
    pair = next(
        (int(t["pair_row"]), int(t["row"]))
        for _, t in texts_.iterrows()
        if int(t["pair_row"]) in image_row
        and _shared_count(cache_env, int(t["pair_row"]), int(t["row"])) == 0
    )
    at = open_page("crossmodal")
    at.selectbox(key="pair_image_row").set_value(pair[0]).run()
    at.selectbox(key="pair_caption").set_value(pair[1]).run()
    assert_clean(at)
    assert "share no atom" in texts(at)
    assert _attribution_table(at) is None
    assert "shared atoms add" not in texts(at)


def test_cosine_attribution_sums_to_the_cosine(cache_env):
    from dashboard import analysis, loaders

    ref = loaders.list_caches(cache_env.parent)[0]
    items = pd.read_parquet(cache_env / "activations/items.parquet")
    text = items[items["modality"] == "text"].iloc[0]
    table = analysis.cosine_attribution(ref, int(text["pair_row"]), int(text["row"]))
    acts = np.load(cache_env / "activations/acts.npy")
    cosine = float(acts[int(text["pair_row"])] @ acts[int(text["row"])])
    assert table["adds to cosine"].sum() == pytest.approx(cosine, abs=1e-5)
    shared = table[table["atom"] >= 0]
    assert np.allclose(
        shared["adds to cosine"],
        shared["image coefficient"] * shared["text coefficient"],
    )


# ---------------------------------------------------------------- traces


def _trace_table(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if "residual norm" in df.value)


def test_trace_of_a_corpus_item_matches_the_stored_code(cache_env):
    at = open_page("traces")
    assert_clean(at)
    row = at.selectbox(key="trace_item_row").value
    steps = _trace_table(at)
    stored_atoms = np.load(cache_env / "codes/mp_atoms.npy")[row]
    stored_fvu = float(np.load(cache_env / "codes/mp_fvu.npy")[row])
    n = int((stored_atoms >= 0).sum())
    assert steps["atom"].tolist() == stored_atoms[:n].tolist()
    assert np.all(np.diff(steps["residual norm"]) <= 1e-5)
    assert steps["cumulative FVU"].iloc[-1] == pytest.approx(stored_fvu, abs=1e-3)
    assert {"nearest to reconstruction", "nearest to residual"} <= set(steps)


def _start_norm(cache: Path, row: int) -> float:
    """|x - b| for an activation row: where the threshold is measured from."""
    from backend.sae import load_sae

    bias_d = load_sae(cache / "sae/mp").bias_d.detach().numpy()
    return float(np.linalg.norm(np.load(cache / "activations/acts.npy")[row] - bias_d))


def test_trace_sliders_re_encode_live(cache_env):
    at = open_page("traces")
    at.slider(key="trace_k").set_value(3).run()
    assert_clean(at)
    assert len(_trace_table(at)) <= 3
    topk = next(df.value for df in at.dataframe if "residual norm" not in df.value)
    assert len(topk) == 3
    at.slider(key="trace_k").set_value(16)
    at.slider(key="trace_threshold").set_value(0.8)
    at.run()
    assert_clean(at)
    steps = _trace_table(at)
    start = _start_norm(cache_env, at.selectbox(key="trace_item_row").value)
    # Stops at the first step whose residual is below the threshold.
    assert steps["residual norm"].iloc[-1] <= 0.8 * start + 1e-5
    if len(steps) > 1:
        assert steps["residual norm"].iloc[-2] > 0.8 * start - 1e-5


def test_trace_step_slider_shows_nearest_items(cache_env):
    at = open_page("traces")
    at.slider(key="trace_step").set_value(2).run()
    assert_clean(at)
    titles = [m.value for m in at.markdown]
    assert any("Reconstruction after step 2" in t for t in titles)
    assert any("Residual after step 2" in t for t in titles)
    at.slider(key="trace_k").set_value(1).run()  # the step slider must follow k
    assert_clean(at)
    assert any("Reconstruction after step 1" in m.value for m in at.markdown)


def test_nearest_along_trace_matches_brute_force(cache_env):
    from dashboard import live, loaders

    ref = loaders.list_caches(cache_env.parent)[0]
    acts = loaders.acts(ref)
    for row in (0, len(acts) - 1):
        modality = loaders.items(ref).loc[row, "modality"]
        code = live.code_of(ref, acts[row], modality, "mp", 12)
        near = live.nearest_along_trace(ref, code, exclude=row)
        n = code.n_steps
        for queries_kd, found in (
            (code.recon_kd[:n], near.reconstruction_k),
            (code.x_d - code.recon_kd[:n], near.residual_k),
        ):
            cosines = (acts @ queries_kd.T) / np.linalg.norm(queries_kd, axis=1)
            cosines[row] = -np.inf
            best = cosines.max(axis=0)
            assert np.allclose(cosines[found, np.arange(n)], best, atol=1e-5)
        # A shorter pursuit reads its answer off the longest one's prefix.
        short = live.code_of(ref, acts[row], modality, "mp", 3)
        cached = live.nearest_for(ref, short, exclude=row)
        direct = live.nearest_along_trace(ref, short, exclude=row)
        assert np.array_equal(cached.reconstruction_k, direct.reconstruction_k)
        assert np.array_equal(cached.residual_k, direct.residual_k)


def test_trace_of_a_typed_text(cache_env):
    at = open_page("traces")
    at.radio(key="trace_source").set_value("Type a text").run()
    at.text_input(key="trace_text").set_value("a yellow star").run()
    assert_clean(at)
    assert len(_trace_table(at)) >= 1


def test_upload_check_rejects_what_is_not_an_image():
    from backend.images import ImageSkipped
    from dashboard.widgets import decode_image

    with pytest.raises(ImageSkipped) as error:
        decode_image(b"certainly not a picture", ".png")
    assert error.value.reason == "not an image"


# ---------------------------------------------------------------- atlas


def test_atlas_renders_in_every_colouring(cache_env):
    at = open_page("atlas")
    assert_clean(at)
    from dashboard.plots import ATLAS_COLOR_TITLES

    for color in ATLAS_COLOR_TITLES:
        at.selectbox(key="atlas_color").set_value(color).run()
        assert_clean(at)
        assert at.get("vega_lite_chart")
    at.toggle(key="atlas_thumbnails").set_value(False).run()
    assert_clean(at)


def test_atlas_click_selection_names_the_atom():
    from dashboard.widgets import selected_atom

    assert selected_atom({"selection": {"atom": [{"atom": 17}]}}) == 17
    assert selected_atom({"selection": {"atom": []}}) is None
    assert selected_atom(None) is None
