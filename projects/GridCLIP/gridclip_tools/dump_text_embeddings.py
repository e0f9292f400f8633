"""Dump prompt-ensembled CLIP text embeddings of a vocabulary to a ``.npy`` (or ``.pt``) file.

The file can then be used as ``MODEL.CLIP.TEXT_EMBEDDINGS`` so training and evaluation need no
text encoder. Results are also cached in ``MODEL.CLIP.TEXT_CACHE_DIR``.

Examples::

    # LVIS v1 vocabulary (1,203 classes) with OpenAI's RN50
    python tools/dump_text_embeddings.py --dataset lvis_v1_val \\
        --output datasets/metadata/lvis_v1_clip_rn50.npy MODEL.CLIP.WEIGHTS ~/.cache/clip/RN50.pt

    # any vocabulary with the project's small CLIP
    python tools/dump_text_embeddings.py --names "red square,blue ring" --output /tmp/v.npy \\
        MODEL.CLIP.NAME embedded MODEL.CLIP.EMBED_DIM 256
"""

import argparse
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

import gridclip  # noqa: F401  (registers the datasets whose class names --dataset reads)
from gridclip import get_gridclip_cfg
from gridclip.clip import (
    check_text_embeddings,
    clean_class_name,
    clip_model_key,
    get_text_embeddings,
    load_clip_from_cfg,
    load_prompts,
    resolve_clip_weights,
    save_text_embeddings,
)
from gridclip.modeling.vocabulary import normalize_class_names

logger = logging.getLogger("gridclip.tools.dump_text_embeddings")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default="", help="project config (path or name under configs/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="registered dataset whose thing_classes are embedded")
    src.add_argument("--names", help='comma-separated class names, e.g. "red square,blue ring"')
    src.add_argument("--names-file", help="text file with one class name per line")
    p.add_argument("--output", required=True, help="output file (.npy, or .pt)")
    p.add_argument(
        "--prompts",
        default=None,
        help="template set (vild, single) or a template file; default MODEL.CLIP.PROMPTS",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="do not read or write MODEL.CLIP.TEXT_CACHE_DIR"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return p.parse_args(argv)


def read_names(args):
    if args.dataset:
        meta = MetadataCatalog.get(args.dataset)
        names = getattr(meta, "thing_classes", None)
        if not names:
            raise SystemExit(
                f"Dataset {args.dataset!r} has no thing_classes in MetadataCatalog (registered: "
                f"{sorted(MetadataCatalog.list())[:20]} ...)"
            )
        return list(names), f"dataset {args.dataset}"
    if args.names:
        return args.names.split(","), "--names"
    if not os.path.isfile(args.names_file):
        raise SystemExit(f"--names-file {args.names_file} does not exist")
    with open(args.names_file, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()], args.names_file


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="gridclip")
    setup_logger(name=logger.name)
    cfg = get_gridclip_cfg(args.config_file or None, args.opts)
    names, source = read_names(args)
    names = normalize_class_names(names, source=source)
    prompts = args.prompts or cfg.MODEL.CLIP.PROMPTS
    templates = load_prompts(prompts)
    weights = resolve_clip_weights(
        cfg.MODEL.CLIP.WEIGHTS, cfg.MODEL.CLIP.NAME, cfg.MODEL.CLIP.CACHE_DIR
    )
    logger.info(
        "Embedding %d class names from %s with %d prompt templates (%s) and CLIP %s",
        len(names),
        source,
        len(templates),
        prompts,
        weights,
    )
    emb = get_text_embeddings(
        [clean_class_name(n) for n in names],
        model_key=clip_model_key(weights),
        prompts=templates,
        cache_dir=None if args.no_cache else cfg.MODEL.CLIP.TEXT_CACHE_DIR,
        progress=not args.no_progress,
        clip_loader=lambda: load_clip_from_cfg(cfg, copy_model=False),
    )
    emb = check_text_embeddings(emb, embed_dim=cfg.MODEL.CLIP.EMBED_DIM, num_classes=len(names))
    path = save_text_embeddings(args.output, emb)
    logger.info("Wrote text embeddings of shape %s to %s", tuple(emb.shape), os.path.abspath(path))
    return 0
