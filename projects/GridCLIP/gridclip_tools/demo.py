"""Detect any vocabulary on images with a trained GridCLIP or ViLD (Detectron2's demo, open-vocab).

    # the embedded world's novel classes, with the model trained by `make demo`
    python tools/demo.py --input "datasets/gridclip_world/val/*.jpg" --output output/demo_vis \\
        --weights output/demo/gridclip/model_final.pth --vocabulary world_novel
    # classes typed by a user (or a .txt file with one name per line)
    python tools/demo.py --input my_images/ --output out/ --weights model.pth \\
        --custom-vocabulary "red star,blue ring" --confidence-threshold 0.2
    # grounding: a caption's phrases (or "red star. blue ring." GLIP-style) are the vocabulary;
    # each detection in detections.json names its phrase and character span
    python tools/demo.py --input img.png --output out/ --weights model.pth \\
        --prompt "a red star beside two blue rings on a striped background"
    # ViLD, LVIS's 1,203 classes, on the GPU if there is one (the default picks it)
    python tools/demo.py --config-file ViLD_R50.yaml --input img.jpg --output out/ \\
        --vocabulary lvis MODEL.WEIGHTS vild_lvis.pth

``--input`` takes image files, folders (their images) and globs, several of each. ``--output``
is a folder: one PNG per input image drawn with Detectron2's ``Visualizer`` and
``detections.json`` (every detection at or above the threshold: XYXY box in input pixels, score,
class; with ``--prompt``/``--caption`` also ``phrase``, ``span`` and ``spans``). Without
``--output`` the JSON goes to stdout. Trailing ``KEY VALUE`` pairs (or
``--opts KEY VALUE ...``) override the config, as in Detectron2's tools.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time

from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.config import get_gridclip_cfg
from gridclip.data import register_datasets_from_cfg
from gridclip.data.images import ImageInputError
from gridclip.data.images import read_image_bgr as _read_image
from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.prompts import parse_prompt
from gridclip.modeling.vocabulary import BUILTIN_VOCABULARIES, parse_vocabulary
from gridclip.utils.io import atomic_write
from gridclip_tools.args import (
    add_config_file,
    add_config_overrides,
    check_weights_file,
    config_overrides,
    split_trailing_opts,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger("gridclip.demo")


def _probability(text: str) -> float:
    """An argparse type: a finite number in [0, 1] (NaN, inf and out-of-range values refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a score between 0 and 1")
    return value


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_file(p)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders and/or globs (quote globs to let the demo expand them)",
    )
    p.add_argument(
        "--output", help="output folder (PNGs + detections.json); default: JSON to stdout"
    )
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument(
        "--vocabulary",
        choices=sorted(BUILTIN_VOCABULARIES),
        help="a built-in vocabulary; "
        + "; ".join(f"{k}: {v}" for k, v in sorted(BUILTIN_VOCABULARIES.items())),
    )
    vocab.add_argument(
        "--custom-vocabulary",
        metavar="NAMES_OR_TXT",
        help='comma-separated class names ("red star,blue ring") or a .txt file, one name a line',
    )
    vocab.add_argument(
        "--prompt",
        metavar="TEXT",
        help='grounding prompt: phrases separated by periods ("red star. blue ring.") or a '
        'caption ("a red star beside two blue rings"); its phrases are the vocabulary and each '
        "detection names its phrase and span (gridclip.modeling.prompts states the rule)",
    )
    vocab.add_argument(
        "--caption",
        metavar="TEXT",
        help="like --prompt, always read as a caption (several sentences, periods included)",
    )
    p.add_argument(
        "--confidence-threshold",
        type=_probability,
        default=0.3,
        help="minimum score shown (0 to 1)",
    )
    p.add_argument("--weights", help="trained checkpoint (same as the opts MODEL.WEIGHTS FILE)")
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="warn about and skip images that cannot be read (default: stop with an error)",
    )
    add_config_overrides(p)
    return p


def expand_inputs(inputs) -> list:
    """Image paths from files, folders and globs, in the order given (each once).

    Raises FileNotFoundError naming the argument that matched nothing, or when nothing matched.
    """
    paths, seen = [], set()

    def add(path):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)

    for item in inputs:
        pattern = os.path.expanduser(item)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                raise FileNotFoundError(f"--input {item!r}: the glob matched no file")
            for f in files:
                add(f)
        elif os.path.isdir(pattern):
            files = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f))
            )
            if not files:
                raise FileNotFoundError(
                    f"--input {item!r}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})"
                )
            for f in files:
                add(f)
        elif os.path.isfile(pattern):
            add(pattern)
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file, folder or glob match")
    if not paths:
        raise FileNotFoundError("--input matched no image")
    return paths


def output_names(paths) -> list:
    """A distinct ``<stem>.png`` per input (``<stem>_2.png`` ... when stems repeat)."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, i = f"{stem}.png", 1
        while name in used:
            i += 1
            name = f"{stem}_{i}.png"
        used.add(name)
        names.append(name)
    return names


def read_image_bgr(path: str):
    """(H, W, 3) uint8 BGR, EXIF orientation applied, any bit depth / channel count converted by
    :mod:`gridclip.data.images`' rule; ``ImageInputError`` (a ValueError) naming the file
    otherwise."""
    return _read_image(path)


def check_output_folder(output) -> None:
    """``--output`` must be a folder (existing or not), never an existing file."""
    if output and os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(
            f"--output {output!r} is an existing file; --output names a folder (PNGs + "
            "detections.json): pass a folder name"
        )


def prompt_json(predictor):
    """The prompt block of ``detections.json`` (None in vocabulary mode)."""
    if predictor.prompt is None:
        return None
    return {
        "text": predictor.prompt.prompt,
        "kind": predictor.prompt.kind,
        "phrases": [
            {"phrase": p.text, "span": list(p.span), "name": p.name}
            for p in predictor.prompt.phrases
        ],
    }


class ResultWriter:
    """``detections.json`` in the output folder, rewritten atomically as images are done (at
    most once a second, and always on :meth:`close`), so an interrupted or failed run keeps the
    results of every image before the failure (``"status"`` says how far it got)."""

    def __init__(self, output, header: dict, interval_s: float = 1.0):
        self.path = os.path.join(output, "detections.json") if output else None
        self.header, self.records, self.skipped = header, [], []
        self.interval_s, self._written = interval_s, 0.0

    def _payload(self, status: str) -> dict:
        return {**self.header, "status": status, "images": self.records, "skipped": self.skipped}

    def _write(self, status: str) -> None:
        if self.path is None:
            return
        with atomic_write(self.path, "w") as f:
            json.dump(self._payload(status), f, indent=2)
        self._written = time.monotonic()

    def add(self, record: dict = None, skipped: str = None) -> None:
        if record is not None:
            self.records.append(record)
        if skipped is not None:
            self.skipped.append(skipped)
        if time.monotonic() - self._written >= self.interval_s:
            self._write(f"running: {len(self.records)} images done")

    def close(self, status: str = "complete") -> dict:
        self._write(status)
        return self._payload(status)


def build_cfg(args):
    opts = config_overrides(args)
    if args.weights:
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"--weights {args.weights!r} does not exist")
        opts += ["MODEL.WEIGHTS", args.weights]
    try:
        cfg = get_gridclip_cfg(args.config_file, opts)
    except (AssertionError, KeyError) as e:  # yacs reports unknown keys/bad values this way
        raise ValueError(f"config {args.config_file!r} with overrides {opts}: {e}") from e
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "no trained weights: pass --weights FILE (or MODEL.WEIGHTS FILE); `make demo` writes "
            "output/demo/gridclip/model_final.pth"
        )
    check_weights_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")  # also when given as an override
    cfg.freeze()
    return cfg


def evaluated_model_setup(parser: argparse.ArgumentParser, args):
    """The config of a command that runs a trained model over registered datasets
    (``add_evaluated_model``'s flags): ``--num-images`` checked, the config with ``--weights``
    (:func:`build_cfg`) and its datasets registered. A bad value ends the command with
    ``parser.error`` naming it."""
    if args.num_images < 0:
        parser.error(f"--num-images {args.num_images}: must be >= 0")
    try:
        cfg = build_cfg(args)
        register_datasets_from_cfg(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    return cfg


def evaluation_setup(parser: argparse.ArgumentParser, args) -> tuple:
    """``(cfg, dataset)`` of an evaluation command (``add_evaluated_model``'s flags and
    ``--iou``): :func:`evaluated_model_setup`, and ``--dataset`` or else the config's
    ``DATASETS.TEST[0]``. A bad value ends the command with ``parser.error`` naming it."""
    if not 0.0 < args.iou <= 1.0:
        parser.error(f"--iou {args.iou}: must be in (0, 1]")
    cfg = evaluated_model_setup(parser, args)
    try:
        dataset = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
        if dataset is None:
            raise ValueError("no --dataset and the config has no DATASETS.TEST")
        if dataset not in DatasetCatalog.list():
            raise ValueError(f"--dataset {dataset!r} is not registered")
    except ValueError as e:
        parser.error(str(e))
    return cfg, dataset


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    split_trailing_opts(args)
    if not args.input:
        parser.error("--input: give at least one image, folder or glob")

    setup_logger(name="fvcore")
    setup_logger(name="gridclip")
    setup_logger()

    # Everything a user typed is checked before the model is built.
    try:
        check_output_folder(args.output)
        paths = expand_inputs(args.input)
        vocabulary = args.vocabulary or args.custom_vocabulary
        if vocabulary is not None:
            parse_vocabulary(vocabulary)
        elif args.custom_vocabulary is not None:
            raise ValueError("--custom-vocabulary is empty: give class names or a .txt file")
        prompt = args.caption if args.caption is not None else args.prompt
        prompt_kind = "caption" if args.caption is not None else "auto"
        if prompt is not None:
            parse_prompt(prompt, prompt_kind)
        cfg = build_cfg(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        parser.error(str(e))

    predictor = OpenVocabularyPredictor(cfg, vocabulary=vocabulary)
    if prompt is not None:
        predictor.set_prompt(prompt, prompt_kind)
    logger.info(
        f"{cfg.MODEL.META_ARCHITECTURE} on {cfg.MODEL.DEVICE}, vocabulary: {predictor.description}"
    )
    if args.output:
        os.makedirs(args.output, exist_ok=True)

    writer = ResultWriter(
        args.output,
        {
            "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
            "device": cfg.MODEL.DEVICE,
            "vocabulary": {
                "description": predictor.description,
                "class_names": predictor.class_names,
            },
            "prompt": prompt_json(predictor),
            "confidence_threshold": args.confidence_threshold,
        },
    )
    start = time.perf_counter()
    for path, png in tqdm(list(zip(paths, output_names(paths))), desc="demo", unit="img"):
        try:
            image = read_image_bgr(path)
        except ImageInputError as e:  # unreadable, or refused by the image rule
            if not args.skip_unreadable:
                writer.close(f"stopped at {path!r}: {e}")
                kept = (
                    f"; the {len(writer.records)} images before it are in " if args.output else ""
                )
                where = writer.path if args.output else ""
                print(
                    f"error: {e} (--skip-unreadable skips such files){kept}{where}",
                    file=sys.stderr,
                )
                sys.exit(1)
            logger.warning(f"skipping: {e}")
            writer.add(skipped=path)
            continue
        outputs = predictor(image)
        record = {
            "file_name": path,
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "detections": predictor.detections_to_json(outputs, args.confidence_threshold),
        }
        if args.output:
            drawing = predictor.visualize(image, outputs, args.confidence_threshold)
            Image.fromarray(drawing).save(os.path.join(args.output, png))
            record["visualization"] = png
        del image, outputs
        writer.add(record)

    result = writer.close("complete")
    records = writer.records
    total = sum(len(r["detections"]) for r in records)
    logger.info(
        f"{len(records)} images, {total} detections >= {args.confidence_threshold} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    if args.output:
        logger.info(f"Wrote {len(records)} PNGs and {writer.path}")
    else:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return result
