"""Images of any kind made into the (H, W, 3) uint8 BGR image the models take, by one rule.

The rule (docs/RELIABILITY.md, "Images"), for arrays given to
:class:`~gridclip.engine.predictor.OpenVocabularyPredictor` and files read by ``tools/demo.py``,
``tools/export.py``, the teacher-cache tools and the training/test mapper
(:class:`~gridclip.data.mapper.CheckedDatasetMapper`):

- **channels**: (H, W) and (H, W, 1) gray is repeated into 3 channels; (H, W, 2) is gray + alpha,
  (H, W, 4) is BGR + alpha (OpenCV's order; RGBA for files): the alpha channel is dropped, as
  Detectron2's ``read_image`` does for files; (H, W, 3) is BGR (RGB for files, which are
  converted). Anything else (channels first (3, H, W), 5+ channels, 1-D or 4-D arrays, an empty
  image) is refused, the message naming the shape.
- **values**: ``uint8`` as is; ``bool`` False/True -> 0/255; ``uint16`` (16-bit PNG/TIFF) scaled
  from its full range 0..65535 to 0..255; other integer types must hold values in 0..255 (taken
  as 8-bit); floating point must be finite and in [0, 1] (scaled by 255) or, when larger than 1,
  in [0, 255] (taken as 8-bit values). Anything else (negative values, NaN/inf, complex, object)
  is refused, the message naming the dtype and the range found.
- **files**: read with PIL, EXIF orientation applied; 16-bit gray (``I;16``, ``I``) and float
  (``F``) files go through the value rule above instead of PIL's 8-bit conversion, which clips
  every value above 255 to white.

Conversion works on bands of rows, so a large float image never gets a second full-size float
copy; resizing to the model's input size happens right after (Detectron2's ``ResizeShortestEdge``
on the uint8 image).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImageInputError",
    "pil_to_bgr_uint8",
    "read_image_bgr",
    "read_image_rgb",
    "to_bgr_uint8",
]

#: rows converted at a time (bounds the temporary float copies of a large image)
_ROW_BAND = 256


class ImageInputError(ValueError):
    """An image (array or file) that the models cannot take; the message names its shape/dtype."""


def _describe(image: np.ndarray) -> str:
    return f"shape {tuple(image.shape)}, dtype {image.dtype}"


def _banded(image: np.ndarray, convert) -> np.ndarray:
    out = np.empty(image.shape, np.uint8)
    for start in range(0, image.shape[0], _ROW_BAND):
        out[start : start + _ROW_BAND] = convert(image[start : start + _ROW_BAND])
    return out


def _values_to_uint8(image: np.ndarray, what: str, desc: str) -> np.ndarray:
    dtype = image.dtype
    if dtype == np.uint8:
        return image
    if dtype == np.bool_:
        return image.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        return _banded(image, lambda b: (b.astype(np.uint32) * 255 + 32767) // 65535)
    if np.issubdtype(dtype, np.integer):
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ImageInputError(
                f"{what} ({desc}): integer values must be 8-bit (0..255) for "
                f"{dtype}, found {low}..{high}; pass uint8, or uint16 for 16-bit images"
            )
        return image.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageInputError(f"{what} ({desc}): NaN or infinite pixel values")
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 255:
            raise ImageInputError(
                f"{what} ({desc}): float values must lie in [0, 1] (or [0, 255]), "
                f"found {low:g}..{high:g}"
            )
        scale = 255.0 if high <= 1.0 else 1.0
        return _banded(image, lambda b: np.rint(b.astype(np.float32) * scale))
    raise ImageInputError(
        f"{what} ({desc}): not an image dtype; pass uint8 (or uint16, bool, float " "in [0, 1])"
    )


def to_bgr_uint8(image, what: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 BGR array from any array the rule of this module accepts.

    Args:
        image: a numpy array (BGR channel order, as ``cv2.imread`` gives), see the module rule.
        what: how messages name the image (e.g. a file name).

    Raises:
        ImageInputError: naming the shape and dtype of an image that is refused.
    """
    if isinstance(image, Image.Image):
        return pil_to_bgr_uint8(image, what)
    if not isinstance(image, np.ndarray):
        raise ImageInputError(
            f"{what}: expected a numpy array (H, W, 3) BGR or a PIL image, got "
            f"{type(image).__name__}"
        )
    desc = _describe(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        hint = ""
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] > 4:
            hint = " (channels first? transpose it to (H, W, C))"
        raise ImageInputError(
            f"{what} ({desc}): expected (H, W), (H, W, 1) gray, (H, W, 2) gray + "
            f"alpha, (H, W, 3) BGR or (H, W, 4) BGRA{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageInputError(f"{what} ({desc}): the image is empty")
    channels = image.shape[2]
    if channels in (2, 4):  # drop alpha before converting values: less to convert
        image = image[:, :, : channels - 1]
    image = _values_to_uint8(image, what, desc)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def pil_to_bgr_uint8(image: Image.Image, what: str = "image") -> np.ndarray:
    """An (H, W, 3) uint8 BGR array from a PIL image (RGB order inside), by the module rule."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if image.mode == "I" and array.size and int(array.max()) > 255:
            if int(array.min()) < 0 or int(array.max()) > 65535:
                raise ImageInputError(
                    f"{what} ({_describe(array)}, PIL mode I): 32-bit values "
                    f"{int(array.min())}..{int(array.max())} are neither 8- nor 16-bit"
                )
            array = array.astype(np.uint16)  # a 16-bit PNG that PIL opened as 32-bit
        elif image.mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return to_bgr_uint8(array, what)
    return to_bgr_uint8(np.asarray(image.convert("RGB"))[:, :, ::-1], what)


def read_image_bgr(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR of an image file, EXIF orientation applied, by the module rule.

    Raises:
        ImageInputError: naming the file when it cannot be read or converted.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as e:  # PIL raises several types for unreadable files
        raise ImageInputError(f"cannot read image {path!r} ({type(e).__name__}: {e})") from e
    return pil_to_bgr_uint8(image, repr(path))


def read_image_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 **RGB** of an image file by the module rule (:func:`read_image_bgr`)."""
    return np.ascontiguousarray(read_image_bgr(path)[:, :, ::-1])
