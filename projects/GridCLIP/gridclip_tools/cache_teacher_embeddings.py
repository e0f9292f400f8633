"""Cache GridCLIP's image-alignment teacher: CLIP embeddings of every training image and tiles.

Runs the frozen CLIP image encoder of the config (``MODEL.CLIP``) once per image of a dataset,
on the whole image and its g x g tiles for each g of ``MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS``, and
writes one file that training reads with ``MODEL.GRIDCLIP.TEACHER_CACHE`` (then no teacher runs
during training).

Resumable and safe to interrupt: the file is rewritten atomically every ``--save-every`` images
and on Ctrl-C; a rerun skips the images already in it.

Examples::

    python tools/cache_teacher_embeddings.py --config-file GridCLIP_R50.yaml \\
        --output datasets/cache/gridclip_teacher_lvis_train_rn50.pt
    # then train with
    #   MODEL.GRIDCLIP.TEACHER_CACHE datasets/cache/gridclip_teacher_lvis_train_rn50.pt
"""

import argparse
import logging
import os

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import gridclip  # noqa: F401  (registers the datasets)
from gridclip import get_gridclip_cfg
from gridclip.clip import build_clip_teacher_from_cfg
from gridclip.clip.teacher_cache import (
    TeacherEmbeddingCache,
    gridclip_teacher_provenance,
    teacher_cache_key,
)
from gridclip.data.images import read_image_rgb
from gridclip.utils.cache import CacheMismatchError
from gridclip_tools.args import non_negative_int, positive_int

logger = logging.getLogger("gridclip.tools.cache_teacher_embeddings")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default="", help="project config (path or name under configs/)")
    p.add_argument(
        "--dataset",
        default="",
        help="registered dataset(s), comma-separated (default: all of DATASETS.TRAIN)",
    )
    p.add_argument(
        "--output", default="", help="cache file (default: MODEL.GRIDCLIP.TEACHER_CACHE)"
    )
    p.add_argument(
        "--grids",
        default="",
        help="comma-separated tiles per side, e.g. 1,2 (default: MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS)",
    )
    p.add_argument("--device", default="", help="torch device (default: MODEL.DEVICE)")
    p.add_argument(
        "--save-every", type=positive_int, default=500, help="images between atomic saves"
    )
    p.add_argument(
        "--limit", type=non_negative_int, default=0, help="embed at most this many new images"
    )
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return p.parse_args(argv)


def _open_cache(path, embed_dim, grids, meta, overwrite):
    """The cache to extend: the file at ``path`` when it was built from the same content (CLIP
    weights' bytes, teacher input size, dataset fingerprint, dimension and grids), else a new
    one (``--overwrite``). A file built from other content is refused, not mixed."""
    if os.path.exists(path) and not overwrite:
        try:
            cache = TeacherEmbeddingCache.load(path, expected_provenance=meta)
        except CacheMismatchError as e:
            raise SystemExit(f"{e}; pass --overwrite to rebuild it (or another --output)")
        if cache.embed_dim != embed_dim or cache.grids != grids:
            raise SystemExit(
                f"{path} holds {cache.embed_dim}-d embeddings for grids {cache.grids}, not "
                f"{embed_dim}-d for grids {grids}; pass --overwrite to rebuild it"
            )
        logger.info(f"Resuming {path}: {len(cache)} images already embedded")
        return cache
    return TeacherEmbeddingCache(embed_dim, grids, meta)


def main(argv=None) -> str:
    args = parse_args(argv)
    setup_logger(name="gridclip")
    logger.setLevel(logging.INFO)
    cfg = get_gridclip_cfg(args.config_file or None, args.opts)
    datasets = [n for n in args.dataset.split(",") if n] or list(cfg.DATASETS.TRAIN)
    output = args.output or cfg.MODEL.GRIDCLIP.TEACHER_CACHE
    if not datasets:
        raise SystemExit("no dataset: pass --dataset or set DATASETS.TRAIN")
    if not output:
        raise SystemExit("no output file: pass --output or set MODEL.GRIDCLIP.TEACHER_CACHE")
    grids = (
        [int(g) for g in args.grids.split(",")]
        if args.grids
        else [int(g) for g in cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS]
    )
    device = args.device or cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"device {device!r} is not available; using the CPU")
        device = "cpu"

    meta = gridclip_teacher_provenance(cfg, datasets)
    cache = _open_cache(output, int(cfg.MODEL.CLIP.EMBED_DIM), grids, meta, args.overwrite)
    dicts = [d for name in datasets for d in DatasetCatalog.get(name)]
    dataset = ",".join(datasets)
    todo = [d for d in dicts if teacher_cache_key(d) not in cache]
    if args.limit > 0:
        todo = todo[: args.limit]
    logger.info(
        f"{dataset}: {len(dicts)} images, {len(dicts) - len(todo)} cached, {len(todo)} to embed "
        f"(grids {grids}) -> {output}"
    )
    if not todo:
        cache.save(output)
        return output

    teacher = build_clip_teacher_from_cfg(cfg).to(device)
    done_since_save = 0
    try:
        for d in tqdm(todo, desc="teacher embeddings", disable=args.no_progress):
            image = read_image_rgb(d["file_name"])  # (H, W, 3) uint8, the image rule
            image = torch.as_tensor(image.copy()).permute(2, 0, 1)[None]
            views = teacher.embed_tiles(image, grids=grids)
            cache.add(teacher_cache_key(d), [v[0] for v in views])
            done_since_save += 1
            if done_since_save >= args.save_every:
                cache.save(output)
                done_since_save = 0
    except KeyboardInterrupt:
        cache.save(output)
        logger.warning(f"Interrupted: saved {len(cache)} images to {output}; rerun to resume")
        raise SystemExit(130)
    cache.save(output)
    logger.info(f"Saved teacher embeddings of {len(cache)} images to {output}")
    return output
