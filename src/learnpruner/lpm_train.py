"""Training the Learnable Pruning Module (LearnPruner stage 1, arXiv 2604.23950 Sec. 3.2).

The VLM is frozen; only the LPM trains. The paper publishes neither its loss nor its schedule, so
this follows the closest published recipe (Dynamic-LLaVA's learned predictor) and states every choice:

* **Any supported family.** The images go through the adapter's ``encode`` (per image its feature rows at
  the vision feature layer, in token order, and the placeholders they fill), so the LPM sees what it sees
  at inference: LLaVA-1.5's 576 rows per image, or every crop of a LLaVA-NeXT image (base crop plus the
  unpadded AnyRes grid; the row newlines are structure, filled with the adapter's embedding, never gated).
  Images of one batch may have different token counts: per-image tables are padded with a validity mask.
  Each image's target is the schedule inference gives an image of its count at the training budget.
  Video-LLaVA: records with a ``video`` (frames sampled uniformly, 8 by default) and records with an image
  may share a dataset and a batch; a video is one item of all its frames' rows (8 x 257 = 2056 at 224 px).
* **Prompts from the processor's chat template.** Each record becomes chat messages; the processor's
  ``apply_chat_template`` formats them the family's way and the processor tokenizes them (expanding the
  image placeholder to the image's token count). Labels cover each assistant turn: the tokens between the
  prompt with the generation prompt and the prompt with that answer (its end token included).
* **Straight-through estimator.** The forward pass uses the hard keep mask ``keep = p > 0.5``
  (the argmax of the LPM's two-class softmax); gradients flow through the soft keep-probability
  ``p`` (``gate = keep + p - p.detach()``).
* **Which tokens the hard mask keeps** (``mask``). ``"threshold"`` (default, the argmax above)
  lets the kept count vary per image, and the keep-ratio term below pulls it to the target.
  ``"topk"`` keeps exactly the top ``r1`` by ``p`` in every image, as inference does, so the
  training forward sees the inference-time token count from the first step and the answer loss
  trains the ranking that inference uses (the keep-ratio term is then zero). On the ShapesVQA
  testbed the threshold mask's kept fraction stayed far from the target in short runs (0.4 to 0.9
  against 0.19 over 300 steps at lr 1e-3; at lr 1e-2 it collapsed to about 0.05 and stayed there),
  while ``"topk"`` needs no calibration. The shipped ShapesVQA LPM says which one trained it (``lpm.json``).
* **Dropping by attention, not by removal.** The hard mask's size varies per image, so during
  training dropped visual tokens stay in the sequence but are excluded from every LLM layer's
  attention: an attention function multiplies each key's post-softmax probability by its gate and
  renormalises, which equals removing the dropped keys in the forward pass and still passes a
  gradient to the gates of dropped tokens (a gate of 0 on an additive mask would pass none).
  At inference the engine physically keeps the top ``r1`` by keep-probability.
* **Stage 2 in the training forward** (``stage2``, off by default). Inference drops visual tokens a second
  time, in the LLM (the text-attention drop of layer ``K``). With ``stage2=True`` the training forward does the
  same: the instruction's attention in layer ``K - 1`` (over the stage-1 set, as at inference) picks each
  image's ``r2`` tokens, and from layer ``K`` on the others are gated out too. The answer loss then reflects the
  whole two-stage pipeline, so the LPM learns which tokens serve the layers before the drop and which survive
  it. The stage-2 pick is a hard, non-differentiable selection (as at inference); the LPM's gradient reaches it
  through the gates of the tokens in each layer.
* **Loss** = next-token cross-entropy on answer tokens + ``ratio_weight * (kept fraction - rho)^2``
  (per image, the kept fraction through the STE, so the forward value is the real hard fraction; the
  mean over images) with ``rho = r1 / n`` for the target budget (64 tokens -> r1 = 111 of 576 for
  LLaVA-1.5-7B) + optional ``distill_weight * KL(unpruned || pruned)`` on the answer tokens' next-token
  distributions (off by default: it costs a second forward per step). An image whose count is within
  the budget is not pruned at inference: it is never gated and has no keep-ratio term.

Runs on a CPU, one GPU, or many GPUs through ``accelerate launch`` (DDP over the LPM) with no code
change; checkpoints (LPM, optimizer, scheduler, step, data position, RNG) are written atomically as
plain data (tensors, numbers, strings, lists, dicts; read back with ``weights_only=True``, so a checkpoint
can never run code) and ``resume=True`` continues exactly. A new run refuses a non-empty ``out_dir``
unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .budget import tokens_for
from .engine.layout import STRUCTURE, Layout, VisualFeatures
from .hub import model_fingerprint
from .lpm import LearnablePruningModule, LPMConfig
from .media import read_image, turn_content
from .methods import get_method
from .utils import atomic_torch_save, read_checkpoint, rng_state, set_rng_state
from .utils import check_out_dir as _check_out_dir

__all__ = ["TrainConfig", "train_lpm", "check_out_dir", "LlavaRecords", "ShapesRecords", "GATED_ATTENTION",
           "chat_messages"]

logger = logging.getLogger(__name__)
GATED_ATTENTION = "learnpruner_gated"
MASKS = ("threshold", "topk")
RUN_FILES = ("lpm.safetensors", "lpm.json", "checkpoint.pt")  # what a run writes into its out_dir


@dataclass
class TrainConfig:
    """Defaults for LPM training; every weight is configurable."""

    tokens: int = 64
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    ratio_weight: float = 4.0
    mask: str = "threshold"
    distill_weight: float = 0.0
    stage2: bool = False  # run stage 2 (the text-attention drop in the LLM) in the training forward
    # the stage-2 layer K of the schedules the targets follow (None: the method's default); the LPM ships it as
    # its ``layer`` option (lpm.json ``extra["options"]``), so ``apply`` uses the K it was trained for
    layer: int | None = None
    hidden_dim: int = 512
    seed: int = 0
    ckpt_every: int = 100
    grad_ckpt: bool = False
    bf16: bool = False
    max_length: int = 2048
    # sample the training budget per step, log-uniformly in [lo, hi] (seeded by step: resumable), so one LPM
    # ranks tokens for every budget it will be used at; None: always ``tokens``
    budget_range: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    def step_tokens(self, step: int) -> int:
        """The training budget of optimisation step ``step``."""
        if self.budget_range is None:
            return self.tokens
        lo, hi = self.budget_range
        u = np.random.default_rng([self.seed, step]).uniform()
        return int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))


# --------------------------------------------------------------------------------------------------
# gated attention: dropped keys excluded in the forward pass, gradient to the gates


def gated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, learnpruner_gate=None,
                    **kwargs):
    """Eager attention whose post-softmax key probabilities are multiplied by ``learnpruner_gate`` [b, s_kv]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(weights.float(), dim=-1)
    stage2 = learnpruner_gate if isinstance(learnpruner_gate, Stage2Gate) else None
    gate = stage2.gate(module.layer_idx) if stage2 is not None else learnpruner_gate
    if gate is not None:
        probs = probs * gate[:, None, None, : key.shape[-2]].float()
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    if stage2 is not None:
        stage2.observe(module.layer_idx, probs)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs


class Stage2Gate:
    """Every layer's key gate when stage 2 runs in the training forward (``TrainConfig.stage2``).

    Layers before ``layer`` use the stage-1 gate ``base`` ``[b, s]`` (straight-through). Layer ``layer - 1``
    reports its gated attention probabilities: the instruction rows' mean attention (over heads and rows, as
    :func:`~learnpruner.selection.aggregate_scores` at inference) ranks each image's stage-1 tokens, and the top
    ``r2[image]`` stay. From ``layer`` on the gate is ``base`` times that 0/1 choice. ``vis``/``img``: the
    layout's token index and image of each position; ``query_index``/``query_valid``: the instruction rows
    (:func:`~learnpruner.engine.readout.query_rows`)."""

    def __init__(self, base, layer: int, vis, img, r2: list[int], widths: list[int], query_index, query_valid):
        self.base, self.layer, self.vis, self.img = base, layer, vis, img
        self.r2, self.widths = r2, widths
        self.query_index, self.query_valid = query_index, query_valid
        self.chosen: torch.Tensor | None = None  # [num_images, width] bool: stage 2's pick
        self.keep: torch.Tensor | None = None  # [b, s]: 0 where stage 2 drops a visual token

    def gate(self, layer_idx: int) -> torch.Tensor:
        if layer_idx < self.layer:
            return self.base
        if self.keep is None:
            raise RuntimeError(f"stage 2 gates layer {layer_idx} before layer {self.layer - 1} chose its tokens")
        return self.base * self.keep

    @torch.no_grad()
    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        if layer_idx != self.layer - 1:
            return
        from . import selection as sel
        from .engine.sequence import keep_positions

        b, h, _, s = probs.shape
        idx = self.query_index[:, None, :, None].expand(b, h, -1, s)
        scores = sel.aggregate_scores(probs.gather(2, idx), self.query_valid)
        kept1 = self.base.detach() > 0
        vis = torch.where(kept1, self.vis, -1)  # tokens stage 1 dropped are absent: they score -inf
        width = max(self.widths)
        table = sel.per_image_scores(scores, vis, self.img, len(self.r2), width)
        chosen = torch.zeros(table.shape, dtype=torch.bool, device=table.device)
        for r in sorted(set(self.r2)):
            rows = torch.tensor([i for i, x in enumerate(self.r2) if x == r], device=table.device)
            finite = torch.isfinite(table[rows]).sum(dim=1)
            picked = sel.topk_sorted(table[rows], min(r, width))
            ok = torch.arange(picked.shape[1], device=table.device)[None] < finite[:, None]
            chosen[rows[:, None].expand_as(picked)[ok], picked[ok]] = True
        self.chosen = chosen
        self.keep = keep_positions(self.vis, self.img, chosen).to(self.base.dtype)


def _register_gated_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, eager_mask)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    image: object  # PIL image (None for a video example)
    turns: list[tuple[str, str]]  # (human, gpt) pairs; the first human turn holds <image> (a video's: <video>)
    video: np.ndarray | None = None  # [T, H, W, 3] uint8 frames of a video example

    @property
    def tag(self) -> str:
        """The placeholder of the example's media in its turns: ``<video>`` or ``<image>``."""
        return "<image>" if self.video is None else "<video>"


class _Records:
    """Bad-record bookkeeping shared by the data sources: each bad record is counted once. ``identity`` says
    which data this is (recorded with a run, checked on resume)."""

    def __init__(self):
        self.skipped: dict[str, int] = {}
        self._bad: set[int] = set()
        self.identity: dict = {}

    def skip(self, index: int, reason: str) -> None:
        if index not in self._bad:
            self._bad.add(index)
            self.skipped[reason] = self.skipped.get(reason, 0) + 1


class LlavaRecords(_Records):
    """LLaVA instruction data: a JSON list or JSONL of ``{"image" | "video", "conversations"}`` records.

    ``image`` (or ``video``, a video file whose ``num_frames`` frames are sampled uniformly with
    :func:`learnpruner.video.read_frames`) is relative to ``image_folder``; ``conversations`` alternates
    ``{"from": "human"}`` and ``{"from": "gpt"}`` turns, the first human turn containing ``<image>`` (a video
    record: ``<video>``, or ``<image>`` as LLaVA-Video data writes it). Images and videos may be mixed in one
    file. Records without an image or video, with a missing or unreadable one, or without the tag are skipped
    and counted in ``skipped`` (reason -> count); they never stop a run.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None, num_frames: int = 8):
        super().__init__()
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        self.num_frames = num_frames
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        import hashlib

        self.identity = {"data": str(Path(path).resolve()), "sha256": hashlib.sha256(raw).hexdigest()[:16]}
        try:
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            records = []
            for line in text.splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        records.append(None)
        self.records = records
        self.image_folder = Path(image_folder) if image_folder else Path(path).parent
        if not self.records:
            raise ValueError(f"no records in {str(path)!r}: expected a JSON list or JSONL of LLaVA records")
        self.has_video = any(isinstance(r, dict) and r.get("video") for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> Example | None:
        if index in self._bad:
            return None

        def bad(reason: str) -> None:
            self.skip(index, reason)

        rec = self.records[index]
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            bad("malformed record")
            return None
        if rec.get("image") and rec.get("video"):
            bad("both image and video")
            return None
        if not (rec.get("image") or rec.get("video")):
            bad("no image")
            return None
        conv = rec["conversations"]
        turns = []
        for human, gpt in zip(conv[0::2], conv[1::2]):
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                break
            turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
        if not turns:
            bad("no human/gpt turn")
            return None
        if rec.get("video") and rec.get("image"):
            bad("both image and video (a record holds one of them)")
            return None
        if rec.get("video"):
            return self._video_example(index, rec["video"], turns)
        if "<image>" not in turns[0][0]:
            bad("no <image> tag")
            return None
        if sum(h.count("<image>") for h, _ in turns) > 1:
            bad("more than one <image> tag")
            return None
        try:
            image = read_image(self.image_folder / rec["image"])
        except (OSError, ValueError):
            bad("missing or unreadable image")
            return None
        return Example(image, turns)

    def _video_example(self, index: int, video: str, turns: list[tuple[str, str]]) -> Example | None:
        """A video record: one ``<video>`` (or ``<image>``) tag, in the first human turn; its frames."""
        from .video import read_frames

        tags = sum(h.count("<video>") + h.count("<image>") for h, _ in turns)
        if not ("<video>" in turns[0][0] or "<image>" in turns[0][0]):
            self.skip(index, "no <video> tag")
            return None
        if tags > 1:
            self.skip(index, "more than one <video> tag")
            return None
        try:
            frames = read_frames(self.image_folder / video, self.num_frames)
        except (OSError, ValueError, TypeError):
            self.skip(index, "missing or unreadable video")
            return None
        turns = [(h.replace("<image>", "<video>"), g) for h, g in turns]
        return Example(None, turns, video=frames)


class ShapesRecords(_Records):
    """The ShapesVQA training stream as examples (one question per image)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.identity = {"data": "shapesvqa", "seed": seed}

    def __len__(self) -> int:
        return 10**9

    def get(self, index: int) -> Example:
        from .testbed.shapes import generate_item

        item = generate_item("train", index, seed=self.seed)
        return Example(item.image, [(f"<image>\n{item.question}", item.answer)])


# --------------------------------------------------------------------------------------------------
# prompts: the processor's chat template, tokenized by the processor


def chat_messages(example: Example) -> list[dict]:
    """The example as chat messages: the image (a video: ``{"type": "video"}``) where the first human turn has
    its ``<image>`` (``<video>``) tag, text around it, and each answer as an assistant turn."""
    kind = "image" if example.video is None else "video"
    messages = []
    for human, gpt in example.turns:
        content = (turn_content(human, kind, example.tag) if example.tag in human else
                   [{"type": "text", "text": human.strip()}] if human.strip() else [])
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": gpt.strip()}]})
    return messages


class SkipRecord(ValueError):
    """A record that cannot train (the message is the reason it is counted under)."""


@dataclass
class Encoded:
    """One tokenized example: ``input_ids`` (image placeholders expanded), ``labels`` (-100 except on the
    answers) and ``visual``, the processor's visual outputs that the adapter's ``encode`` reads."""

    input_ids: list[int]
    labels: list[int]
    visual: dict[str, torch.Tensor]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _encode(example: Example, processor, ad: Adapter, max_length: int) -> Encoded:
    """Token ids, labels and visual inputs of ``example`` in the family's chat format.

    The processor tokenizes the whole conversation with its image (``<image>`` expanded per image size) or
    video (``videos=[frames]``, ``<video>`` expanded to every frame's tokens).
    Labels: for each assistant turn, the tokens after ``apply_chat_template(messages up to its question,
    add_generation_prompt=True)`` up to the end of ``apply_chat_template(messages up to its answer)``,
    located on the tokenizer's own ids of those texts (the same call the processor makes, placeholder not
    expanded). Raises :class:`SkipRecord` when the sequence is longer than ``max_length``, has no answer
    token, or the tokenizer and the processor disagree on the text.
    """
    messages = chat_messages(example)
    text = processor.apply_chat_template(messages)
    media = {"images": [example.image]} if example.video is None else {"videos": [example.video]}
    out = processor(text=[text], return_tensors="pt", **media)
    ids = out["input_ids"][0].tolist()
    if len(ids) > max_length:
        raise SkipRecord("too long")
    tok = processor.tokenizer
    placeholder = ad.placeholders(out["input_ids"])[0].tolist()
    # the processor's ids with each run of placeholders collapsed to one, and where each collapsed id sits
    collapsed, where = [], []
    for i, (t, ph) in enumerate(zip(ids, placeholder)):
        if not (ph and i > 0 and placeholder[i - 1]):
            collapsed.append(t)
            where.append(i)
    full = tok(text)["input_ids"]
    if full != collapsed:
        raise SkipRecord("tokenizer and processor disagree")
    labels = [-100] * len(ids)
    for k in range(len(example.turns)):
        prompt = tok(processor.apply_chat_template(messages[: 2 * k + 1], add_generation_prompt=True))["input_ids"]
        answered = tok(processor.apply_chat_template(messages[: 2 * k + 2]))["input_ids"]
        start, end = _common_prefix(prompt, full), _common_prefix(answered, full)
        for j in range(start, end):
            if not placeholder[where[j]]:
                labels[where[j]] = ids[where[j]]
    if all(v == -100 for v in labels):
        raise SkipRecord("no answer tokens")
    visual = {name: out[name] for name in ad.visual_inputs if name in out}
    return Encoded(ids, labels, visual)


def _stack_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (LLaVA-NeXT's crops per image)."""
    if all(v.shape == values[0].shape for v in values):
        return torch.cat(values)
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = values[0].new_zeros((sum(v.shape[0] for v in values), *shape))
    row = 0
    for v in values:
        out[(slice(row, row + v.shape[0]), *(slice(0, s) for s in v.shape[1:]))] = v
        row += v.shape[0]
    return out


def _collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``labels``, ``attention_mask`` and the visual inputs (each one
    stacked over the examples that have it, in order: images and videos may share a batch)."""
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    for name in dict.fromkeys(name for e in examples for name in e.visual):
        batch[name] = _stack_padded([e.visual[name] for e in examples if name in e.visual])
    return batch


class _Batches:
    """The training stream: each process reads its own slice of one global order; ``pos`` is where it is."""

    def __init__(self, data, processor, ad: Adapter, cfg: TrainConfig, rt):
        self.data, self.processor, self.ad, self.cfg, self.rt = data, processor, ad, cfg, rt
        self.order = _order(len(data), cfg.seed) if isinstance(data, LlavaRecords) else None
        self.pos = 0
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id or 0

    def _index(self) -> int:
        index = self.pos * self.rt.world + self.rt.rank
        self.pos += 1
        if self.order is None:
            return index
        epoch, offset = divmod(index, len(self.order))
        return int(_order(len(self.order), self.cfg.seed + epoch)[offset]) if epoch else int(self.order[offset])

    def next(self) -> dict[str, torch.Tensor]:
        data, examples = self.data, []
        while len(examples) < self.cfg.batch_size:
            if len(data._bad) >= len(data):
                raise ValueError(f"no usable training record: every record was skipped ({data.skipped})")
            index = self._index()
            ex = data.get(index)
            if ex is None:
                continue
            try:
                examples.append(_encode(ex, self.processor, self.ad, self.cfg.max_length))
            except SkipRecord as e:
                data.skip(index, str(e))
        return _collate(examples, self.pad_id)


# --------------------------------------------------------------------------------------------------
# runtime: plain or accelerate


class _Runtime:
    def __init__(self, bf16: bool, device: str | None):
        self.acc = None
        try:
            from accelerate import Accelerator

            if int(os.environ.get("WORLD_SIZE", "1")) > 1 or device is None:
                # accelerate sets up CPU-only multi-process (gloo) training only when told cpu=True
                no_accelerator = not (hasattr(torch, "accelerator") and torch.accelerator.is_available())
                cpu = device == "cpu" or (device is None and no_accelerator)
                self.acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
        except ImportError:
            pass
        self.device = self.acc.device if self.acc else torch.device(device or "cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0

    def prepare(self, *objs):
        return self.acc.prepare(*objs) if self.acc else objs

    def backward(self, loss):
        if self.acc:
            self.acc.backward(loss)
        else:
            loss.backward()

    def unwrap(self, module):
        return self.acc.unwrap_model(module) if self.acc else module

    def reduce_mean(self, value: torch.Tensor) -> float:
        if self.acc and self.world > 1:
            value = self.acc.reduce(value.detach(), reduction="mean")
        return float(value.detach())

    def wait(self):
        if self.acc:
            self.acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# the run, step by step


class _Targets:
    """Per token count ``n``: the stage-1 budget ``r1`` inference gives an image of ``n`` tokens at the training
    budget, and the target kept fraction ``r1 / n`` (None where stage 1 keeps every token)."""

    def __init__(self, tokens: int, num_layers: int, layer: int | None = None):
        self.tokens, self.num_layers, self.layer = tokens, num_layers, layer
        self._schedules: dict = {}

    def schedule(self, n: int):
        """The :class:`~learnpruner.budget.Schedule` inference gives an image of ``n`` tokens."""
        if n not in self._schedules:
            budget = tokens_for(n, self.tokens, None)
            options = {} if self.layer is None else {"layer": self.layer}
            self._schedules[n] = get_method("learnpruner").schedule(budget, n, self.num_layers, options)
        return self._schedules[n]

    def r1(self, n: int) -> int | None:
        return self.schedule(n).r1

    def drop(self, n: int) -> tuple[int, int] | None:
        """Stage 2 of an image of ``n`` tokens: ``(layer, r2)``, or None where it keeps the stage-1 set."""
        drops = self.schedule(n).drops
        return tuple(drops[0]) if drops else None

    def __call__(self, n: int) -> float | None:
        r1 = self.r1(n)
        return None if r1 is None else r1 / n


def _check_processor(processor) -> None:
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat template: LPM training formats every record with "
            "processor.apply_chat_template (each model family its own way); load the model's processor "
            "with its chat_template, or set processor.chat_template"
        )


def _start_run(out: Path, resume: bool, overwrite: bool, cfg: TrainConfig, device: str | None) -> _Runtime:
    """Refuse a used ``out`` (unless resume/overwrite), start the runtime, delete an overwritten run's files."""
    old_run = check_out_dir(out, resume, overwrite)
    rt = _Runtime(cfg.bf16, device)
    if old_run and rt.is_main:
        for path in old_run:
            path.unlink(missing_ok=True)
    rt.wait()
    return rt


def _targets(ad: Adapter, cfg: TrainConfig, frames: int | None = None) -> tuple[_Targets, int]:
    """The per-count targets and the largest item's token count (refused when stage 1 keeps it whole): the largest
    image, or with ``frames`` (the data has videos; None: it has none) a video of that many frames."""
    n = ad.num_visual_tokens()
    video = frames is not None and ad.video_tokens(frames) is not None
    if video:
        n = max(n, ad.video_tokens(frames))
    if cfg.layer is not None and not 0 < cfg.layer < ad.text_config.num_hidden_layers:
        raise ValueError(f"layer must lie in 1..{ad.text_config.num_hidden_layers - 1} (the LLM's layers after the "
                         f"first), got {cfg.layer}")
    targets = _Targets(cfg.tokens, ad.text_config.num_hidden_layers, cfg.layer)
    if targets.r1(n) is None:
        raise ValueError(f"tokens={cfg.tokens} keeps every one of the {n} visual tokens in stage 1: nothing to train")
    if cfg.max_length <= n and video:
        logger.warning("max_length=%d cannot hold a %d-frame video's %d visual tokens: video records are skipped "
                       "as too long (raise max_length, e.g. to 4096 for 8-frame Video-LLaVA videos)", cfg.max_length,
                       frames, n)
    elif cfg.max_length <= n:
        logger.warning("max_length=%d cannot hold the largest image's %d visual tokens: records with such images "
                       "are skipped as too long (raise max_length, e.g. to 4096 for LLaVA-NeXT)", cfg.max_length, n)
    return targets, n


def _freeze(model, ad: Adapter, cfg: TrainConfig, rt: _Runtime) -> str:
    """The VLM frozen on ``rt.device`` with the gated attention in its text model; returns the previous one."""
    _register_gated_attention()
    previous_impl = ad.text_config._attn_implementation
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False).eval().to(rt.device)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return previous_impl


def _unfreeze(model, cfg: TrainConfig, previous_impl: str) -> None:
    model.set_attn_implementation({"text_config": previous_impl})
    if cfg.grad_ckpt:
        model.gradient_checkpointing_disable()


def _new_lpm(ad: Adapter, cfg: TrainConfig, targets: _Targets, n: int, rt: _Runtime):
    """A fresh LPM for the adapter's family and feature layer, its optimizer and its LR schedule."""
    torch.manual_seed(cfg.seed)
    r1 = targets.r1(n)
    lpm = LearnablePruningModule(LPMConfig(
        feature_dim=ad.feature_dim(), hidden_dim=cfg.hidden_dim, family=ad.family,
        feature_layer=ad.feature_layer(), num_tokens=n,
        extra={"trained_tokens": cfg.tokens, "r1": r1, "keep_ratio": r1 / n,
               **({"budget_range": list(cfg.budget_range)} if cfg.budget_range else {}),
               **({"options": {"layer": cfg.layer}} if cfg.layer is not None else {})},
    )).to(rt.device)
    opt = torch.optim.AdamW(lpm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))

    return lpm, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _restore(ckpt_path: Path, resume: bool, cfg: TrainConfig, lpm, opt, scheduler, batches: _Batches, data,
             trained_on: dict):
    """Load a run's checkpoint to continue it exactly; returns ``(step, history)`` (``(0, [])`` when new)."""
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path, ("lpm", "opt", "sched", "step", "pos", "history", "rng"))
        _check_resume_config(state.get("config", {}), asdict(cfg), ckpt_path)
        _check_trained_on(state.get("trained_on"), trained_on, ckpt_path)
        lpm.load_state_dict(state["lpm"])
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["sched"])
        batches.pos = state["pos"]
        data.skipped = dict(state.get("skipped", {}))
        data._bad = set(state.get("bad", []))
        set_rng_state(state["rng"])
        return state["step"], state["history"]
    if resume:
        logger.warning("no checkpoint at %s: starting from scratch", ckpt_path)
    return 0, []


def train_lpm(
    model,
    processor,
    data: LlavaRecords | ShapesRecords,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str | None = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> LearnablePruningModule:
    """Train an LPM for ``model`` (frozen; any family with an adapter) and save it into ``out_dir``; returns it.

    ``processor`` is the model's processor, with a chat template (every record is formatted by it).
    A non-empty ``out_dir`` is refused unless ``resume`` (continue its checkpoint) or ``overwrite`` (delete
    the old run's ``lpm.*`` and ``checkpoint.pt`` first). ``stop_after`` ends the run after that many steps
    of this call (for tests of interrupted runs); the checkpoint in ``out_dir`` then lets ``resume=True``
    continue exactly.
    """
    cfg = config or TrainConfig()
    _check_mask(cfg.mask)
    _check_processor(processor)
    out = Path(out_dir)
    rt = _start_run(out, resume, overwrite, cfg, device)
    ad = adapter_for(model)
    targets, n = _targets(ad, cfg, data.num_frames if getattr(data, "has_video", False) else None)
    previous_impl = _freeze(model, ad, cfg, rt)
    try:
        lpm, opt, scheduler = _new_lpm(ad, cfg, targets, n, rt)
        batches = _Batches(data, processor, ad, cfg, rt)
        trained_on = {**model_fingerprint(model), **data.identity}
        step, history = _restore(out / "checkpoint.pt", resume, cfg, lpm, opt, scheduler, batches, data, trained_on)
        lpm.config.extra["trained_on"] = trained_on
        lpm_t, opt_t = rt.prepare(lpm, opt)
        step = _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches, targets, cfg, rt, out, step, history,
                            stop_after, progress, previous_impl)
    finally:
        _unfreeze(model, cfg, previous_impl)
    return _finish(rt.unwrap(lpm_t).eval(), data, cfg, rt, out, step)


def _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches: _Batches, targets: _Targets, cfg: TrainConfig,
                 rt: _Runtime, out: Path, step: int, history: list, stop_after: int | None, progress: bool,
                 previous_impl: str) -> int:
    """The optimisation loop from ``step`` to ``cfg.steps`` (or ``stop_after`` steps); checkpoints on the way."""
    from tqdm.auto import tqdm

    data, total, done_here = batches.data, cfg.steps, 0
    per_budget = {cfg.tokens: targets}
    bar = tqdm(total=total, initial=step, desc="train LPM", disable=not (progress and rt.is_main), dynamic_ncols=True)
    while step < total and (stop_after is None or done_here < stop_after):
        batch = {k: v.to(rt.device) for k, v in batches.next().items()}
        tokens = cfg.step_tokens(step)
        if tokens not in per_budget:
            per_budget[tokens] = _Targets(tokens, targets.num_layers, targets.layer)
        loss, parts = step_loss(model, ad, lpm_t, batch, per_budget[tokens], cfg, previous_impl)
        opt_t.zero_grad(set_to_none=True)
        rt.backward(loss)
        opt_t.step()
        scheduler.step()
        step += 1
        done_here += 1
        rec = {"step": step, "loss": rt.reduce_mean(loss), "lr": scheduler.get_last_lr()[0],
               **{k: rt.reduce_mean(v) for k, v in parts.items() if v.dim() == 0}}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", kept=f"{rec['kept']:.3f}",
                        target=f"{rec['target']:.3f}", skipped=sum(data.skipped.values()))
        if rt.is_main and (step % cfg.ckpt_every == 0 or step == total or
                           (stop_after is not None and done_here == stop_after)):
            _save_checkpoint(out / "checkpoint.pt", rt.unwrap(lpm_t), opt, scheduler, step, batches.pos, history,
                             data, cfg)
    bar.close()
    rt.wait()
    return step


def _finish(trained: LearnablePruningModule, data, cfg: TrainConfig, rt: _Runtime, out: Path, step: int):
    """Report skipped records; a finished run saves the LPM (with its run's settings) into ``out``."""
    if data.skipped:
        logger.warning("skipped %d bad record(s): %s", sum(data.skipped.values()), data.skipped)
    if rt.is_main and step >= cfg.steps:
        trained.config.extra.update({"steps": step, "skipped": data.skipped, "train_config": asdict(cfg)})
        if getattr(data, "has_video", False):
            trained.config.extra["frames"] = data.num_frames
        trained.save(out)
    return trained


def check_out_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Refuse to start a new run in a non-empty ``out_dir``; returns the old run's files (``RUN_FILES``) that
    ``overwrite`` deletes. ``resume`` with a ``checkpoint.pt`` there continues that run."""
    return _check_out_dir(out_dir, resume, overwrite, RUN_FILES)


RESUME_MAY_CHANGE = ("steps", "ckpt_every")


def _check_trained_on(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse to resume a run made for another model or other data, naming both (a checkpoint of an older
    learnpruner, which recorded neither, resumes as before)."""
    if saved is None:
        return
    for what, keys in (("model", ("model", "fingerprint")), ("data", ("data", "sha256", "seed"))):
        if any(saved.get(k) != now.get(k) for k in keys):
            there, here = (", ".join(f"{k}={d.get(k)}" for k in keys if d.get(k) is not None) for d in (saved, now))
            raise ValueError(f"cannot resume {path}: it was trained on another {what} ({there}), this run "
                             f"has {here}; resume with the checkpoint's {what} or use another --out")


def _check_resume_config(saved: dict, now: dict, path: Path) -> None:
    """Resuming continues exactly, so only ``RESUME_MAY_CHANGE`` may differ from the checkpoint's run."""
    diff = {k: (saved[k], now.get(k)) for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path} with different settings ({shown}); "
                         "use the checkpoint's settings or another --out")


def hard_keep_mask(keep_prob: torch.Tensor, rho: float | list[float], mask: str = "threshold",
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass's 0/1 keep mask ``[b, n]``: ``p > 0.5``, or exactly the top ``round(rho * n_i)``
    (at least 1) of each row's ``n_i`` valid entries. ``rho``: one fraction or one per row; ``valid``
    (``[b, n]`` bool, None: all) marks the real tokens of a padded table, and padding is never kept."""
    _check_mask(mask)
    valid = torch.ones_like(keep_prob, dtype=torch.bool) if valid is None else valid.bool()
    if mask == "threshold":
        return ((keep_prob > 0.5) & valid).to(keep_prob.dtype)
    count = valid.sum(dim=-1)
    k = (torch.as_tensor(rho, dtype=torch.float64, device=keep_prob.device) * count).round().clamp_min(1)
    order = keep_prob.detach().masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(keep_prob.shape[-1], device=keep_prob.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return ((rank < k[..., None]) & valid).to(keep_prob.dtype)


def _check_mask(mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; accepted: {', '.join(MASKS)}")


def _feature_table(visual: VisualFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's feature rows as one ``[num_images, width, d]`` table (zero-padded) and its validity mask."""
    feats = visual.features
    if isinstance(feats, torch.Tensor):
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    table = nn.utils.rnn.pad_sequence(list(feats), batch_first=True)
    counts = torch.tensor(visual.counts(), device=table.device)
    return table, torch.arange(table.shape[1], device=table.device)[None] < counts[:, None]


@torch.no_grad()
def rotary_positions(ad: Adapter, batch: dict) -> dict:
    """``{"position_ids": ...}`` for families whose rotary positions depend on the images (Qwen2.5-VL's 3-D
    M-RoPE, computed on the prompt with the model's own rules), else ``{}`` (the model's default positions):
    the forwards below take embeddings, from which such a model cannot recover them."""
    input_ids = batch["input_ids"]
    text = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    visual = {k: batch[k] for k in ad.visual_inputs if k in batch}
    rope = ad.rope_positions(input_ids, batch.get("attention_mask"), text, visual, None)
    return {"position_ids": rope} if rope.dim() == 3 else {}


def prompt_embeddings(model, ad: Adapter, batch: dict) -> tuple[torch.Tensor, VisualFeatures, Layout]:
    """The unpruned LLM input of a batch through the adapter: text embeddings, every image's projected rows at
    its placeholders, structure (LLaVA-NeXT's row newlines) filled with the adapter's embedding. Returns
    ``(embeds, visual, layout)``."""
    input_ids = batch["input_ids"]
    inputs = {k: batch[k].to(model.dtype) if batch[k].is_floating_point() else batch[k]
              for k in ad.visual_inputs if k in batch}
    visual = ad.encode(inputs.pop("pixel_values", None), input_ids=input_ids, **inputs)
    layout = Layout.build(ad.placeholders(input_ids), visual)
    embeds = model.get_input_embeddings()(input_ids)
    if isinstance(visual.features, torch.Tensor):
        proj = ad.project(visual.features).flatten(0, 1)
    else:
        proj = torch.cat([ad.project(f) for f in visual.features])
    offsets = torch.tensor([0, *visual.counts()], device=embeds.device).cumsum(0)
    token = layout.vis >= 0
    embeds[token] = proj.to(embeds)[offsets[layout.img[token]] + layout.vis[token]]
    structure = layout.vis == STRUCTURE
    if visual.structure is not None and bool(structure.any()):
        embeds = torch.where(structure[..., None], visual.structure.to(embeds), embeds)
    return embeds, visual, layout


def step_loss(model, ad, lpm, batch: dict, rho: float | Callable[[int], float | None], cfg: TrainConfig,
              teacher_impl: str = "sdpa"):
    """The training loss for one batch (the model must use the gated attention): ``(loss, parts)``.

    ``rho``: the target kept fraction of every image, or a function of an image's token count giving its
    target (None: that image keeps every token, as at inference, and is not gated). ``parts`` holds ``ce``,
    ``ratio``, ``kl``, ``kept`` (hard kept fraction, mean over the gated images), ``target`` (their mean
    target), and the per-image tables ``keep_prob`` ``[num_images, width]`` with ``valid`` (real tokens).
    """
    embeds, visual, layout = prompt_embeddings(model, ad, batch)
    positions = rotary_positions(ad, batch)
    teacher = None
    if cfg.distill_weight > 0:
        with torch.no_grad():
            model.set_attn_implementation({"text_config": teacher_impl})
            teacher = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False,
                            **positions).logits
            model.set_attn_implementation({"text_config": GATED_ATTENTION})
    feats, valid = _feature_table(visual)
    counts = valid.sum(dim=1)
    targets = [rho(n) if callable(rho) else rho for n in visual.counts()]
    gated = torch.tensor([t is not None for t in targets], device=feats.device)
    fractions = [1.0 if t is None else t for t in targets]
    target = torch.tensor(fractions, device=feats.device)
    keep_prob = lpm(feats)  # [num_images, width]
    hard = torch.where(gated[:, None], hard_keep_mask(keep_prob, fractions, cfg.mask, valid), valid.to(keep_prob))
    # straight-through: hard forward, soft gradient; images not pruned at inference keep a constant gate of 1
    gate_vis = torch.where(gated[:, None], hard + keep_prob - keep_prob.detach(), hard)
    token = layout.vis >= 0
    gate = torch.ones(token.shape, dtype=gate_vis.dtype, device=gate_vis.device)
    gate = gate.masked_scatter(token, gate_vis[layout.img[token], layout.vis[token]])
    stage2 = _stage2_gate(gate, rho, layout, visual, batch) if cfg.stage2 else None
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                learnpruner_gate=stage2 if stage2 is not None else gate, use_cache=False, **positions)
    kept_frac = (gate_vis * valid).sum(dim=1) / counts  # per image, through the STE
    zero = torch.zeros((), device=out.loss.device)
    ratio = ((kept_frac - target) ** 2)[gated].mean() if bool(gated.any()) else zero
    loss = out.loss + cfg.ratio_weight * ratio
    kl = zero
    if teacher is not None:
        answer = batch["labels"][:, 1:] != -100
        s_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)[answer]
        t_logp = torch.log_softmax(teacher[:, :-1].float(), dim=-1)[answer]
        kl = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        loss = loss + cfg.distill_weight * kl
    hard_frac = (hard * valid).sum(dim=1) / counts
    kept = hard_frac[gated].mean() if bool(gated.any()) else hard_frac.mean()
    parts = {"ce": out.loss.detach(), "ratio": ratio.detach(), "kl": kl.detach(), "kept": kept.detach(),
             "target": target[gated].mean() if bool(gated.any()) else target.mean(),
             "keep_prob": keep_prob, "valid": valid, "hard": hard.detach()}
    if stage2 is not None:
        parts["stage2_chosen"] = stage2.chosen
    return loss, parts


def _stage2_gate(gate, targets, layout: Layout, visual: VisualFeatures, batch: dict) -> Stage2Gate | None:
    """The :class:`Stage2Gate` of a batch: each image's stage-2 layer and ``r2`` from the per-count
    ``targets``; the instruction rows are the prompt's (before the first answer token), as at inference."""
    from .engine.readout import query_rows

    if not isinstance(targets, _Targets):
        raise ValueError("stage2=True needs the per-count training targets (a _Targets), not a fixed fraction")
    counts = visual.counts()
    drops = [targets.drop(n) for n in counts]
    layers = {d[0] for d in drops if d is not None}
    if not layers:
        return None
    if len(layers) > 1:
        raise ValueError(f"images of one batch drop at different LLM layers {sorted(layers)}")
    r2 = [n if d is None else d[1] for n, d in zip(counts, drops)]
    labels = batch["labels"]
    ar = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    first_answer = torch.where(labels != -100, ar, labels.shape[1]).amin(dim=1, keepdim=True)
    prompt = batch["attention_mask"].bool() & (ar < first_answer)
    qidx, qvalid = query_rows(layout.vis, prompt, "text")
    return Stage2Gate(gate, layers.pop(), layout.vis, layout.img, r2, counts, qidx, qvalid)


def _order(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(length)


def _save_checkpoint(path: Path, lpm: nn.Module, opt, scheduler, step, pos, history, data, cfg) -> None:
    state = {"lpm": lpm.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "step": step,
             "pos": pos, "history": history, "skipped": dict(data.skipped), "bad": sorted(data._bad),
             "rng": rng_state(), "config": asdict(cfg), "trained_on": lpm.config.extra.get("trained_on")}
    atomic_torch_save(state, path)


def iter_history(out_dir: str | os.PathLike) -> Iterator[dict]:
    """The per-step records of a run's checkpoint (loss, ce, kept, kl, lr)."""
    yield from read_checkpoint(Path(out_dir) / "checkpoint.pt", ("history",))["history"]
