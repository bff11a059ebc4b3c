"""CLIP vision towers (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA): features at the feature layer, [CLS] attention."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["clip_features"]


def crop_coords(vision_config, n: int, device=None) -> torch.Tensor:
    """``[n, 2]``: where each of a CLIP crop's ``n`` feature rows lies in the tower's square patch grid, in ``[-1, 1]``
    (:func:`~learnpruner.engine.layout.grid_coords`); a leading [CLS] row (the ``full`` strategy) at the centre."""
    from ..engine.layout import grid_coords

    side = vision_config.image_size // vision_config.patch_size
    cls = n - side * side
    if cls not in (0, 1):
        raise ValueError(f"{n} feature rows do not fit a {side}x{side} patch grid (plus at most a [CLS] row)")
    return grid_coords(torch.arange(n, device=device) - cls, side, side)


def clip_features(tower: nn.Module, pixel_values: torch.Tensor, layer, strategy: str, cls_attention: bool = False):
    """``[num_crops, n, d]`` hidden states of ``tower`` at ``layer`` (an int or a list, concatenated).

    Strategy ``"default"`` drops the [CLS] row, ``"full"`` keeps it. With ``cls_attention=True`` returns
    ``(features, extras)``: ``extras["cls"]`` ``[num_crops, n]`` is the [CLS] attention (mean over heads)
    of the encoder layer that produced the (last) feature layer, computed from that layer's own q/k
    projections during the same forward (so SDPA works); ``extras["keys"]`` ``[num_crops, n, head_dim]``
    are that layer's keys, mean over heads. Under "default" the [CLS] entries are left out.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    captured, handles = {}, []
    if cls_attention:
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        last = layers[-1]
        idx = (len(encoder_layers) + 1 + last if last < 0 else last) - 1
        if idx < 0:
            raise ValueError("[CLS] attention needs a vision feature layer after the embeddings")
        attn = encoder_layers[idx].self_attn
        handles = [
            attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o[:, :1])),
            attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
        ]
    try:
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    finally:
        for h in handles:
            h.remove()
    feats = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        feats = [f[:, 1:] for f in feats]
    feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
    if not cls_attention:
        return feats
    b, s = captured["k"].shape[:2]
    heads, hd = attn.num_heads, attn.head_dim
    q = captured["q"].view(b, 1, heads, hd).transpose(1, 2).float()
    k = captured["k"].view(b, s, heads, hd).transpose(1, 2).float()
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=1)[:, 0]  # [b, s]
    keys = k.mean(dim=1)  # [b, s, hd]: the layer's keys, mean over heads (VisionZip's merge metric)
    drop = 1 if strategy == "default" else 0
    return feats, {"cls": probs[:, drop:], "keys": keys[:, drop:]}
