"""A ``DatasetMapper`` whose image-reading failures name the file.

Detectron2's ``read_image`` already converts grayscale/RGBA to the configured format and applies
EXIF orientation; this subclass only turns an unreadable or truncated image into an error that
says which file, instead of a bare PIL/IO error deep inside a data-loader worker.
"""

from __future__ import annotations

from detectron2.data import DatasetMapper

__all__ = ["CheckedDatasetMapper", "ImageReadError"]


class ImageReadError(RuntimeError):
    """An image of the dataset could not be decoded."""


class CheckedDatasetMapper(DatasetMapper):
    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError) as e:
            # PIL raises OSError for truncated data and UnidentifiedImageError (an OSError) for
            # unknown formats; SyntaxError for some malformed headers.
            if isinstance(e, ImageReadError):
                raise
            raise ImageReadError(
                f"Cannot read image {dataset_dict.get('file_name')!r} "
                f"(image_id {dataset_dict.get('image_id')}): {type(e).__name__}: {e}"
            ) from e
