from .fixed_ap import FixedAPLVISEvaluator, top_detections_per_class
from .lvis_compat import patch_lvis_for_numpy2
from .novel_split import NovelBaseCOCOEvaluator, novel_base_ap, resolve_novel_classes

patch_lvis_for_numpy2()

__all__ = [
    "FixedAPLVISEvaluator",
    "NovelBaseCOCOEvaluator",
    "novel_base_ap",
    "patch_lvis_for_numpy2",
    "resolve_novel_classes",
    "top_detections_per_class",
]
