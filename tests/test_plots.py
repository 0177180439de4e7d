"""Figure helpers: atlas colouring by label, the trace curves' FVU axis."""

from __future__ import annotations

import numpy as np
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


def test_trace_fvu_axis_has_clean_ticks_from_zero():
    steps = np.arange(0, 9)
    curve = pd.DataFrame(
        {
            "step": steps,
            "residual norm": np.linspace(1.3, 0.2, 9),
            "cumulative FVU": np.linspace(1.37, 0.01, 9),
        }
    )
    fig = plots.trace_curves({"MP": curve}, "t")
    axis = fig.layout.yaxis2
    assert list(axis.tickvals) == [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert axis.range[0] == 0 and axis.range[1] >= 1.37
    assert list(axis.ticktext)[:3] == ["0", "0.25", "0.5"]
