"""Training on boxes and image-text pairs: a second data loader, alternated with the box one.

With ``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0`` the trainer's loader yields a batch of pairs
(``DATASETS.PAIRS_TRAIN``) every ``MODEL.GRIDCLIP.PAIRS_PERIOD``-th iteration and a box batch
otherwise (DetCLIPv2 alternates the two sources). Pair images are resized to
``PAIRS_MIN_SIZE_TRAIN`` (a lower resolution: DetCLIPv2's efficiency trick) and batched by
``PAIRS_IMS_PER_BATCH``; the model trains only the phrase-to-grid alignment loss on them
(:meth:`gridclip.modeling.GridCLIP.pairs_losses`). A pair iteration is an iteration of
``SOLVER.MAX_ITER`` (same learning-rate schedule). Multi-process training: the box tower gets
no gradient on pair iterations, so DDP needs ``find_unused_parameters`` there. A resumed run
restarts the alternation's phase at its first iteration (the same share of pair iterations).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from detectron2.data import DatasetCatalog, build_detection_train_loader

from ..data.mapper import CheckedDatasetMapper

logger = logging.getLogger(__name__)

__all__ = ["AlternatingLoader", "pairs_enabled", "build_pairs_train_loader"]


class AlternatingLoader:
    """Iterates two infinite loaders: ``pairs`` at steps ``period - 1, 2 * period - 1, ...``
    (0-based), ``boxes`` at every other step."""

    def __init__(self, boxes: Iterable, pairs: Iterable, period: int):
        if int(period) < 2:
            raise ValueError(f"MODEL.GRIDCLIP.PAIRS_PERIOD must be >= 2, got {period}")
        self.boxes, self.pairs, self.period = boxes, pairs, int(period)

    def __iter__(self) -> Iterator:
        boxes, pairs = iter(self.boxes), iter(self.pairs)
        step = 0
        while True:
            yield next(pairs) if step % self.period == self.period - 1 else next(boxes)
            step += 1


def pairs_enabled(cfg) -> bool:
    """Whether ``cfg`` trains on image-text pairs (GridCLIP with PAIRS_LOSS_WEIGHT > 0)."""
    weight = cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT
    if weight <= 0:
        if cfg.DATASETS.PAIRS_TRAIN:
            logger.warning(
                f"DATASETS.PAIRS_TRAIN {list(cfg.DATASETS.PAIRS_TRAIN)} ignored: "
                "MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT is 0"
            )
        return False
    if cfg.MODEL.META_ARCHITECTURE != "GridCLIP":
        raise ValueError(
            "MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0: training on image-text pairs is implemented "
            f"for GridCLIP only, not {cfg.MODEL.META_ARCHITECTURE}"
        )
    return True


def build_pairs_train_loader(cfg):
    """The infinite, batched loader of ``DATASETS.PAIRS_TRAIN`` (no annotations, so no
    empty-image filtering), at the pair resolution."""
    names = list(cfg.DATASETS.PAIRS_TRAIN)
    if not names:
        raise ValueError(
            "MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0 needs image-text pair datasets in "
            "DATASETS.PAIRS_TRAIN (e.g. ('gridclip_world_pairs',))"
        )
    g = cfg.MODEL.GRIDCLIP
    batch = g.PAIRS_IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"MODEL.GRIDCLIP.PAIRS_IMS_PER_BATCH = {batch!r}: must be >= 0")
    if g.PAIRS_MIN_SIZE_TRAIN < 0:
        raise ValueError(f"MODEL.GRIDCLIP.PAIRS_MIN_SIZE_TRAIN = {g.PAIRS_MIN_SIZE_TRAIN} < 0")
    dicts = [d for n in names for d in DatasetCatalog.get(n)]
    without = [d.get("file_name") for d in dicts if not d.get("phrases")]
    if without:
        logger.warning(f"{len(without)} pair images without phrases (e.g. {without[0]}) skipped")
        dicts = [d for d in dicts if d.get("phrases")]
    if not dicts:
        raise ValueError(f"DATASETS.PAIRS_TRAIN {names}: no image with a phrase")
    pair_cfg = cfg.clone()
    pair_cfg.defrost()
    if g.PAIRS_MIN_SIZE_TRAIN:
        pair_cfg.INPUT.MIN_SIZE_TRAIN = (int(g.PAIRS_MIN_SIZE_TRAIN),)
        pair_cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    logger.info(
        f"Image-text pairs: {len(dicts)} images of {names}, batches of {batch} at min size "
        f"{pair_cfg.INPUT.MIN_SIZE_TRAIN}, every {g.PAIRS_PERIOD}-th iteration"
    )
    return build_detection_train_loader(
        dicts,
        mapper=CheckedDatasetMapper(pair_cfg, True),
        total_batch_size=batch,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
