"""Datasets: COCO/LVIS files named in the config, LVIS-format registration, the LVIS v1
OVD split, the embedded world."""

from .files import (
    dataset_metadata,
    parse_dataset_file_entry,
    register_dataset_file,
    register_datasets_from_cfg,
    validate_detectron2_registrations,
)
from .lvis_ovd import (
    NoClassFrequenciesError,
    datasets_root,
    filter_novel_annotations,
    has_class_frequencies,
    novel_class_mask,
    register_lvis_format_dataset,
    register_lvis_v1_ovd,
)
from .mapper import CheckedDatasetMapper, ImageReadError, ViLDDatasetMapper
from .world import register_default_worlds

register_lvis_v1_ovd()
register_default_worlds()  # the embedded world (gridclip_world_*, gridclip_world_ci_*)

__all__ = [
    "CheckedDatasetMapper",
    "ImageReadError",
    "ViLDDatasetMapper",
    "datasets_root",
    "dataset_metadata",
    "parse_dataset_file_entry",
    "register_dataset_file",
    "register_datasets_from_cfg",
    "validate_detectron2_registrations",
    "NoClassFrequenciesError",
    "filter_novel_annotations",
    "has_class_frequencies",
    "novel_class_mask",
    "register_lvis_format_dataset",
    "register_lvis_v1_ovd",
]
