"""Datasets named by their files, and metadata of datasets registered the plain Detectron2 way.

Two ways in, no Python needed for the first:

- ``DATASETS.FILES``: entries ``"NAME=JSON_FILE"`` or ``"NAME=JSON_FILE:IMAGE_ROOT"`` (image root
  defaults to the JSON's folder). A COCO-format file is registered with Detectron2's
  ``register_coco_instances`` (COCO evaluator); a file whose categories all carry an LVIS
  ``frequency`` with :func:`register_lvis_format_dataset` (LVIS evaluator, novel classes known).
  ``NAME`` can then be used in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
- Datasets registered with Detectron2's ``register_coco_instances`` / ``register_lvis_instances``:
  Detectron2 fills ``thing_classes`` only when the dataset is loaded; :func:`dataset_metadata`
  fills it on demand from the JSON (as ``load_coco_json`` would), so a model can be built before.
  Their loaders (and those of Detectron2's built-in names: ``coco_2017_train``, ``lvis_v1_val``,
  ...) get the project's checks (:mod:`.validation`) wrapped around them by
  :func:`validate_detectron2_registrations`, which :func:`register_datasets_from_cfg` calls for
  the config's ``DATASETS.TRAIN`` and ``DATASETS.TEST``: a bad file fails when the trainer
  builds its loaders, before the first iteration, as the project's own registrations do.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.lvis import get_lvis_instances_meta

from .lvis_ovd import register_lvis_format_dataset, validate_dataset_dicts
from .validation import (
    check_dataset_class_counts,
    check_loaded_dataset,
    read_annotation_json,
    validate_annotation_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "dataset_metadata",
    "parse_dataset_file_entry",
    "register_dataset_file",
    "register_datasets_from_cfg",
    "validate_detectron2_registrations",
]


def parse_dataset_file_entry(entry: str) -> Tuple[str, str, str]:
    """``"NAME=JSON_FILE[:IMAGE_ROOT]"`` -> ``(name, json_file, image_root)``."""
    name, sep, files = str(entry).partition("=")
    name, files = name.strip(), files.strip()
    if not sep or not name or not files:
        raise ValueError(
            f"DATASETS.FILES entry {entry!r}: expected 'NAME=JSON_FILE' or "
            "'NAME=JSON_FILE:IMAGE_ROOT' (e.g. 'my_val=data/my/val.json:data/my/images')"
        )
    json_file, sep, image_root = files.rpartition(":")
    if not sep or not json_file.lower().endswith(".json"):
        json_file, image_root = files, ""
    json_file = os.path.expanduser(json_file)
    image_root = os.path.expanduser(image_root) if image_root else os.path.dirname(json_file)
    return name, json_file, image_root


def _read_categories(json_file: str, name: str) -> List[dict]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file of dataset {name!r} not found: {json_file!r}")
    data = read_annotation_json(json_file)  # a syntax error names the file and position
    try:
        categories = data["categories"]
    except KeyError as e:
        raise ValueError(
            f"{json_file} (dataset {name!r}): not a COCO/LVIS-format JSON with a 'categories' "
            f"list ({type(e).__name__}: {e})"
        ) from e
    if not categories:
        raise ValueError(f"{json_file} (dataset {name!r}): 'categories' is empty")
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{json_file} (dataset {name!r}): category {i} needs 'id' and 'name'")
    return sorted(categories, key=lambda c: c["id"])


def register_dataset_file(name: str, json_file: str, image_root: str = "") -> str:
    """Register a COCO- or LVIS-format JSON under ``name`` (idempotent for the same file).

    Returns the format it was registered as: ``"lvis"`` when every category has an LVIS
    ``frequency``, else ``"coco"``.
    """
    image_root = image_root or os.path.dirname(json_file)
    if name in DatasetCatalog.list():
        registered = MetadataCatalog.get(name).get("json_file", None)
        if registered is not None and os.path.abspath(registered) == os.path.abspath(json_file):
            return MetadataCatalog.get(name).get("evaluator_type", "coco")
        raise ValueError(
            f"dataset {name!r} is already registered (json_file {registered!r}); "
            f"choose another name for {json_file!r}"
        )
    categories = _read_categories(json_file, name)
    if all(c.get("frequency") in ("f", "c", "r") for c in categories):
        register_lvis_format_dataset(name, json_file, image_root)
        kind = "lvis"
    else:
        _register_coco_file(name, json_file, image_root)
        _fill_coco_metadata(name, categories)
        kind = "coco"
    logger.info(f"Registered {kind.upper()}-format dataset {name!r}: {json_file} ({image_root})")
    return kind


def _register_coco_file(name: str, json_file: str, image_root: str) -> None:
    """Detectron2's ``register_coco_instances``, with :mod:`.validation`'s checks around
    ``load_coco_json`` (repeated ids, missing image files, boxes outside their image, no usable
    instance)."""

    def _load():
        validate_annotation_file(json_file)
        return check_loaded_dataset(load_coco_json(json_file, image_root, name), json_file)

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_datasets_from_cfg(cfg) -> List[str]:
    """Register every ``DATASETS.FILES`` entry of ``cfg``; returns their names.

    Also checks that the category counts of ``cfg``'s datasets agree with the model's (see
    :func:`~gridclip.data.validation.check_dataset_class_counts`).
    """
    names = []
    for entry in cfg.DATASETS.FILES:
        name, json_file, image_root = parse_dataset_file_entry(entry)
        register_dataset_file(name, json_file, image_root)
        names.append(name)
    validate_detectron2_registrations(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    check_dataset_class_counts(cfg, dataset_metadata)
    return names


def _loader_module(loader) -> str:
    return getattr(getattr(loader, "func", loader), "__module__", None) or ""


def _checked_detectron2_load(loader, name: str) -> List[dict]:
    """A Detectron2 loader between the checks the project's own loaders run (see
    :func:`validate_detectron2_registrations`)."""
    metadata = MetadataCatalog.get(name)
    json_file = metadata.get("json_file", None)
    source = json_file or f"dataset {name!r}"
    if json_file and os.path.isfile(json_file):
        validate_annotation_file(json_file)  # malformed JSON, repeated image/annotation ids
    dicts = loader()
    classes = metadata.get("thing_classes", None)  # set by Detectron2's loader
    if classes:
        # category ids in range, finite and non-negative boxes; zero-size boxes counted
        dicts = validate_dataset_dicts(dicts, len(classes), source)
    return check_loaded_dataset(dicts, source)  # missing files, boxes outside, no instance


def validate_detectron2_registrations(names) -> List[str]:
    """Wrap the loader of each dataset in ``names`` that Detectron2 registered
    (``register_coco_instances``, ``register_lvis_instances``, Detectron2's built-in names) with
    the checks of the project's own registrations, run when the dataset is loaded (the trainer's
    loaders, before the first iteration): malformed JSON and repeated image/annotation ids
    (:func:`~.validation.validate_annotation_file`), category ids and box values
    (:func:`~.lvis_ovd.validate_dataset_dicts`), missing image files, boxes outside their image
    and a split with no usable instance (:func:`~.validation.check_loaded_dataset`). Each message
    names the file. Loaders of the project and of users' own functions are left as they are;
    unregistered names are skipped. Idempotent. Returns the names wrapped by this call.
    """
    wrapped = []
    registered = set(DatasetCatalog.list())
    for name in dict.fromkeys(names):
        if name not in registered:
            continue
        loader = DatasetCatalog[name]
        if not _loader_module(loader).startswith("detectron2."):
            continue
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_checked_detectron2_load, loader, name))
        wrapped.append(name)
        logger.info(f"Dataset {name!r} (registered by Detectron2): checked when loaded")
    return wrapped


def _fill_coco_metadata(name: str, categories: List[dict]) -> None:
    # The same values load_coco_json sets when the dataset is loaded (so it does not conflict).
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )


def _is_builtin_lvis(name: str) -> bool:
    try:
        get_lvis_instances_meta(name)
    except (ValueError, KeyError):
        return False
    return True


def dataset_metadata(name: str):
    """``MetadataCatalog.get(name)``, with ``thing_classes`` filled from the dataset's JSON when
    it was registered without them (Detectron2's ``register_coco_instances`` /
    ``register_lvis_instances`` fill them only on load).

    A custom-named set registered with ``register_lvis_instances`` (whose loader knows only
    Detectron2's built-in LVIS names) is re-registered with
    :func:`~gridclip.data.register_lvis_format_dataset`, keeping its metadata.
    """
    metadata = MetadataCatalog.get(name)
    values = metadata.as_dict()
    json_file = values.get("json_file")
    if "thing_classes" in values or json_file is None or name not in DatasetCatalog.list():
        return metadata
    if values.get("evaluator_type") == "lvis" and not _is_builtin_lvis(name):
        extra = {
            k: v
            for k, v in values.items()
            if k not in ("name", "json_file", "image_root", "evaluator_type")
        }
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        register_lvis_format_dataset(
            name, json_file, values.get("image_root", ""), extra_metadata=extra
        )
        logger.info(
            f"Dataset {name!r} (register_lvis_instances) re-registered as an LVIS-format set"
        )
        return MetadataCatalog.get(name)
    if values.get("evaluator_type") == "lvis":
        metadata.set(**get_lvis_instances_meta(name))
    else:
        _fill_coco_metadata(name, _read_categories(json_file, name))
    return metadata
