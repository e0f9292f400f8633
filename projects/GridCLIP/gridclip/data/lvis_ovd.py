"""LVIS-format datasets: registration, the LVIS v1 open-vocabulary split, frequency metadata.

Detectron2's ``register_lvis_instances`` only knows its built-in LVIS names, so any other
LVIS-format set (the embedded world, user sets) is registered here with ``load_lvis_json`` and
metadata read from the JSON itself. Every LVIS-format dataset gets, in ``MetadataCatalog``:

- ``thing_classes``: class names in contiguous-id order,
- ``class_frequencies``: LVIS frequency per class (``"f"``, ``"c"``, ``"r"``); ``r`` = novel,
- ``evaluator_type = "lvis"``, ``json_file``, ``image_root``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json

from .validation import check_loaded_dataset, read_annotation_json, validate_annotation_file

logger = logging.getLogger(__name__)

__all__ = [
    "register_lvis_format_dataset",
    "register_lvis_v1_ovd",
    "filter_novel_annotations",
    "validate_dataset_dicts",
    "novel_class_mask",
    "has_class_frequencies",
    "NoClassFrequenciesError",
    "datasets_root",
    "DATASETS_README",
]

DATASETS_README = "datasets/README.md"
NOVEL_FREQUENCY = "r"


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``datasets`` (Detectron2's convention)."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} not found: {path!r}. See {DATASETS_README} for the expected layout "
            f"(set DETECTRON2_DATASETS to the folder that holds it)."
        )


def read_lvis_categories(json_file: str) -> List[dict]:
    """Categories of an LVIS-format JSON, sorted by id, checked to be contiguous from 1."""
    _require_file(json_file, "LVIS-format annotation file")
    try:
        categories = read_annotation_json(json_file)["categories"]
    except KeyError as e:
        raise ValueError(f"{json_file}: not an LVIS-format JSON with 'categories' ({e})")
    categories = sorted(categories, key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(
            f"{json_file}: category ids must be contiguous 1..{len(ids)} (LVIS convention); "
            f"got {ids[:5]}..."
        )
    for c in categories:
        if c.get("frequency") not in ("f", "c", "r"):
            raise ValueError(
                f"{json_file}: category {c['id']} ({c.get('name')!r}) has frequency "
                f"{c.get('frequency')!r}; expected one of 'f', 'c', 'r'"
            )
    return categories


def validate_dataset_dicts(dataset_dicts: List[dict], num_classes: int, source: str) -> List[dict]:
    """Check Detectron2 dataset dicts loaded from ``source`` before anything trains on them.

    Raises ValueError naming the file, image and annotation for: category ids outside
    [0, num_classes), non-finite or negative-size boxes. Zero-size boxes (which LVIS-style
    annotation tools do emit) are dropped with a warning that counts them, never silently.
    """
    dropped = 0
    for d in dataset_dicts:
        kept = []
        for k, a in enumerate(d.get("annotations", [])):
            # Detectron2's COCO loader drops annotation ids: then its place in the image's list
            which = a["id"] if a.get("id") is not None else f"#{k + 1} of the image"
            where = (
                f"{source}: image {d.get('image_id')} ({d.get('file_name')}), annotation {which}"
            )
            cid = a.get("category_id")
            if cid is None or not (0 <= cid < num_classes):
                raise ValueError(
                    f"{where}: category id {None if cid is None else cid + 1} outside the "
                    f"{num_classes} categories of the file"
                )
            x, y, w, h = (float(v) for v in a["bbox"])
            if not all(map(math.isfinite, (x, y, w, h))):
                raise ValueError(f"{where}: non-finite bbox {a['bbox']}")
            if w < 0 or h < 0:
                raise ValueError(f"{where}: negative box size in bbox [x, y, w, h] = {a['bbox']}")
            if w == 0 or h == 0:
                dropped += 1
                continue
            kept.append(a)
        d["annotations"] = kept
    if dropped:
        logger.warning(f"{source}: dropped {dropped} zero-size boxes")
    return dataset_dicts


def _load_lvis_dicts(
    json_file: str,
    image_root: str,
    num_classes: int,
    builtin_name=None,
    class_frequencies: Optional[Sequence[str]] = None,
):
    """``load_lvis_json`` between the checks of :mod:`.validation` (malformed JSON, repeated
    ids, missing image files, boxes outside their image, no usable instance) and
    :func:`validate_dataset_dicts`; a missing field becomes an error naming the file. With
    ``class_frequencies``, novel annotations are removed (the OVD split) before the final checks.
    """
    validate_annotation_file(json_file)
    try:
        dicts = load_lvis_json(json_file, image_root, builtin_name, extra_annotation_keys=["id"])
    except KeyError as e:
        raise ValueError(
            f"{json_file}: missing field {e} (LVIS format needs images[id, coco_url, height, "
            "width], annotations[id, image_id, category_id, bbox, segmentation]; as in LVIS v1, "
            "an image is found by the last two parts of its coco_url, '<folder>/<file>' under "
            "the image root, and needs no file_name)"
        ) from e
    dicts = validate_dataset_dicts(dicts, num_classes, json_file)
    if class_frequencies is not None:
        dicts = filter_novel_annotations(dicts, class_frequencies)
    return check_loaded_dataset(dicts, json_file)


def filter_novel_annotations(
    dataset_dicts: List[dict], class_frequencies: Sequence[str]
) -> List[dict]:
    """Remove annotations of novel (frequency ``r``) classes: the OVD training protocol.

    Images stay, so novel objects remain in the pixels as unlabelled "background", as in LVIS OVD.
    """
    novel = {i for i, f in enumerate(class_frequencies) if f == NOVEL_FREQUENCY}
    removed = 0
    for d in dataset_dicts:
        kept = [a for a in d["annotations"] if a["category_id"] not in novel]
        removed += len(d["annotations"]) - len(kept)
        d["annotations"] = kept
    logger.info(f"OVD split: removed {removed} annotations of {len(novel)} novel classes")
    return dataset_dicts


def register_lvis_format_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    base_only: bool = False,
    extra_metadata: Optional[Dict] = None,
) -> None:
    """Register an LVIS-format dataset under ``name`` (idempotent).

    Images are found as Detectron2's LVIS loader does: ``image_root`` + the last two parts of
    each image's ``coco_url`` (``"<folder>/<file>"``).

    The JSON is read lazily (on ``DatasetCatalog.get``) for the dicts, and on first metadata
    access for the class names and frequencies, so registering costs nothing and a missing file
    fails only when the dataset is used, with a message naming the file.

    Args:
        base_only: drop annotations of novel (``r``) classes (the OVD training split).
    """
    if not image_root.endswith(os.sep):
        image_root = image_root + os.sep  # load_lvis_json concatenates image_root + folder
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file:
            return
        raise ValueError(
            f"dataset {name!r} is already registered with json_file "
            f"{getattr(meta, 'json_file', None)!r}, not {json_file!r}"
        )

    def _load():
        _require_file(json_file, f"annotations of dataset {name!r}")
        _ensure_class_metadata(name)
        num_classes = len(MetadataCatalog.get(name).thing_classes)
        frequencies = MetadataCatalog.get(name).class_frequencies if base_only else None
        return _load_lvis_dicts(json_file, image_root, num_classes, class_frequencies=frequencies)

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **(extra_metadata or {})
    )
    if os.path.isfile(json_file):
        _ensure_class_metadata(name)


def _ensure_class_metadata(name: str) -> None:
    meta = MetadataCatalog.get(name)
    if "thing_classes" in meta.as_dict() and "class_frequencies" in meta.as_dict():
        return
    categories = read_lvis_categories(meta.json_file)
    meta.set(
        thing_classes=[c["name"] for c in categories],
        class_frequencies=[c["frequency"] for c in categories],
    )


class NoClassFrequenciesError(ValueError):
    """A dataset without the LVIS ``class_frequencies`` metadata that tells novel classes."""


def has_class_frequencies(dataset_name: str) -> bool:
    """Whether :func:`novel_class_mask` can tell the novel classes of ``dataset_name``."""
    metadata = MetadataCatalog.get(dataset_name)
    values = metadata.as_dict()
    # Only LVIS-format files carry frequencies: a COCO-format set (evaluator_type "coco") has none
    if values.get("evaluator_type") == "lvis" and "json_file" in values:
        if "class_frequencies" not in values:
            _ensure_class_metadata(metadata.name)
    return getattr(metadata, "class_frequencies", None) is not None


def novel_class_mask(
    dataset_name: str, num_classes: Optional[int] = None, *, setting: str = ""
) -> torch.Tensor:
    """(K,) bool tensor, True for the novel (LVIS frequency ``r``) classes of a dataset.

    The one place that tells novel classes; models call it and add no message of their own.

    Args:
        dataset_name: a registered dataset (a ``Metadata`` entry is accepted too).
        num_classes: the model's class count K, checked against the dataset's.
        setting: the config key that asked for novel classes, named in the error.

    Raises:
        NoClassFrequenciesError: the dataset has no ``class_frequencies`` metadata.
        ValueError: the dataset's class count differs from ``num_classes``.
    """
    name = dataset_name if isinstance(dataset_name, str) else dataset_name.name
    if not has_class_frequencies(name):
        needed = f", which {setting} True needs" if setting else ""
        instead = f", or set {setting} False" if setting else ""
        raise NoClassFrequenciesError(
            f"dataset {name!r} has no 'class_frequencies' metadata (LVIS f/c/r per class) to tell "
            f"novel classes{needed}; register it with "
            f"gridclip.data.register_lvis_format_dataset{instead}"
        )
    frequencies = MetadataCatalog.get(name).class_frequencies
    if num_classes is not None and len(frequencies) != int(num_classes):
        raise ValueError(
            f"dataset {name!r} has class_frequencies for {len(frequencies)} classes, the model has "
            f"{int(num_classes)}"
        )
    return torch.tensor([f == NOVEL_FREQUENCY for f in frequencies], dtype=torch.bool)


def register_lvis_v1_ovd(root: Optional[str] = None) -> None:
    """Register the LVIS v1 open-vocabulary split (idempotent).

    - ``lvis_v1_train_ovd_base``: LVIS v1 train with rare-class annotations removed (866 base
      classes: 405 frequent + 461 common boxed; 337 rare unannotated).
    - ``lvis_v1_val`` (Detectron2's built-in) and ``lvis_v1_train`` get ``class_frequencies``.
    """
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    root = root or datasets_root()
    categories = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    frequencies = [c["frequency"] for c in categories]
    for builtin in ("lvis_v1_train", "lvis_v1_val"):
        if builtin in DatasetCatalog.list():
            MetadataCatalog.get(builtin).set(class_frequencies=frequencies)
    name = "lvis_v1_train_ovd_base"
    if name in DatasetCatalog.list():
        return
    json_file = os.path.join(root, "lvis/lvis_v1_train.json")
    image_root = os.path.join(root, "coco/")

    def _load():
        _require_file(json_file, "LVIS v1 train annotations")
        return _load_lvis_dicts(
            json_file, image_root, len(categories), "lvis_v1_train", frequencies
        )

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        thing_classes=[c["synonyms"][0] for c in categories],
        class_frequencies=frequencies,
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
    )
