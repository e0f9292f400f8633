"""Fixed AP (Dave et al. 2021, "Evaluating large-vocabulary object detectors: the devil is in
the details", arXiv 2102.01066).

The standard LVIS protocol keeps 300 detections per image, so a detector gains AP by spending
them on frequent classes. Fixed AP caps detections per *class* over the whole dataset instead
(the top 10,000 by score) and puts no cap per image; the ``lvis`` API evaluates them with
``max_dets=-1``. The detector must keep enough detections per image for this to matter
(``TEST.DETECTIONS_PER_IMAGE``, e.g. 1000).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List

from detectron2.evaluation import LVISEvaluator

logger = logging.getLogger(__name__)

__all__ = ["FixedAPLVISEvaluator", "top_detections_per_class"]


def top_detections_per_class(detections: List[Dict], max_per_class: int) -> List[Dict]:
    """Keep the ``max_per_class`` highest-scoring detections of each ``category_id`` over the
    whole list (LVIS/COCO result dicts); order among kept ones follows the input."""
    if max_per_class <= 0:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    by_class = defaultdict(list)
    for i, d in enumerate(detections):
        by_class[d["category_id"]].append(i)
    keep = set()
    for indices in by_class.values():
        indices.sort(key=lambda i: -detections[i]["score"])
        keep.update(indices[:max_per_class])
    return [d for i, d in enumerate(detections) if i in keep]


class FixedAPLVISEvaluator(LVISEvaluator):
    """``LVISEvaluator`` computing fixed AP: top ``max_dets_per_class`` detections per class over
    the dataset, no per-image cap (``lvis`` API with ``max_dets=-1``)."""

    def __init__(self, dataset_name, *args, max_dets_per_class: int = 10000, **kwargs):
        kwargs["max_dets_per_image"] = -1
        super().__init__(dataset_name, *args, **kwargs)
        self._max_dets_per_class = int(max_dets_per_class)

    def _eval_predictions(self, predictions):
        detections = [d for p in predictions for d in p["instances"]]
        kept = top_detections_per_class(detections, self._max_dets_per_class)
        logger.info(
            f"Fixed AP: {len(kept)} of {len(detections)} detections kept (top "
            f"{self._max_dets_per_class} per class over the dataset, no per-image cap)"
        )
        return super()._eval_predictions([{"instances": kept}])
