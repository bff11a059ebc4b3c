"""Training data: records (JSONL in the LLaVA format, or ShapesVQA), their chat prompts through the processor's
template, tokenized and collated; batches in a seeded, resumable order."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import Adapter
from ..media import read_image, turn_content
from .config import TrainConfig

logger = logging.getLogger("learnpruner.training")


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


class JsonlRecords(_Records):
    """Instruction data in the LLaVA conversation format, for every family: a JSON list or JSONL of
    ``{"image" | "video", "conversations"}`` records.

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
        from ..video import read_frames

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
    """The ShapesVQA training stream as examples (one question per image); ``split`` another ShapesVQA split (``val``,
    ``val-large``: validation records for a training run's curve), whose fixed items ignore ``seed``."""

    def __init__(self, seed: int = 0, split: str = "train"):
        super().__init__()
        from ..testbed.shapes import SPLIT_SIZES

        if split != "train" and split not in SPLIT_SIZES:
            raise ValueError(f"ShapesVQA has no split {split!r}; accepted: train, {', '.join(SPLIT_SIZES)}")
        self.seed, self.split = (seed, split) if split == "train" else (0, split)
        self.identity = {"data": "shapesvqa", "seed": seed} if split == "train" else {"data": f"shapesvqa:{split}"}
        self._len = 10**9 if split == "train" else SPLIT_SIZES[split]

    def __len__(self) -> int:
        return self._len

    def get(self, index: int) -> Example:
        from ..testbed.shapes import generate_item

        item = generate_item(self.split, index, seed=self.seed)
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
    where = _align(full, collapsed, where, placeholder)
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


def _align(full: list[int], collapsed: list[int], where: list[int], placeholder: list[bool]) -> list[int]:
    """For each of the tokenizer's ids (``full``), its position in the processor's ids. ``collapsed``: the
    processor's ids with each placeholder run collapsed to one, ``where`` their positions. The processor may write
    text of its own right around an item's placeholders (InternVL's ``<img>`` ... ``</img>``): those ids are
    skipped (prompt, never labels); any other difference raises :class:`SkipRecord`."""
    out, i = [], 0
    for t, w in zip(collapsed, where):
        if i < len(full) and full[i] == t:
            out.append(w)
            i += 1
        elif not ((w > 0 and placeholder[w - 1]) or (w + 1 < len(placeholder) and placeholder[w + 1])):
            raise SkipRecord("tokenizer and processor disagree")
    if i != len(full):
        raise SkipRecord("tokenizer and processor disagree")
    return out


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
        self.order = _order(len(data), cfg.seed) if isinstance(data, JsonlRecords) else None
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


def _order(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(length)
