"""Datasets: LVIS-format registration, the LVIS v1 OVD split, the embedded world."""

from .lvis_ovd import (
    datasets_root,
    filter_novel_annotations,
    novel_class_mask,
    register_lvis_format_dataset,
    register_lvis_v1_ovd,
)
from .world import register_default_worlds

register_lvis_v1_ovd()
register_default_worlds()  # the embedded world (gridclip_world_*, gridclip_world_ci_*)

__all__ = [
    "datasets_root",
    "filter_novel_annotations",
    "novel_class_mask",
    "register_lvis_format_dataset",
    "register_lvis_v1_ovd",
]
