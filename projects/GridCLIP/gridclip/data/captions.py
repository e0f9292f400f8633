"""Image-text pairs: COCO-captions-style JSON, phrases with character spans, registration.

Image-text pairs carry no boxes: an image and one or more captions ("a red star beside two blue
rings."). GridCLIP learns from them with caption pseudo-boxes
(:mod:`gridclip.modeling.pairs_alignment`), whose vocabulary is the batch's *phrases*.

**File format** (COCO captions, plus optional phrases; datasets/README.md)::

    {"images": [{"id": 1, "file_name": "a.jpg", "height": 256, "width": 256}, ...],
     "annotations": [{"id": 1, "image_id": 1, "caption": "a red star beside two blue rings.",
                      "phrases": [{"text": "a red star", "span": [0, 10]}, ...]}, ...]}

``phrases`` is optional; each phrase needs ``text`` (found in the caption when ``span`` is
missing) and may carry ``category_id`` (kept for evaluation only; training never reads it).
Without ``phrases`` a caption is split by :func:`split_caption_phrases` (the documented rule
of :mod:`gridclip.data.phrases`, shared with grounding prompts; no NLP dependency).

**Dataset dicts** (one per image with at least one caption): ``file_name``, ``image_id``,
``height``/``width`` when given, ``caption`` (the first), ``captions`` (all), ``phrases``: list
of ``{"text", "span": [start, end], "caption_index", "key"}`` (+ ``category_id`` when known),
where ``caption[start:end] == text`` and ``key`` = :func:`phrase_key` (what is embedded).

**Teacher pseudo-boxes** (a second self-training round; ``MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES``,
written by ``tools/pseudo_label_pairs.py``): a JSON of the pair images a trained detector
labelled (every one, with or without boxes) and its boxes, each naming its phrase key::

    {"info": {...}, "images": [{"id": 2000001, "file_name": "..."}, ...],
     "annotations": [{"image_id": 2000001, "bbox": [x, y, w, h], "phrase": "red star"}, ...]}

:func:`attach_pseudo_boxes` turns them into the dicts' ``annotations`` (``category_id`` = the
index of the phrase in the image's ``phrases``), which the pair mapper carries as
``pseudo_boxes``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .phrases import caption_phrases, phrase_key, pluralize

logger = logging.getLogger(__name__)

__all__ = [
    "phrase_key",
    "split_caption_phrases",
    "compose_caption",
    "load_coco_captions_json",
    "register_coco_captions",
    "pair_phrase_keys",
    "attach_pseudo_boxes",
]

_NUMBER_WORDS = ["a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def split_caption_phrases(caption: str) -> List[Dict]:
    """Split a free caption into phrases with character spans, by the project's one caption
    rule (:mod:`gridclip.data.phrases`, shared with grounding prompts): "a photo of a red star
    beside two blue rings on a striped background." -> "red star", "blue rings", "striped
    background".

    Returns:
        list of ``{"text", "span": [start, end]}`` with ``caption[start:end] == text``.
    """
    return [{"text": text, "span": [s, e]} for text, (s, e), _ in caption_phrases(caption)]


def compose_caption(
    groups: Sequence[Tuple[str, int, int]],
    rng: np.random.Generator,
    *,
    drop_probability: float = 0.2,
) -> Tuple[str, List[Dict]]:
    """A web-like caption of a scene's objects, with its phrases and their spans.

    Args:
        groups: ``(name, count, category_id)`` per class present (name with spaces, "red star").
        rng: the only source of randomness.
        drop_probability: each group is left out with this probability (captions are
            incomplete), at least one is kept.
    Returns:
        ``(caption, phrases)``; phrases: ``{"text", "span", "category_id"}``, e.g.
        ``("two blue rings and a red star on a noisy background.", [...])``.
    """
    assert len(groups) >= 1, "a caption needs at least one object"
    order = [groups[i] for i in rng.permutation(len(groups))]
    kept = [g for g in order if rng.random() >= drop_probability] or order[:1]
    texts = []
    for name, count, category_id in kept:
        if count == 1:
            text = ("an " if name[0] in "aeiou" else "a ") + name
        else:
            number = _NUMBER_WORDS[count - 1] if count <= len(_NUMBER_WORDS) else "many"
            text = f"{number} {pluralize(name)}"
        texts.append((text, category_id))
    # connectors: a list ("A, B and C"), or "A beside/next to/with B ..."
    style = int(rng.integers(4))
    glue = [", "] * (len(texts) - 2) + [" and "] if style < 2 else None
    if glue is None:
        word = [" beside ", " next to ", " with "][int(rng.integers(3))]
        glue = [word] + [", "] * max(len(texts) - 3, 0) + ([" and "] if len(texts) > 2 else [])
    prefix = ["", "a photo of ", "a picture showing ", "an image with "][int(rng.integers(4))]
    suffix = ["", " on a noisy background", " on a textured background", " in the scene"][
        int(rng.integers(4))
    ]
    caption, phrases = prefix, []
    for i, (text, category_id) in enumerate(texts):
        if i:
            caption += glue[i - 1]
        phrases.append(
            {
                "text": text,
                "span": [len(caption), len(caption) + len(text)],
                "category_id": category_id,
            }
        )
        caption += text
    caption += suffix + "."
    return caption, phrases


# ------------------------------------------------------------------------------------- loading
def _checked_phrases(given, caption: str, json_file: str, ann_id, caption_index: int) -> List[Dict]:
    where = f"{json_file}: annotation {ann_id}"
    if given is None:
        phrases = split_caption_phrases(caption)
    else:
        if not isinstance(given, list):
            raise ValueError(f"{where}: 'phrases' must be a list, got {type(given).__name__}")
        phrases = []
        for j, p in enumerate(given):
            if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"]:
                raise ValueError(f"{where}: phrase {j} needs a non-empty 'text' string")
            text = p["text"]
            span = p.get("span")
            if span is None:
                s = caption.find(text)
                if s < 0:
                    raise ValueError(f"{where}: phrase {text!r} does not occur in {caption!r}")
                span = [s, s + len(text)]
            ok = (
                isinstance(span, (list, tuple))
                and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1] <= len(caption)
                and caption[span[0] : span[1]] == text
            )
            if not ok:
                raise ValueError(
                    f"{where}: phrase {j} span {span!r} does not hold {text!r} in {caption!r}"
                )
            phrase = {"text": text, "span": [int(span[0]), int(span[1])]}
            if "category_id" in p:
                phrase["category_id"] = p["category_id"]
            phrases.append(phrase)
    for p in phrases:
        p["caption_index"] = caption_index
        p["key"] = phrase_key(p["text"])
    return [p for p in phrases if p["key"]]


def _read_images_and_annotations(json_file: str, where: str, what: str) -> Dict:
    """A COCO-style JSON with an ``images`` list and an ``annotations`` list (of ``what``);
    errors start with ``where``."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{where}: expected a dict with an 'images' list and 'annotations' list")
    if not isinstance(data.get("annotations"), list):
        raise ValueError(f"{where}: expected an 'annotations' list of {what}")
    return data


def load_coco_captions_json(json_file: str, image_root: str, dataset_name: str = "") -> List[Dict]:
    """Read a COCO-captions-style JSON (module doc) into dataset dicts, one per captioned image.

    Errors name the file and the offending key or value; images without a caption are skipped
    (counted in the log).
    """
    where = f"{json_file}" + (f" (dataset {dataset_name!r})" if dataset_name else "")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"captions file of {where} not found")
    data = _read_images_and_annotations(json_file, where, "captions")
    images: Dict = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{where}: images[{i}] needs 'id' and 'file_name'")
        if im["id"] in images:
            raise ValueError(f"{where}: image id {im['id']!r} appears twice")
        images[im["id"]] = im
    captions: Dict = {k: [] for k in images}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise ValueError(f"{where}: annotations[{i}] needs 'image_id' and 'caption'")
        if a["image_id"] not in images:
            raise ValueError(f"{where}: annotations[{i}] names unknown image_id {a['image_id']!r}")
        if not isinstance(a.get("caption"), str) or not a["caption"].strip():
            raise ValueError(f"{where}: annotations[{i}] needs a non-empty 'caption' string")
        captions[a["image_id"]].append(a)
    dicts, uncaptioned = [], 0
    for image_id, im in images.items():
        anns = captions[image_id]
        if not anns:
            uncaptioned += 1
            continue
        record = {
            "file_name": os.path.join(image_root, im["file_name"]),
            "image_id": image_id,
            "caption": anns[0]["caption"],
            "captions": [a["caption"] for a in anns],
            "phrases": [],
        }
        for key in ("height", "width"):
            if key in im:
                record[key] = im[key]
        for j, a in enumerate(anns):
            record["phrases"] += _checked_phrases(
                a.get("phrases"), a["caption"], json_file, a.get("id", f"#{j}"), j
            )
        dicts.append(record)
    if uncaptioned:
        logger.info(f"{where}: {uncaptioned} images without a caption skipped")
    logger.info(f"Loaded {len(dicts)} captioned images from {where}")
    return dicts


def register_coco_captions(
    name: str, json_file: str, image_root: str, extra_metadata: Optional[Dict] = None
) -> str:
    """Register an image-text pair dataset (COCO-captions-style JSON, module doc) with
    Detectron2 under ``name`` (lazy: the file is read on first use). Idempotent for the same
    file; another file under the same name is an error. Use it in ``DATASETS.PAIRS_TRAIN``."""
    json_file, image_root = os.path.expanduser(json_file), os.path.expanduser(image_root)
    if name in DatasetCatalog.list():
        known = MetadataCatalog.get(name).get("json_file", None)
        if known == json_file:
            return name
        raise ValueError(
            f"dataset {name!r} is already registered (with {known!r}, not {json_file!r})"
        )
    DatasetCatalog.register(
        name, functools.partial(load_coco_captions_json, json_file, image_root, name)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="captions",
        **(extra_metadata or {}),
    )
    return name


def pair_phrase_keys(dataset_dicts: Sequence[Dict]) -> List[str]:
    """The distinct phrase keys of pair dataset dicts, sorted (the text vocabulary to embed)."""
    return sorted({p["key"] for d in dataset_dicts for p in d.get("phrases", ())})


def attach_pseudo_boxes(dataset_dicts: Sequence[Dict], json_file: str) -> List[Dict]:
    """Pair dataset dicts with a teacher's pseudo-boxes (module doc) as their ``annotations``.

    Every image must be in the file's ``images`` (labelled, maybe with no box); every box must
    name a phrase of its image and have a positive width and height. Errors name the file and
    the image or value at fault.

    Returns:
        new dicts (the given ones are not changed): ``annotations`` = ``{"bbox" (XYWH_ABS),
        "bbox_mode", "category_id" (index in ``phrases``), "iscrowd": 0}``; other keys of the
        file's boxes are not read.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES: {json_file!r} not found "
            "(write it with tools/pseudo_label_pairs.py)"
        )
    data = _read_images_and_annotations(json_file, json_file, "pseudo-boxes")
    labelled = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    by_image: Dict = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not {"image_id", "bbox", "phrase"} <= set(a):
            raise ValueError(f"{json_file}: annotations[{i}] needs 'image_id', 'bbox', 'phrase'")
        if a["image_id"] not in labelled:
            raise ValueError(
                f"{json_file}: annotations[{i}] names image_id {a['image_id']!r}, "
                "which is not in its 'images'"
            )
        box = a["bbox"]
        ok = isinstance(box, list) and len(box) == 4
        ok = ok and all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)
        if not ok or box[2] <= 0 or box[3] <= 0:
            raise ValueError(
                f"{json_file}: annotations[{i}] bbox {box!r} is not a finite [x, y, w, h] "
                "with positive width and height"
            )
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for d in dataset_dicts:
        if d["image_id"] not in labelled:
            raise ValueError(
                f"{json_file}: pair image {d['file_name']!r} (image_id {d['image_id']!r}) was "
                "not labelled: the file is of other pairs (label them again)"
            )
        index = {}
        for j, p in enumerate(d["phrases"]):
            index.setdefault(p["key"], j)
        annotations = []
        for a in by_image.get(d["image_id"], ()):
            if a["phrase"] not in index:
                raise ValueError(
                    f"{json_file}: a pseudo-box of image_id {d['image_id']!r} names phrase "
                    f"{a['phrase']!r}, not one of its captions' {sorted(index)}"
                )
            annotations.append(
                {
                    "bbox": [float(v) for v in a["bbox"]],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": index[a["phrase"]],
                    "iscrowd": 0,
                }
            )
        out.append({**d, "annotations": annotations})
    return out
