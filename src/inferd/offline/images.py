"""Image files to an image input tensor, for ``inferd batch`` on a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.errors import InvalidArgument
from inferd.types import TensorSpec


def decode_images(spec: TensorSpec, files: tuple[Path, ...]) -> tuple[np.ndarray, dict[int, str]]:
    """Decode, convert and resize images to an input of shape [-1, H, W], [-1, H, W, C] or
    [-1, C, H, W] (C in 1, 3, 4); float inputs get values scaled to [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    shape = spec.shape or ()
    if len(shape) not in (3, 4) or any(d < 1 for d in shape[1:]):
        raise InvalidArgument(f"input {spec.name!r} ({spec.describe()}) does not take fixed-size images")
    channels_first = len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4)
    height, width = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    channels = 1 if len(shape) == 3 else (shape[1] if channels_first else shape[3])
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    out = np.zeros((len(files), *shape[1:]), dtype=spec.dtype)
    bad: dict[int, str] = {}
    for row, path in enumerate(files):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert(mode).resize((width, height)))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad[row] = f"cannot decode image: {exc}"
            continue
        pixels = pixels.reshape(height, width, channels)
        if channels_first:
            pixels = pixels.transpose(2, 0, 1)
        value = pixels / 255.0 if spec.dtype.kind == "f" else pixels
        out[row] = value.reshape(shape[1:])
    return out, bad
