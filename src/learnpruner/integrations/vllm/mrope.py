"""Original 3-D M-RoPE positions for kept tokens in vLLM, shared by the Qwen plugins (Qwen2.5-VL, Qwen3-VL).

vLLM numbers a prompt before its images are encoded, when the kept tokens are not known yet.
:meth:`KeptPositions.get_mrope_input_positions` numbers the text exactly as in the unpruned prompt and gives
every visual row its item's first position; the encoder appends each kept token's offset within its item
(``(t, h, w)``, :data:`OFFSET_CHANNELS` channels, each offset split into two bytes so it is exact in bfloat16) to
its embedding (:func:`encode_offsets`); :meth:`KeptPositions.embed_input_ids` strips those channels and
:meth:`KeptPositions.forward` adds the offsets in place to the visual rows of the step. This is vLLM's own device
for pruned M-RoPE models (its EVS appends positions to the embeddings the same way) without the model runner's
pruning switch, which vLLM's CPU runner never turns on; it does not depend on the runner, the batch or the rank.
"""

from __future__ import annotations

import torch

from ...adapters.qwen2_5_vl import grid_extent

__all__ = ["OFFSET_CHANNELS", "encode_offsets", "decode_offsets", "KeptCounts", "KeptPositions"]

OFFSET_CHANNELS = 6  # (t, h, w) offsets, each as (high byte, low byte): exact in bfloat16 up to 65535
_BYTE = 256


def encode_offsets(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[k, 6]`` channels carrying ``offsets`` (``[3, k]``, non-negative integers below 65536) exactly in
    ``dtype``: each offset as its high and low byte."""
    if offsets.numel() and int(offsets.max()) >= _BYTE * _BYTE:
        raise ValueError(f"an M-RoPE offset of {int(offsets.max())} does not fit the 16 bits the vLLM plugin "
                         "carries per offset")
    parts = torch.stack([torch.div(offsets, _BYTE, rounding_mode="floor"), offsets % _BYTE], dim=1)  # [3, 2, k]
    return parts.reshape(OFFSET_CHANNELS, -1).T.to(dtype)


def decode_offsets(channels: torch.Tensor) -> torch.Tensor:
    """``[3, k]`` offsets from :func:`encode_offsets`' channels (``[k, 6]``)."""
    parts = channels.float().round().long().T.reshape(3, 2, -1)
    return parts[:, 0] * _BYTE + parts[:, 1]


class KeptCounts:
    """Mixed in before a vLLM Qwen ``ProcessingInfo`` class (shared by the Qwen plugins): each image's and each
    video's placeholder count is the count it keeps (:meth:`~.stage1.Stage1Spec.kept`). ``family`` names the
    plugin's family; ``start_frames`` is where the frame search of profiling starts (the vLLM class's own)."""

    family: str
    start_frames: int = 1

    def _kept(self, n: int) -> int:
        from .stage1 import spec_of

        return spec_of(self.get_hf_config(), self.family).kept(n)

    def get_num_image_tokens(self, **kwargs) -> int:
        return self._kept(super().get_num_image_tokens(**kwargs))

    def get_num_video_tokens(self, **kwargs) -> int:
        return self._kept(super().get_num_video_tokens(**kwargs))

    def _get_max_video_frames(self, max_tokens: int, start_num_frames: int | None = None) -> int:
        """The most frames whose UNPRUNED tokens fit ``max_tokens`` (a kept count may stay constant as frames
        grow, so the search runs on the tower's own count: the profiled encoder work is the unpruned one)."""
        width, height = self.get_image_size_with_most_features()
        processor = self.get_image_processor()
        frames = self.start_frames if start_num_frames is None else start_num_frames
        while super().get_num_video_tokens(image_width=width, image_height=height, num_frames=frames + 1,
                                           image_processor=processor, mm_kwargs={}) <= max_tokens:
            frames += 1
        return frames


class KeptPositions:
    """Mixed in before a vLLM Qwen model class: the positions of the module docstring. The subclass gives
    :meth:`visual_runs` and ``self.learnpruner`` (:func:`~.stage1.attach`); its encoder appends the offsets."""

    _pending_offsets: tuple[torch.Tensor, torch.Tensor] | None = None

    def visual_runs(self, input_tokens: list[int], mm_features):
        """Per run of visual placeholders, in prompt order: ``(offset, kept, (t, h, w), t_factor)``: where the run
        starts, how many placeholders it holds, and the LLM grid (after the merge) it is numbered as. An image is
        one run; a Qwen3-VL video one per frame group."""
        raise NotImplementedError

    def start_stage1(self, vllm_config, family: str, project) -> None:
        """At engine start: refuse the encoder modes that bypass the plugin, then attach the served stage 1 (the
        spec from the config's learnpruner entry, the LPM of ``family`` on the merger's input, ``project`` the
        merger on kept rows)."""
        from .stage1 import attach

        self.check_encoder_path(vllm_config)
        vc = vllm_config.model_config.hf_config.vision_config
        attach(self, vllm_config, family, vc.hidden_size * vc.spatial_merge_size ** 2, -1, project)

    def check_encoder_path(self, vllm_config) -> None:
        """Refuse, at engine start, the encoder modes that run the tower outside the plugin's encoder step."""
        if self.use_data_parallel:
            raise ValueError("mm_encoder_tp_mode='data' runs the vision tower outside learnpruner's stage 1; "
                             "serve with the default mm_encoder_tp_mode")
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            raise ValueError("cudagraph_mm_encoder replays the vision tower outside learnpruner's stage 1; "
                             "serve without it")

    # --- positions ----------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """``[3, len(input_tokens)]`` positions of the pruned prompt: its text exactly as in the unpruned prompt,
        each visual row its item's first position (:meth:`forward` adds the kept token's offset); and the
        ``mrope_position_delta`` decode steps continue with (the unpruned prompt's)."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts, start, nxt = [], 0, 0
        for offset, kept, grid, factor in self.visual_runs(input_tokens, features):
            text = offset - start
            parts += [torch.arange(text).expand(3, text) + nxt, torch.full((3, kept), nxt + text)]
            nxt += text + grid_extent(grid, factor)
            start = offset + kept
        tail = len(input_tokens) - start
        parts.append(torch.arange(tail).expand(3, tail) + nxt)
        positions = torch.cat(parts, dim=1).long()
        return positions, nxt + tail - len(input_tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """The LLM's input embeddings, the encoder's offset channels stripped and kept for :meth:`forward`."""
        self._pending_offsets = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds = [e[:, :-OFFSET_CHANNELS] for e in multimodal_embeddings]
        offsets = decode_offsets(torch.cat([e[:, -OFFSET_CHANNELS:] for e in multimodal_embeddings]))
        rows = torch.nonzero(is_multimodal.flatten()).flatten()
        if rows.numel() != offsets.shape[1]:
            raise RuntimeError(f"{rows.numel()} visual rows for {offsets.shape[1]} visual embeddings")
        self._pending_offsets = (rows, offsets.to(rows.device))
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._pending_offsets = self._pending_offsets, None
        if pending is not None and positions.dim() == 2:
            rows, offsets = pending
            # in place: ``positions`` is this step's slice of the runner's buffer, rebuilt every step from the
            # request's own positions; a copy would move the input of captured (piecewise) CUDA graphs
            positions[:, rows] += offsets.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
