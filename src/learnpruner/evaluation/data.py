"""Evaluation data: items (ShapesVQA splits or a JSONL of records), their fingerprints, and exact-match scoring."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvalItem:
    id: str
    image: object  # PIL image, or a path opened lazily (an image file, or a video file when ``kind="video"``)
    question: str
    answers: list[str]
    qtype: str = "all"
    extra: dict = field(default_factory=dict)
    kind: str = "image"  # "image" or "video"

    def frames(self, num_frames: int = 8):
        """A video item's frames, sampled uniformly (``[T, H, W, 3]``)."""
        from ..video import read_frames

        try:
            return read_frames(self.image, num_frames)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.where()}: {e}") from None

    def pil(self):
        """The item's image, RGB and upright (read by :func:`learnpruner.media.read_image`)."""
        from ..media import read_image

        if isinstance(self.image, (str, os.PathLike)):
            try:
                return read_image(self.image)
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.where()}: {e}") from None
        return self.image

    def where(self) -> str:
        """``FILE:LINE: item 'ID'`` (the line when the item came from a JSONL), for error messages."""
        line = self.extra.get("line")
        return f"{line}: item {self.id!r}" if line else f"item {self.id!r}"

    def fingerprint(self) -> str:
        """A hash of the item: id, question, answers, qtype, kind and the image or video (its pixels, or the
        bytes of its file: another file of the same name and size is other data)."""
        h = hashlib.sha256(json.dumps([self.id, self.question, list(self.answers), self.qtype]).encode())
        if self.kind != "image":
            h.update(self.kind.encode())
        if isinstance(self.image, (str, os.PathLike)):
            try:
                h.update(_file_digest(self.image).encode())
            except OSError:
                raise FileNotFoundError(f"{self.where()}: no {self.kind} at {os.fspath(self.image)}") from None
        else:
            h.update(f"{self.image.mode} {self.image.size}".encode())
            h.update(self.image.tobytes())
        return h.hexdigest()[:16]


def _file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (bounded memory for a large video)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match of the normalized prediction with any normalized answer."""
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def load_items(data: str, limit: int | None = None) -> list[EvalItem]:
    """``shapesvqa`` (its fixed test split; ``shapesvqa:SPLIT`` for ``val``, ``test`` or ``test-large``) or a JSONL
    of ``{image|video, question, answer|answers[, id, qtype]}``.

    Image and video paths are relative to the JSONL file's folder and must exist; ``answers`` is a list or
    one string; ``id`` defaults to the line number and must be unique; an empty file is refused.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    if data == "shapesvqa" or data.startswith("shapesvqa:"):
        from ..testbed.shapes import SPLIT_SIZES, load_split

        split = data.partition(":")[2] or "test"
        if split not in SPLIT_SIZES:
            raise ValueError(f"--data {data!r}: ShapesVQA has no split {split!r}; accepted: "
                             f"{', '.join('shapesvqa:' + s for s in SPLIT_SIZES)} ('shapesvqa' is shapesvqa:test)")
        return [EvalItem(f"{split}-{it.index}", it.image, it.question, [it.answer], it.qtype)
                for it in load_split(split, limit)]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no data at {data!r}: pass 'shapesvqa' (its test split; shapesvqa:test-large, "
                                "shapesvqa:val) or a JSONL file of LLaVA-style records")
    items: list[EvalItem] = []
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{data}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                             "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError(f"a record is a JSON object, got {type(rec).__name__}")
            answers = rec["answers"] if "answers" in rec else [rec["answer"]]
            if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
                answers = [answers]  # one answer, not a sequence of characters
            if not isinstance(answers, list) or any(
                    isinstance(a, bool) or not isinstance(a, (str, int, float)) for a in answers):
                bad = answers if not isinstance(answers, list) else next(
                    a for a in answers if isinstance(a, bool) or not isinstance(a, (str, int, float)))
                raise ValueError(f"{data}:{lineno}: answer {json.dumps(bad)} is not a text or a number; give the "
                                 "accepted answer (or a list of them) as text")
            if "video" in rec and "image" in rec:
                raise ValueError(f"{data}:{lineno}: the record has both image ({rec['image']!r}) and video "
                                 f"({rec['video']!r}); a record holds one of them")
            kind = "video" if "video" in rec else "image"
            item = EvalItem(str(rec.get("id", lineno)), path.parent / rec[kind], rec["question"],
                            [str(a) for a in answers], str(rec.get("qtype", "all")),
                            extra={"line": f"{data}:{lineno}", "image": rec[kind]}, kind=kind)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{data}:{lineno}: bad record ({e!r}); expected image (or video), question and answer or answers"
            ) from None
        if not isinstance(rec.get("question"), str):
            raise ValueError(f"{data}:{lineno}: question {json.dumps(rec.get('question'))} is not a text")
        if not item.answers:
            raise ValueError(f"{item.where()}: answers is empty; give at least one accepted answer")
        if item.id in lines:
            raise ValueError(f"{data}: id {item.id!r} appears on lines {lines[item.id]} and {lineno}; ids must be "
                             "unique (a record without an id is named by its line number)")
        lines[item.id] = lineno
        if not item.image.is_file():
            raise FileNotFoundError(f"{item.where()}: no {item.kind} at {item.image}")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{data} holds no records; expected one JSON object per line with image, question and "
                         "answer or answers")
    return items
