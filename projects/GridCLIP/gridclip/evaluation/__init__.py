from .fixed_ap import FixedAPLVISEvaluator, top_detections_per_class
from .lvis_compat import patch_lvis_for_numpy2

patch_lvis_for_numpy2()

__all__ = ["FixedAPLVISEvaluator", "patch_lvis_for_numpy2", "top_detections_per_class"]
