"""The embedded world: a generated open-vocabulary detection dataset in LVIS format.

Real LVIS and real CLIP weights cannot be downloaded everywhere, so the project brings a small
world in which every claim can be measured end to end on a CPU:

- **Vocabulary**: 48 compositional categories ``<colour>_<shape>`` (8 colours x 7 shapes, 8 pairs
  left out), with LVIS frequencies: 20 ``f``, 18 ``c`` (base, boxed in training) and 10 ``r``
  (novel). Every colour and every shape of a novel class also occurs in some base class, so a
  novel class is a new *composition* of known attributes. The vocabulary is fixed (it does not
  depend on the world's seed), so the datasets' metadata is known before any file exists.
- **Images**: several objects per image on textured, noisy backgrounds with clutter strokes and
  non-class distractor blobs, a wide scale range, random rotation and mild aspect jitter, and
  occlusion by draw order. Boxes are tight around the *visible* pixels; objects more than 60%
  occluded (or tinier than 4 px) are not annotated, and their class is then neither a positive
  nor in the image's ``neg_category_ids`` (it is ``not_exhaustive`` when other instances of it
  are annotated), so the federated LVIS evaluation never punishes a correct detection of them.
- **Splits**: novel objects appear in training images and are annotated in the train JSON (an
  oracle can train on them); the open-vocabulary training split ``<prefix>_train`` removes them
  on load (``base_only=True``), as the LVIS OVD protocol does. ``f`` classes are drawn ~3x more
  often than ``c`` and ``r`` ones in training; validation draws all classes uniformly so each has
  enough instances for a stable AP.

The vocabulary and :func:`render_scene`, the one renderer, live in :mod:`.world_scene` (and are
re-exported here). :func:`generate_world` writes a world (atomic, cached by its parameters);
:func:`register_world` registers it with Detectron2 (lazy: files may not exist yet).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..utils.io import built_in_place_of
from .captions import compose_caption, load_coco_captions_json
from .lvis_ovd import datasets_root, register_lvis_format_dataset
from .world_scene import (
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    class_names,
    render_scene,
    world_categories,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS",
    "SHAPES",
    "PRESETS",
    "WORLD_FORMAT_VERSION",
    "SceneObject",
    "Scene",
    "world_categories",
    "class_names",
    "render_scene",
    "generate_world",
    "world_params",
    "register_world",
    "register_default_worlds",
    "default_world_root",
    "world_prefix",
    "resolve_world_root",
    "PAIRS_PRESETS",
    "generate_world_pairs",
    "register_world_pairs",
]

#: Bump when the renderer or the JSON layout changes: cached worlds are then regenerated.
WORLD_FORMAT_VERSION = 1

TRAIN_FREQUENCY_WEIGHTS = {"f": 1.0, "c": 0.3, "r": 0.3}

#: Named parameter sets. ``demo``: the embedded default (three detectors train on it within
#: minutes on 2 CPU cores); ``ci``: a tiny world for tests.
PRESETS: Dict[str, Dict] = {
    "demo": dict(num_train=1000, num_val=300, image_size=256),
    "ci": dict(num_train=32, num_val=16, image_size=128),
}


# ------------------------------------------------------------------------------- world on disk
def world_params(
    preset: str = "demo",
    *,
    seed: int = 0,
    split_seed: int = 0,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    image_size: Optional[int] = None,
    num_objects: Tuple[int, int] = (3, 8),
    object_size: Tuple[float, float] = (12.0, 110.0),
    image_format: str = "jpg",
) -> Dict:
    """The full parameter dict of a world (what the cache compares), from a preset + overrides."""
    if preset not in PRESETS:
        raise KeyError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    p = dict(PRESETS[preset])
    for key, value in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size)):
        if value is not None:
            p[key] = int(value)
    if p["num_train"] < 1 or p["num_val"] < 1 or p["image_size"] < 32:
        raise ValueError(f"world needs >= 1 train and val image and image_size >= 32, got {p}")
    lo, hi = int(num_objects[0]), int(num_objects[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"num_objects must be a range 1 <= min <= max, got {num_objects}")
    if int(split_seed) < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    # The default split (0) is not written, so worlds generated before split seeds existed stay
    # cached; another split changes which classes are novel, hence the train images' draws.
    split = {"split_seed": int(split_seed)} if split_seed else {}
    return {
        "format_version": WORLD_FORMAT_VERSION,
        "preset": preset,
        "seed": int(seed),
        **p,
        "num_objects": [lo, hi],
        "object_size": [float(object_size[0]), float(object_size[1])],
        "image_format": image_format,
        "train_frequency_weights": dict(TRAIN_FREQUENCY_WEIGHTS),
        **split,
    }


def _split_json(split: str, params: Dict, progress: bool, out_dir: str) -> Tuple[Dict, List]:
    """Render one split to ``out_dir/<split>/`` and return its LVIS dict (no categories yet)."""
    categories = world_categories(params.get("split_seed", 0))
    num_classes = len(categories)
    if split == "train":
        weights = [params["train_frequency_weights"][c["frequency"]] for c in categories]
        count, split_code, id_base = params["num_train"], 0, 0
    else:
        weights = [1.0] * num_classes
        count, split_code, id_base = params["num_val"], 1, 1_000_000
    os.makedirs(os.path.join(out_dir, split))
    images, annotations = [], []
    iterator = range(count)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"world {split}", unit="img")
    for index in iterator:
        rng = np.random.default_rng([params["seed"], split_code, index])
        scene = render_scene(
            rng,
            params["image_size"],
            class_weights=weights,
            num_objects=tuple(params["num_objects"]),
            object_size=tuple(params["object_size"]),
        )
        image_id = id_base + index + 1
        file_name = f"{image_id:012d}.{params['image_format']}"
        path = os.path.join(out_dir, split, file_name)
        if params["image_format"] == "jpg":
            Image.fromarray(scene.image).save(path, quality=95)
        else:
            Image.fromarray(scene.image).save(path)
        present = {o.category_id for o in scene.objects}
        annotated = {o.category_id for o in scene.objects if o.annotated}
        skipped = {o.category_id for o in scene.objects if not o.annotated}
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "coco_url": f"{split}/{file_name}",
                "height": params["image_size"],
                "width": params["image_size"],
                # Every class not drawn at all is verified absent.
                "neg_category_ids": [c for c in range(1, num_classes + 1) if c not in present],
                # Classes with some instance too occluded to annotate next to annotated ones.
                "not_exhaustive_category_ids": sorted(annotated & skipped),
            }
        )
        for o in scene.objects:
            if not o.annotated:
                continue
            x0, y0, x1, y1 = o.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": o.category_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": o.visible_area,
                    "segmentation": [o.polygon],
                }
            )
    return {"images": images, "annotations": annotations}, images


def _summary(train: Dict, val: Dict, split_seed: int = 0) -> Dict:
    freq = {c["id"]: c["frequency"] for c in world_categories(split_seed)}
    out = {}
    for split, d in (("train", train), ("val", val)):
        per_group = {"f": 0, "c": 0, "r": 0}
        for a in d["annotations"]:
            per_group[freq[a["category_id"]]] += 1
        out[split] = {
            "images": len(d["images"]),
            "instances": len(d["annotations"]),
            "instances_per_frequency": per_group,
        }
    return out


def generate_world(
    root: str,
    *,
    preset: str = "demo",
    seed: int = 0,
    split_seed: int = 0,
    progress: bool = False,
    **overrides,
) -> Dict:
    """Write a world to ``root`` and return its manifest (cached and atomic).

    Layout: ``root/{train,val}/<id>.jpg``, ``root/annotations/{train,val}.json`` (LVIS v1
    format), ``root/manifest.json`` (parameters + summary).

    - Cached: if ``root/manifest.json`` has the same parameters, nothing is written.
    - Atomic: the world is built in a temporary folder next to ``root`` and moved into place
      with ``os.replace``; an error leaves no partial ``root``. A previous world at ``root`` with
      other parameters is replaced; a ``root`` that is not a world (no manifest) is refused.

    Args:
        preset: ``"demo"`` (1000 train / 300 val images of 256 px) or ``"ci"`` (32 / 16 of 128).
        seed: every image is drawn from ``(seed, split, index)``: same seed, same bytes.
        split_seed: which classes are novel (:func:`world_categories`); 0 is the default split.
            Register the world with the same ``split_seed``.
        overrides: ``num_train``, ``num_val``, ``image_size``, ``num_objects``, ``object_size``,
            ``image_format`` (see :func:`world_params`).
    """
    params = world_params(preset, seed=seed, split_seed=split_seed, **overrides)
    root = os.path.abspath(os.path.expanduser(root))
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("params") == params:
            logger.info(f"World at {root} is up to date (cached)")
            return manifest
        logger.info(f"World at {root} has other parameters; regenerating")
    elif os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} exists and is not a generated world (no manifest.json); refusing to replace "
            "it. Remove it or pass another --root."
        )
    with built_in_place_of(root) as tmp:
        train, _ = _split_json("train", params, progress, tmp)
        val, _ = _split_json("val", params, progress, tmp)
        categories = _with_counts(world_categories(split_seed), train)
        info = {"description": "GridCLIP embedded world", "params": params}
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, d in (("train", train), ("val", val)):
            d = {"info": info, "images": d["images"], "annotations": d["annotations"]}
            d["categories"] = categories
            with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
                json.dump(d, f, separators=(",", ":"))
        manifest = {"params": params, "summary": _summary(train, val, split_seed)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    logger.info(f"World written to {root}: {manifest['summary']}")
    return manifest


def _with_counts(categories: List[Dict], train: Dict) -> List[Dict]:
    """LVIS category dicts with ``image_count``/``instance_count`` from the train split."""
    images = {c["id"]: set() for c in categories}
    instances = {c["id"]: 0 for c in categories}
    for a in train["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    keys = ("id", "name", "synonyms", "def", "frequency")
    return [
        {
            **{k: c[k] for k in keys},
            "image_count": len(images[c["id"]]),
            "instance_count": instances[c["id"]],
        }
        for c in categories
    ]


# --------------------------------------------------------------------------------- registration
def resolve_world_root(root: str) -> str:
    """``DATASETS.WORLD.ROOT`` semantics: absolute as is, else under ``$DETECTRON2_DATASETS``."""
    root = os.path.expanduser(root)
    return root if os.path.isabs(root) else os.path.join(datasets_root(), root)


def world_prefix(preset: str = "demo", split_seed: int = 0) -> str:
    """Folder and dataset-name prefix of a world: ``gridclip_world`` (demo),
    ``gridclip_world_<preset>``, plus ``_split<k>`` for a split seed k > 0."""
    if preset not in PRESETS:
        raise KeyError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    name = "gridclip_world" if preset == "demo" else f"gridclip_world_{preset}"
    return name + (f"_split{int(split_seed)}" if split_seed else "")


def default_world_root(preset: str = "demo", split_seed: int = 0) -> str:
    """``$DETECTRON2_DATASETS/<world_prefix(preset, split_seed)>``."""
    return os.path.join(datasets_root(), world_prefix(preset, split_seed))


def _load_world_split(loader, json_file: str, name: str, split_seed: int = 0):
    if not os.path.isfile(json_file):
        hint = f" --split-seed {split_seed}" if split_seed else ""
        raise FileNotFoundError(
            f"The embedded world of dataset {name!r} is missing: {json_file!r} does not exist. "
            f"Generate it with `python tools/make_world.py{hint}` (add `--preset ci` for the tiny "
            "test world, `--root` for another folder) or run `make demo`."
        )
    manifest = os.path.join(os.path.dirname(os.path.dirname(json_file)), "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            written = int(json.load(f).get("params", {}).get("split_seed", 0))
        if written != int(split_seed):
            raise ValueError(
                f"dataset {name!r} is registered with split seed {split_seed}, but the world at "
                f"{os.path.dirname(manifest)!r} was generated with split seed {written}: its "
                "novel classes differ. Register it with the split seed it was generated with."
            )
    return loader()


def register_world(
    root: Optional[str] = None, prefix: str = "gridclip_world", split_seed: int = 0
) -> List[str]:
    """Register a generated world's splits with Detectron2 (idempotent, lazy).

    - ``<prefix>_train``: train images, novel (``r``) annotations removed: the OVD split.
    - ``<prefix>_train_full``: train with every annotation (an oracle that sees novel boxes).
    - ``<prefix>_val``: validation, every class annotated.
    - ``<prefix>_pairs``: image-text pairs without boxes (:func:`register_world_pairs`).

    The files need not exist yet: class names and frequencies come from the fixed vocabulary,
    and loading a missing world raises ``FileNotFoundError`` telling how to generate it.

    Args:
        root: world folder (used as given; :func:`resolve_world_root` turns a relative path into
            one under ``$DETECTRON2_DATASETS``); default :func:`default_world_root`
            (``$DETECTRON2_DATASETS/gridclip_world``).
        split_seed: the split the world was generated with (which classes are novel); loading
            a world of another split is refused.

    Returns:
        The registered dataset names.
    """
    root = default_world_root(split_seed=split_seed) if root is None else os.path.expanduser(root)
    categories = world_categories(split_seed)
    metadata = {
        "thing_classes": [c["name"] for c in categories],
        "class_frequencies": [c["frequency"] for c in categories],
        "world_root": root,
    }
    names = []
    for suffix, split, base_only in (
        ("train", "train", True),
        ("train_full", "train", False),
        ("val", "val", False),
    ):
        name = f"{prefix}_{suffix}"
        json_file = os.path.join(root, "annotations", f"{split}.json")
        already = name in DatasetCatalog.list()
        register_lvis_format_dataset(
            name, json_file, root, base_only=base_only, extra_metadata=metadata
        )
        if not already:
            loader = DatasetCatalog[name]
            DatasetCatalog.remove(name)
            DatasetCatalog.register(
                name, functools.partial(_load_world_split, loader, json_file, name, split_seed)
            )
        names.append(name)
    names.append(register_world_pairs(root, f"{prefix}_pairs"))  # image-text pairs, no boxes
    return names


#: Split seeds registered at import besides the default one (the study command's second split).
REGISTERED_SPLIT_SEEDS = (1, 2)


def register_default_worlds() -> None:
    """Register the demo world (``gridclip_world_*``), its other splits
    (``gridclip_world_split<k>_*``, k in :data:`REGISTERED_SPLIT_SEEDS`) and the CI world
    (``gridclip_world_ci_*``) at their default roots under ``$DETECTRON2_DATASETS``. Called at
    import of ``gridclip.data``; lazy (the files need not exist).
    """
    register_world(default_world_root("demo"), prefix="gridclip_world")
    for k in REGISTERED_SPLIT_SEEDS:
        prefix = world_prefix("demo", k)
        register_world(default_world_root("demo", k), prefix=prefix, split_seed=k)
    register_world(default_world_root("ci"), prefix="gridclip_world_ci")


# ------------------------------------------------------------------------- image-text pairs
#: Pair images per world preset (``tools/make_world.py --num-pairs`` overrides).
PAIRS_PRESETS: Dict[str, int] = {"demo": 1000, "ci": 16}
#: Bump when the pair images or captions change: cached pair splits are then regenerated.
PAIRS_FORMAT_VERSION = 1
_PAIRS_SPLIT_CODE = 2  # rng streams: (seed, 0, i) train, (seed, 1, i) val, (seed, 2, i) pairs
_PAIRS_ID_BASE = 2_000_000
_CAPTION_DROP_PROBABILITY = 0.2


def _read_manifest(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def generate_world_pairs(
    root: str, *, num_pairs: Optional[int] = None, progress: bool = False
) -> Dict:
    """Write the image-text pairs of the world at ``root`` (generated first) and return their
    manifest. Cached and atomic like :func:`generate_world`.

    Layout: ``root/pairs/images/<id>.<ext>``, ``root/pairs/captions.json`` (COCO captions with
    ``phrases``: text, span and the category each phrase names, for evaluation only),
    ``root/pairs/manifest.json``. Images come from the world's renderer with every class drawn
    uniformly (novel classes included, as in web captions), seeded by ``(world seed, 2, index)``;
    each caption names the visible (annotated-quality) objects with their counts, each class
    left out with probability 0.2 (captions are incomplete).

    Cache: the pair manifest records the world's parameters; pairs of another world (another
    seed, size, ...) or another pair count are regenerated, never mixed. A world regenerated
    by :func:`generate_world` loses its pairs (the folder is replaced), so they are remade.
    """
    root = os.path.abspath(os.path.expanduser(root))
    world = _read_manifest(os.path.join(root, "manifest.json"))
    if world is None:
        raise FileNotFoundError(
            f"{root} is not a generated world (no manifest.json): generate the world first "
            "(python tools/make_world.py)"
        )
    params = world["params"]
    if num_pairs is None:
        num_pairs = PAIRS_PRESETS.get(params.get("preset"), PAIRS_PRESETS["demo"])
    if int(num_pairs) < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    pairs_params = {
        "format_version": PAIRS_FORMAT_VERSION,
        "num_pairs": int(num_pairs),
        "caption_drop_probability": _CAPTION_DROP_PROBABILITY,
        "world_params": params,
    }
    out = os.path.join(root, "pairs")
    manifest = _read_manifest(os.path.join(out, "manifest.json"))
    if manifest is not None and manifest.get("params") == pairs_params:
        logger.info(f"Image-text pairs at {out} are up to date (cached)")
        return manifest
    categories = world_categories()
    names = [c["name"].replace("_", " ") for c in categories]
    with built_in_place_of(out) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        images, annotations = [], []
        iterator = range(pairs_params["num_pairs"])
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="world pairs", unit="img")
        size = params["image_size"]
        for index in iterator:
            rng = np.random.default_rng([params["seed"], _PAIRS_SPLIT_CODE, index])
            scene = render_scene(
                rng,
                size,
                num_objects=tuple(params["num_objects"]),
                object_size=tuple(params["object_size"]),
            )
            image_id = _PAIRS_ID_BASE + index + 1
            file_name = f"{image_id:012d}.{params['image_format']}"
            path = os.path.join(tmp, "images", file_name)
            Image.fromarray(scene.image).save(
                path, **({"quality": 95} if params["image_format"] == "jpg" else {})
            )
            counts: Dict[int, int] = {}
            for o in scene.objects:
                if o.annotated:
                    counts[o.category_id] = counts.get(o.category_id, 0) + 1
            if not counts:  # nothing visible enough to name: no caption for this image
                counts = {scene.objects[0].category_id: 1} if scene.objects else {}
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            if not counts:
                continue
            groups = [(names[c - 1], n, c) for c, n in counts.items()]
            caption, phrases = compose_caption(
                groups, rng, drop_probability=_CAPTION_DROP_PROBABILITY
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "caption": caption,
                    "phrases": phrases,
                }
            )
        freq = {c["id"]: c["frequency"] for c in categories}
        per_group = {"f": 0, "c": 0, "r": 0}
        for a in annotations:
            for p in a["phrases"]:
                per_group[freq[p["category_id"]]] += 1
        info = {"description": "GridCLIP embedded world: image-text pairs", "params": pairs_params}
        with open(os.path.join(tmp, "captions.json"), "w") as f:
            json.dump({"info": info, "images": images, "annotations": annotations}, f)
        manifest = {
            "params": pairs_params,
            "summary": {
                "images": len(images),
                "captions": len(annotations),
                "phrases_per_frequency": per_group,
            },
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
    logger.info(f"Image-text pairs written to {out}: {manifest['summary']}")
    return manifest


def _load_world_pairs(root: str, name: str) -> List[Dict]:
    json_file = os.path.join(root, "pairs", "captions.json")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"The image-text pairs of dataset {name!r} are missing: {json_file!r} does not exist. "
            "Generate them with `python tools/make_world.py` (it writes the world and its pairs; "
            "`--preset ci` for the tiny test world, `--root` for another folder)."
        )
    world = _read_manifest(os.path.join(root, "manifest.json"))
    pairs = _read_manifest(os.path.join(root, "pairs", "manifest.json"))
    if world is None or pairs is None or pairs["params"].get("world_params") != world["params"]:
        raise ValueError(
            f"The image-text pairs in {root}/pairs belong to another world than {root} (its "
            "manifest.json differs from the one recorded in pairs/manifest.json): regenerate them "
            "with `python tools/make_world.py`"
        )
    return load_coco_captions_json(json_file, os.path.join(root, "pairs", "images"), name)


def register_world_pairs(root: str, name: str) -> str:
    """Register the world's image-text pairs (``root/pairs``) as ``name`` (lazy, idempotent):
    dataset dicts with ``caption``, ``captions`` and ``phrases`` (spans, keys, category ids) and
    no annotations; for ``DATASETS.PAIRS_TRAIN``."""
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, functools.partial(_load_world_pairs, root, name))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "pairs", "captions.json"),
            image_root=os.path.join(root, "pairs", "images"),
            evaluator_type="captions",
            world_root=root,
        )
    return name
