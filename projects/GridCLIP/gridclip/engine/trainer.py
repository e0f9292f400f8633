"""The project's ``DefaultTrainer``: evaluator dispatch, atomic checkpoints, one run per
``OUTPUT_DIR`` (:mod:`gridclip.engine.run_guard`)."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, LVISEvaluator

from ..data import dataset_metadata, register_datasets_from_cfg
from ..data.mapper import CheckedDatasetMapper, ViLDDatasetMapper
from ..evaluation import FixedAPLVISEvaluator, NovelBaseCOCOEvaluator
from ..utils import atomic_write, check_whole_number
from .checkpoint import make_atomic, project_checkpointer
from .pairs import JointLoader, build_pairs_train_loader, pairs_enabled
from .run_guard import lock_output_dir
from .vocabulary import evaluation_vocabulary

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "build_evaluator", "write_results"]


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """Evaluator chosen by the dataset's ``evaluator_type`` (``lvis`` or ``coco``).

    LVIS: the standard protocol (``TEST.DETECTIONS_PER_IMAGE`` per image), or fixed AP with
    ``TEST.FIXED_AP`` (``TEST.FIXED_AP_DETECTIONS_PER_CLASS`` per class, no per-image cap).
    COCO (datasets without LVIS frequencies): all classes, the COCO protocol; with
    ``TEST.NOVEL_CLASSES``, also AP_novel / AP_base (:class:`NovelBaseCOCOEvaluator`).
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = dataset_metadata(dataset_name).get("evaluator_type", None)
    if evaluator_type == "lvis" and cfg.TEST.FIXED_AP:
        return FixedAPLVISEvaluator(
            dataset_name,
            output_dir=output_folder,
            max_dets_per_class=cfg.TEST.FIXED_AP_DETECTIONS_PER_CLASS,
        )
    if evaluator_type == "coco" and cfg.TEST.FIXED_AP:
        logger.warning(
            f"TEST.FIXED_AP is an LVIS-API protocol: COCO-format dataset {dataset_name!r} is "
            "evaluated with the standard COCO protocol"
        )
    if evaluator_type == "lvis":
        return LVISEvaluator(
            dataset_name, output_dir=output_folder, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE
        )
    if evaluator_type == "coco" and len(cfg.TEST.NOVEL_CLASSES):
        return NovelBaseCOCOEvaluator(
            dataset_name,
            cfg.TEST.NOVEL_CLASSES,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=False,
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
        "name its JSON in DATASETS.FILES, register it with register_coco_instances or "
        "gridclip.data.register_lvis_format_dataset, or set evaluator_type."
    )


@contextmanager
def _ddp_on_any_device():
    """Let ``DefaultTrainer`` wrap a CPU model in DDP (gloo): Detectron2 always passes
    ``device_ids=[local_rank]``, which PyTorch rejects for CPU modules."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with atomic checkpoints, LVIS/COCO evaluation, and
    multi-process training on CPU (gloo) as well as GPU (NCCL)."""

    def __init__(self, cfg):
        # one run per OUTPUT_DIR: taken before anything is written there (metrics, checkpoints)
        self.run_lock = lock_output_dir(cfg.OUTPUT_DIR) if comm.is_main_process() else None
        with _ddp_on_any_device(), project_checkpointer():
            super().__init__(cfg)
        make_atomic(self.checkpointer)  # idempotent; also used by the PeriodicCheckpointer hook
        # the initial MODEL.WEIGHTS may hold some modules only (a pre-trained backbone): warn;
        # resuming the run's own checkpoint stays strict
        self.checkpointer.mismatch = "warn"

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            logger.info(
                f"Resuming from {self.checkpointer.get_checkpoint_file()}: "
                f"start_iter={self.start_iter}, max_iter={self.max_iter}"
            )

    def train(self):
        """Train; returns the last evaluation results (``{}`` without evaluation).
        ``DefaultTrainer.train`` returns them only when ``TEST.EXPECTED_RESULTS`` is set."""
        try:
            results = super().train()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
        if results is None:
            results = getattr(self, "_last_eval_results", None) or {}
        return results

    @classmethod
    def build_model(cls, cfg):
        register_datasets_from_cfg(cfg)  # DATASETS.FILES, before anything looks a dataset up
        return super().build_model(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``, each dataset of ``DATASETS.TEST`` evaluated with its own
        class names (see :func:`gridclip.engine.vocabulary.evaluation_vocabulary`)."""
        register_datasets_from_cfg(cfg)
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(
                f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} DATASETS.TEST"
            )
        results = OrderedDict()
        for i, dataset_name in enumerate(cfg.DATASETS.TEST):
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (dataset_name,)
            with evaluation_vocabulary(model, dataset_name):
                result = super().test(one, model, None if evaluators is None else [evaluators[i]])
            results[dataset_name] = result
        if len(results) == 1:
            results = list(results.values())[0]
        return results

    @classmethod
    def build_train_loader(cls, cfg):
        check_whole_number(
            cfg.SOLVER.IMS_PER_BATCH,
            "SOLVER.IMS_PER_BATCH",
            meaning="training images per iteration, all GPUs together",
        )
        if cfg.MODEL.META_ARCHITECTURE == "ViLD":
            # also attaches cached teacher proposals (MODEL.VILD.TEACHER "cache"), transformed
            # with the image's own resize/flip
            mapper = ViLDDatasetMapper(cfg, True)
        else:
            mapper = CheckedDatasetMapper(cfg, True)
        register_datasets_from_cfg(cfg)
        loader = build_detection_train_loader(cfg, mapper=mapper)
        if pairs_enabled(cfg):  # a pair batch on top of every PAIRS_PERIOD-th box batch (pairs.py)
            pairs = build_pairs_train_loader(cfg)
            g = cfg.MODEL.GRIDCLIP
            return JointLoader(loader, pairs, g.PAIRS_PERIOD, g.PAIRS_START_ITER)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        register_datasets_from_cfg(cfg)
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return DatasetEvaluators([build_evaluator(cfg, dataset_name, output_folder)])


def write_results(cfg, results, filename: str = "results.json") -> str:
    """Write evaluation results (``{"bbox": {"AP": ...}}``) as JSON in ``cfg.OUTPUT_DIR``,
    atomically, with the config that produced them. Returns the path."""
    path = os.path.join(cfg.OUTPUT_DIR, filename)
    payload = {
        "results": {task: dict(metrics) for task, metrics in results.items()},
        "datasets_test": list(cfg.DATASETS.TEST),
        "weights": cfg.MODEL.WEIGHTS,
        "max_iter": cfg.SOLVER.MAX_ITER,
    }
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    logger.info(f"Wrote evaluation results to {path}")
    return path
