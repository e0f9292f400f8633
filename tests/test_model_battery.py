"""One battery of model checks for every detector of the project, as Detectron2's
``tests/modeling/test_model_e2e.py`` does for its meta-architectures: GridCLIP, the ViLD baseline
and plain Detectron2 RetinaNet, each built from the shipped base config on a tiny random CLIP
(tests/tiny_models.py), CPU, fixed seeds.

Checks: empty ground truth trains with finite losses; odd image sizes give detections inside
the image; inf/NaN input gives no non-finite box; bf16 autocast on CPU runs; ``set_vocabulary``
(open-vocabulary models) changes the class count; a state-dict round trip reproduces the
outputs.
"""

import numpy as np
import pytest
import test_gridclip
import test_vild
import tiny_models
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

MODELS = ("GridCLIP", "ViLD", "RetinaNet")
OPEN_VOCABULARY = ("GridCLIP", "ViLD")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny CLIP weights + text embeddings for the GridCLIP (test_gridclip) and ViLD (test_vild)
    configs; both use a D = 64 tiny CLIP."""
    root = tmp_path_factory.mktemp("battery_assets")
    weights = str(root / "tiny_clip.pt")
    torch.save(tiny_models.make_tiny_clip(test_gridclip.D).state_dict(), weights)
    text_files = {}
    for name, k in (("gridclip", test_gridclip.K), ("vild", len(test_vild.FREQUENCIES))):
        text_files[name] = str(root / f"text_{name}.npy")
        np.save(text_files[name], np.random.RandomState(0).randn(k, test_gridclip.D).astype("f4"))
    return {"weights": weights, "text": text_files, "root": root}


def make_model(arch, assets):
    """``arch`` built from its shipped base config (tiny sizes); image alignment / ViLD-image
    distillation on, with the online tiny CLIP teacher."""
    torch.manual_seed(0)
    if arch == "ViLD":
        vild_assets = {"weights": assets["weights"], "text": assets["text"]["vild"]}
        cfg = test_vild.make_cfg(dict(vild_assets, root=assets["root"]))
    else:
        gridclip_assets = {"clip": assets["weights"], "text": assets["text"]["gridclip"]}
        opts = ["MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0, "MODEL.GRIDCLIP.DENSE_CLIP", True]
        if arch == "RetinaNet":
            opts = ["MODEL.META_ARCHITECTURE", "RetinaNet"]
        cfg = test_gridclip.make_cfg(dict(gridclip_assets, root=assets["root"]), *opts)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # detections even from random weights
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    assert type(model).__name__ == arch
    return model


def image_input(h, w, boxes=(), classes=(), seed=0, image=None):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    if image is None:
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
    return {"image": image, "instances": inst, "height": h, "width": w, "image_id": seed + 1}


def detect(model, inputs):
    model.eval()
    with torch.no_grad():
        return [x["instances"] for x in model(inputs)]


@pytest.fixture(scope="module", params=MODELS)
def arch(request):
    return request.param


def test_empty_ground_truth_trains(arch, assets):
    model = make_model(arch, assets).train()
    batch = [image_input(64, 80, seed=0), image_input(72, 64, seed=1)]
    with EventStorage():
        losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    box_losses = [v for k, v in losses.items() if k in ("loss_box_reg", "loss_rpn_loc")]
    assert box_losses and all(v.item() == 0 for v in box_losses)
    sum(losses.values()).backward()


def test_odd_image_sizes_give_boxes_inside_the_image(arch, assets):
    model = make_model(arch, assets)
    sizes = [(61, 93), (100, 37)]
    results = detect(model, [image_input(h, w, seed=i) for i, (h, w) in enumerate(sizes)])
    assert len(results) == 2
    assert sum(len(r) for r in results) > 0
    for r, (h, w) in zip(results, sizes):
        assert r.image_size == (h, w)
        boxes = r.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inf_nan_input_gives_no_non_finite_box(arch, assets, bad):
    model = make_model(arch, assets)
    image = torch.randint(0, 256, (3, 64, 80)).float()
    image[:, 10:30, 20:50] = bad
    (result,) = detect(model, [image_input(64, 80, image=image)])
    assert torch.isfinite(result.pred_boxes.tensor).all()
    assert torch.isfinite(result.scores).all()


def test_bf16_autocast_on_cpu(arch, assets):
    model = make_model(arch, assets)
    inputs = [image_input(64, 80, seed=3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (result,) = detect(model, inputs)
    assert len(result) > 0 and torch.isfinite(result.pred_boxes.tensor).all()
    assert torch.isfinite(result.scores.float()).all()


def test_set_vocabulary_changes_the_class_count(arch, assets):
    if arch not in OPEN_VOCABULARY:
        pytest.skip(f"{arch} has a fixed classifier")
    model = make_model(arch, assets)
    text = torch.randn(3, test_gridclip.D)
    model.set_vocabulary(text)
    assert model.num_classes == 3 and model.text_embeddings.shape == (3, test_gridclip.D)
    (result,) = detect(model, [image_input(64, 80, seed=4)])
    assert len(result) > 0 and int(result.pred_classes.max()) < 3


def test_state_dict_round_trip_reproduces_outputs(arch, assets):
    model = make_model(arch, assets)
    with torch.no_grad():  # move away from the initialisation, so loading matters
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = [image_input(64, 80, seed=5)]
    (want,) = detect(model, inputs)
    torch.manual_seed(123)
    other = make_model(arch, assets)
    other.load_state_dict(model.state_dict())
    (got,) = detect(other, inputs)
    assert len(want) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor)
    torch.testing.assert_close(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)
