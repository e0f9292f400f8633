"""A second dataset for transfer: another render of the world, another vocabulary, COCO format.

    python tools/make_transfer_set.py    # $DETECTRON2_DATASETS/gridclip_world_transfer

Cross-dataset transfer (train on one dataset, evaluate on another with its own class list) is how
ViLD, Detic and most OVD papers report generalisation. This writes such a second set for the
models trained on the embedded world (``make demo``):

- **another vocabulary**: 20 of the world's 48 classes (all 10 novel ones of the default split
  and 5 frequent + 5 common base ones, the first by name), spelt with spaces ("yellow star") and
  numbered 1..20 in their own order; objects of the other 28 classes are never drawn;
- **another render**: its own seed (images the models never saw), 320 px images (the world's are
  256 px) with 4-10 objects (the world's 3-8);
- **COCO format, no LVIS fields** (no ``frequency``, ``neg_category_ids``, ...): it is evaluated
  by Detectron2's COCO evaluator on all its classes; objects too occluded to annotate become
  ``iscrowd`` regions (COCO's way of saying "do not count a detection here").

It is registered like any COCO file: ``DATASETS.FILES "('NAME=<root>/annotations/val.json:<root>/
val',)"`` on the command line, or ``register_coco_instances`` in Python; ``TEST.NOVEL_CLASSES``
with :func:`novel_classes` reports novel/base AP. Cached: the same parameters return at once;
written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from gridclip.data.lvis_ovd import datasets_root
from gridclip.data.world_scene import render_scene, world_categories
from gridclip.utils.io import built_in_place_of
from gridclip_tools.args import positive_int

__all__ = [
    "TRANSFER_FORMAT_VERSION",
    "default_transfer_root",
    "make_transfer_set",
    "novel_classes",
    "transfer_classes",
    "main",
]

#: Bump when the layout or the class choice changes: cached sets are then regenerated.
TRANSFER_FORMAT_VERSION = 1
DEFAULT_NAME = "gridclip_world_transfer"


def transfer_classes() -> List[Dict]:
    """The set's vocabulary: world category dicts of the 10 novel classes of the default split
    and the first 5 ``f`` and 5 ``c`` classes by name, sorted by name."""
    categories = world_categories(0)
    chosen = [c for c in categories if c["frequency"] == "r"]
    for frequency in ("f", "c"):
        chosen += [c for c in categories if c["frequency"] == frequency][:5]
    return sorted(chosen, key=lambda c: c["name"])


def novel_classes() -> List[str]:
    """Names (as the set spells them) of its classes never boxed in the world's training split:
    the value for ``TEST.NOVEL_CLASSES``."""
    return [c["name"].replace("_", " ") for c in transfer_classes() if c["frequency"] == "r"]


def default_transfer_root() -> str:
    return os.path.join(datasets_root(), DEFAULT_NAME)


def _params(seed: int, num_images: int, image_size: int) -> Dict:
    if num_images < 1 or image_size < 32:
        raise ValueError(
            f"need num_images >= 1 and image_size >= 32, got {num_images}, {image_size}"
        )
    return {
        "format_version": TRANSFER_FORMAT_VERSION,
        "seed": int(seed),
        "num_images": int(num_images),
        "image_size": int(image_size),
        "num_objects": [4, 10],
        "classes": [c["name"] for c in transfer_classes()],
    }


def _render(params: Dict, out_dir: str, progress: bool) -> Dict:
    world = world_categories(0)
    chosen = transfer_classes()
    new_id = {c["id"]: i + 1 for i, c in enumerate(chosen)}  # world id -> this set's id
    weights = [1.0 if c["id"] in new_id else 0.0 for c in world]
    images, annotations = [], []
    os.makedirs(os.path.join(out_dir, "val"))
    iterator = range(params["num_images"])
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="transfer set", unit="img")
    for index in iterator:
        rng = np.random.default_rng([params["seed"], 7, index])
        scene = render_scene(
            rng,
            params["image_size"],
            class_weights=weights,
            num_objects=tuple(params["num_objects"]),
        )
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(scene.image).save(os.path.join(out_dir, "val", file_name), quality=95)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": params["image_size"],
                "width": params["image_size"],
            }
        )
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": new_id[o.category_id],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": o.visible_area,
                    "iscrowd": 0 if o.annotated else 1,
                }
            )
    categories = [
        {"id": i + 1, "name": c["name"].replace("_", " "), "supercategory": c["shape"]}
        for i, c in enumerate(chosen)
    ]
    return {
        "info": {"description": "GridCLIP embedded world, transfer set", "params": params},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def make_transfer_set(
    root: Optional[str] = None,
    *,
    seed: int = 7,
    num_images: int = 300,
    image_size: int = 320,
    progress: bool = False,
) -> Dict[str, str]:
    """Write (or reuse) the transfer set under ``root``; returns its ``json_file``,
    ``image_root`` and the ``DATASETS.FILES`` ``entry`` (named ``gridclip_world_transfer``).

    Raises:
        FileExistsError: ``root`` exists and is not a transfer set.
    """
    root = os.path.abspath(root or default_transfer_root())
    params = _params(seed, num_images, image_size)
    json_file = os.path.join(root, "annotations", "val.json")
    manifest = os.path.join(root, "manifest.json")
    paths = {
        "json_file": json_file,
        "image_root": os.path.join(root, "val"),
        "entry": f"{DEFAULT_NAME}={json_file}:{os.path.join(root, 'val')}",
    }
    if os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f).get("params") == params:
                return paths
    elif os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} exists and is not a transfer set (no manifest.json); refusing to replace "
            "it. Remove it or pass another --root."
        )
    with built_in_place_of(root) as tmp:
        data = _render(params, tmp, progress)
        os.makedirs(os.path.join(tmp, "annotations"))
        with open(os.path.join(tmp, "annotations", "val.json"), "w") as f:
            json.dump(data, f, separators=(",", ":"))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"params": params}, f, indent=2)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--root", default=None, help=f"output folder (default $DETECTRON2_DATASETS/{DEFAULT_NAME})"
    )
    p.add_argument("--seed", type=int, default=7, help="seed of the images (the world's is 0)")
    p.add_argument("--num-images", type=positive_int, default=300)
    p.add_argument("--image-size", type=positive_int, default=320)
    args = p.parse_args(argv)
    if args.image_size < 32:
        p.error(f"--image-size {args.image_size}: must be at least 32")
    paths = make_transfer_set(
        args.root,
        seed=args.seed,
        num_images=args.num_images,
        image_size=args.image_size,
        progress=True,
    )
    novel = ", ".join(repr(n) for n in novel_classes())
    print(f"Transfer set: {paths['json_file']} (images in {paths['image_root']})")
    print(f"  DATASETS.FILES \"('{paths['entry']}',)\"")
    print(f'  TEST.NOVEL_CLASSES "({novel})"')
    return 0
