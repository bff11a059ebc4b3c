"""ShapesVQA: a deterministic synthetic VQA dataset of small shapes and characters on cluttered backgrounds.

Every item is generated from an integer seed (no files needed). Images are 336x336 RGB; the answer to each
templated question depends on one or two small objects, so most of the 24x24 patch grid is uninformative
background. Per-patch ground truth (object kind, colour, shape, character, object centre) comes with each scene.
Object centres sit on patch centres and text boxes on patch corners (the 14 px lattice), which makes the tiny
vision tower learnable from scratch on CPU; ``render_scene`` itself accepts any coordinates.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import (
    _FONT_ROWS,
    BOX_SIZE,
    CHARS,
    COLOR_NAMES,
    COLORS,
    GRID,
    IMAGE_SIZE,
    MAX_COUNT,
    MAX_OBJECTS,
    MIN_OBJECTS,
    MIN_SEPARATION,
    NUMBER_WORDS,
    PATCH,
    PLURALS,
    QTYPES,
    QUESTION_TEMPLATES,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLIT_SIZES,
    SPLIT_TAGS,
    Scene,
    SceneObject,
    TextBox,
    VQAItem,
)

# ----------------------------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, x: float, y: float, size: float) -> list[tuple[float, float]] | None:
    r = size / 2.0
    if shape == "square":
        r *= 0.85
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    if shape == "hexagon":
        return [(x + r * np.cos(a), y + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((x + rad * np.cos(a), y + rad * np.sin(a)))
        return pts
    if shape == "cross":
        t = r / 3.0
        return [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
                (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)]
    return None  # circle


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    poly = _shape_polygon(obj.shape, obj.x, obj.y, obj.size)
    if poly is None:
        r = obj.size / 2.0
        draw.ellipse([obj.x - r, obj.y - r, obj.x + r, obj.y + r], fill=fill)
    else:
        draw.polygon([(round(px), round(py)) for px, py in poly], fill=fill)


def _draw_box(draw: ImageDraw.ImageDraw, box: TextBox, fill, border, ink) -> None:
    h = box.size // 2
    x0, y0 = box.x - h, box.y - h
    draw.rectangle([x0, y0, x0 + box.size - 1, y0 + box.size - 1], fill=border)
    draw.rectangle([x0 + 2, y0 + 2, x0 + box.size - 3, y0 + box.size - 3], fill=fill)
    rows = _FONT_ROWS[box.char]
    s = 3  # 5x7 glyph scaled to 15x21
    gx, gy = box.x - (5 * s) // 2, box.y - (7 * s) // 2
    for j, row in enumerate(rows):
        for i, c in enumerate(row):
            if c == "#":
                draw.rectangle([gx + i * s, gy + j * s, gx + i * s + s - 1, gy + j * s + s - 1], fill=ink)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation, mid/low-brightness colour."""
    grey = rng.uniform(55, 150)
    tint = rng.normal(0, 1, 3)
    tint = tint / (np.linalg.norm(tint) + 1e-6) * rng.uniform(5, 30)
    return np.clip(grey + tint, 0, 255)


def _background(rng: np.random.Generator) -> Image.Image:
    n = IMAGE_SIZE
    img = np.empty((n, n, 3), np.float32)
    img[:] = _muted(rng)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if rng.random() < 0.7:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(8, 40)
        amp = rng.uniform(4, 16)
        wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        img += (amp * wave)[..., None] * (rng.uniform(0.6, 1.0, 3)[None, None])
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    layer = Image.new("RGB", (n, n), (0, 0, 0))
    mask = Image.new("L", (n, n), 0)
    d, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(3, 9))):  # blotches
        cx, cy = rng.uniform(0, n, 2)
        rx, ry = rng.uniform(15, 80, 2)
        col = tuple(int(v) for v in _muted(rng))
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        dm.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(90, 200)))
    mask = mask.filter(ImageFilter.GaussianBlur(6))
    base = Image.composite(layer.filter(ImageFilter.GaussianBlur(3)), base, mask)
    d = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 14))):  # clutter: thin muted lines
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, n, 4))
        d.line([x0, y0, x1, y1], fill=tuple(int(v) for v in _muted(rng)), width=int(rng.integers(1, 3)))
    arr = np.asarray(base).astype(np.float32)
    arr += rng.normal(0, rng.uniform(4, 14), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _patch_labels(objects: Sequence[SceneObject], boxes: Sequence[TextBox]) -> dict[str, np.ndarray]:
    ids = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(ids)
    for i, o in enumerate(objects):
        _draw_shape(d, o, i + 1)
    for j, b in enumerate(boxes):
        h = b.size // 2
        d.rectangle([b.x - h, b.y - h, b.x - h + b.size - 1, b.y - h + b.size - 1], fill=len(objects) + j + 1)
    arr = np.asarray(ids).reshape(GRID, PATCH, GRID, PATCH)
    n_ids = len(objects) + len(boxes)
    counts = np.stack([(arr == k).sum(axis=(1, 3)) for k in range(1, n_ids + 1)]) if n_ids else None
    labels = {k: np.zeros((GRID, GRID), np.int64) for k in ("kind", "color", "shape", "char", "center", "id")}
    if counts is None:
        return labels
    best = counts.argmax(0)
    present = counts.max(0) >= 20  # at least ~10% of the patch's 196 pixels
    for k in range(n_ids):
        m = present & (best == k)
        labels["id"][m] = k + 1
        if k < len(objects):
            o = objects[k]
            labels["kind"][m] = 1
            labels["color"][m] = COLOR_NAMES.index(o.color) + 1
            labels["shape"][m] = SHAPES.index(o.shape) + 1
        else:
            labels["kind"][m] = 2
            labels["char"][m] = CHARS.index(boxes[k - len(objects)].char) + 1
    for o in objects:
        labels["center"][min(o.y // PATCH, GRID - 1), min(o.x // PATCH, GRID - 1)] = 1
    return labels


def render_scene(objects: Sequence[SceneObject], boxes: Sequence[TextBox] = (), seed: int = 0) -> Scene:
    """Render objects and text boxes on a background drawn from ``seed``; returns image and patch labels."""
    rng = np.random.default_rng(seed)
    img = _background(rng)
    d = ImageDraw.Draw(img)
    for o in objects:
        base = np.asarray(COLORS[o.color], np.float32)
        col = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
        _draw_shape(d, o, col)
    for b in boxes:
        fill = tuple(int(v) for v in rng.integers(215, 240, 3))
        _draw_box(d, b, fill=fill, border=(25, 25, 25), ink=(15, 15, 15))
    return Scene(img, list(objects), list(boxes), _patch_labels(objects, boxes))


# -------------------------------------------------------------------------------------------- scene placement


def _place(rng: np.random.Generator, sizes: Sequence[int], offsets: Sequence[int], margin: int = 4,
           tries: int = 200):
    """Random non-overlapping centres (bounding boxes separated by ``margin``) for items of given sizes.
    Centres lie on the patch lattice: ``x = 14 * k + offset`` (objects use the patch centre, offset 7;
    text boxes a patch corner, offset 0), so a given shape always meets the patch grid the same way."""
    placed: list[tuple[int, int, int]] = []
    for s, off in zip(sizes, offsets):
        h = s / 2 + 2
        lo, hi = int(np.ceil((h - off) / PATCH)), int(np.floor((IMAGE_SIZE - h - off) / PATCH))
        for _ in range(tries):
            x, y = (PATCH * int(k) + off for k in rng.integers(lo, hi + 1, 2))
            if all(abs(x - px) * 2 >= s + ps + 2 * margin or abs(y - py) * 2 >= s + ps + 2 * margin
                   for px, py, ps in placed):
                placed.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def random_scene(rng: np.random.Generator, n_objects: int, n_boxes: int = 1):
    """Sample object attributes and non-overlapping positions. Shapes/colours come from a per-scene
    palette so that repeats (for counting) and unique ones (for referring) both occur."""
    shape_pal = rng.choice(len(SHAPES), size=int(rng.integers(2, 6)), replace=False)
    color_pal = rng.choice(len(COLOR_NAMES), size=int(rng.integers(3, 7)), replace=False)
    attrs = [(SHAPES[int(rng.choice(shape_pal))], COLOR_NAMES[int(rng.choice(color_pal))],
              int(rng.choice(SIZES))) for _ in range(n_objects)]
    chars = [CHARS[int(rng.integers(len(CHARS)))] for _ in range(n_boxes)]
    while True:
        pos = _place(rng, [a[2] for a in attrs] + [BOX_SIZE] * n_boxes, [PATCH // 2] * n_objects + [0] * n_boxes)
        if pos is not None:
            break
    objects = [SceneObject(s, c, z, x, y) for (s, c, z), (x, y) in zip(attrs, pos[:n_objects])]
    boxes = [TextBox(ch, x, y) for ch, (x, y) in zip(chars, pos[n_objects:])]
    return objects, boxes


# ------------------------------------------------------------------------------------------ question logic


def answer_question(question: str, objects: Sequence[SceneObject], boxes: Sequence[TextBox] = ()) -> str:
    """Compute the answer of a templated question from scene metadata. Raises ValueError if the question
    does not match a template or is ambiguous (referred object not unique, relation too close to call)."""
    q = question.strip().lower()
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        hits = [o for o in objects if o.shape == m[1]]
        if len(hits) != 1:
            raise ValueError(f"ambiguous: {len(hits)} {m[1]}")
        return hits[0].color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        hits = [o for o in objects if o.color == m[1]]
        if len(hits) != 1:
            raise ValueError(f"ambiguous: {len(hits)} {m[1]} objects")
        return hits[0].shape
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        shape = {v: k for k, v in PLURALS.items()}[m[1]]
        return NUMBER_WORDS[sum(o.shape == shape for o in objects)]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q):
        a = [o for o in objects if o.color == m[1] and o.shape == m[2]]
        b = [o for o in objects if o.color == m[4] and o.shape == m[5]]
        if len(a) != 1 or len(b) != 1 or a[0] is b[0]:
            raise ValueError("ambiguous position reference")
        dx, dy = b[0].x - a[0].x, b[0].y - a[0].y  # > 0: a is left of / above b
        d = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[m[3]]
        if abs(d) < MIN_SEPARATION:
            raise ValueError("relation too close to call")
        return "yes" if d > 0 else "no"
    if q == "what is written in the box?":
        if len(boxes) != 1:
            raise ValueError("needs exactly one box")
        return boxes[0].char.lower()
    raise ValueError(f"unknown question: {question!r}")


def make_question(qtype: str, objects: Sequence[SceneObject], boxes: Sequence[TextBox],
                  rng: np.random.Generator) -> tuple[str, str] | None:
    """Sample an unambiguous question of ``qtype`` about the scene; None if the scene does not allow one.
    Yes/no questions draw the answer first (50/50) so they are balanced."""
    t = QUESTION_TEMPLATES[qtype]
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    if qtype == "color":
        cands = [o for o in objects if shapes.count(o.shape) == 1]
        if not cands:
            return None
        q = t.format(shape=cands[int(rng.integers(len(cands)))].shape)
    elif qtype == "shape":
        cands = [o for o in objects if colors.count(o.color) == 1]
        if not cands:
            return None
        q = t.format(color=cands[int(rng.integers(len(cands)))].color)
    elif qtype == "count":
        present = [s for s in sorted(set(shapes), key=SHAPES.index) if shapes.count(s) <= MAX_COUNT]
        absent = [s for s in SHAPES if s not in shapes]
        if not present:
            return None
        pool = absent if (rng.random() < 0.2 and absent) else present
        q = t.format(plural=PLURALS[pool[int(rng.integers(len(pool)))]])
    elif qtype == "exist":
        combos = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            c, s = sorted(combos)[int(rng.integers(len(combos)))]
        else:  # a distractor: colour and shape both in the scene but never together, when possible
            neg = [(c, s) for c in sorted(set(colors)) for s in sorted(set(shapes)) if (c, s) not in combos]
            if not neg:
                neg = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in combos]
            c, s = neg[int(rng.integers(len(neg)))]
        q = t.format(color=c, shape=s)
    elif qtype == "position":
        combos = [(o.color, o.shape) for o in objects]
        uniq = [o for o in objects if combos.count((o.color, o.shape)) == 1]
        want = "yes" if rng.random() < 0.5 else "no"
        pairs = []
        for i, a in enumerate(uniq):
            for b in uniq[i + 1:]:
                for rel in RELATIONS:
                    for p, r in ((a, b), (b, a)):
                        qq = t.format(color=p.color, shape=p.shape, relation=rel, color2=r.color, shape2=r.shape)
                        try:
                            if answer_question(qq, objects, boxes) == want:
                                pairs.append(qq)
                        except ValueError:
                            pass
        if not pairs:
            return None
        q = pairs[int(rng.integers(len(pairs)))]
    elif qtype == "read":
        if len(boxes) != 1:
            return None
        q = t
    else:
        raise ValueError(qtype)
    return q, answer_question(q, objects, boxes)


def relevant_objects(question: str, objects: Sequence[SceneObject], boxes: Sequence[TextBox] = ()) -> list[int]:
    """Indices (objects first, then boxes, as in ``labels["id"] - 1``) of the items a templated question's
    answer depends on: the referred object(s), every instance counted, both sides of a relation, the box.
    Empty when nothing in the scene matches (a "no" existence question, a count of zero)."""
    q = question.strip().lower()
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return [i for i, o in enumerate(objects) if o.shape == m[1]]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        return [i for i, o in enumerate(objects) if o.color == m[1]]
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        shape = {v: k for k, v in PLURALS.items()}[m[1]]
        return [i for i, o in enumerate(objects) if o.shape == shape]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        return [i for i, o in enumerate(objects) if o.color == m[1] and o.shape == m[2]]
    if m := re.fullmatch(r"is the (\w+) (\w+) (?:left of|right of|above|below) the (\w+) (\w+)\?", q):
        return [i for i, o in enumerate(objects) if (o.color, o.shape) in ((m[1], m[2]), (m[3], m[4]))]
    if q == "what is written in the box?":
        return [len(objects) + j for j in range(len(boxes))]
    raise ValueError(f"unknown question: {question!r}")


def referents(question: str, objects: Sequence[SceneObject],
              boxes: Sequence[TextBox] = ()) -> list[tuple[str, list[int]]]:
    """The referring words of a templated question, in order, each with the indices (as in
    ``relevant_objects``) of what it refers to in the scene: the shape word of "what color is the circle?",
    the colour word of "what shape is the red object?", the plural of a count, the shape word of an existence
    question (its colour-and-shape matches), both shape words of a relation, "box" for reading.
    A word that matches nothing (a "no" existence question, a count of zero) is left out."""
    q = question.strip().lower()
    out: list[tuple[str, list[int]]] = []
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        out = [(m[1], [i for i, o in enumerate(objects) if o.shape == m[1]])]
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        out = [(m[1], [i for i, o in enumerate(objects) if o.color == m[1]])]
    elif m := re.fullmatch(r"how many (\w+) are there\?", q):
        shape = {v: k for k, v in PLURALS.items()}[m[1]]
        out = [(m[1], [i for i, o in enumerate(objects) if o.shape == shape])]
    elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        out = [(m[2], [i for i, o in enumerate(objects) if o.color == m[1] and o.shape == m[2]])]
    elif m := re.fullmatch(r"is the (\w+) (\w+) (?:left of|right of|above|below) the (\w+) (\w+)\?", q):
        out = [(m[2], [i for i, o in enumerate(objects) if (o.color, o.shape) == (m[1], m[2])]),
               (m[4], [i for i, o in enumerate(objects) if (o.color, o.shape) == (m[3], m[4])])]
    elif q == "what is written in the box?":
        out = [("box", [len(objects) + j for j in range(len(boxes))])]
    else:
        raise ValueError(f"unknown question: {question!r}")
    return [(w, idx) for w, idx in out if idx]


# ---------------------------------------------------------------------------------------------- datasets


def item_seed(split: str, index: int, seed: int = 0) -> int:
    """Deterministic 63-bit seed for item ``index`` of a split; splits draw from disjoint seed streams."""
    ss = np.random.SeedSequence([SPLIT_TAGS[split], seed, index])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def generate_item(split: str, index: int, seed: int = 0, qtypes: Sequence[str] | None = None,
                  max_objects: int = MAX_OBJECTS, all_questions: bool = False) -> VQAItem:
    """Generate one item. By default the question type cycles with ``index`` (balanced per qtype);
    ``qtypes`` restricts it. With ``all_questions`` every qtype the scene allows is asked (in random order)
    and stored in ``item.qas``."""
    qtypes = tuple(qtypes or QTYPES)
    s = item_seed(split, index, seed)
    rng = np.random.default_rng(s)
    max_objects = max(MIN_OBJECTS, min(MAX_OBJECTS, max_objects))
    while True:
        n = int(rng.integers(MIN_OBJECTS, max_objects + 1))
        objects, boxes = random_scene(rng, n)
        if all_questions:
            order = [qtypes[int(i)] for i in rng.permutation(len(qtypes))]
        else:
            order = [qtypes[index % len(qtypes)]]
        qas = []
        for qt in order:
            qa = make_question(qt, objects, boxes, rng)
            if qa is not None:
                qas.append((qa[0], qa[1], qt))
        if qas and (all_questions or len(qas) == len(order)):
            break
    scene = render_scene(objects, boxes, seed=int(rng.integers(2**62)))
    q, a, qt = qas[0]
    return VQAItem(scene.image, q, a, qt, [vars(o).copy() for o in objects], [vars(b).copy() for b in boxes],
                   scene.labels, index, split, qas)


def load_split(split: str, n: int | None = None) -> list[VQAItem]:
    """The fixed ``val`` (500) or ``test`` (1200) split, or its first ``n`` items. Deterministic."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLIT_SIZES))}, got {split!r}")
    if n is not None and not 0 <= n <= SPLIT_SIZES[split]:
        raise ValueError(f"the {split} split has {SPLIT_SIZES[split]} items; got n={n} (--limit): give at most "
                         f"{SPLIT_SIZES[split]}")
    n = SPLIT_SIZES[split] if n is None else n
    return [generate_item(split, i) for i in range(n)]


def train_stream(seed: int = 0, start_index: int = 0, all_questions: bool = True,
                 curriculum: Callable[[int], int] | None = None) -> Iterator[VQAItem]:
    """Infinite training stream; item ``i`` depends only on (seed, i), so it resumes from ``start_index``.
    ``curriculum(i)`` may cap the number of objects of item ``i``."""
    i = start_index
    while True:
        cap = curriculum(i) if curriculum is not None else MAX_OBJECTS
        yield generate_item("train", i, seed, max_objects=cap, all_questions=all_questions)
        i += 1


def vocabulary() -> list[str]:
    """Every word the question templates and answers can produce (lowercase, punctuation split)."""
    words: set[str] = set()
    for t in QUESTION_TEMPLATES.values():
        words.update(re.findall(r"[a-z]+|[^\sa-z{}]", re.sub(r"\{\w+\}", " ", t)))
    for r in RELATIONS:
        words.update(r.split())
    words.update(SHAPES, PLURALS.values(), COLOR_NAMES, NUMBER_WORDS, ("yes", "no"))
    words.update(c.lower() for c in CHARS)
    return sorted(words)


def to_jsonl(items: Sequence[VQAItem], out_dir: str, name: str = "data.jsonl") -> str:
    """Write PNGs under ``out_dir/images`` and a LLaVA-style jsonl with relative image paths."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        for it in items:
            rel = f"images/{it.split}_{it.index:06d}.png"
            it.image.save(os.path.join(out_dir, rel))
            f.write(json.dumps({"id": f"{it.split}-{it.index}", "image": rel, "question": it.question,
                                "answer": it.answer, "qtype": it.qtype}) + "\n")
    return path
