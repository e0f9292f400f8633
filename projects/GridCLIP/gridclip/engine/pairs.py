"""Training on boxes and image-text pairs: a second data loader, joined to the box one.

With ``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0`` every ``MODEL.GRIDCLIP.PAIRS_PERIOD``-th
iteration's batch is the box batch *plus* a batch of pairs (``DATASETS.PAIRS_TRAIN``): the model
computes the box losses on the box images and the caption pseudo-box loss on the pair
images (two forward passes, :meth:`gridclip.modeling.GridCLIP.forward`), and one optimizer step
follows their sum. The pairs come *on top of* the box iterations: the same box batches, number
of iterations and learning-rate schedule as box-only training. (Pair iterations that *replaced*
box iterations, DetCLIPv2's alternation, cost the 300-iteration embedded schedule about 12 AP:
the box iterations given up, README.) Pair images are resized to ``PAIRS_MIN_SIZE_TRAIN`` (a
lower resolution is DetCLIPv2's efficiency trick; the embedded config keeps the box resolution,
where pseudo-boxes are better) and batched by ``PAIRS_IMS_PER_BATCH``; no pair batch is added
before ``PAIRS_START_ITER``. With ``PAIRS_PSEUDO_BOXES`` (a file of a trained detector's
pseudo-boxes, ``tools/pseudo_label_pairs.py``) pair inputs carry those boxes
(``pseudo_boxes``) and the model trains on them instead of searching its own. A resumed run
restarts the period's phase at its first iteration.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, List

from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.utils.events import get_event_storage

from ..data.captions import attach_pseudo_boxes
from ..data.mapper import PairsDatasetMapper
from ..utils import check_whole_number

logger = logging.getLogger(__name__)

__all__ = ["JointLoader", "pairs_enabled", "build_pairs_train_loader"]


class JointLoader:
    """Iterates the infinite ``boxes`` loader; at steps ``0, period, 2 * period, ...``
    (0-based) the next batch of the infinite ``pairs`` loader is appended to the box batch
    (one list: box inputs first, then pair inputs). With ``start > 0`` no pair batch is added
    while the training iteration (the event storage's, so that a resumed run counts from where
    it stopped) is below ``start``."""

    def __init__(self, boxes: Iterable, pairs: Iterable, period: int, start: int = 0):
        check_whole_number(period, "MODEL.GRIDCLIP.PAIRS_PERIOD", meaning="box steps per pair step")
        check_whole_number(start, "MODEL.GRIDCLIP.PAIRS_START_ITER", minimum=0)
        self.boxes, self.pairs, self.period, self.start = boxes, pairs, period, start

    def _started(self) -> bool:
        return self.start == 0 or get_event_storage().iter >= self.start

    def __iter__(self) -> Iterator[List]:
        boxes, pairs = iter(self.boxes), iter(self.pairs)
        step = 0
        while True:
            batch = list(next(boxes))
            if step % self.period == 0 and self._started():
                batch += list(next(pairs))
            yield batch
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
    check_whole_number(
        g.PAIRS_IMS_PER_BATCH,
        "MODEL.GRIDCLIP.PAIRS_IMS_PER_BATCH",
        minimum=0,
        meaning="0: SOLVER.IMS_PER_BATCH",
    )
    batch = g.PAIRS_IMS_PER_BATCH or check_whole_number(
        cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH"
    )
    if g.PAIRS_MIN_SIZE_TRAIN < 0:
        raise ValueError(f"MODEL.GRIDCLIP.PAIRS_MIN_SIZE_TRAIN = {g.PAIRS_MIN_SIZE_TRAIN} < 0")
    dicts = [d for n in names for d in DatasetCatalog.get(n)]
    without = [d.get("file_name") for d in dicts if not d.get("phrases")]
    if without:
        logger.warning(f"{len(without)} pair images without phrases (e.g. {without[0]}) skipped")
        dicts = [d for d in dicts if d.get("phrases")]
    if not dicts:
        raise ValueError(f"DATASETS.PAIRS_TRAIN {names}: no image with a phrase")
    if g.PAIRS_PSEUDO_BOXES:
        dicts = attach_pseudo_boxes(dicts, g.PAIRS_PSEUDO_BOXES)
        boxes = sum(len(d["annotations"]) for d in dicts)
        logger.info(
            f"Teacher pseudo-boxes of {g.PAIRS_PSEUDO_BOXES}: {boxes} for {len(dicts)} pair images "
            "(the online search is off)"
        )
    pair_cfg = cfg.clone()
    pair_cfg.defrost()
    if g.PAIRS_MIN_SIZE_TRAIN:
        pair_cfg.INPUT.MIN_SIZE_TRAIN = (int(g.PAIRS_MIN_SIZE_TRAIN),)
        pair_cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    logger.info(
        f"Image-text pairs: {len(dicts)} images of {names}, batches of {batch} at min size "
        f"{pair_cfg.INPUT.MIN_SIZE_TRAIN}, added to every {g.PAIRS_PERIOD}-th box batch"
    )
    return build_detection_train_loader(
        dicts,
        mapper=PairsDatasetMapper(pair_cfg, True),
        total_batch_size=batch,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
