"""Novel / base AP on COCO-format test sets (``TEST.NOVEL_CLASSES``).

An LVIS-format set tells its novel classes by frequency (``r``: APr). A COCO-format set has no
frequencies, so a user names the classes that are novel for the model (not boxed in its
training); :class:`NovelBaseCOCOEvaluator` then reports, beside Detectron2's COCO metrics,
``AP_novel`` and ``AP_base``: the mean of the per-class APs (``AP-<name>``, COCO's AP over IoU
0.5:0.95) of the novel classes and of the others, as OVD papers report COCO novel/base AP.
Classes without ground truth (AP NaN) are left out of the means, as COCO's own mean does.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Sequence

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

logger = logging.getLogger(__name__)

__all__ = ["NovelBaseCOCOEvaluator", "novel_base_ap", "resolve_novel_classes"]


def resolve_novel_classes(
    novel_classes: Iterable[str], class_names: Sequence[str], dataset_name: str
) -> List[str]:
    """The names of ``novel_classes`` that are classes of the dataset (compared case- and
    space/underscore-insensitively), in the dataset's spelling.

    Raises:
        ValueError: none of them is a class of the dataset (a typo, or another dataset's list):
            the message names the dataset, the key and some of its classes.
    """

    def key(name: str) -> str:
        return " ".join(str(name).replace("_", " ").lower().split())

    by_key = {key(n): n for n in class_names}
    wanted = [str(n) for n in novel_classes]
    found = [by_key[key(n)] for n in wanted if key(n) in by_key]
    missing = [n for n in wanted if key(n) not in by_key]
    if not found:
        raise ValueError(
            f"TEST.NOVEL_CLASSES {wanted}: none is a class of dataset {dataset_name!r} "
            f"(its classes: {list(class_names)[:10]}{' ...' if len(class_names) > 10 else ''})"
        )
    if missing:
        logger.warning(
            f"TEST.NOVEL_CLASSES: {missing} are not classes of {dataset_name!r}; its novel "
            f"classes are {found}"
        )
    return found


def novel_base_ap(per_class_ap: Dict[str, float], novel: Sequence[str]) -> Dict[str, float]:
    """``{"AP_novel", "AP_base"}`` from ``{class name: AP}`` (NaN APs left out; NaN if a group
    has no AP)."""
    novel = set(novel)

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    return {
        "AP_novel": mean(ap for n, ap in per_class_ap.items() if n in novel),
        "AP_base": mean(ap for n, ap in per_class_ap.items() if n not in novel),
    }


class NovelBaseCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` plus ``AP_novel`` / ``AP_base`` (module doc)."""

    def __init__(self, dataset_name: str, novel_classes: Sequence[str], **kwargs):
        super().__init__(dataset_name, **kwargs)
        names = MetadataCatalog.get(dataset_name).thing_classes
        self._novel_names = resolve_novel_classes(novel_classes, names, dataset_name)

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if not results or "bbox" not in results:
            return results
        bbox = results["bbox"]
        per_class = {k[len("AP-") :]: v for k, v in bbox.items() if k.startswith("AP-")}
        split = novel_base_ap(per_class, self._novel_names)
        bbox.update(split)
        self._logger.info(
            f"novel classes {self._novel_names}: AP_novel {split['AP_novel']:.2f}, "
            f"AP_base {split['AP_base']:.2f}"
        )
        return results
