"""Shareable views: the Traces page reads and writes its URL parameters."""

from __future__ import annotations

from tests.test_dashboard_pages import assert_clean, cache_env, open_page  # noqa: F401


def test_traces_link_opens_the_named_item_and_k(cache_env):  # noqa: F811
    at = open_page("traces", item="7", k="3")
    assert_clean(at)
    assert at.selectbox(key="trace_item_row").value == 7
    assert at.slider(key="trace_k").value == 3
    assert at.query_params["item"] == "7"
    assert at.query_params["k"] == "3"


def test_traces_url_follows_the_chosen_item_and_typed_text(cache_env):  # noqa: F811
    at = open_page("traces")
    first = at.selectbox(key="trace_item_row").value
    assert at.query_params["item"] == str(first)
    other = 2 if first != 2 else 3
    at.selectbox(key="trace_item_row").set_value(other).run()
    assert_clean(at)
    assert at.selectbox(key="trace_item_row").value == other
    assert at.query_params["item"] == str(other)
    at.radio(key="trace_source").set_value("Type a text").run()
    at.text_input(key="trace_text").input("a red apple").run()
    assert_clean(at)
    assert at.query_params["text"] == "a red apple"
    assert "item" not in at.query_params


def test_traces_link_to_a_missing_item_warns(cache_env):  # noqa: F811
    at = open_page("traces", item="999999")
    assert not at.exception
    assert any("no corpus item 999999" in w.value for w in at.warning)
