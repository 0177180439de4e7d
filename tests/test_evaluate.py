"""Evaluation metrics on hand-built cases, and the command on the shipped model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from backend import evaluate
from backend.cli import main


def test_plain_and_balanced_accuracy():
    scores = evaluate.score_predictions(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert scores.accuracy == pytest.approx(0.75)
    assert scores.balanced == pytest.approx((2 / 3 + 1) / 2)
    assert scores.recall == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert (scores.n_images, scores.n_classes) == (4, 2)


def test_recall_at_k_on_a_known_layout():
    eye = torch.eye(4)
    image_nd = eye[:3]
    # Captions: two of image 0 (one leaning towards image 1), one of image 1
    # that points at image 2 and away from image 1, one of image 2 between
    # image 2 and image 0.
    text_td = torch.nn.functional.normalize(
        torch.stack(
            [
                eye[0],
                eye[0] + 0.1 * eye[1],
                eye[2] - 0.2 * eye[1],
                eye[2] + 0.5 * eye[0],
            ]
        ),
        dim=-1,
    )
    owner = [0, 0, 1, 2]
    scores = evaluate.recall_at_k(image_nd, text_td, owner, ks=(1, 2))

    # image 0: nearest caption is its own; image 1: nearest is caption 1 (image
    # 0's) and its own caption 2 comes last; image 2: nearest is caption 2
    # (image 1's), then its own caption 3.
    assert scores.image_to_text == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    # caption 0 -> image 0 (hit); caption 1 -> image 0 (hit); caption 2 ->
    # image 2, then image 0 (miss at 2); caption 3 -> image 2 (hit).
    assert scores.text_to_image == {1: pytest.approx(3 / 4), 2: pytest.approx(3 / 4)}


def test_readable_category_names():
    assert evaluate.readable("Food & Drink") == "food and drink"
    assert evaluate.readable("signs_and_symbols") == "signs and symbols"


def test_subcategory_prompts_come_from_the_train_label_tree():
    table = pd.DataFrame(
        {
            "source": ["clip"] * 6 + ["emoji"],
            "split": ["train", "train", "train", "test", "train", "train", "train"],
            "level0": [
                "food",
                "food",
                "animals",
                "animals",
                "unsorted",
                "food",
                "food",
            ],
            "level1": ["fruit", "fruit", "birds", "fish", "misc", None, "drink"],
        }
    )
    texts, owners = evaluate.subcategory_prompts(table, "clip", ["animals", "food"])
    # One prompt per distinct pair; a subcategory seen only in the test split,
    # a category outside the label set, a missing level1 and another source's
    # pairs give none.
    assert texts == ["animals birds", "food fruit"]
    assert owners == ["animals", "food"]
    no_levels = table.drop(columns="level1")
    assert evaluate.subcategory_prompts(no_levels, "clip", ["food"]) == ([], [])


@pytest.fixture(scope="module")
def shipped_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = ["evaluate", "--model", "mini", "--limit", "160"]
    assert main([*args, "--out", str(out / "trained.json")]) == 0
    assert main([*args, "--untrained", "--out", str(out / "untrained.json")]) == 0
    return (
        json.loads((out / "trained.json").read_text()),
        json.loads((out / "untrained.json").read_text()),
    )


def test_evaluation_json_has_every_figure(shipped_results):
    trained, _ = shipped_results
    assert trained["split"] == "test"
    assert set(trained["category_by_source"]) == {"noto-emoji", "openclipart"}
    for key in ("accuracy", "balanced", "n_images", "recall"):
        assert key in trained["category"]
    assert set(trained["retrieval"]["image_to_text"]) == {"1", "5"}
    assert "unsorted" not in trained["category"]["recall"]
    via_sub = trained["category_hierarchical"]
    assert set(via_sub["recall"]) == set(trained["category"]["recall"])
    assert set(trained["category_hierarchical_by_source"]) == {
        "noto-emoji",
        "openclipart",
    }
    assert "Component" not in trained["category"]["recall"]


def test_trained_tower_beats_the_untrained_one(shipped_results):
    trained, untrained = shipped_results
    assert trained["category"]["accuracy"] >= 0.4
    assert trained["category"]["accuracy"] >= untrained["category"]["accuracy"] + 0.2
    assert trained["category"]["balanced"] >= untrained["category"]["balanced"] + 0.1
    via_sub = trained["category_hierarchical"]["accuracy"]
    assert via_sub >= untrained["category_hierarchical"]["accuracy"] + 0.2
    i2t, base = trained["retrieval"]["image_to_text"], untrained["retrieval"]
    assert i2t["5"] >= base["image_to_text"]["5"] + 0.1
