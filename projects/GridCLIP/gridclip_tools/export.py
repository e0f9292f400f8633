"""Export GridCLIP inference, with one vocabulary baked in, for deployment without this project.

    # the GridCLIP trained by `make demo`, the embedded world's 48 classes, both formats
    python tools/export.py --weights output/demo/gridclip/model_final.pth --output output/export
    # another vocabulary (names embedded once, at export time), an eager-vs-exported timing
    python tools/export.py --weights output/demo/gridclip/model_final.pth --output output/export \\
        --vocabulary "red star,blue ring" --benchmark

Writes ``<output>/gridclip.pt2`` (``torch.export``, load with ``torch.export.load``),
``<output>/gridclip.onnx`` (``torch.onnx.export``; runs in ``onnxruntime``) and
``<output>/export.json`` (class names, canvas size, resize and threshold settings: what
:func:`preprocess` and a deployment need).

**What the exported graph is** (:class:`ExportableGridCLIP`), the boundary:

- input ``image``: (H, W, 3) **uint8 BGR** canvas of the export size (``--canvas``), the image
  already resized as Detectron2's ``DefaultPredictor`` resizes it (``ResizeShortestEdge`` to
  ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) and placed in its top-left corner;
  ``resized_hw``: (2,) int64, the resized image's height and width inside the canvas;
  ``original_hw``: (2,) int64, the original image's height and width. :func:`preprocess` (plain
  numpy + Detectron2's resize, shipped here) makes all three from any BGR image. Resizing is left
  out of the graph: Detectron2 resizes with PIL, which neither exporter reproduces bit for bit.
- in the graph: BGR -> the model's channel order, float, ``PIXEL_MEAN``/``PIXEL_STD``
  normalisation, the pixels outside ``resized_hw`` set to 0 (Detectron2's padding), backbone,
  FPN, head, dense CLIP term, the text product against the **baked-in text embeddings** (a
  constant of the graph), per level a fixed top-k (``TOPK_CANDIDATES_TEST``) of (location,
  class) pairs then of anchors, the score threshold (``SCORE_THRESH_TEST``), box decoding,
  class-wise NMS (``torchvision.ops.nms`` with class offsets; ONNX ``NonMaxSuppression``), the
  ``DETECTIONS_PER_IMAGE`` best, boxes scaled to the original image, clipped, empty ones dropped
  (Detectron2's ``detector_postprocess``).
- outputs: ``boxes`` (N, 4) float32 XYXY in original-image pixels, ``scores`` (N,) float32,
  ``classes`` (N,) int64 indices into the baked-in vocabulary, best first, N <=
  ``DETECTIONS_PER_IMAGE`` (data-dependent).

**Faithfulness.** An image whose padded size (resized, then rounded up to the backbone's size
divisibility) is the canvas size gets the eager model's detections: the same count and
classes, boxes within 1e-3 px and scores within 1e-4 (``tests/test_export.py``, a tiny model);
the model trained by ``make demo`` on 20 embedded-world val images: boxes within 3e-5 px,
scores within 1e-6 in ONNX, identical in the ``.pt2`` (README). A smaller image sees zero
padding up to the canvas, as in batched Detectron2 inference: features near its border and
locations in the padding differ slightly from a single-image eager run. The eager model's
exact pruning of hopeless locations is not in the graph (every location is scored: the same
detections, since pruned locations cannot pass the threshold); ``TEST_TOPK_LOCATIONS`` is.

**Any input size** (``--dynamic``, ``.pt2`` only): one graph for every canvas whose sides are
multiples of the size divisibility between the coarsest stride + 1 px (rounded up) and
``--canvas`` (default ``INPUT.MAX_SIZE_TEST`` square); the anchors are computed in the graph and
:func:`preprocess` pads each image only as Detectron2 does (to the divisibility), so every image
of at least that minimum gets the eager model's detections, whatever its size. ONNX stays one
canvas size: its dynamic-size graph of this model indexes out of range in onnxruntime.

**Not exported**: ViLD (two stages, ROI pooling of data-dependent proposals; use the eager
model), training, changing the vocabulary after export (re-export per vocabulary: the text
embeddings are constants), the text encoder (names are embedded at export time with the
config's CLIP and prompts), the reduced-precision text product (the graph computes in fp32),
the frozen-CLIP score ensemble (``MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE``, on in the embedded
world's config: a warning says so, the graph outputs the detector's own scores and is checked
against the eager model with the ensemble off) and a dynamic-size ONNX graph.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from detectron2.data import transforms as T
from detectron2.utils.logger import setup_logger
from torch import Tensor, nn

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.config import get_gridclip_cfg
from gridclip.data.images import read_image_bgr
from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.box_voting import kept_boxes
from gridclip.modeling.gridclip import GridCLIP
from gridclip.utils.io import atomic_write
from gridclip_tools.args import (
    add_config_file,
    add_config_overrides,
    config_overrides,
    split_trailing_opts,
)
from gridclip_tools.measure import time_interleaved

logger = logging.getLogger("gridclip.export")

FORMATS = ("pt2", "onnx")
INPUT_NAMES = ["image", "resized_hw", "original_hw"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]

__all__ = [
    "ExportableGridCLIP",
    "build_exportable",
    "detection_arrays",
    "export_onnx",
    "export_pt2",
    "main",
    "missing_onnx_extras",
    "preprocess",
    "round_up",
    "run_onnx",
    "run_pt2",
]


def round_up(value: int, divisor: int) -> int:
    """``value`` rounded up to a multiple of ``divisor`` (how Detectron2 pads image sides)."""
    return -(-int(value) // divisor) * divisor


class ExportableGridCLIP(nn.Module):
    """GridCLIP inference on one image of a fixed canvas size, without data-dependent Python
    control flow (see the module doc for the boundary). Wraps a trained :class:`GridCLIP` in
    eval mode; its text embeddings (the vocabulary) become constants of an exported graph."""

    def __init__(self, model: GridCLIP, canvas_hw: Tuple[int, int], dynamic: bool = False):
        super().__init__()
        self.dynamic = bool(dynamic)
        if not isinstance(model, GridCLIP):
            raise TypeError(
                f"only GridCLIP exports (got {type(model).__name__}); ViLD's two stages are not "
                "exported: run it eagerly"
            )
        self.model = model.eval()
        h, w = (int(v) for v in canvas_hw)
        div = max(1, int(model.backbone.size_divisibility))
        if h <= 0 or w <= 0 or h % div or w % div:
            raise ValueError(
                f"canvas {h}x{w}: height and width must be positive multiples of the backbone's "
                f"size divisibility {div}"
            )
        self.canvas_hw = (h, w)
        self.size_divisibility = div
        self.input_format = model.input_format
        # A dynamic graph must not see a feature map of side 1 (torch.export specialises sizes 0
        # and 1): inputs are at least one coarsest stride + 1 px, rounded up to the divisibility.
        max_stride = max(model.backbone.output_shape()[f].stride for f in model.head_in_features)
        side = round_up(max_stride + 1, div)
        self.min_canvas_hw = (side, side)
        if self.dynamic and (h < side or w < side):
            raise ValueError(
                f"a dynamic export's largest canvas {h}x{w} is below its smallest input "
                f"{side}x{side} (the coarsest stride {max_stride} + 1 px): give a larger --canvas"
            )
        # The anchors of a fixed canvas are constants: computed once here, not in the graph.
        with torch.no_grad():
            probe = torch.zeros(1, 3, h, w, device=model.device)
            feats = model.backbone(probe)
            anchors = model.anchor_generator([feats[f] for f in model.head_in_features])
        for i, a in enumerate(anchors):
            self.register_buffer(f"anchors_{i}", a.tensor.clone(), persistent=False)
        self.num_levels = len(anchors)
        self.eval()

    def _anchors(self) -> List[Tensor]:
        return [getattr(self, f"anchors_{i}") for i in range(self.num_levels)]

    def forward(self, image: Tensor, resized_hw: Tensor, original_hw: Tensor):
        """
        Args:
            image: (H, W, 3) uint8 BGR canvas (H, W = the canvas size).
            resized_hw: (2,) int64, the resized image's (height, width) in the canvas.
            original_hw: (2,) int64, (height, width) of the image the boxes are returned in.
        Returns:
            boxes (N, 4) float32 XYXY, scores (N,) float32, classes (N,) int64; best first.
        """
        m = self.model
        x = image.permute(2, 0, 1).to(torch.float32)
        if self.input_format == "RGB":
            x = x.flip(0)
        x = (x - m.pixel_mean) / m.pixel_std
        h, w = image.shape[0], image.shape[1]
        rows = torch.arange(h, device=x.device)[:, None] < resized_hw[0]
        cols = torch.arange(w, device=x.device)[None, :] < resized_hw[1]
        x = x * (rows & cols).to(x.dtype)  # Detectron2 pads the normalised image with zeros
        backbone_features = m.backbone(x[None])
        features = [backbone_features[f] for f in m.head_in_features]
        if self.dynamic:  # the anchors of this input's size, in the graph
            anchors = [a.tensor for a in m.anchor_generator(features)]
        else:
            anchors = self._anchors()
        predictions = m.predict(features, backbone_features.get("res5"))
        grid_embeddings, box_deltas, anchor_offsets = predictions[:3]
        ranking = predictions[3] if len(predictions) > 3 else None  # the objectness ranker
        boxes, scores, classes = [], [], []
        for level, level_anchors in enumerate(anchors):
            level_rows = m.head.embedding_rows(grid_embeddings[level])[0]  # (HW, D)
            deltas = box_deltas[level][0].permute(1, 2, 0).reshape(-1, 4)  # (HW*A, 4)
            offsets = None
            if anchor_offsets is not None:
                a = anchor_offsets[level].shape[1]
                offsets = anchor_offsets[level][0].permute(1, 2, 0).reshape(-1, a)  # (HW, A)
            level_ranking = None if ranking is None else ranking[level][0].reshape(-1)  # (HW,)
            b, s, c = self._decode_level(level_anchors, level_rows, deltas, offsets, level_ranking)
            boxes.append(b)
            scores.append(s)
            classes.append(c)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        # class-wise NMS: boxes of different classes are moved apart so they never overlap
        coords = torch.cat([boxes.flatten(), boxes.new_zeros(1)])  # no detection: no max()
        span = coords.max() - coords.min() + 1
        keep = torchvision.ops.nms(
            boxes + (classes.to(boxes.dtype) * span)[:, None], scores, m.test_nms_thresh
        )
        keep = keep[: m.max_detections_per_image]
        voted = kept_boxes(boxes, scores, classes, keep, m.test_box_voting_iou)  # in the graph
        boxes, scores, classes = voted, scores[keep], classes[keep]
        # Detectron2's detector_postprocess: to the original image, clip, drop empty boxes
        scale_y = original_hw[0].to(torch.float32) / resized_hw[0].to(torch.float32)
        scale_x = original_hw[1].to(torch.float32) / resized_hw[1].to(torch.float32)
        boxes = boxes * torch.stack([scale_x, scale_y, scale_x, scale_y])
        limit = torch.stack([original_hw[1], original_hw[0]] * 2).to(torch.float32)
        boxes = torch.minimum(boxes.clamp_min(0), limit)
        nonempty = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        return boxes[nonempty], scores[nonempty], classes[nonempty]

    def _locations(
        self, offsets: Optional[Tensor], num_rows: int, ranking: Optional[Tensor] = None
    ) -> Optional[Tensor]:
        """``TEST_TOPK_LOCATIONS``: the K locations of highest objectness (the objectness
        ranker's logits when the model has one, else the maximum anchor offset), ascending;
        None: all (the eager model's exact pruning is not needed: see the module doc)."""
        k = self.model.test_topk_locations
        if offsets is None or not 0 < k < num_rows:
            return None
        objectness = ranking if ranking is not None else offsets.max(dim=1).values
        return objectness.topk(k).indices.sort().values

    def _decode_level(
        self,
        anchors: Tensor,
        rows: Tensor,
        deltas: Tensor,
        offsets: Optional[Tensor],
        ranking: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """One level: :meth:`GridCLIP._decode_level` with fixed-size top-k's and the threshold
        as a mask (the eager model's selection, ties aside)."""
        m = self.model
        group = deltas.shape[0] // rows.shape[0]
        locations = self._locations(offsets, rows.shape[0], ranking)
        if locations is not None:
            anchor_idxs = (locations[:, None] * group + torch.arange(group)).flatten()
            rows, offsets = rows[locations], offsets[locations]
            deltas, anchors = deltas[anchor_idxs], anchors[anchor_idxs]
        logits = m.head.logits(rows)  # (M, K), the text product
        num_rows, num_classes = logits.shape
        topk = m.test_topk_candidates
        if offsets is not None:
            ranked = logits + offsets.max(dim=1).values[:, None]
            idxs = ranked.flatten().topk(min(topk, ranked.numel())).indices
            pair_rows, pair_classes = idxs // num_classes, idxs % num_classes
            candidates = logits[pair_rows, pair_classes][:, None] + offsets[pair_rows]  # (P, A)
            anchor_logits, idxs = candidates.flatten().topk(min(topk, candidates.numel()))
            pairs = idxs // group
            anchor_idxs = pair_rows[pairs] * group + idxs % group
            classes = pair_classes[pairs]
        else:
            k = min(max(1, topk // group), logits.numel())
            anchor_logits, idxs = logits.flatten().topk(k)
            pair_rows, classes = idxs // num_classes, idxs % num_classes
            anchor_idxs = (pair_rows[:, None] * group + torch.arange(group)).flatten()
            anchor_logits = anchor_logits.repeat_interleave(group)
            classes = classes.repeat_interleave(group)
        scores = anchor_logits.sigmoid()
        keep = scores > m.test_score_thresh
        scores, anchor_idxs, classes = scores[keep], anchor_idxs[keep], classes[keep]
        boxes = m.box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs])
        return boxes, scores, classes


# ------------------------------------------------------------------------ pre/post-processing
def resize_transform(min_size: int, max_size: int) -> T.ResizeShortestEdge:
    """Detectron2's ``DefaultPredictor`` resize (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``)."""
    return T.ResizeShortestEdge([min_size, min_size], max_size)


def preprocess(image_bgr: np.ndarray, settings: Dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exported graph's inputs from one (H, W, 3) uint8 BGR image.

    Args:
        image_bgr: the image, as ``cv2.imread`` returns it.
        settings: ``export.json`` (or :func:`export_settings`): ``canvas_hw``, ``min_size_test``,
            ``max_size_test``.
    Returns:
        ``image`` (canvas H, W, 3) uint8, ``resized_hw`` (2,) int64, ``original_hw`` (2,) int64.
    Raises:
        ValueError: not an (H, W, 3) uint8 image, or resized larger than the canvas.
    """
    if not (
        isinstance(image_bgr, np.ndarray)
        and image_bgr.ndim == 3
        and image_bgr.shape[2] == 3
        and image_bgr.dtype == np.uint8
    ):
        desc = getattr(image_bgr, "shape", type(image_bgr).__name__)
        raise ValueError(f"expected an (H, W, 3) uint8 BGR image, got {desc}")
    height, width = image_bgr.shape[:2]
    resize = resize_transform(settings["min_size_test"], settings["max_size_test"])
    resized = resize.get_transform(image_bgr).apply_image(image_bgr)
    ch, cw = settings["canvas_hw"]
    rh, rw = resized.shape[:2]
    if settings.get("dynamic"):  # the resized image padded as Detectron2 pads it, or to the minimum
        div = settings["size_divisibility"]
        min_h, min_w = settings["min_canvas_hw"]
        ch, cw = min(ch, max(min_h, round_up(rh, div))), min(cw, max(min_w, round_up(rw, div)))
    if rh > ch or rw > cw:
        raise ValueError(
            f"a {height}x{width} image is resized to {rh}x{rw}, larger than the exported canvas "
            f"{ch}x{cw}: export again with a larger --canvas (e.g. --canvas {max(rh, ch)} "
            f"{max(rw, cw)}, rounded up to the size divisibility)"
        )
    canvas = np.zeros((ch, cw, 3), dtype=np.uint8)
    canvas[:rh, :rw] = resized
    return canvas, np.array([rh, rw], dtype=np.int64), np.array([height, width], dtype=np.int64)


def export_settings(
    predictor: OpenVocabularyPredictor,
    canvas_hw: Sequence[int],
    wrapper: Optional[ExportableGridCLIP] = None,
) -> Dict:
    """What a deployment needs beside the graph (written as ``export.json``). With a dynamic
    ``wrapper``: ``dynamic``, ``size_divisibility`` and ``min_canvas_hw`` too (``canvas_hw`` is
    then the largest input)."""
    cfg, model = predictor.cfg, predictor.model
    dynamic = {}
    if wrapper is not None and wrapper.dynamic:
        dynamic = {
            "dynamic": True,
            "size_divisibility": wrapper.size_divisibility,
            "min_canvas_hw": list(wrapper.min_canvas_hw),
        }
    return {
        "format_version": 1,
        "class_names": list(predictor.class_names),
        "canvas_hw": [int(v) for v in canvas_hw],
        **dynamic,
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "input_format": "BGR",
        "model_input_format": cfg.INPUT.FORMAT,
        "score_thresh_test": float(model.test_score_thresh),
        "clip_score_ensemble": False,  # never in the graph (build_exportable says so)
        "box_refine": False,  # never in the graph (build_exportable says so)
        "nms_thresh_test": float(model.test_nms_thresh),
        "topk_candidates_test": int(model.test_topk_candidates),
        "detections_per_image": int(model.max_detections_per_image),
        "inputs": INPUT_NAMES,
        "outputs": OUTPUT_NAMES,
        "weights": cfg.MODEL.WEIGHTS,
    }


def default_canvas(cfg, divisibility: int, dynamic: bool = False) -> Tuple[int, int]:
    """A square canvas of side ``INPUT.MIN_SIZE_TEST`` (dynamic: ``INPUT.MAX_SIZE_TEST``, the
    largest input the resize makes) rounded up to the size divisibility."""
    div = max(1, int(divisibility))
    size = cfg.INPUT.MAX_SIZE_TEST if dynamic else cfg.INPUT.MIN_SIZE_TEST
    side = round_up(size, div)
    return side, side


def build_exportable(
    config_file: str,
    weights: str,
    opts: Sequence[str] = (),
    vocabulary=None,
    canvas_hw: Optional[Sequence[int]] = None,
    dynamic: bool = False,
) -> Tuple[OpenVocabularyPredictor, ExportableGridCLIP, Dict]:
    """The eager predictor (CPU), its exportable wrapper and the export settings.

    Args:
        config_file, weights, opts: as :meth:`OpenVocabularyPredictor.from_config_file`
            (``weights`` may be empty: the config's ``MODEL.WEIGHTS``).
        vocabulary: anything ``set_vocabulary`` takes; None: the model's own classes.
        canvas_hw: (H, W) of the exported input (dynamic: the largest); default
            :func:`default_canvas`.
        dynamic: any input size (multiples of the size divisibility between the wrapper's
            ``min_canvas_hw`` and ``canvas_hw``), anchors computed in the graph; ``.pt2`` only.
    """
    opts = list(opts) + ["MODEL.DEVICE", "cpu"]
    probe = get_gridclip_cfg(config_file, opts)
    if probe.MODEL.META_ARCHITECTURE == "GridCLIP" and probe.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE:
        # The frozen CLIP's rescoring of the final detections runs a second network on crops
        # of data-dependent boxes: not in the graph. The eager model the export is checked
        # against must then score as the graph does.
        logger.warning(
            f"{config_file} rescores detections with the frozen CLIP "
            "(MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE True): the exported graph does not; it outputs "
            "the detector's own scores (export.json: clip_score_ensemble false) and is checked "
            "against the eager model with the ensemble off. Its AP is the ensemble-off AP."
        )
        opts += ["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE", False]
    predictor = OpenVocabularyPredictor.from_config_file(
        config_file, weights=weights or None, opts=opts, vocabulary=vocabulary
    )
    if getattr(predictor.model, "box_refiner", None) is not None:
        # The refiner pools features inside data-dependent boxes (ROIAlign over levels chosen
        # by box size): not in the graph. Dropped after loading (the checkpoint has its
        # weights), so the eager reference the export is checked against leaves it out too.
        logger.warning(
            f"{config_file} refines its final boxes (MODEL.GRIDCLIP.BOX_REFINE True): the "
            "exported graph does not (export.json: box_refine false); it outputs the dense "
            "head's boxes and is checked against the eager model with the refinement off."
        )
        predictor.model.box_refiner = None
    model = predictor.model
    if not isinstance(model, GridCLIP):
        raise TypeError(
            f"{predictor.cfg.MODEL.META_ARCHITECTURE} does not export: only GridCLIP does (ViLD's "
            "two stages with data-dependent proposals are run eagerly)"
        )
    if canvas_hw is None:
        canvas_hw = default_canvas(predictor.cfg, model.backbone.size_divisibility, dynamic)
    wrapper = ExportableGridCLIP(model, canvas_hw, dynamic=dynamic)
    return predictor, wrapper, export_settings(predictor, canvas_hw, wrapper)


def example_inputs(settings: Dict) -> Tuple[Tensor, Tensor, Tensor]:
    """A canvas-sized input (the shapes an export is traced with)."""
    h, w = settings["canvas_hw"]
    image = torch.zeros(h, w, 3, dtype=torch.uint8)
    return image, torch.tensor([h, w]), torch.tensor([h, w])


def _replace_when_written(path: str, write) -> str:
    """``write(tmp_path)``, then move it to ``path`` (no half-written model on a crash)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def dynamic_shapes(wrapper: ExportableGridCLIP) -> Dict:
    """``torch.export``'s ``dynamic_shapes`` of a dynamic wrapper: the image's height and width,
    each a multiple of the size divisibility from ``min_canvas_hw`` to ``canvas_hw``."""
    div = wrapper.size_divisibility
    dims = [
        torch.export.Dim(name, min=lo // div, max=hi // div)
        for name, lo, hi in zip(("height", "width"), wrapper.min_canvas_hw, wrapper.canvas_hw)
    ]
    return {"image": {0: div * dims[0], 1: div * dims[1]}, "resized_hw": None, "original_hw": None}


def export_pt2(wrapper: ExportableGridCLIP, settings: Dict, path: str) -> str:
    """``torch.export`` the wrapper (a dynamic one: any input size in its range); saved with
    ``torch.export.save`` (load: ``torch.export.load(path).module()``)."""
    shapes = dynamic_shapes(wrapper) if wrapper.dynamic else None
    with torch.no_grad():
        program = torch.export.export(wrapper, example_inputs(settings), dynamic_shapes=shapes)
    return _replace_when_written(path, lambda p: torch.export.save(program, p))


def export_onnx(wrapper: ExportableGridCLIP, settings: Dict, path: str) -> str:
    """``torch.onnx.export`` (the dynamo exporter) of the wrapper, weights inside the file.
    One canvas size only: exported with dynamic sizes, the graph indexes out of range in
    onnxruntime at any other size (torch 2.14's exporter, onnxruntime 1.2x), so it is refused."""
    if wrapper.dynamic:
        raise ValueError(
            "ONNX export takes one canvas size (a dynamic-size ONNX graph of this model fails in "
            "onnxruntime): export ONNX without --dynamic, or use the .pt2 format"
        )

    def write(p):
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                example_inputs(settings),
                p,
                dynamo=True,
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                external_data=False,
                verbose=False,
            )

    return _replace_when_written(path, write)


def load_pt2(path: str):
    """The exported program's module (call it with the three input tensors)."""
    return torch.export.load(path).module()


def run_pt2(module, image_bgr: np.ndarray, settings: Dict) -> Dict[str, np.ndarray]:
    """Detections of one BGR image by a loaded ``.pt2`` module: ``boxes``, ``scores``,
    ``classes`` arrays (original-image pixels)."""
    inputs = [torch.from_numpy(x) for x in preprocess(image_bgr, settings)]
    with torch.no_grad():
        outputs = module(*inputs)
    return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, outputs)}


def onnx_session(path: str, threads: int = 0):
    """An ``onnxruntime`` CPU session (``threads`` > 0: that many intra-op threads)."""
    import onnxruntime  # optional dependency: only the ONNX path needs it

    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, image_bgr: np.ndarray, settings: Dict) -> Dict[str, np.ndarray]:
    """Detections of one BGR image by an ``onnxruntime`` session (as :func:`run_pt2`)."""
    feeds = dict(zip(INPUT_NAMES, preprocess(image_bgr, settings)))
    return dict(zip(OUTPUT_NAMES, session.run(OUTPUT_NAMES, feeds)))


def detection_arrays(instances) -> Dict[str, np.ndarray]:
    """Detectron2 ``Instances`` of detections as the arrays :func:`run_pt2` returns."""
    instances = instances.to("cpu")
    return {
        "boxes": instances.pred_boxes.tensor.numpy(),
        "scores": instances.scores.numpy(),
        "classes": instances.pred_classes.numpy(),
    }


def run_eager(predictor: OpenVocabularyPredictor, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
    """The eager model's detections of one BGR image, as :func:`run_pt2` returns them."""
    return detection_arrays(predictor(image_bgr)["instances"])


def compare_detections(reference: Dict, other: Dict, min_iou: float = 0.99) -> Dict[str, float]:
    """How far ``other``'s detections are from ``reference``'s (both as :func:`run_eager` /
    ``run_*`` return them), independent of the order among equal scores.

    Equal scores are common (the anchors of one location share a score when the head has no
    anchor offsets; random weights tie more), and which of two tied boxes NMS keeps, or which
    tied candidate a top-k takes, is each implementation's own choice. So the detections are
    matched one to one, best first: same class, IoU >= ``min_iou``, the closest score.

    Returns ``count_diff``; ``unmatched``: detections of ``other`` without a match; over the
    matched pairs ``max_box_diff`` (px) and ``max_score_diff``; ``max_sorted_score_diff``: the
    largest difference between the two score lists, each sorted (order-free).
    """
    n_ref, n_other = len(reference["scores"]), len(other["scores"])
    diff = {"count_diff": abs(n_ref - n_other)}
    n = min(n_ref, n_other)
    sorted_ref = np.sort(np.asarray(reference["scores"], dtype=np.float64))[::-1][:n]
    sorted_other = np.sort(np.asarray(other["scores"], dtype=np.float64))[::-1][:n]
    diff["max_sorted_score_diff"] = float(np.abs(sorted_ref - sorted_other).max()) if n else 0.0
    if n_ref == 0 or n_other == 0:
        return {**diff, "unmatched": n_other, "max_box_diff": 0.0, "max_score_diff": 0.0}
    ref_boxes = np.asarray(reference["boxes"], dtype=np.float64)
    other_boxes = np.asarray(other["boxes"], dtype=np.float64)
    iou = torchvision.ops.box_iou(torch.from_numpy(other_boxes), torch.from_numpy(ref_boxes))
    iou = iou.numpy()
    same_class = np.asarray(other["classes"])[:, None] == np.asarray(reference["classes"])[None]
    score_gap = np.abs(
        np.asarray(other["scores"], np.float64)[:, None]
        - np.asarray(reference["scores"], np.float64)[None]
    )
    candidates = same_class & (iou >= min_iou)
    used = np.zeros(n_ref, dtype=bool)
    unmatched, box_diff, score_diff = 0, 0.0, 0.0
    for i in range(n_other):
        options = np.flatnonzero(candidates[i] & ~used)
        if options.size == 0:
            unmatched += 1
            continue
        j = options[np.argmin(score_gap[i, options])]
        used[j] = True
        box_diff = max(box_diff, float(np.abs(other_boxes[i] - ref_boxes[j]).max()))
        score_diff = max(score_diff, float(score_gap[i, j]))
    return {**diff, "unmatched": unmatched, "max_box_diff": box_diff, "max_score_diff": score_diff}


# ---------------------------------------------------------------------------- command line
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_file(p)
    p.add_argument("--weights", default="", help="trained GridCLIP checkpoint (MODEL.WEIGHTS)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--vocabulary",
        default=None,
        help="vocabulary baked in: a built-in name (world, world_novel, lvis, ...), "
        "comma-separated names or a .txt file with one per line; default: the model's classes",
    )
    p.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help="formats to write (default: both)",
    )
    p.add_argument(
        "--canvas",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input size of the exported graph (default: INPUT.MIN_SIZE_TEST square, rounded up "
        "to the size divisibility)",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="pt2 only: one graph for any input size (multiples of the size divisibility, up to "
        "--canvas, default INPUT.MAX_SIZE_TEST square); images padded only as Detectron2 pads them",
    )
    p.add_argument(
        "--benchmark",
        type=int,
        nargs="?",
        const=20,
        default=0,
        metavar="N",
        help="time eager vs exported inference on N images (default 20; --input or generated), "
        "one thread, and print ms/img",
    )
    p.add_argument("--input", nargs="*", default=[], help="images to check and time on")
    add_config_overrides(p)
    return p


def _check_images(args, settings: Dict) -> List[np.ndarray]:
    """The --input images (BGR), or canvas-sized noise images when none are given."""
    if args.input:
        return [read_image_bgr(p) for p in args.input]  # the project's one image rule
    rng = np.random.RandomState(0)
    h, w = settings["canvas_hw"]
    shapes = [(h, w), (h // 2, w), (h, w * 2 // 3)] if settings.get("dynamic") else [(h, w)] * 3
    return [rng.randint(0, 256, (sh, sw, 3), dtype=np.uint8) for sh, sw in shapes]


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_onnx_extras() -> List[str]:
    """The optional packages the ONNX path needs and this environment lacks."""
    return [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    split_trailing_opts(args)
    if args.dynamic:
        if args.format == list(FORMATS):  # the default: both
            args.format = ["pt2"]
        if "onnx" in args.format:
            raise SystemExit(
                "--dynamic exports the .pt2 format only (a dynamic-size ONNX graph of this model "
                "fails in onnxruntime): use --format pt2, or export ONNX at one --canvas"
            )
    if "onnx" in args.format:
        missing = missing_onnx_extras()
        if missing:
            raise SystemExit(
                f"ONNX export needs {', '.join(missing)} (optional extras): install them with "
                "`bash tools/setup_env.sh --export`, or export only --format pt2"
            )
    setup_logger(name="gridclip")
    logger.setLevel(logging.INFO)
    if args.benchmark:
        torch.set_num_threads(1)
    predictor, wrapper, settings = build_exportable(
        args.config_file,
        args.weights,
        config_overrides(args),
        vocabulary=args.vocabulary,
        canvas_hw=args.canvas,
        dynamic=args.dynamic,
    )
    if not predictor.cfg.MODEL.WEIGHTS:
        logger.warning(
            "no --weights (MODEL.WEIGHTS is empty): exporting an untrained detector head; pass the "
            "checkpoint of a trained GridCLIP, e.g. output/demo/gridclip/model_final.pth"
        )
    os.makedirs(args.output, exist_ok=True)
    written = {}
    if "pt2" in args.format:
        written["pt2"] = export_pt2(wrapper, settings, os.path.join(args.output, "gridclip.pt2"))
        logger.info(f"torch.export program: {written['pt2']}")
    if "onnx" in args.format:
        written["onnx"] = export_onnx(wrapper, settings, os.path.join(args.output, "gridclip.onnx"))
        logger.info(f"ONNX model: {written['onnx']}")
    with atomic_write(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(
            {**settings, "files": {k: os.path.basename(v) for k, v in written.items()}}, f, indent=2
        )
    runners = {"eager": lambda img: run_eager(predictor, img)}
    if "pt2" in written:
        module = load_pt2(written["pt2"])
        runners["pt2"] = lambda img: run_pt2(module, img, settings)
    if "onnx" in written:
        session = onnx_session(written["onnx"], threads=1 if args.benchmark else 0)
        runners["onnx"] = lambda img: run_onnx(session, img, settings)
    images = _check_images(args, settings)
    report = {"files": written, "check": {}}
    for name in runners:
        if name == "eager":
            continue
        worst = {}
        for img in images:
            diff = compare_detections(runners["eager"](img), runners[name](img))
            worst = {k: max(v, worst.get(k, v)) for k, v in diff.items()}
        report["check"][name] = worst
        logger.info(f"{name} vs eager on {len(images)} images: {worst}")
    if args.benchmark:
        report["ms_per_image"] = benchmark(runners, images, args.benchmark)
        print(f"ms/img over {args.benchmark} images, 1 thread, median (wall / process CPU time):")
        for name, ms in report["ms_per_image"].items():
            print(f"  {name:6s} {ms['wall_ms']:8.1f} / {ms['cpu_ms']:8.1f}")
    return report


def benchmark(runners: Dict, images: Sequence[np.ndarray], num_images: int) -> Dict[str, float]:
    """Median ms/img of each runner (preprocessing to detections), interleaved: wall-clock
    and process CPU time (on a shared machine the CPU time is the steadier of the two)."""
    chosen = [images[i % len(images)] for i in range(num_images)]
    state = {name: 0 for name in runners}

    def job(name):
        def run():
            runners[name](chosen[state[name] % len(chosen)])
            state[name] += 1

        return run

    timings = time_interleaved({n: job(n) for n in runners}, warmup=2, repeats=num_images)
    return {
        name: {"wall_ms": 1000.0 * t["median_s"], "cpu_ms": 1000.0 * t["cpu_median_s"]}
        for name, t in timings.items()
    }
