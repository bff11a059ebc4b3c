"""ShapesVQA's vocabulary and records: image and patch geometry, shapes, colours, question types, the bitmap
font, and the dataclasses of a scene (objects, text boxes) and of a VQA item."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
PLURALS = {s: (s + "es" if s.endswith(("s", "x")) else s + "s") for s in SHAPES}
COLORS = {
    "red": (225, 35, 35),
    "green": (40, 185, 50),
    "blue": (40, 85, 235),
    "yellow": (245, 225, 35),
    "purple": (155, 55, 210),
    "orange": (255, 140, 10),
    "white": (250, 250, 250),
}
COLOR_NAMES = tuple(COLORS)
SIZES = (24, 34, 44)  # bounding-box side in pixels
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QTYPES = ("color", "shape", "count", "exist", "position", "read")
KINDS = ("background", "object", "text")
BOX_SIZE = 30
MIN_OBJECTS, MAX_OBJECTS = 3, 8
SPLIT_TAGS = {"train": 0, "val": 1, "test": 2, "test-large": 3, "val-large": 4}
# test-large: 6000 items, so that a cell's 95% interval at 80% accuracy is about +-1 point (1.96 sqrt(.16 / n))
SPLIT_SIZES = {"val": 500, "test": 1200, "test-large": 6000, "val-large": 3000}
MAX_COUNT = 4  # counting questions are only asked when the answer is at most this
MIN_SEPARATION = 24  # px between centres for a left/above relation to count as unambiguous

# A tiny 5x7 bitmap font, so text rendering needs no font file and is identical everywhere.
_FONT_ROWS = {
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ####", "#    ", "#    ", "#    ", "#    ", "#    ", " ####"),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#### ", "    #", "    #", " ### ", "    #", "    #", "#### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "    #", " ### "),
}
CHARS = tuple(_FONT_ROWS)

QUESTION_TEMPLATES = {
    "color": "what color is the {shape}?",
    "shape": "what shape is the {color} object?",
    "count": "how many {plural} are there?",
    "exist": "is there a {color} {shape}?",
    "position": "is the {color} {shape} {relation} the {color2} {shape2}?",
    "read": "what is written in the box?",
}
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class SceneObject:
    """A shape instance: centre (x, y) in pixels, bounding-box side ``size``."""

    shape: str
    color: str
    size: int
    x: int
    y: int


@dataclass
class TextBox:
    """A small box with a single character drawn in it; centre (x, y)."""

    char: str
    x: int
    y: int
    size: int = BOX_SIZE


@dataclass
class Scene:
    """A rendered scene with its metadata and 24x24 per-patch labels."""

    image: Image.Image
    objects: list[SceneObject]
    boxes: list[TextBox]
    labels: dict[str, np.ndarray]


@dataclass
class VQAItem:
    """One ShapesVQA example. ``qas`` holds every (question, answer, qtype) asked about the image; the
    first one is also exposed as ``question``/``answer``/``qtype``."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[dict]
    boxes: list[dict]
    labels: dict[str, np.ndarray]
    index: int = 0
    split: str = "train"
    qas: list[tuple[str, str, str]] = field(default_factory=list)
