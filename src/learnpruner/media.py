"""Reading images as transformers' own loader does, and placing an image or video in a user turn.

``read_image`` is the one place the package opens an image file: EXIF orientation applied (as
``transformers.image_utils.load_image`` does), 16-bit and 32-bit greyscale scaled to 8 bits (not clipped to
white), and every failure, a decompression bomb included, one ``ValueError`` naming the file.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["read_image", "TAGS", "turn_content"]

TAGS = {"image": "<image>", "video": "<video>"}  # the placeholders of LLaVA-format data


def _to_8bit(im):
    """An RGB copy of a greyscale image of more than 8 bits (``I;16*``, ``I``, ``F``), scaled, not clipped."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        top = 65535.0
    elif im.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    else:  # "I": 32-bit integers, as PIL opens 16-bit PNGs; 8-bit content stays as it is
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
    grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def read_image(path: str | os.PathLike):
    """The image file at ``path`` as an RGB ``PIL.Image``, upright (EXIF orientation applied).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything PIL cannot
    read safely (a damaged file, a format it does not know, a decompression bomb above PIL's pixel limit)."""
    from PIL import Image, ImageOps

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot read image {path!r}: no such file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode.startswith("I") or im.mode == "F":
                return _to_8bit(im)
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def turn_content(text: str, kind: str = "image", tag: str | None = None) -> list[dict]:
    """The chat-template content of one user turn holding one ``kind`` ("image" or "video") and ``text``.

    LLaVA-format data marks where the media goes with a tag (``<image>``, ``<video>``; ``tag`` overrides it):
    the media is placed there, with the text before and after it. Without a tag the media comes first."""
    tag = tag or TAGS[kind]
    before, found, after = text.partition(tag)
    if not found:
        before, after = "", text
    content = [{"type": "text", "text": before.strip()}] if before.strip() else []
    content.append({"type": kind})
    if after.strip():
        content.append({"type": "text", "text": after.strip()})
    return content
