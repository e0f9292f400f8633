"""Dataset checks that run when a dataset is loaded, before the first iteration.

Detectron2's loaders absorb several faults of an annotation file: a repeated image id keeps one
image and gives it the boxes of both, a missing image file is found only when (if ever) it is
read, boxes outside their image train on nothing, an empty annotation list ends in "No valid data
found" (training) or ``results: {}`` (evaluation). The functions here turn each into a message
that names the file, the image and the annotation:

- :func:`read_annotation_json`: the JSON, or an error naming the file and the position of a syntax
  error;
- :func:`check_annotation_json`: repeated image / annotation ids (errors), annotations of images
  that are not in the file (a warning with the count);
- :func:`check_loaded_dataset`: image files that do not exist (an error with the count and the
  first names), boxes that vanish when clipped to their image (dropped, with a warning that counts
  them), a split with no usable instance (an error);
- :func:`check_dataset_class_counts`: a training set whose category count differs from the
  model's (``MODEL.RETINANET.NUM_CLASSES`` / ``MODEL.ROI_HEADS.NUM_CLASSES``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetValidationError",
    "check_annotation_json",
    "check_dataset_class_counts",
    "check_loaded_dataset",
    "read_annotation_json",
    "validate_annotation_file",
]

#: problems listed in one message (the count says how many more there are)
MAX_LISTED = 10
#: missing image files named in the message
MAX_MISSING_LISTED = 5


class DatasetValidationError(ValueError):
    """An annotation file (or the dataset loaded from it) that cannot be trained or evaluated
    on as it is; the message names the file, image and annotation of each problem."""


def _listing(problems: List[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def read_annotation_json(json_file: str) -> dict:
    """The parsed JSON of an annotation file; a syntax error names the file and its position."""
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetValidationError(
            f"{json_file}: malformed JSON at line {e.lineno}, column {e.colno} (character "
            f"{e.pos}): {e.msg}. Fix or regenerate the file."
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetValidationError(
            f"{json_file}: not a UTF-8 JSON file (byte {e.start}: {e.reason})"
        ) from e
    if not isinstance(data, dict):
        raise DatasetValidationError(
            f"{json_file}: a COCO/LVIS annotation file is a JSON object with 'images', "
            f"'annotations' and 'categories'; this one holds a {type(data).__name__}"
        )
    return data


def _image_name(image: dict) -> str:
    return str(image.get("file_name") or image.get("coco_url") or "?")


def check_annotation_json(data: dict, json_file: str) -> None:
    """Check the ids of a COCO/LVIS-format annotation file (the parsed JSON ``data``).

    Raises:
        DatasetValidationError: one line per repeated image id (naming both images) and per
            repeated annotation id (naming both images).
    """
    images = data.get("images")
    annotations = data.get("annotations", [])
    if not isinstance(images, list):
        raise DatasetValidationError(f"{json_file}: no 'images' list")
    if not isinstance(annotations, list):
        raise DatasetValidationError(f"{json_file}: 'annotations' is not a list")
    problems: List[str] = []
    names: Dict[object, str] = {}
    for image in images:
        if not isinstance(image, dict) or "id" not in image:
            continue  # the loader names a missing field
        image_id = image["id"]
        if image_id in names:
            problems.append(
                f"{json_file}: image id {image_id} is used by two images, {names[image_id]!r} and "
                f"{_image_name(image)!r}"
            )
        else:
            names[image_id] = _image_name(image)
    annotation_images: Dict[object, object] = {}
    orphans: List[str] = []
    for a in annotations:
        if not isinstance(a, dict) or "id" not in a:
            continue
        ann_id, image_id = a["id"], a.get("image_id")
        if ann_id in annotation_images:
            first = annotation_images[ann_id]
            problems.append(
                f"{json_file}: annotation id {ann_id} is used twice (image {first} "
                f"{names.get(first, '?')!r} and image {image_id} {names.get(image_id, '?')!r})"
            )
        else:
            annotation_images[ann_id] = image_id
        if image_id not in names:
            orphans.append(f"annotation {ann_id} -> image {image_id}")
    if problems:
        raise DatasetValidationError(
            f"{json_file}: {len(problems)} repeated id(s); ids must be unique (Detectron2's loader "
            "would keep one entry per id and pair one image's pixels with another's boxes):"
            + _listing(problems)
        )
    if orphans:
        logger.warning(
            f"{json_file}: {len(orphans)} annotations refer to images that are not in 'images' "
            f"and are ignored (first: {', '.join(orphans[:MAX_MISSING_LISTED])})"
        )


_CHECKED_LOCK = threading.Lock()
_CHECKED: set = set()


def validate_annotation_file(json_file: str) -> None:
    """:func:`read_annotation_json` + :func:`check_annotation_json`, once per file version
    (path, size, mtime) in a process."""
    st = os.stat(json_file)
    key = (os.path.abspath(json_file), st.st_size, st.st_mtime_ns)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return
    check_annotation_json(read_annotation_json(json_file), json_file)
    with _CHECKED_LOCK:
        _CHECKED.add(key)


def _vanishes_when_clipped(annotation: dict, height: int, width: int) -> bool:
    box = annotation.get("bbox")
    if box is None:
        return False
    mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return False  # relative or rotated boxes: not checked here
    x0, y0, x1, y1 = BoxMode.convert(list(box), mode, BoxMode.XYXY_ABS)
    return min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0)


def check_loaded_dataset(dataset_dicts: List[dict], source: str) -> List[dict]:
    """Check Detectron2 dataset dicts loaded from ``source`` (a file name, for messages).

    - image files that do not exist: :class:`FileNotFoundError` with the count and the first
      names (checked with ``os.path.isfile``, no image is read);
    - boxes that lie outside their image (zero area once clipped to it): dropped, with a warning
      that counts them and names the first;
    - no usable instance left in the whole split: :class:`DatasetValidationError`.

    Returns ``dataset_dicts`` (modified in place).
    """
    missing = [d for d in dataset_dicts if not os.path.isfile(d["file_name"])]
    if missing:
        first = ", ".join(
            f"{d['file_name']!r} (image {d.get('image_id')})" for d in missing[:MAX_MISSING_LISTED]
        )
        roots = sorted({os.path.dirname(d["file_name"]) for d in missing})[:3]
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(dataset_dicts)} image files do not exist: {first}"
            f"{' ...' if len(missing) > MAX_MISSING_LISTED else ''} (looked in {roots}). Check the "
            "image root (DATASETS.FILES 'NAME=JSON_FILE:IMAGE_ROOT', or the image_root the dataset "
            "was registered with) and that every image was copied."
        )
    outside: List[str] = []
    for d in dataset_dicts:
        height, width = d.get("height"), d.get("width")
        if not height or not width or not d.get("annotations"):
            continue
        kept = []
        for a in d["annotations"]:
            if _vanishes_when_clipped(a, height, width):
                outside.append(
                    f"image {d.get('image_id')} ({os.path.basename(d['file_name'])}, {width}x"
                    f"{height}) annotation {a.get('id')} bbox {list(a['bbox'])}"
                )
                continue
            kept.append(a)
        d["annotations"] = kept
    if outside:
        logger.warning(
            f"{source}: dropped {len(outside)} boxes that lie outside their image (nothing left "
            f"once clipped to it), e.g. {'; '.join(outside[:3])}"
        )
    instances = sum(len(d.get("annotations", [])) for d in dataset_dicts)
    if instances == 0:
        dropped = f" ({len(outside)} boxes outside their images were dropped)" if outside else ""
        raise DatasetValidationError(
            f"{source}: no usable instance in {len(dataset_dicts)} images{dropped}: there is "
            "nothing to train or evaluate on. Check that the file's 'annotations' list is filled "
            "and that its boxes are [x, y, width, height] in the pixels of their images."
        )
    return dataset_dicts


def _num_classes_key(meta_architecture: str) -> str:
    if meta_architecture in ("GridCLIP", "RetinaNet"):
        return "MODEL.RETINANET.NUM_CLASSES"
    return "MODEL.ROI_HEADS.NUM_CLASSES"


def check_dataset_class_counts(cfg, metadata_of) -> None:
    """A ``DATASETS.TRAIN`` set whose category count differs from the model's is an error.

    The model learns exactly the training set's classes (its class count is
    ``MODEL.RETINANET.NUM_CLASSES`` for GridCLIP/RetinaNet, ``MODEL.ROI_HEADS.NUM_CLASSES``
    otherwise): with fewer categories some outputs would never see a positive, with more some
    annotations would index outside the classifier. Test sets are not checked: an
    open-vocabulary model evaluates each with its own class names. ``metadata_of(name)`` returns
    a dataset's metadata (with ``thing_classes``); names that are not registered are skipped.
    """
    key = _num_classes_key(cfg.MODEL.META_ARCHITECTURE)
    node = cfg
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    num_classes = int(getattr(node, key.split(".")[-1]))
    registered = set(DatasetCatalog.list())
    for name in cfg.DATASETS.TRAIN:
        if name not in registered:
            continue
        metadata = metadata_of(name)
        classes: Optional[Sequence[str]] = getattr(metadata, "thing_classes", None)
        if classes is None or len(classes) == num_classes:
            continue
        source = getattr(metadata, "json_file", None)
        more_or_fewer = "fewer" if len(classes) < num_classes else "more"
        raise DatasetValidationError(
            f"class count mismatch: training dataset {name!r}{f' ({source})' if source else ''} "
            f"has {len(classes)} categories (metadata.thing_classes), {more_or_fewer} than the "
            f"model's {key} = {num_classes}. Set {key} {len(classes)}, or train on a dataset of "
            "the model's classes."
        )
