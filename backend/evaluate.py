"""Zero-shot category accuracy and image-text retrieval of an encoder.

Two measurements on one split of a corpus (the held-out ``test`` split by
default):

- **Category zero-shot.** Each image is classified by its top-level category
  (``level0``): the class whose prompt embedding (the mean of several prompt
  templates filled with the category's readable name, renormalised) has the
  highest cosine with the image embedding. Images are classified *per
  source*: an emoji against the emoji groups, a clip-art image against the
  clip-art top folders, because both label sets describe overlapping things
  ("Animals & Nature" and "animals") and the source of an image is known.
  Catch-all categories that ``meta["catch_all_level0"]`` lists (such as
  ``unsorted``) are neither labels nor evaluated images. Reported plainly
  (share of images right) and balanced (mean over categories of the recall
  within the category), pooled over sources and per source.
- **Category zero-shot through the subcategories.** The same classification
  with a richer text side: a category is also represented by one prompt per
  subcategory (``level1``) it holds in the train split's label tree (for
  example ``computer icons`` or ``people and body person role``), and an
  image goes to the category of its best-matching prompt, as in CHiLS
  ("CHiLS: Zero-Shot Image Classification with Hierarchical Label Sets").
  No image takes part in building the classifier, so it is still zero-shot;
  it uses the label tree, known in advance, where the flat variant uses the
  top-level names alone.
- **Retrieval** between the split's images and all their captions:
  image-to-text recall@k is the share of images with at least one of their
  own captions among the k captions nearest to them; text-to-image recall@k
  the share of captions whose image is among the k nearest images.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.atomic import write_json

log = logging.getLogger(__name__)

# Prompt templates per corpus source; other sources get the generic ones.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "noto-emoji": ("an emoji of {}", "a {} emoji", "{} emoji"),
    "openclipart": ("a clip art drawing of {}", "{} clip art", "a {} picture"),
}
GENERIC_TEMPLATES = ("a picture of {}", "a photo of {}", "{}")
RECALL_KS = (1, 5)


@dataclass
class CategoryScores:
    """Zero-shot category classification of one label set (or all pooled).

    ``accuracy`` is the share of images classified right; ``balanced`` the
    mean over categories of the per-category recall; ``recall`` that recall
    per category; ``n_images`` and ``n_classes`` what was scored.
    """

    accuracy: float
    balanced: float
    n_images: int
    n_classes: int
    recall: dict[str, float] = field(default_factory=dict)


@dataclass
class RetrievalScores:
    """Recall@k both ways; keys of the dicts are k."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    n_images: int
    n_texts: int


@dataclass
class Evaluation:
    """Everything ``python -m backend evaluate`` measures for one model."""

    model: str
    card: dict[str, Any]
    corpus: str
    split: str
    category: CategoryScores
    category_by_source: dict[str, CategoryScores]
    retrieval: RetrievalScores
    seconds: float
    category_hierarchical: CategoryScores | None = None
    category_hierarchical_by_source: dict[str, CategoryScores] = field(
        default_factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> dict[str, float]:
        """The figures of the summary table, as fractions."""
        row = {
            "category accuracy": self.category.accuracy,
            "category balanced": self.category.balanced,
        }
        if self.category_hierarchical is not None:
            row["category accuracy, via subcategories"] = (
                self.category_hierarchical.accuracy
            )
            row["category balanced, via subcategories"] = (
                self.category_hierarchical.balanced
            )
        for k, value in self.retrieval.image_to_text.items():
            row[f"image->text R@{k}"] = value
        for k, value in self.retrieval.text_to_image.items():
            row[f"text->image R@{k}"] = value
        return row


def readable(label: str) -> str:
    """A category label as plain words: ``Food & Drink`` -> ``food and drink``."""
    text = label.replace("&", " and ")
    return re.sub(r"[\s_\-/]+", " ", text).strip().lower()


def class_embeddings(encoder, names: Sequence[str], templates: Sequence[str]):
    """Prompt-ensemble embedding per class name: float32 ``(n_classes, d)``.

    Each name fills every template; the template embeddings are averaged and
    the mean is renormalised to unit length.
    """
    prompts = [t.format(readable(n)) for n in names for t in templates]
    prompt_pd = encoder.encode_texts(prompts)
    mean_cd = prompt_pd.reshape(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(mean_cd, dim=-1)


def category_scores(
    image_nd: torch.Tensor,
    labels: Sequence[str],
    class_names: Sequence[str],
    class_cd: torch.Tensor,
) -> CategoryScores:
    """Classify images by the nearest class embedding and score the result."""
    predicted = (image_nd @ class_cd.T).argmax(dim=1).numpy()
    predicted_names = np.asarray(class_names, dtype=object)[predicted]
    return score_predictions(list(labels), list(predicted_names))


def score_predictions(labels: Sequence[str], predicted: Sequence[str]):
    """Plain and balanced accuracy of predicted against true labels."""
    labels, predicted = np.asarray(labels, object), np.asarray(predicted, object)
    recall = {
        str(c): float((predicted[labels == c] == c).mean()) for c in sorted(set(labels))
    }
    return CategoryScores(
        accuracy=float((labels == predicted).mean()) if len(labels) else float("nan"),
        balanced=float(np.mean(list(recall.values()))) if recall else float("nan"),
        n_images=len(labels),
        n_classes=len(recall),
        recall=recall,
    )


def recall_at_k(
    image_nd: torch.Tensor,
    text_td: torch.Tensor,
    text_owner: Sequence[int],
    ks: Sequence[int] = RECALL_KS,
) -> RetrievalScores:
    """Recall@k of image->text and text->image retrieval by cosine.

    ``text_owner[t]`` is the row in ``image_nd`` of the image that text ``t``
    describes. Shapes: ``image_nd`` (n, d), ``text_td`` (t, d), both unit
    rows; results are fractions in [0, 1].
    """
    owner_t = torch.as_tensor(np.asarray(text_owner), dtype=torch.long)
    sim_nt = image_nd @ text_td.T
    kmax = max(ks)

    top_texts_nk = sim_nt.topk(min(kmax, sim_nt.shape[1]), dim=1).indices
    hit_owner_nk = owner_t[top_texts_nk] == torch.arange(len(image_nd))[:, None]
    top_images_tk = sim_nt.T.topk(min(kmax, sim_nt.shape[0]), dim=1).indices
    hit_image_tk = top_images_tk == owner_t[:, None]

    return RetrievalScores(
        image_to_text={k: _hit_rate(hit_owner_nk, k) for k in ks},
        text_to_image={k: _hit_rate(hit_image_tk, k) for k in ks},
        n_images=len(image_nd),
        n_texts=len(text_td),
    )


def _hit_rate(hits_qk: torch.Tensor, k: int) -> float:
    return float(hits_qk[:, :k].any(dim=1).float().mean())


def evaluate(
    encoder,
    corpus,
    split: str = "test",
    limit: int | None = None,
    progress: bool = True,
) -> Evaluation:
    """Measure category zero-shot and retrieval of ``encoder`` on a split.

    Parameters
    ----------
    encoder : backend.models.Encoder
    corpus : backend.corpus.Corpus
        Needs ``level0`` labels for the category part and captions for the
        retrieval part.
    split : str
        ``"test"`` (held out) or ``"train"``.
    limit : int, optional
        Evaluate on an evenly spread subset of this many images (for tests).
    """
    started = time.perf_counter()
    table = corpus.table[corpus.table["split"] == split].reset_index(drop=True)
    if limit:
        table = table.iloc[np.linspace(0, len(table) - 1, limit).astype(int)]
        table = table.drop_duplicates("id").reset_index(drop=True)
    if table.empty:
        raise ValueError(f"corpus {corpus.name} has no images in split {split!r}")

    images = [corpus.open_image(i) for i in table["id"]]
    image_nd = encoder.encode_images(images, progress=progress)
    by_source, pooled = _categories(encoder, corpus, table, image_nd)
    by_source_h, pooled_h = _categories(
        encoder, corpus, table, image_nd, hierarchical=True
    )
    retrieval = _retrieval(encoder, table, image_nd, progress)
    return Evaluation(
        model=encoder.card.name,
        card=encoder.card.to_dict(),
        corpus=str(corpus.name),
        split=split,
        category=pooled,
        category_by_source=by_source,
        retrieval=retrieval,
        seconds=round(time.perf_counter() - started, 1),
        category_hierarchical=pooled_h,
        category_hierarchical_by_source=by_source_h,
    )


def _categories(encoder, corpus, table, image_nd, hierarchical: bool = False):
    """Per-source zero-shot classification, and the scores pooled.

    With ``hierarchical``, each category's prompts are its own name plus one
    per subcategory (:func:`subcategory_prompts`); the best-matching prompt
    decides the category.
    """
    catch_all = set(corpus.meta.get("catch_all_level0", []))
    all_rows = corpus.table
    by_source: dict[str, CategoryScores] = {}
    labels, predicted = [], []
    for source in sorted(table["source"].dropna().unique()):
        names = sorted(
            set(all_rows.loc[all_rows["source"] == source, "level0"].dropna())
            - catch_all
        )
        rows = np.flatnonzero(
            (table["source"] == source).to_numpy()
            & table["level0"].isin(names).to_numpy()
        )
        if len(names) < 2 or len(rows) == 0:
            continue
        texts, owners = list(names), list(names)
        if hierarchical:
            sub_texts, sub_owners = subcategory_prompts(all_rows, source, names)
            texts, owners = texts + sub_texts, owners + sub_owners
        templates = TEMPLATES.get(source, GENERIC_TEMPLATES)
        class_cd = class_embeddings(encoder, texts, templates)
        guess = (image_nd[rows] @ class_cd.T).argmax(dim=1).numpy()
        truth = table["level0"].to_numpy()[rows]
        guessed = [owners[g] for g in guess]
        by_source[source] = score_predictions(truth, guessed)
        labels += list(truth)
        predicted += guessed
    if not labels:
        raise ValueError(
            f"corpus {corpus.name} has no level0 categories to classify; category "
            "zero-shot needs at least two non-catch-all level0 values per source"
        )
    return by_source, score_predictions(labels, predicted)


def subcategory_prompts(
    table, source: str, categories: Sequence[str]
) -> tuple[list[str], list[str]]:
    """One prompt text per (category, subcategory) of the train label tree.

    The pairs are the distinct ``(level0, level1)`` values of the ``train``
    rows of ``source`` whose ``level0`` is one of ``categories``; the text
    joins the readable names (``computer`` and ``icons``: ``computer
    icons``). Returns the texts and, for each, the category it stands for.
    A table without ``level1`` or ``split`` gives none.
    """
    if "level1" not in table or "split" not in table:
        return [], []
    rows = table[(table["source"] == source) & (table["split"] == "train")]
    rows = rows[rows["level0"].isin(list(categories)) & rows["level1"].notna()]
    pairs = sorted(set(zip(rows["level0"], rows["level1"], strict=True)))
    texts = [f"{readable(top)} {readable(sub)}" for top, sub in pairs]
    return texts, [top for top, _ in pairs]


def _retrieval(encoder, table, image_nd, progress) -> RetrievalScores:
    texts, owner = [], []
    for row, captions in enumerate(table["captions"]):
        texts += list(captions)
        owner += [row] * len(captions)
    if not texts:
        raise ValueError("the split has no captions; retrieval needs them")
    text_td = encoder.encode_texts(texts, progress=progress)
    return recall_at_k(image_nd, text_td, owner)


def format_table(results: Sequence[Evaluation]) -> str:
    """A plain-text table: one column per evaluated model, percentages."""
    rows = list(results[0].headline())
    names = [r.model for r in results]
    width = max(len(r) for r in rows) + 2
    colw = max(12, *(len(n) + 2 for n in names))
    lines = ["".ljust(width) + "".join(n.rjust(colw) for n in names)]
    for key in rows:
        cells = "".join(f"{100 * r.headline()[key]:.1f}%".rjust(colw) for r in results)
        lines.append(key.ljust(width) + cells)
    per_source = [("", "category_by_source")]
    if all(r.category_hierarchical_by_source for r in results):
        per_source.append((", via subcategories", "category_hierarchical_by_source"))
    for suffix, field_name in per_source:
        for source in getattr(results[0], field_name):
            for attr in ("accuracy", "balanced"):
                cells = "".join(
                    f"{100 * getattr(getattr(r, field_name)[source], attr):.1f}%".rjust(
                        colw
                    )
                    for r in results
                )
                lines.append(f"{source} {attr}{suffix}".ljust(width) + cells)
    first = results[0]
    lines.append(
        f"({first.split} split of {first.corpus}: {first.retrieval.n_images} images, "
        f"{first.retrieval.n_texts} captions, {first.category.n_images} images in "
        f"{first.category.n_classes} categories)"
    )
    return "\n".join(lines)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="zero-shot category accuracy and retrieval recall of a model",
        description="Encode a corpus split with a model and measure top-level "
        "category zero-shot accuracy (plain and balanced, per source) and "
        "image-to-text / text-to-image recall@1 and @5. Prints a table and "
        "writes the full result as JSON.",
    )
    parser.add_argument(
        "--model", default="mini", help="model spec: mini | ARCH:TAG | ARCH:PATH"
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="with --model mini: the same architecture with the image tower at "
        "its seeded random initialisation (the baseline)",
    )
    parser.add_argument(
        "--corpus", default=None, help="corpus spec (default: the shipped corpus)"
    )
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate on this many images only"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default: cache/evaluation/<model>[-untrained].json)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is faster on a "
        "small machine shared with other jobs)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from backend.corpus import load_corpus
    from backend.models import parse_spec, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.untrained:
        parsed = parse_spec(args.model)
        if parsed.kind != "mini":
            raise SystemExit("--untrained applies to the mini model only")
        from backend import miniclip

        encoder = miniclip.load_encoder(
            parsed.target, device=args.device, name=args.model, untrained=True
        )
    else:
        encoder = resolve_model(args.model, device=args.device)
    corpus = load_corpus(args.corpus)
    result = evaluate(encoder, corpus, split=args.split, limit=args.limit)
    out = args.out or _default_out(args.model, args.untrained)
    write_json(out, result.to_dict())
    print(format_table([result]))
    print(f"wrote {out}")
    return 0


def _default_out(spec: str, untrained: bool) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")
    suffix = "-untrained" if untrained else ""
    return Path("cache") / "evaluation" / f"{slug}{suffix}.json"


def load_evaluation(path: str | Path) -> dict[str, Any]:
    """Read a JSON file that ``python -m backend evaluate`` wrote."""
    return json.loads(Path(path).read_text())
