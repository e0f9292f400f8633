import json
import os

import numpy as np
import pytest
import tiny_models
import torch

from gridclip_tools import embedded_demo

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_lvis_json(tmp_path):
    """A hand-made 2-image, 2-class LVIS-format set (class 2 is novel); images on disk."""
    from PIL import Image

    images, annotations = [], []
    boxes = {1: [(10, 10, 30, 20, 1), (50, 40, 20, 30, 2)], 2: [(5, 5, 40, 40, 1)]}
    ann_id = 1
    for image_id, objs in boxes.items():
        fname = f"img{image_id}.png"
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (96, 80), (128, 128, 128)).save(tmp_path / "images" / fname)
        images.append(
            {
                "id": image_id,
                "file_name": fname,
                "coco_url": f"images/{fname}",  # Detectron2 joins image_root + "<folder>/<file>"
                "height": 80,
                "width": 96,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        )
        for x, y, w, h, c in objs:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            ann_id += 1
    categories = [
        {"id": 1, "name": "red_square", "frequency": "f", "synonyms": ["red_square"]},
        {"id": 2, "name": "blue_ring", "frequency": "r", "synonyms": ["blue_ring"]},
    ]
    path = tmp_path / "tiny_lvis.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(path), str(tmp_path)


@pytest.fixture(scope="session")
def ci_demo(tmp_path_factory):
    """One CI-sized run of the embedded demo pipeline (tiny world, 20 iterations per model),
    shared by every test that needs trained embedded models. Returns the summary dict; the
    models are under ``summary["output_dir"]/<name>/model_final.pth``."""
    out = tmp_path_factory.mktemp("ci_demo")
    summary = embedded_demo.main(
        ["--preset", "ci", "--output-dir", str(out), "--timing-images", "3", "--num-vis", "2"]
    )
    summary["output_dir"] = str(out)
    return summary


@pytest.fixture(scope="module")
def assets(request, tmp_path_factory):
    """A tiny random CLIP saved in OpenAI's format and (K, D) random text embeddings, per test
    module: ``{"clip": path, "weights": path (the same file), "text": path, "root": folder,
    "model": the CLIP module}`` (``tiny_models.tiny_clip_opts`` turns it into config overrides).

    The requesting module sets the sizes with its constants ``D`` (joint-space dimension,
    default 64) and ``K`` (classes, default 5), and the CLIP with a ``make_tiny_clip()``
    function when it has one (else ``tiny_models.make_tiny_clip(D)``).
    """
    module = request.module
    dim, num_classes = getattr(module, "D", 64), getattr(module, "K", 5)
    make_clip = getattr(module, "make_tiny_clip", None)
    model = make_clip() if make_clip is not None else tiny_models.make_tiny_clip(dim)
    root = tmp_path_factory.mktemp("tiny_assets")
    weights = str(root / "tiny_clip.pt")
    torch.save(model.state_dict(), weights)
    text = str(root / f"text{num_classes}.npy")
    np.save(text, np.random.RandomState(0).randn(num_classes, dim).astype("float32"))
    return {"clip": weights, "weights": weights, "text": text, "root": root, "model": model}
