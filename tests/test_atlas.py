"""Atlas colouring by label: groups by first word, "other" in grey."""

from __future__ import annotations

import pandas as pd

from dashboard import plots


def test_label_groups_merge_word_labels_on_their_first_word():
    labels = pd.Series(
        ["stars", "stars, shapes, pt", "cat, gatto", "cat", "lamp", "", "People & Body"]
    )
    groups = plots.atlas_groups(labels, n=2)
    assert groups.tolist() == [
        "stars",
        "stars",
        "cat",
        "cat",
        "other",
        "other",
        "other",
    ]


def test_label_colouring_puts_other_last_in_grey():
    spec = plots.atlas_spec("label", ("stars", "cat", plots.ATLAS_OTHER))
    scale = spec["encoding"]["color"]["scale"]
    assert scale["domain"] == ["stars", "cat", "other"]
    assert scale["range"][-1] == "#d9d9d9"
    assert len(set(scale["range"])) == 3
