"""Reading images: every mode PIL opens becomes the 8-bit RGB image a processor expects."""

from __future__ import annotations

import numpy as np
from PIL import Image

from learnpruner.media import read_image


def test_32_bit_integer_and_float_images_keep_their_greys(tmp_path):
    """Mode "I" (32-bit integers, 8-bit content) and mode "F" (floats in [0, 1]) read as the same greys."""
    ints = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I")
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    for name, im in (("i.tif", ints), ("f.tif", floats)):
        im.save(tmp_path / name)
        got = np.asarray(read_image(tmp_path / name))
        assert got.shape == (1, 3, 3)
        assert got[0, :, 0].tolist() == [0, 128, 255], name
