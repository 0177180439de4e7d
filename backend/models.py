"""Turn a model spec into an encoder of images and texts in CLIP's joint space.

A spec names one of three sources:

- ``mini`` (the default): the embedded mini-CLIP shipped in ``assets/miniclip``
  (see :mod:`backend.miniclip`), fully offline. ``mini:DIR`` loads mini-CLIP
  weights from another folder, such as the output of a fresh training run.
- ``ARCH:TAG``, e.g. ``ViT-B-32:laion2b_s34b_b79k``: any open_clip architecture
  and pretrained tag, through open_clip's own loading code (downloads the
  weights on first use).
- ``ARCH:PATH``: an open_clip architecture with weights from a local file,
  either a ``.safetensors`` file or a plain (open_clip or OpenAI layout) state
  dict saved with ``torch.save``. The file is read with safetensors or with
  ``torch.load(weights_only=True)``, so loading it never runs code from it.

Every encoder returns float32, L2-normalised embeddings of shape ``(n, d)``
on the CPU, and carries a :class:`ModelCard` with the preprocessing that
open_clip's ``image_transform`` applies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_SPEC = "mini"

# Suffixes that mark the part after ``ARCH:`` as a file even if it is missing.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ModelSpecError(ValueError):
    """A model spec that cannot be parsed or resolved."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit its architecture."""


@dataclass(frozen=True)
class ModelCard:
    """What a resolved model is and how it sees its inputs.

    Attributes
    ----------
    name : str
        The spec the model was resolved from (``mini``, ``ViT-B-32:openai``...).
    arch : str
        Architecture: an open_clip model name, or ``mini-clip``.
    source : str
        ``embedded``, ``open_clip tag`` or ``checkpoint file``.
    embed_dim : int
        Width ``d`` of the joint embedding space.
    image_size : int
        Side in pixels of the square image the image tower reads.
    context_length : int
        Number of tokens a text is padded or truncated to.
    preprocess : dict
        open_clip ``PreprocessCfg`` fields (size, mean, std, interpolation,
        resize_mode, ...) given to ``open_clip.image_transform_v2``.
    details : dict
        Source-specific facts (weights file, text tower package, ...).
    """

    name: str
    arch: str
    source: str
    embed_dim: int
    image_size: int
    context_length: int
    preprocess: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the card as JSON-ready plain data."""
        return _jsonable(asdict(self))


class ParsedSpec(NamedTuple):
    """A spec split into its parts.

    ``kind`` is ``mini``, ``tag`` or ``file``; ``arch`` the open_clip
    architecture (``mini-clip`` for the embedded model); ``target`` the tag or
    the path (``None`` for the shipped mini weights).
    """

    kind: str
    arch: str
    target: str | None


def parse_spec(spec: str) -> ParsedSpec:
    """Split a model spec into kind, architecture and target.

    The part after the first colon is a file when it names an existing file
    or ends with a checkpoint suffix, and a pretrained tag otherwise.
    """
    spec = spec.strip()
    if spec == "mini":
        return ParsedSpec("mini", "mini-clip", None)
    if spec.startswith("mini:"):
        return ParsedSpec("mini", "mini-clip", spec[len("mini:") :])
    arch, sep, target = spec.partition(":")
    if not sep or not arch or not target:
        raise ModelSpecError(
            f"model spec {spec!r} is not 'mini', 'ARCH:TAG' or 'ARCH:PATH'; "
            "for example 'ViT-B-32:laion2b_s34b_b79k' or 'ViT-B-32:/path/to/"
            "weights.safetensors'"
        )
    is_file = os.path.isfile(target) or target.lower().endswith(CHECKPOINT_SUFFIXES)
    return ParsedSpec("file" if is_file else "tag", arch, target)


class Encoder:
    """Embed images and texts into a CLIP joint space.

    Parameters
    ----------
    model : torch.nn.Module
        An open_clip model (``CLIP`` or ``CustomTextCLIP``) in eval mode.
    tokenizer : callable
        open_clip tokenizer: ``list[str] -> LongTensor (n, context_length)``.
    card : ModelCard
        Description of the model; ``card.preprocess`` builds the transform.
    device : str
        Device the model runs on; results always come back on the CPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        card: ModelCard,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.card = card
        self.device = device
        self.preprocess = image_transform_v2(
            PreprocessCfg(**card.preprocess), is_train=False
        )

    def __repr__(self) -> str:
        return f"Encoder({self.card.name!r}, d={self.card.embed_dim})"

    @torch.no_grad()
    def encode_images(
        self,
        images: Sequence[Image.Image],
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embed images; return float32 ``(n, d)``, rows of unit L2 norm.

        Each image goes through open_clip's eval transform (RGB conversion,
        resize, centre crop, normalisation) before the image tower.
        """
        chunks = []
        for start in tqdm(
            range(0, len(images), batch_size),
            desc="encode images",
            unit="batch",
            disable=not progress,
        ):
            batch = images[start : start + batch_size]
            pixels_nchw = torch.stack([self.preprocess(im) for im in batch])
            feats_nd = self.model.encode_image(pixels_nchw.to(self.device))
            chunks.append(F.normalize(feats_nd.float(), dim=-1).cpu())
        return self._concat(chunks)

    @torch.no_grad()
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embed texts; return float32 ``(n, d)``, rows of unit L2 norm."""
        chunks = []
        for start in tqdm(
            range(0, len(texts), batch_size),
            desc="encode texts",
            unit="batch",
            disable=not progress,
        ):
            tokens_nl = self.tokenizer(list(texts[start : start + batch_size]))
            feats_nd = self.model.encode_text(tokens_nl.to(self.device))
            chunks.append(F.normalize(feats_nd.float(), dim=-1).cpu())
        return self._concat(chunks)

    def _concat(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if not chunks:
            return torch.zeros(0, self.card.embed_dim, dtype=torch.float32)
        return torch.cat(chunks)

    @cached_property
    def fingerprint(self) -> str:
        """A stable hash of every weight (name, dtype, shape and values).

        Two encoders share a fingerprint exactly when their state dicts are
        equal, whatever file they came from. 16 hex digits.
        """
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def resolve_model(spec: str = DEFAULT_SPEC, device: str = "cpu") -> Encoder:
    """Build the encoder a spec names.

    Parameters
    ----------
    spec : str
        ``mini``, ``mini:DIR``, ``ARCH:TAG`` or ``ARCH:PATH`` (module docstring).
    device : str
        torch device for the model.

    Raises
    ------
    ModelSpecError
        The spec is malformed or names an unknown architecture.
    CheckpointError
        A checkpoint file is missing, unsafe to read, or does not fit ``ARCH``.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "mini":
        from backend import miniclip

        return miniclip.load_encoder(parsed.target, device=device, name=spec)
    _check_arch(parsed.arch)
    if parsed.kind == "tag":
        return _load_tag(spec, parsed, device)
    return _load_file(spec, parsed, device)


def _check_arch(arch: str) -> None:
    if open_clip.get_model_config(arch) is None:
        raise ModelSpecError(
            f"unknown open_clip architecture {arch!r}; "
            "open_clip.list_models() lists the known ones"
        )


def _load_tag(spec: str, parsed: ParsedSpec, device: str) -> Encoder:
    tags = open_clip.list_pretrained_tags_by_model(parsed.arch)
    if parsed.target not in tags:
        raise ModelSpecError(
            f"{parsed.target!r} is neither a pretrained tag of {parsed.arch} "
            f"(known: {', '.join(tags) or 'none'}) nor an existing file"
        )
    model = open_clip.create_model(
        parsed.arch, pretrained=parsed.target, device=device, weights_only=True
    )
    details = {"pretrained": parsed.target}
    return _open_clip_encoder(spec, parsed.arch, model, "open_clip tag", details)


def _load_file(spec: str, parsed: ParsedSpec, device: str) -> Encoder:
    path = Path(parsed.target)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (like OpenAI's original CLIP files); "
            "it is not read because loading it runs its code. Use the open_clip "
            "tag instead (for example 'ViT-B-32:openai') or save its state dict "
            "as .safetensors"
        )
    try:
        model = open_clip.create_model(
            parsed.arch, pretrained=str(path), device=device, weights_only=True
        )
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects beyond tensors ({_unsafe_global(err)}), "
            "which are not loaded because unpickling can run code; save the "
            "state dict as .safetensors or as a plain dict of tensors"
        ) from err
    except (RuntimeError, AssertionError, KeyError, ValueError) as err:
        raise CheckpointError(_mismatch_message(parsed.arch, path, err)) from err
    details = {"checkpoint": str(path.resolve())}
    return _open_clip_encoder(spec, parsed.arch, model, "checkpoint file", details)


def _open_clip_encoder(
    spec: str, arch: str, model: torch.nn.Module, source: str, details: dict
) -> Encoder:
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    tokenizer = open_clip.get_tokenizer(arch)
    card = ModelCard(
        name=spec,
        arch=arch,
        source=source,
        embed_dim=int(open_clip.get_model_config(arch)["embed_dim"]),
        image_size=_side(preprocess["size"]),
        context_length=int(tokenizer.context_length),
        preprocess=_jsonable(preprocess),
        details=details,
    )
    device = str(next(model.parameters()).device)
    return Encoder(model, tokenizer, card, device=device)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder inside."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _unsafe_global(err: Exception) -> str:
    """The 'Unsupported global: ...' phrase of a weights-only load error."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"it references {found.group(1)}" if found else type(err).__name__


def _side(size: int | Sequence[int]) -> int:
    return int(size) if isinstance(size, int) else int(size[-1])


def _mismatch_message(arch: str, path: Path, err: Exception) -> str:
    """Name the keys and shapes that keep a checkpoint from fitting ``arch``."""
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    try:
        found = load_state_dict(str(path), weights_only=True)
    except Exception as read_err:  # noqa: BLE001 - report the read error itself
        return f"cannot read checkpoint {path}: {read_err}"
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(found))
    unexpected = sorted(set(found) - set(wanted))
    reshaped = [
        f"{k} (file {tuple(found[k].shape)}, model {tuple(wanted[k].shape)})"
        for k in sorted(set(found) & set(wanted))
        if tuple(found[k].shape) != tuple(wanted[k].shape)
    ]
    parts = [f"checkpoint {path} does not fit open_clip architecture {arch}"]
    for label, items in (
        ("missing from file", missing),
        ("unexpected in file", unexpected),
        ("shape mismatch", reshaped),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {len(items)}: {', '.join(items[:5])}{more}")
    if len(parts) == 1:
        parts.append(str(err).strip().splitlines()[0] or type(err).__name__)
    parts.append("check that ARCH in 'ARCH:PATH' is the architecture it was saved from")
    return "; ".join(parts)


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so a card round-trips through JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
