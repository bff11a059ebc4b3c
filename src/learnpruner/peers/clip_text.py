"""CDPruner's official instruction relevance: CLIP's text tower against CLIP-projected patch embeddings.

The official code (Theia-4869/CDPruner: ``llava/model/multimodal_encoder/clip_encoder.py`` and
``llava/model/llava_arch.py``, ``encode_images``) loads the CLIP the LLaVA vision tower comes from a second
time, as ``CLIPTextModelWithProjection`` (the text tower) and ``CLIPVisionModelWithProjection`` (for its
``visual_projection``), and computes

* the patch embeddings: the vision tower's own ``post_layernorm`` on the feature-layer rows, then
  ``visual_projection`` in float32;
* the text embeddings: the instruction tokenized by CLIP's tokenizer without truncation, cut into segments
  of ``max_position_embeddings`` (77) tokens (the last one zero-padded, masked), one ``text_embeds`` row
  per segment;
* ``relevance = mean over segments of -cos(patch, text)`` (negated: penultimate-layer CLIP patches are
  anti-aligned with the text), min-max normalised (see :func:`learnpruner.peers.vision_select.normalize_relevance`).

Here the same computation runs on transformers' CLIP classes: a ``CLIPModel`` (or any module with
``text_model``, ``text_projection`` and ``visual_projection``, e.g. a CLIP checkpoint loaded as ``CLIPModel``)
plus CLIP's tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipText", "load_clip_text", "load_tokenizer", "text_embeds", "clip_relevance"]


@dataclass
class ClipText:
    """A CLIP text tower with its projections, and CLIP's tokenizer."""

    model: nn.Module  # text_model, text_projection, visual_projection (and vision_model.post_layernorm)
    tokenizer: Any

    @property
    def segment(self) -> int:
        """Tokens per text segment (the text tower's ``max_position_embeddings``)."""
        cfg = getattr(self.model.config, "text_config", self.model.config)
        return int(cfg.max_position_embeddings)


_LOADED: dict[tuple[str, str], Any] = {}  # (kind, path) -> loaded model or tokenizer, once per process


def _check_clip(model: nn.Module) -> nn.Module:
    missing = [a for a in ("text_model", "text_projection", "visual_projection") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"cdpruner's text_model must be a CLIP with a text tower and both projections (a transformers CLIPModel); "
            f"{type(model).__name__} lacks {', '.join(missing)}"
        )
    return model


def load_tokenizer(spec, what: str):
    """A tokenizer from a path or hub id (loaded once per process) or an object with ``decode``/``__call__``."""
    if isinstance(spec, (str, os.PathLike)):
        key = ("tokenizer", str(spec))
        if key not in _LOADED:
            from transformers import AutoTokenizer

            try:
                _LOADED[key] = AutoTokenizer.from_pretrained(str(spec))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load {what} from {str(spec)!r}: {e}") from None
        return _LOADED[key]
    return spec


def load_clip_text(spec, tokenizer=None) -> ClipText:
    """``spec``: a path or hub id of a CLIP checkpoint (loaded once per process as ``CLIPModel``, its tokenizer
    from the same place unless ``tokenizer`` is given), a CLIP module (then ``tokenizer`` is required), or a
    :class:`ClipText`."""
    if isinstance(spec, ClipText):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        key = ("clip", str(spec))
        if key not in _LOADED:
            from transformers import CLIPModel

            try:
                _LOADED[key] = _check_clip(CLIPModel.from_pretrained(str(spec)).eval().requires_grad_(False))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load cdpruner's text_model (a CLIP checkpoint) from {str(spec)!r}: {e}") \
                    from None
        return ClipText(_LOADED[key], load_tokenizer(tokenizer if tokenizer is not None else spec, "CLIP's tokenizer"))
    if isinstance(spec, nn.Module):
        if tokenizer is None:
            raise ValueError("cdpruner with a text_model module needs CLIP's tokenizer: pass text_tokenizer=...")
        return ClipText(_check_clip(spec), load_tokenizer(tokenizer, "CLIP's tokenizer"))
    raise ValueError(f"option text_model must be a path, a hub id or a CLIP module, got {type(spec).__name__}")


@torch.no_grad()
def text_embeds(clip: ClipText, text: str, device=None) -> torch.Tensor:
    """``[segments, C]``: CLIP text embeddings of ``text``, one per segment of ``clip.segment`` tokens (as the
    official code: no truncation, the last segment zero-padded with its mask at 0)."""
    enc = clip.tokenizer(text=text, return_tensors="pt")
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    width = clip.segment
    segments = (ids.shape[1] - 1) // width + 1
    pad = width * segments - ids.shape[1]
    ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1).reshape(-1, width)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1).reshape(-1, width)
    model = clip.model
    device = device if device is not None else next(model.parameters()).device
    pooled = model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output
    return model.text_projection(pooled)


@torch.no_grad()
def clip_relevance(features: torch.Tensor, post_layernorm: nn.Module, visual_projection: nn.Module,
                   texts: list[torch.Tensor]) -> torch.Tensor:
    """``[num_images, n]`` raw CDPruner relevance (before normalisation).

    ``features``: ``[num_images, n, d]`` feature-layer rows of the vision tower; ``texts``: per image its
    ``[segments, C]`` text embeddings. Patch embeddings are ``visual_projection(post_layernorm(features))`` in
    float32; relevance is the negated cosine with each segment, averaged over the segments.
    """
    patches = post_layernorm(features).float()
    patches = F.linear(patches, visual_projection.weight.float(),
                       None if visual_projection.bias is None else visual_projection.bias.float())
    patches = patches / patches.norm(dim=-1, keepdim=True)
    out = []
    for i, t in enumerate(texts):
        t = t.float().to(patches.device)
        t = t / t.norm(dim=-1, keepdim=True)
        out.append((-(patches[i] @ t.T)).mean(dim=-1))
    return torch.stack(out)
