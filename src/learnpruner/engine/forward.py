"""The forward of a pruned model: prefill (with pruning) or a decode step, then norm and LM head."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .decode import decode
from .prefill import prefill
from .sequence import take
from .state import SEGMENTS_ATTR, STATIC_ATTR, PruneState

__all__ = ["pruned_forward"]


def pruned_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    return_dict: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    **kwargs,
):
    """Forward of a model patched by :func:`learnpruner.apply`; same arguments as the original. The family's
    visual inputs (``adapter.visual_inputs``) and vision-tower options (``adapter.vision_options``) arrive by name
    in ``kwargs``; the rest goes to the decoder layers."""
    state: PruneState = self._learnpruner
    ad = state.adapter
    if output_attentions or output_hidden_states:
        raise NotImplementedError(
            "output_attentions/output_hidden_states are not available on a pruned model (layers see "
            "different sequences); call learnpruner.remove(model) first"
        )
    kwargs.pop("mm_encoder_outputs", None)
    visual = {name: kwargs.pop(name, None) for name in ad.visual_inputs}
    visual = {name: value for name, value in visual.items() if value is not None}
    vision_kwargs = {name: kwargs.pop(name, None) for name in ad.vision_options}
    has_pixels = any(visual.get(name) is not None for name in ad.pixel_inputs)
    cache = cache if cache is not None else past_key_values
    cfg = ad.text_config
    use_cache = use_cache if use_cache is not None else getattr(cfg, "use_cache", True)
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        inputs_embeds = ad.language_model.embed_tokens(input_ids)
    static = getattr(cache, STATIC_ATTR, None)
    past = static.get_seq_length() if static is not None else cache.get_seq_length() if cache is not None else 0
    if has_pixels and past > 0:
        raise ValueError("learnpruner prunes at prefill: pixel values with a non-empty cache are not supported")
    segments = getattr(cache, SEGMENTS_ATTR, None) if past > 0 else None
    if segments is not None and state.fast:
        from .decode_static import fast_decode

        hidden, final_orig = fast_decode(ad, cache, segments, inputs_embeds, position_ids, kwargs), None
    elif segments is not None:
        hidden = decode(ad, segments, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs)
        final_orig = None
    else:
        hidden, final_orig = prefill(state, inputs_embeds, input_ids, visual if has_pixels else None, attention_mask,
                                     position_ids, cache, use_cache, past, vision_kwargs, kwargs)

    hidden = ad.language_model.norm(hidden)
    keep_slice = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = self.lm_head(hidden[:, keep_slice, :])
    loss = None
    if labels is not None:
        if final_orig is not None:
            labels = take(labels.to(final_orig.device), final_orig, -100)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kwargs)
    out_cls = ad.output_class()
    cache_field = "cache" if "cache" in out_cls.__dataclass_fields__ else "past_key_values"
    out = out_cls(loss=loss, logits=logits, **{cache_field: cache if use_cache else None})
    return out.to_tuple() if return_dict is False else out
