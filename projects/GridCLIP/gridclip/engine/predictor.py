"""A Detectron2 ``DefaultPredictor`` that detects any vocabulary.

Shared by ``tools/demo.py`` and the notebook (``projects/GridCLIP/notebooks``)::

    predictor = OpenVocabularyPredictor.from_config_file(
        "embedded/GridCLIP_world.yaml", weights="output/demo/gridclip/model_final.pth"
    )
    predictor.set_vocabulary("world_novel")           # a built-in vocabulary
    predictor.set_vocabulary("red star, blue ring")   # names typed by a user
    outputs = predictor(cv2.imread("image.png"))      # BGR in, like DefaultPredictor
    batch = predictor([bgr_1, bgr_2, bgr_3])          # N images, one forward: a list of outputs
    outputs = predictor(bgr, prompt="a red star beside two blue rings")  # grounding: see below
    rgb = predictor.visualize(bgr, outputs, threshold=0.3)
    detections = predictor.detections_to_json(outputs)

Every vocabulary gets its own ``MetadataCatalog`` entry, named after a hash of its class names
(``gridclip_vocabulary_<hash>``), so switching vocabularies any number of times in one process
never collides with an earlier entry (``Metadata`` refuses to change ``thing_classes``).

Grounding: ``predictor.set_prompt(prompt)`` (or ``predictor(images, prompt=...)``) makes the
phrases of a caption or a GLIP-style prompt (``"red star. blue ring."``) the vocabulary
(:func:`gridclip.modeling.prompts.parse_prompt`); from then on every detection of
``detections_to_json`` carries its ``phrase`` and character ``span`` in the prompt, and drawings
label the phrase. ``set_vocabulary`` ends prompt mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from ..config import get_gridclip_cfg
from ..data.images import to_bgr_uint8
from ..modeling.prompts import ParsedPrompt, parse_prompt
from ..modeling.vocabulary import BUILTIN_VOCABULARIES, builtin_vocabulary, parse_vocabulary
from .checkpoint import project_checkpointer
from .vocabulary import base_novel_masks, trained_name_keys

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_VOCABULARIES",
    "OpenVocabularyPredictor",
    "builtin_vocabulary",
    "detections_to_json",
    "parse_prompt",
    "parse_vocabulary",
    "vocabulary_metadata",
]

#: small images are drawn enlarged to at least this many pixels on their longer side
MIN_DRAWING_SIDE = 640
#: large images are drawn reduced to at most this many pixels on their longer side (bounded
#: memory: Detectron2's Visualizer holds several full-size copies of its canvas)
MAX_DRAWING_SIDE = 1600

Vocabulary = Union[str, os.PathLike, Sequence[str]]


def vocabulary_metadata(class_names: Sequence[str], prefix: str = "gridclip_vocabulary"):
    """The ``MetadataCatalog`` entry of a vocabulary: ``<prefix>_<hash of the names>``.

    The same names always map to the same entry; different names never share one, so
    vocabularies can be switched any number of times in one process.
    """
    names = [str(n) for n in class_names]
    digest = hashlib.sha256(json.dumps(names).encode("utf-8")).hexdigest()[:16]
    metadata = MetadataCatalog.get(f"{prefix}_{digest}")
    if "thing_classes" not in metadata.as_dict():
        metadata.thing_classes = names
    assert list(metadata.thing_classes) == names, (
        f"MetadataCatalog entry {metadata.name!r} holds other classes; is another library using "
        f"the prefix {prefix!r}?"
    )
    return metadata


def detections_to_json(
    outputs: Dict,
    class_names: Sequence[str],
    threshold: float = 0.0,
    prompt: Optional[ParsedPrompt] = None,
) -> List[Dict]:
    """Detections of one image as JSON-ready dicts, highest score first.

    Args:
        outputs: a model output for one image (``{"instances": Instances}`` with
            ``pred_boxes``, ``scores``, ``pred_classes`` in input-image pixels).
        class_names: the K names of the vocabulary the outputs were predicted with.
        threshold: keep detections with score >= threshold.
        prompt: the parsed prompt the vocabulary came from (``class_names`` are its
            ``class_names``), or None.

    Returns:
        ``[{"box": [x0, y0, x1, y1], "score": s, "class_id": k, "class_name": name}, ...]``
        (boxes XYXY in the pixels of the image given to the predictor). With a prompt, each also
        has ``"phrase"`` (the text as written in the prompt), ``"span": [start, end]`` (its
        string indices in the prompt, end exclusive) and ``"spans"`` (every occurrence of the
        phrase's name: a caption may name the same thing twice).
    """
    if prompt is not None and list(prompt.class_names) != list(class_names):
        raise ValueError(
            f"the prompt's phrases {prompt.class_names} are not the vocabulary {list(class_names)}"
        )
    instances = outputs["instances"].to("cpu")
    boxes = instances.pred_boxes.tensor.tolist()
    scores = instances.scores.tolist()
    classes = instances.pred_classes.tolist()
    detections = []
    for box, score, k in zip(boxes, scores, classes):
        if score < threshold:
            continue
        if not 0 <= k < len(class_names):
            raise ValueError(
                f"detection of class {k} but the vocabulary has {len(class_names)} classes: were "
                "the outputs predicted with another vocabulary?"
            )
        detections.append(
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(float(score), 5),
                "class_id": int(k),
                "class_name": class_names[k],
            }
        )
        if prompt is not None:
            phrases = prompt.class_phrases[k]
            detections[-1]["phrase"] = phrases[0].text
            detections[-1]["span"] = list(phrases[0].span)
            detections[-1]["spans"] = [list(p.span) for p in phrases]
    detections.sort(key=lambda d: -d["score"])
    return detections


class OpenVocabularyPredictor(DefaultPredictor):
    """``DefaultPredictor`` (BGR image in, ``cfg.INPUT.MIN_SIZE_TEST`` resize, weights from
    ``cfg.MODEL.WEIGHTS``, on ``cfg.MODEL.DEVICE``) for GridCLIP and ViLD, plus a vocabulary
    that can be changed at any time with :meth:`set_vocabulary`.

    Attributes:
        class_names (list[str]): the current vocabulary.
        metadata (Metadata): its ``MetadataCatalog`` entry (``thing_classes`` = class_names),
            what :meth:`visualize` draws with.
    """

    def __init__(self, cfg, vocabulary: Optional[Vocabulary] = None):
        """
        Args:
            cfg: a config from ``gridclip.get_gridclip_cfg`` (``MODEL.WEIGHTS``: the trained
                model; ``MODEL.DEVICE``: cpu, or cuda when present).
            vocabulary: anything :meth:`set_vocabulary` takes; default: the vocabulary the model
                was trained with (its checkpoint's classes, named by ``DATASETS.TRAIN/TEST``).
        """
        with project_checkpointer():  # weights of another architecture are an error
            super().__init__(cfg)
        for attr in ("set_vocabulary", "num_classes"):
            if not hasattr(self.model, attr):
                raise TypeError(
                    f"{type(self.model).__name__} ({cfg.MODEL.META_ARCHITECTURE}) has no {attr!r}:"
                    " OpenVocabularyPredictor needs an open-vocabulary model (GridCLIP or ViLD)"
                )
        names = getattr(self.model, "class_names", None)
        if names is None:
            dataset_meta = getattr(self, "metadata", None)
            names = getattr(dataset_meta, "thing_classes", None) if dataset_meta else None
        if names is None or len(names) != self.model.num_classes:
            names = [f"class_{i}" for i in range(self.model.num_classes)]
        self.class_names: List[str] = list(names)
        self.description = f"trained vocabulary, {len(names)} classes"
        self.metadata = vocabulary_metadata(self.class_names)
        self.prompt: Optional[ParsedPrompt] = None  # set by set_prompt
        # base = boxed in the model's training, judged by name against the vocabulary it was
        # built with (not a later swap's): a prompt's phrase naming a novel class is novel
        self._trained_base_names = trained_name_keys(self.model, self.class_names)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    @classmethod
    def from_config_file(
        cls,
        config_file: str,
        weights: Optional[str] = None,
        opts: Sequence[str] = (),
        vocabulary: Optional[Vocabulary] = None,
    ) -> "OpenVocabularyPredictor":
        """Build from a config path or a name under ``projects/GridCLIP/configs`` (e.g.
        ``"embedded/GridCLIP_world.yaml"``), a checkpoint and config overrides."""
        opts = list(opts)
        if weights:
            if not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"weights {weights!r} do not exist; train a model first (e.g. `make demo` "
                    "writes output/demo/<model>/model_final.pth)"
                )
            opts += ["MODEL.WEIGHTS", weights]
        cfg = get_gridclip_cfg(config_file, opts)
        cfg.freeze()
        return cls(cfg, vocabulary=vocabulary)

    # -------------------------------------------------------------------------- predicting
    def __call__(
        self, images: Union[np.ndarray, Sequence[np.ndarray]], prompt: Optional[str] = None
    ):
        """``DefaultPredictor``'s call for one BGR (H, W, 3) image (its output dict), or for a
        list of them in one forward (a list of output dicts, in order). ``prompt``: detect the
        phrases of this caption or GLIP-style prompt (:meth:`set_prompt`; kept for later calls).

        A batch is resized image by image as one image would be, then padded to its largest
        image by the model (``ImageList``): images of one size give the same detections as one
        by one (tests); images of different sizes see zero padding beyond their borders, as in
        any batched Detectron2 inference.
        """
        if prompt is not None and (self.prompt is None or self.prompt.prompt != prompt):
            self.set_prompt(prompt)
        if isinstance(images, (np.ndarray, Image.Image)):
            # any dtype / channel count, by gridclip.data.images' rule (or a clear error)
            return super().__call__(to_bgr_uint8(images))
        return self.predict_batch(images)

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[Dict]:
        """The outputs of N BGR images from one model forward (see :meth:`__call__`)."""
        if not len(images):
            return []
        inputs = []
        for i, original_image in enumerate(images):
            original_image = to_bgr_uint8(original_image, f"image {i} of the batch")
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": image, "height": height, "width": width})
        with torch.no_grad():
            return self.model(inputs)

    # ------------------------------------------------------------------------- vocabulary
    def set_vocabulary(self, vocabulary: Vocabulary) -> List[str]:
        """Detect another vocabulary from now on.

        Args:
            vocabulary: a built-in name (``lvis``, ``world``, ``world_base``, ``world_novel``,
                ``lvis_base``, ``lvis_novel``), a list of class names, a comma-separated string
                of names, or a path to a text file with one name per line.

        Returns:
            The class names (also ``self.class_names``; ``self.metadata`` is their catalog entry).
        """
        names, description = parse_vocabulary(vocabulary)
        # ViLD and GridCLIP weigh their ensembles per class by base/novel
        kwargs = base_novel_masks(self.model, names, self._trained_base_names)
        self.model.set_vocabulary(names, **kwargs)
        assert self.model.num_classes == len(names), (
            f"{type(self.model).__name__}.set_vocabulary left {self.model.num_classes} classes for "
            f"a vocabulary of {len(names)}"
        )
        self.class_names = names
        self.description = description
        self.metadata = vocabulary_metadata(names)
        self.prompt = None
        logger.info(f"Vocabulary: {description} (metadata {self.metadata.name!r})")
        return names

    def set_prompt(self, prompt: str, kind: str = "auto") -> ParsedPrompt:
        """Detect the phrases of a grounding prompt from now on.

        Args:
            prompt: a caption (``"a red star beside two blue rings"``) or a GLIP-style prompt
                (``"red star. blue ring."``); split by :func:`~gridclip.modeling.prompts.
                parse_prompt` (its module doc states the rule).
            kind: ``"auto"``, ``"phrases"`` or ``"caption"`` (see ``parse_prompt``).

        Returns:
            The parsed prompt (also ``self.prompt``). ``self.class_names`` are its phrase names
            (what is embedded); ``self.metadata`` labels each class with its phrase as written.
        """
        parsed = parse_prompt(prompt, kind)
        self.set_vocabulary(parsed.class_names)
        self.prompt = parsed
        self.description = f"{parsed.describe()}: {prompt!r}"
        self.metadata = vocabulary_metadata(parsed.class_labels, prefix="gridclip_prompt")
        return parsed

    # ---------------------------------------------------------------------------- outputs
    def detections_to_json(self, outputs: Dict, threshold: float = 0.0) -> List[Dict]:
        """:func:`detections_to_json` with the current vocabulary's names (and, after
        :meth:`set_prompt`, each detection's phrase and span)."""
        return detections_to_json(outputs, self.class_names, threshold, prompt=self.prompt)

    def visualize(
        self,
        image_bgr: np.ndarray,
        outputs: Dict,
        threshold: float = 0.3,
        scale: Optional[float] = None,
    ) -> np.ndarray:
        """Draw detections with score >= threshold on the image with Detectron2's Visualizer.

        Args:
            image_bgr: the image given to the predictor (any kind it takes).
            outputs: the predictor's output for it.
            threshold: score threshold of drawn detections.
            scale: drawing scale; default: enlarge small images so that the longer side is at
                least ``MIN_DRAWING_SIDE`` pixels (labels stay readable), else 1. Whatever the
                scale, the drawing's longer side is at most ``MAX_DRAWING_SIDE`` pixels.

        Returns:
            (H * scale, W * scale, 3) uint8 RGB image.
        """
        image_bgr = to_bgr_uint8(image_bgr)
        instances = outputs["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        if len(instances) and int(instances.pred_classes.max()) >= len(self.class_names):
            raise ValueError(
                f"outputs hold class {int(instances.pred_classes.max())} but the vocabulary has "
                f"{len(self.class_names)} classes: predict again after set_vocabulary"
            )
        if scale is None:
            scale = max(1.0, MIN_DRAWING_SIDE / max(image_bgr.shape[:2]))
        image_bgr, instances, scale = _drawing_canvas(image_bgr, instances, scale)
        visualizer = Visualizer(
            image_bgr[:, :, ::-1],
            metadata=self.metadata,
            scale=scale,
            instance_mode=ColorMode.IMAGE,
        )
        return visualizer.draw_instance_predictions(instances).get_image()


def _drawing_canvas(image: np.ndarray, instances, scale: float):
    """(image, instances, scale) for the Visualizer, the image reduced first when the drawing
    would be larger than ``MAX_DRAWING_SIDE`` (its boxes scaled alike): the Visualizer then
    never holds a full-size canvas of a very large image."""
    height, width = image.shape[:2]
    scale = min(float(scale), MAX_DRAWING_SIDE / max(height, width))
    if scale >= 1.0:
        return image, instances, scale
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    factors = torch.tensor([size[0] / width, size[1] / height] * 2)
    fields = dict(instances.get_fields())  # a new Instances: the caller's outputs keep theirs
    fields["pred_boxes"] = Boxes(
        fields["pred_boxes"].tensor * factors.to(fields["pred_boxes"].tensor)
    )
    return small, Instances((size[1], size[0]), **fields), 1.0
