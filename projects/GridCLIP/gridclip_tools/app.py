"""An interactive demo page: upload or pick an image, type a vocabulary or a caption, see the
drawn detections and their JSON (Gradio, an optional extra: ``make app`` installs it).

    make app                                   # the model `make demo` trains, http://127.0.0.1:7860
    python tools/app.py --weights output/demo/gridclip/model_final.pth --port 7860
    python tools/app.py --config-file embedded/ViLD_world.yaml \\
        --weights output/demo/vild/model_final.pth

The examples are the first ``--num-examples`` images of ``--dataset`` (default: the config's
``DATASETS.TEST[0]``), each with a caption of its objects (its dataset ``caption``, or one built
from its annotations), so picking one fills the image and the prompt. The page's **prompt** (a
caption, or phrases separated by periods) wins over the **vocabulary** box (a built-in name such as
``world_novel``, or comma-separated names); with neither, the model's trained vocabulary is
used. Detections are what ``tools/demo.py`` writes for one image (with ``phrase`` and ``span``
after a prompt). Gradio is imported only by :func:`build_app`: this module imports without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.data import register_datasets_from_cfg
from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.vocabulary import BUILTIN_VOCABULARIES
from gridclip_tools.args import add_config_file, add_config_overrides
from gridclip_tools.demo import build_cfg
from gridclip_tools.grounding_eval import image_caption

logger = logging.getLogger("gridclip.app")

__all__ = ["DemoSession", "build_app", "example_images", "main"]

DEFAULT_WEIGHTS = "output/demo/gridclip/model_final.pth"
INSTALL_HINT = "the demo page needs Gradio: `make app` (or `pip install gradio`) installs it"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_file(p)
    p.add_argument(
        "--weights",
        default=DEFAULT_WEIGHTS,
        help=f"trained checkpoint (default {DEFAULT_WEIGHTS}, written by `make demo`)",
    )
    p.add_argument("--dataset", help="examples from this dataset (default DATASETS.TEST[0])")
    p.add_argument("--num-examples", type=int, default=4, help="example images shown (0: none)")
    p.add_argument(
        "--threshold", type=float, default=0.3, help="the page's initial score threshold"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_config_overrides(p)
    return p


def example_images(cfg, dataset: Optional[str], num: int) -> List[Tuple[str, str]]:
    """``(file_name, caption)`` of the first ``num`` annotated images of ``dataset`` (default:
    ``cfg.DATASETS.TEST[0]``); [] when there is none or its images are not on disk."""
    if num <= 0:
        return []
    register_datasets_from_cfg(cfg)
    name = dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    if name is None:
        return []
    if name not in DatasetCatalog.list():
        raise ValueError(f"--dataset {name!r} is not registered")
    try:
        dicts = DatasetCatalog.get(name)
    except (OSError, ValueError) as e:  # a registered world that was never generated
        logger.warning(f"no example images: dataset {name!r} cannot be loaded ({e})")
        return []
    names = list(MetadataCatalog.get(name).thing_classes)
    examples = []
    for d in dicts:
        if d.get("annotations") and os.path.isfile(d["file_name"]):
            examples.append((os.path.abspath(d["file_name"]), image_caption(d, names)))
        if len(examples) == num:
            break
    return examples


class DemoSession:
    """What the page does on "Detect", without Gradio: one predictor, one request at a time."""

    def __init__(self, predictor: OpenVocabularyPredictor):
        self.predictor = predictor
        self._trained = list(predictor.class_names)
        self._lock = threading.Lock()

    def detect(
        self,
        image_rgb: Optional[np.ndarray],
        vocabulary: str = "",
        prompt: str = "",
        threshold: float = 0.3,
    ) -> Tuple[np.ndarray, Dict]:
        """Detect on an (H, W, 3) uint8 RGB image (what Gradio gives).

        Args:
            vocabulary: a built-in name or comma-separated names; used when ``prompt`` is blank.
            prompt: a caption or GLIP-style phrases (see ``gridclip.modeling.prompts``).
            threshold: minimum score of listed and drawn detections.

        Returns:
            (drawing as RGB uint8, ``{"vocabulary", "prompt", "detections"}``).

        Raises:
            ValueError: no image, a bad threshold, or a vocabulary/prompt that does not parse
            (the page shows the message).
        """
        if image_rgb is None:
            raise ValueError("no image: upload one or pick an example")
        image_rgb = np.asarray(image_rgb)
        if image_rgb.ndim == 2:
            image_rgb = np.stack([image_rgb] * 3, axis=-1)
        if image_rgb.ndim != 3 or image_rgb.shape[2] not in (3, 4):
            raise ValueError(f"expected an RGB image, got an array of shape {image_rgb.shape}")
        image_bgr = np.ascontiguousarray(image_rgb[:, :, 2::-1]).astype(np.uint8)
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score threshold {threshold} is not between 0 and 1")
        prompt, vocabulary = (prompt or "").strip(), (vocabulary or "").strip()
        with self._lock:
            if prompt:
                self.predictor.set_prompt(prompt)
            elif vocabulary:
                self.predictor.set_vocabulary(vocabulary)
            else:
                self.predictor.set_vocabulary(self._trained)
            outputs = self.predictor(image_bgr)
            detections = self.predictor.detections_to_json(outputs, threshold)
            drawing = self.predictor.visualize(image_bgr, outputs, threshold)
            parsed = self.predictor.prompt
            result = {
                "vocabulary": {
                    "description": self.predictor.description,
                    "class_names": list(self.predictor.class_names),
                },
                "prompt": None,
                "threshold": threshold,
                "detections": detections,
            }
            if parsed is not None:
                result["prompt"] = {
                    "text": parsed.prompt,
                    "kind": parsed.kind,
                    "phrases": [
                        {"phrase": p.text, "span": list(p.span), "name": p.name}
                        for p in parsed.phrases
                    ],
                }
        return drawing, result


def build_app(
    session: DemoSession, examples: Sequence[Tuple[str, str]] = (), threshold: float = 0.3
):
    """The Gradio ``Blocks`` page (not launched). Element ids, for tests and styling: ``image``,
    ``vocabulary``, ``prompt``, ``threshold``, ``detect``, ``drawing``, ``json``, ``status``."""
    try:
        import gradio as gr  # optional extra: only the page needs it
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e

    def run(image, vocabulary, prompt, threshold):
        try:
            drawing, result = session.detect(image, vocabulary, prompt, threshold)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            return None, {"error": message}, f"**Error:** {message}"
        n = len(result["detections"])
        return (
            drawing,
            result,
            f"{n} detections >= {result['threshold']:g}: {result['vocabulary']['description']}",
        )

    builtins = ", ".join(sorted(BUILTIN_VOCABULARIES))
    with gr.Blocks(title="GridCLIP: detect any vocabulary", analytics_enabled=False) as page:
        gr.Markdown(
            "# GridCLIP: detect any vocabulary\n"
            "Upload an image or pick an example, type a **prompt** (a caption such as *a red "
            "star beside two blue rings*, or phrases separated by periods: *red star. blue "
            "ring.*) or a **vocabulary** (built-in: " + builtins + "; or names separated by "
            "commas), then **Detect**. A prompt wins over the vocabulary; each detection then "
            "names its phrase and its character span in the prompt."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="numpy", elem_id="image")
                prompt = gr.Textbox(
                    label="prompt (caption or phrases. separated. by periods)",
                    elem_id="prompt",
                )
                vocabulary = gr.Textbox(
                    label="vocabulary (used when the prompt is empty)",
                    placeholder="world_novel, or: red star, blue ring",
                    elem_id="vocabulary",
                )
                threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=threshold,
                    step=0.01,
                    label="score threshold",
                    elem_id="threshold",
                )
                button = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column():
                drawing = gr.Image(label="detections", type="numpy", elem_id="drawing")
                status = gr.Markdown(elem_id="status")
                result = gr.JSON(label="detections.json", elem_id="json")
        if examples:
            gr.Examples(
                examples=[[path, caption] for path, caption in examples],
                inputs=[image, prompt],
                label="examples (val images of the embedded world with their captions)",
                elem_id="examples",
            )
        button.click(
            run, inputs=[image, vocabulary, prompt, threshold], outputs=[drawing, result, status]
        )
    return page


def main(argv=None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="gridclip")
    setup_logger()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error(INSTALL_HINT)
    if not 0.0 <= args.threshold <= 1.0:  # also False for NaN
        parser.error(f"--threshold {args.threshold}: not a score between 0 and 1")
    if not os.path.isfile(args.weights):
        parser.error(
            f"--weights {args.weights!r} does not exist: run `make demo` first (it writes "
            f"{DEFAULT_WEIGHTS}), or give --weights FILE"
        )
    try:
        cfg = build_cfg(args)
        examples = example_images(cfg, args.dataset, args.num_examples)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    session = DemoSession(OpenVocabularyPredictor(cfg))
    page = build_app(session, examples, args.threshold)
    folders = sorted({os.path.dirname(path) for path, _ in examples})
    logger.info(f"Serving the demo page on http://{args.host}:{args.port}")
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, allowed_paths=folders, show_error=True
    )


if __name__ == "__main__":  # pragma: no cover
    main()
