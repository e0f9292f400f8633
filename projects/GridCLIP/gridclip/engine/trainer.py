"""The project's ``DefaultTrainer``: evaluator dispatch and atomic checkpoints."""
from __future__ import annotations

import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, LVISEvaluator

from .checkpoint import make_atomic

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "build_evaluator"]


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """Evaluator chosen by the dataset's ``evaluator_type`` (``lvis`` or ``coco``)."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type == "lvis":
        return LVISEvaluator(
            dataset_name, output_dir=output_folder, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE
        )
    if evaluator_type == "coco":
        return COCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=False,  # the fast C++ COCOeval needs detectron2._C
        )
    raise NotImplementedError(
        f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
        "register it with gridclip.data.register_lvis_format_dataset or set evaluator_type."
    )


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with atomic checkpoints and LVIS/COCO evaluation."""

    def __init__(self, cfg):
        super().__init__(cfg)
        make_atomic(self.checkpointer)  # also used by the PeriodicCheckpointer hook

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return DatasetEvaluators([build_evaluator(cfg, dataset_name, output_folder)])
