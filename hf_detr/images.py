"""Reading an example's image: one decoder for training and evaluation (`decode_image`), and the
check of the decoded image against the example's annotated size (`read_example_image`). Training
(`hf_detr.transforms.DetectionDataset`) and `hf_detr.evaluation.evaluate_model` skip, warn about and
count an image these reject, naming it (`describe_image`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

# What PIL raises for a file it cannot read: truncated or corrupt data, an unknown format, more pixels
# than PIL.Image.MAX_IMAGE_PIXELS allows (a decompression bomb); ValueError also for a pixel mode
# with no known range (see `decode_image`).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(image: Any) -> PIL.Image.Image:
    """An image as it is displayed, in RGB: a `datasets.Image` value (``{"bytes", "path"}``), a file
    path or a PIL image -> a fully decoded RGB `PIL.Image.Image`.

    The EXIF orientation is applied, as `datasets`' Image feature and transformers' `load_image` (and
    so `pipeline`) do, so annotations are in the frame the image is displayed in. 16-bit greyscale is
    scaled to 8 bits (PIL's own conversion clips it to white); 32-bit integer or float pixels are taken
    as they are when they lie in 0..255, else rejected. Raises one of `UNREADABLE_IMAGE_ERRORS`.
    """
    if isinstance(image, PIL.Image.Image):
        return _displayed_rgb(image)
    if isinstance(image, Mapping):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if image is None or not isinstance(image, (str, os.PathLike, io.IOBase)):
        raise ValueError(f"not an image, a path or image bytes: {type(image).__name__}")
    with PIL.Image.open(image) as opened:
        return _displayed_rgb(opened)


def displayed_size(image: Any) -> tuple[int, int]:
    """(width, height) of an image as `decode_image` gives it (EXIF orientation applied), from its header
    alone: the pixels are not decoded. Raises one of `UNREADABLE_IMAGE_ERRORS`."""
    if isinstance(image, Mapping):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    if isinstance(image, PIL.Image.Image):
        opened, close = image, False
    elif isinstance(image, (str, os.PathLike, io.IOBase)):
        opened, close = PIL.Image.open(image), True
    else:
        raise ValueError(f"not an image, a path or image bytes: {type(image).__name__}")
    try:
        width, height = opened.size
        # orientations 5-8 turn the image by 90 degrees (transposed, rotated, transversed)
        if opened.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
            width, height = height, width
        return width, height
    finally:
        if close:
            opened.close()


def _displayed_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    image.load()  # the full decode: truncated data fails here, not later
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float32) / 257  # 0..65535 -> 0..255
        image = PIL.Image.fromarray(pixels.round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        pixels = np.asarray(image)
        low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(f"{image.mode} pixels in [{low}, {high}]: no known range, convert the file to 8 or 16 bits")
        image = PIL.Image.fromarray(pixels.astype(np.uint8))
    return image.convert("RGB")


# Why an example's image was not used (`read_example_image`); 0: read.
UNREADABLE, SIZE_MISMATCH = 1, 2


def read_example_image(image: Any, width: int | None, height: int | None) -> tuple[PIL.Image.Image | None, int, str]:
    """Decode an example's image (`decode_image`) and check it against the example's ``width`` and
    ``height`` (the frame its boxes are in; None: not checked).

    -> ``(rgb_image, 0, "")``, or ``(None, UNREADABLE, why)`` for a file that cannot be read, or
    ``(None, SIZE_MISMATCH, why)`` when the decoded size differs from width x height: the boxes would
    land elsewhere than the annotator drew them, so such an image is not used either.
    """
    try:
        rgb = decode_image(image)
    except UNREADABLE_IMAGE_ERRORS as err:
        return None, UNREADABLE, f"{type(err).__name__}: {err}"
    if width is None or height is None or (rgb.width, rgb.height) == (int(width), int(height)):
        return rgb, 0, ""
    why = f"decoded size {rgb.width}x{rgb.height} differs from the annotated width x height {width}x{height}"
    if (rgb.height, rgb.width) == (int(width), int(height)):
        why += " (its EXIF orientation rotates it: boxes must be in the displayed frame)"
    return None, SIZE_MISMATCH, why


def describe_image(image: Any, image_id: Any) -> str:
    """A name for log messages: the file path when there is one, and the image id."""
    path = image.get("path") if isinstance(image, Mapping) else getattr(image, "filename", None) or None
    return f"{path} (image_id {image_id})" if path else f"image_id {image_id}"
