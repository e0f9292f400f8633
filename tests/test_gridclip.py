"""GridCLIP: meta-architecture, head, inference fast path, vocabulary, image alignment, backbone.

Tiny models built here (a random CLIP with a ModifiedResNet of width 16, 64-d joint space),
odd image sizes around 64-120 px, CPU, fixed seeds.
"""

import copy
import math
import os
import runpy
import uuid
from unittest import mock

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import sigmoid_focal_loss

import gridclip.clip as gclip
from gridclip import get_gridclip_cfg
from gridclip.clip import CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255, modified_resnet_features
from gridclip.data import register_lvis_format_dataset
from gridclip.modeling import GridCLIP, GridCLIPHead, image_alignment
from gridclip.modeling.clip_backbone import CLIPResNet
from gridclip.modeling.image_alignment import (
    ImageAlignment,
    TeacherEmbeddingCache,
    mirror_tiles,
    pool_grid_embeddings,
    raw_rgb_image,
    teacher_cache_key,
)
from gridclip.modeling.vocabulary import check_class_count, resolve_vocabulary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 64  # tiny CLIP joint-space dimension
K = 5  # classes of the default test vocabulary
A = 9  # anchors per location (RetinaNet's 3 scales x 3 ratios)


# ------------------------------------------------------------------------------------ fixtures
def make_tiny_clip(seed=0):
    return tiny_models.make_tiny_clip(D, seed=seed, random_bn_stats=("running_var",))


def make_cfg(assets, *opts):
    """A tiny GridCLIP config: CLIP-ResNet backbone from the tiny CLIP, 32-channel FPN."""
    cfg = get_gridclip_cfg(
        "Base-GridCLIP.yaml",
        tiny_models.tiny_clip_opts(assets, D)
        + [
            "MODEL.CLIP_RESNET.FREEZE_AT", 1,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.RETINANET.NUM_CONVS", 1,
            "MODEL.RETINANET.NUM_CLASSES", K,
            "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.0,
            "MODEL.GRIDCLIP.DENSE_CLIP", False,  # the learned branch alone (test_dense_clip.py)
            "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()",
        ]
        + list(opts),
    )  # fmt: skip
    return cfg


def gt(h, w, boxes, classes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def make_inputs(with_boxes=(True, False)):
    torch.manual_seed(1)
    sizes = [(97, 113), (70, 81)]
    inputs = []
    for i, ((h, w), has_boxes) in enumerate(zip(sizes, with_boxes)):
        boxes, classes = ([[10, 12, 60, 70], [40, 30, 100, 90]], [1, 3]) if has_boxes else ([], [])
        inputs.append(
            {
                "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                "instances": gt(h, w, boxes, classes),
                "image_id": i + 1,
                "height": h,
                "width": w,
            }
        )
    return inputs


def train_losses(model, inputs):
    model.train()
    with EventStorage() as storage:
        losses = model(inputs)
    return losses, storage


def register_tiny(json_and_root):
    json_file, root = json_and_root
    name = f"gridclip_test_{uuid.uuid4().hex[:8]}"
    register_lvis_format_dataset(name, json_file, root)
    return name


def dense_inputs(model, n=1, size=(2, 64, 80), seed=0):
    """Hand-made FPN features for ``model``'s levels and an ImageList of the matching size."""
    torch.manual_seed(seed)
    h, w = size[1], size[2]
    shapes = model.backbone.output_shape()
    features = [
        torch.randn(n, 32, math.ceil(h / shapes[f].stride), math.ceil(w / shapes[f].stride))
        for f in model.head_in_features
    ]
    images = ImageList(torch.zeros(n, 3, h, w), [(h, w)] * n)
    return images, features


# --------------------------------------------------------------------------- configs & building
def test_configs_load_and_use_clip_preprocessing():
    base = get_gridclip_cfg("Base-GridCLIP.yaml")
    assert base.MODEL.META_ARCHITECTURE == "GridCLIP"
    assert base.INPUT.FORMAT == "RGB"
    np.testing.assert_allclose(base.MODEL.PIXEL_MEAN, CLIP_PIXEL_MEAN_255, rtol=1e-6)
    np.testing.assert_allclose(base.MODEL.PIXEL_STD, CLIP_PIXEL_STD_255, rtol=1e-6)
    assert base.MODEL.BACKBONE.NAME == "build_clip_resnet_fpn_backbone"
    r50 = get_gridclip_cfg("GridCLIP_R50.yaml")
    assert r50.MODEL.RETINANET.NUM_CLASSES == 1203
    assert r50.DATASETS.TRAIN == ("lvis_v1_train_ovd_base",)
    assert r50.DATASETS.TEST == ("lvis_v1_val",)
    assert r50.TEST.DETECTIONS_PER_IMAGE == 300
    assert r50.MODEL.CLIP.NAME == "RN50" and r50.MODEL.CLIP.EMBED_DIM == 1024
    assert r50.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert r50.MODEL.RETINANET.SCORE_THRESH_TEST <= 1e-3
    # issue 13: the top-500 gate ranked by the detached objectness ranker (eighth pass)
    assert r50.MODEL.GRIDCLIP.OBJECTNESS_RANKER and r50.MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS == 500
    # issue 13, eighth pass: the light head (FPN and towers at 128 channels, 2 convs per tower)
    assert (r50.MODEL.FPN.OUT_CHANNELS, r50.MODEL.RETINANET.NUM_CONVS) == (128, 2)


def test_build_tiny_model_and_parameter_count(assets):
    model = build_model(make_cfg(assets))
    assert isinstance(model, GridCLIP) and isinstance(model.head, GridCLIPHead)
    assert model.num_classes == K and model.text_embeddings.shape == (K, D)
    assert model.image_alignment is None
    # per-location embedding conv: 32 channels -> D, 1x1 (Base-GridCLIP's EMBED_KERNEL_SIZE)
    assert sum(p.numel() for p in model.head.grid_embed.parameters()) == 32 * D + D
    assert not hasattr(model.head, "cls_score")  # no K-class conv
    # pinned: tiny CLIP trunk (stem..res5) + 32-ch FPN + 1-conv towers + 64-d 1x1 embedding
    # conv + the learned bias + the anchor-offset conv (32 -> A channels, 3x3)
    assert sum(p.numel() for p in model.parameters()) == 745404 + 1 + (32 * 9 * A + A)


def test_class_count_mismatch_errors(assets, tiny_lvis_json):
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES = 4"):
        build_model(make_cfg(assets, "MODEL.RETINANET.NUM_CLASSES", 4))
    name = register_tiny(tiny_lvis_json)  # 2 classes
    with pytest.raises(ValueError, match="thing_classes"):
        build_model(make_cfg(assets, "DATASETS.TRAIN", f"('{name}',)"))
    with pytest.raises(ValueError, match="EMBED_DIM"):
        resolve_text = make_cfg(assets, "MODEL.CLIP.EMBED_DIM", 32)
        GridCLIP.vocabulary_from_cfg(resolve_text)


# ------------------------------------------------------------------------------------- training
def test_train_forward_finite_losses_with_image_alignment(assets):
    cfg = make_cfg(
        assets,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS", "[1, 2]",
    )  # fmt: skip
    model = build_model(cfg)
    losses, storage = train_losses(model, make_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_image_align"}
    for k, v in losses.items():
        assert torch.isfinite(v) and v > 0, (k, v)
    sum(losses.values()).backward()
    assert model.head.grid_embed.weight.grad.abs().sum() > 0
    assert model.backbone.bottom_up.res5[0].conv1.weight.grad.abs().sum() > 0
    assert model.backbone.bottom_up.stem[0].weight.grad is None  # frozen stem
    assert storage.latest()["num_pos_anchors"][0] > 0
    # the teacher exists now, yet is neither saved, nor trained, nor moved by .to()
    teacher = model.image_alignment.teacher
    assert teacher is not None
    assert not any("teacher" in k or "attnpool" in k for k in model.state_dict())
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in teacher.parameters())


def test_empty_and_half_empty_ground_truth(assets):
    model = build_model(make_cfg(assets))
    losses, _ = train_losses(model, make_inputs(with_boxes=(False, False)))
    assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_cls"])
    assert losses["loss_cls"] > 0
    losses, _ = train_losses(model, make_inputs(with_boxes=(True, False)))
    assert losses["loss_box_reg"] > 0 and torch.isfinite(losses["loss_cls"])


def _hand_focal(logits, targets, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(logits.double())
    t = targets.double()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def test_golden_logits_and_focal_loss(assets):
    """Known grid embedding and text embeddings -> logits and focal loss computed by hand."""
    text = torch.zeros(3, D)
    text[0, 0] = text[1, 1] = text[2, 2] = 1.0  # three orthogonal class embeddings
    cfg = make_cfg(assets, "MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.GRIDCLIP.LOGIT_SCALE", 10.0)
    cfg.MODEL.CLIP.TEXT_EMBEDDINGS = ""
    np.save(assets["root"] / "text3.npy", text.numpy())
    cfg.MODEL.CLIP.TEXT_EMBEDDINGS = str(assets["root"] / "text3.npy")
    model = build_model(cfg).train()

    e = torch.zeros(D)
    e[0], e[1] = 3.0, 1.0  # cos with the classes: 3/sqrt(10), 1/sqrt(10), 0
    bias = -math.log(0.99 / 0.01)
    expected = torch.tensor([30 / math.sqrt(10), 10 / math.sqrt(10), 0.0]) + bias
    torch.testing.assert_close(model.head.logits(e[None]), expected[None], atol=1e-5, rtol=0)
    assert expected[0].item() == pytest.approx(4.89, abs=0.01)  # 9.4868 - 4.5951

    images, features = dense_inputs(model)
    grid_embeddings = [e.view(1, D, 1, 1).expand(1, D, f.shape[2], f.shape[3]) for f in features]
    box_deltas = [torch.zeros(1, A * 4, f.shape[2], f.shape[3]) for f in features]
    offsets = [torch.zeros(1, A, f.shape[2], f.shape[3]) for f in features]
    # the per-anchor logit offsets add to every class of their anchor
    offsets_p7 = torch.arange(A, dtype=torch.float32).view(1, A, 1, 1)
    anchor_logits = model.head.anchor_logits([grid_embeddings[-1]], [offsets_p7])  # P7 is 1x1
    torch.testing.assert_close(
        anchor_logits[0], expected + torch.arange(A)[:, None], atol=1e-5, rtol=0
    )
    gt_instances = [gt(64, 80, [[8, 8, 40, 40]], [1])]
    with EventStorage():
        losses = model.forward_training(
            images, features, [grid_embeddings, box_deltas, offsets], gt_instances
        )
    labels = model.label_anchors(model.anchor_generator(features), gt_instances)[0][0]
    valid = labels >= 0
    targets = F.one_hot(labels[valid], 4)[:, :3]
    num_pos = int((targets.sum(1) > 0).sum())
    assert num_pos > 0
    hand = _hand_focal(expected.expand(int(valid.sum()), 3), targets)
    normalizer = 100 * 0.9 + num_pos * 0.1  # RetinaNet's EMA, first step
    assert losses["loss_cls"].item() == pytest.approx(hand.item() / normalizer, rel=1e-4)
    assert losses["loss_box_reg"] > 0  # zero deltas, boxes not equal to anchors


def _novel_setup(assets, tiny_lvis_json, ignore_novel=True):
    name = register_tiny(tiny_lvis_json)  # class 0 'red_square' (f), class 1 'blue_ring' (r)
    np.save(assets["root"] / "text2.npy", np.random.RandomState(3).randn(2, D).astype("float32"))
    cfg = make_cfg(
        assets,
        "DATASETS.TRAIN", f"('{name}',)",
        "MODEL.RETINANET.NUM_CLASSES", 2,
        "MODEL.CLIP.TEXT_EMBEDDINGS", str(assets["root"] / "text2.npy"),
        "MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING", ignore_novel,
    )  # fmt: skip
    return build_model(cfg)


def _cls_loss(model, grid_embeddings, features, images, gt_instances):
    box_deltas = [torch.zeros(1, A * 4, f.shape[2], f.shape[3]) for f in features]
    offsets = [torch.zeros(1, A, f.shape[2], f.shape[3]) for f in features]
    if hasattr(model, "loss_normalizer"):
        del model.loss_normalizer
    with EventStorage() as storage:
        losses = model.forward_training(
            images, features, [grid_embeddings, box_deltas, offsets], gt_instances
        )
    return losses["loss_cls"], storage.latest()["num_pos_anchors"][0]


def test_ignore_novel_classes_in_training(assets, tiny_lvis_json):
    model = _novel_setup(assets, tiny_lvis_json).train()
    assert model.trained_class_mask.tolist() == [True, False]
    assert "trained_class_mask" not in model.state_dict()  # derived, not saved
    images, features = dense_inputs(model)
    grid_embeddings = [
        torch.randn(1, D, f.shape[2], f.shape[3], requires_grad=True) for f in features
    ]
    base_gt = [gt(64, 80, [[8, 8, 40, 40]], [0])]
    loss, num_pos = _cls_loss(model, grid_embeddings, features, images, base_gt)
    assert num_pos > 0
    # moving the novel class's text embedding does not change the loss: its column is not trained
    new_text = model.text_embeddings.clone()
    new_text[1] = torch.randn(D)
    model.head.classifier.set_vocabulary(new_text)
    loss_moved, _ = _cls_loss(model, grid_embeddings, features, images, base_gt)
    assert loss_moved.item() == loss.item()
    # a box of a novel class makes its anchors "ignore", not positives of some other column
    _, num_pos_novel = _cls_loss(
        model, grid_embeddings, features, images, [gt(64, 80, [[8, 8, 40, 40]], [1])]
    )
    assert num_pos_novel == 0
    # ... whereas without IGNORE_NOVEL_IN_TRAINING the novel column is a negative everywhere
    trained_all = _novel_setup(assets, tiny_lvis_json, ignore_novel=False).train()
    assert trained_all.trained_class_mask.all()
    loss_all, _ = _cls_loss(trained_all, grid_embeddings, features, images, base_gt)
    assert loss_all.item() != pytest.approx(loss.item(), rel=1e-3)


def test_ignore_novel_requires_frequencies(assets, tiny_lvis_json):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"gridclip_test_nofreq_{uuid.uuid4().hex[:6]}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_classes=[f"c{i}" for i in range(K)])
    with pytest.raises(ValueError, match="class_frequencies"):
        build_model(make_cfg(assets, "DATASETS.TRAIN", f"('{name}',)"))
    model = build_model(
        make_cfg(
            assets,
            "DATASETS.TRAIN",
            f"('{name}',)",
            "MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING",
            False,
        )
    )
    assert model.trained_class_mask.all()


def _reference_focal_loss(logits, offsets, labels, num_classes, alpha, gamma):
    """Detectron2's RetinaNet.losses classification term on expanded per-anchor logits."""
    from fvcore.nn import sigmoid_focal_loss_jit

    n, m, k = logits.shape
    group = labels.shape[1] // m
    z = logits[:, :, None, :]
    z = z + offsets[..., None] if offsets is not None else z.expand(n, m, group, k)
    z = z.reshape(n, m * group, k)
    valid = labels >= 0
    targets = F.one_hot(labels[valid], num_classes + 1)[:, :-1].to(z.dtype)
    return sigmoid_focal_loss_jit(z[valid], targets, alpha=alpha, gamma=gamma, reduction="sum")


def _random_focal_inputs(n, m, group, k, with_offsets, seed):
    g = torch.Generator().manual_seed(seed)
    # wide logits: easy negatives far below 0, a few confident ones far above
    logits = torch.randn(n, m, k, generator=g) * 4 - 4
    logits.view(-1)[::13] = -90.0
    logits.view(-1)[5::29] = 30.0
    logits[0, 0, 1] = 0.5  # the location whose anchors are positives of class 1 (below)
    logits.requires_grad_()
    offsets = None
    if with_offsets:
        offsets = (torch.randn(n, m, group, generator=g) * 2).requires_grad_()
    labels = torch.full((n, m * group), k, dtype=torch.long)
    u = torch.rand(n, m * group, generator=g)
    labels[u < 0.15] = -1  # ignored
    positive = u > 0.9
    labels[positive] = torch.randint(0, k, (int(positive.sum()),), generator=g)
    if group > 1:  # several anchors of one location positive for the same class
        labels[0, :group] = torch.tensor([1] * (group - 1) + [-1])
    return logits, offsets, labels


@pytest.mark.parametrize(
    "group,with_offsets,alpha,gamma",
    [
        (9, True, 0.25, 2.0),  # per-location embeddings + anchor offsets (the default head)
        (9, False, 0.25, 2.0),  # per-location embeddings, anchors share their logits
        (1, False, 0.25, 2.0),  # per-anchor embeddings
        (9, True, -1.0, 1.5),  # no alpha weighting, another gamma
        (9, False, 0.5, 0.0),  # gamma 0: weighted BCE
    ],
)
def test_grid_focal_loss_equals_detectron2(group, with_offsets, alpha, gamma):
    from gridclip.modeling.focal_loss import grid_focal_loss

    k = 11
    logits, offsets, labels = _random_focal_inputs(2, 37, group, k, with_offsets, seed=group)
    inputs = [logits] + ([offsets] if with_offsets else [])
    ref = _reference_focal_loss(
        logits.double(), offsets.double() if with_offsets else None, labels, k, alpha, gamma
    )
    ref_grads = torch.autograd.grad(ref, inputs)  # float64 arithmetic
    ref32 = _reference_focal_loss(logits, offsets, labels, k, alpha, gamma)
    ref32_grads = torch.autograd.grad(ref32, inputs)  # what RetinaNet.losses computes
    for block in (97, 1 << 18):  # many blocks (some without positives), one block
        loss = grid_focal_loss(logits, offsets, labels, k, alpha, gamma, block_elements=block)
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert loss.item() == pytest.approx(ref32.item(), rel=1e-5)
        grads = torch.autograd.grad(loss * 3.0, inputs)  # the upstream gradient is applied
        for got, want, want32 in zip(grads, ref_grads, ref32_grads):
            assert got.shape == want.shape and got.dtype == torch.float32
            for expected in (want, want32):
                torch.testing.assert_close(
                    got.double(),
                    3.0 * expected.double(),
                    rtol=1e-5,
                    atol=1e-6 * expected.abs().max().item(),
                )


def test_grid_focal_loss_edge_cases():
    from gridclip.modeling.focal_loss import grid_focal_loss, softplus_from_sigmoid

    k = 4
    logits = torch.randn(1, 6, k, requires_grad=True)
    offsets = torch.randn(1, 6, 3, requires_grad=True)
    ignored = torch.full((1, 18), -1, dtype=torch.long)  # nothing valid: zero loss and grads
    loss = grid_focal_loss(logits, offsets, ignored, k)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().sum() == 0 and offsets.grad.abs().sum() == 0
    with torch.no_grad():  # no autograd: the loss only
        labels = torch.full((1, 18), k, dtype=torch.long)
        ref = _reference_focal_loss(logits, offsets, labels, k, 0.25, 2.0)
        assert grid_focal_loss(logits, offsets, labels, k).item() == pytest.approx(ref.item())
    # softplus from the sigmoid: a few ulps over float32's range, no inf/nan at the extremes
    z = torch.cat([torch.linspace(-80, 80, 20001), torch.tensor([0.0, 1e-8, -1e-8, 200, -200])])
    p = torch.sigmoid(z)
    sp = softplus_from_sigmoid(z, p, 1 - p)
    want = F.softplus(z.double())
    assert torch.isfinite(sp).all()
    torch.testing.assert_close(sp.double(), want, rtol=5e-7, atol=1e-30)


def _detectron2_losses(model, inputs):
    """The oracle: Detectron2's ``RetinaNet.losses`` on the per-anchor logits the head expands
    (every class trained, so ``model.num_classes`` is the loss's class count)."""
    assert model.trained_class_mask.all()
    model.train()
    images = model.preprocess_image(inputs)
    backbone_features = model.backbone(images.tensor)
    features = [backbone_features[f] for f in model.head_in_features]
    grid_embeddings, box_deltas, offsets = model.predict(features, backbone_features.get("res5"))
    anchors = model.anchor_generator(features)
    gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"] for x in inputs])
    logits = model.head.anchor_logits(grid_embeddings, offsets)
    deltas = [permute_to_N_HWA_K(x, 4) for x in box_deltas]
    with EventStorage() as storage:
        losses = RetinaNet.losses(model, anchors, [logits], gt_labels, deltas, gt_boxes)
    return losses, storage


@pytest.mark.parametrize(
    "opts",
    [
        (),  # per-location embeddings with anchor offsets (the default)
        ("MODEL.GRIDCLIP.ANCHOR_OFFSET", False),
    ],
)
def test_model_losses_equal_detectron2_retinanet_losses(assets, opts):
    model = build_model(make_cfg(assets, *opts))
    _random_head(model, std=0.3)
    results = {}
    for name, run in (("grid", train_losses), ("detectron2", _detectron2_losses)):
        if hasattr(model, "loss_normalizer"):
            del model.loss_normalizer
        model.zero_grad()
        losses, storage = run(model, make_inputs())
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.head.named_parameters() if p.grad is not None}
        results[name] = (losses, storage.latest()["num_pos_anchors"][0], grads)
    (grid, grid_pos, grid_grads), (d2, d2_pos, d2_grads) = results["grid"], results["detectron2"]
    assert grid_pos == d2_pos > 0
    assert grid["loss_cls"].item() == pytest.approx(d2["loss_cls"].item(), rel=1e-5)
    assert grid["loss_box_reg"].item() == d2["loss_box_reg"].item()
    assert set(grid_grads) == set(d2_grads) and len(grid_grads) > 4
    for name, want in d2_grads.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(grid_grads[name], want, rtol=1e-4, atol=1e-5 * scale + 1e-12)


def test_grid_focal_loss_trains_base_classes_only(assets, tiny_lvis_json):
    """The trained-class subset and label remapping, against Detectron2's focal loss on the
    expanded per-anchor logits of the trained columns."""
    model = _novel_setup(assets, tiny_lvis_json).train()
    images, features = dense_inputs(model)
    grid_embeddings = [torch.randn(1, D, f.shape[2], f.shape[3]) for f in features]
    base_gt = [gt(64, 80, [[8, 8, 40, 40], [30, 20, 70, 60]], [0, 1])]  # a base and a novel box
    grid, grid_pos = _cls_loss(model, grid_embeddings, features, images, base_gt)
    anchors = model.anchor_generator(features)
    labels, _ = model.label_anchors(anchors, base_gt)
    trained = model.trained_class_mask.nonzero().flatten()
    labels = torch.stack(model._to_trained_labels(labels, trained))
    offsets = [torch.zeros(1, A, f.shape[2], f.shape[3]) for f in features]
    logits = model.head.anchor_logits(grid_embeddings, offsets, trained)
    valid = labels >= 0
    num_pos = int((valid & (labels != trained.numel())).sum())
    target = F.one_hot(labels[valid], trained.numel() + 1)[:, :-1].float()
    want = sigmoid_focal_loss(logits[valid], target, alpha=0.25, gamma=2.0, reduction="sum")
    assert grid_pos == num_pos > 0
    assert grid.item() == pytest.approx(want.item() / (0.9 * 100 + 0.1 * num_pos), rel=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_embed_kernel_size(assets, kernel):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", kernel))
    conv = model.head.grid_embed
    assert conv.kernel_size == (kernel, kernel) and conv.padding == (kernel // 2, kernel // 2)
    assert sum(p.numel() for p in conv.parameters()) == 32 * kernel * kernel * D + D
    images, features = dense_inputs(model)
    grid_embeddings = model.head.forward_embeddings(features)[0]
    for x, f in zip(grid_embeddings, features):  # the grid keeps its size
        assert x.shape == (1, D, f.shape[2], f.shape[3])
    losses, _ = train_losses(model, make_inputs())
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kernel", [0, 2, 5])
def test_embed_kernel_size_rejects_other_values(assets, kernel):
    with pytest.raises(ValueError, match="EMBED_KERNEL_SIZE"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", kernel))


# ------------------------------------------------------------------------------------ inference
def _random_head(model, std=0.5):
    torch.manual_seed(5)
    with torch.no_grad():
        model.head.grid_embed.weight.normal_(0, std)
        model.head.grid_embed.bias.normal_(0, 1.0)
        model.head.bbox_pred.weight.normal_(0, 0.05)
        if model.head.anchor_offset is not None:
            model.head.anchor_offset.weight.normal_(0, 0.3)


def assert_same_detections(a, b):
    """Same boxes/classes, scores equal up to float rounding (sigmoid of differently-sized
    tensors may differ in the last bit); canonical order by class and box."""
    assert len(a) == len(b), (len(a), len(b))

    def canonical(inst):
        keys = [
            (c, tuple(round(v, 2) for v in box))
            for c, box in zip(inst.pred_classes.tolist(), inst.pred_boxes.tensor.tolist())
        ]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return inst[torch.tensor(order, dtype=torch.long)]

    a, b = canonical(a), canonical(b)
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-5)


def _naive_inference(model, images, features):
    """Detectron2's own RetinaNet inference on per-anchor logits (the head's RetinaNet contract)."""
    naive_predictions = list(model.head(features))  # (N, A*K, Hi, Wi) logits
    return RetinaNet.forward_inference(model, images, features, naive_predictions)


NO_OFFSET = ["MODEL.GRIDCLIP.ANCHOR_OFFSET", False]
TWO_SQUARE_ANCHORS = [
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32], [32, 64], [64, 128], [128, 256], [256, 512]]",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]",
]  # fmt: skip


# With anchor offsets (default) the fast path must equal RetinaNet's decoding exactly, NMS and
# detection cap included. Without them, same-location anchors tie in score and NMS among them
# depends on the order of ties: exact equality is then checked with NMS off for RetinaNet's 9
# anchors, and with NMS on for 2 square anchors per location (scales 1x, 2x: IoU 0.25, they never
# suppress each other).
@pytest.mark.parametrize(
    "opts,nms_thresh,max_det",
    [
        ([], 0.5, 40),
        (TWO_SQUARE_ANCHORS, 0.5, 10000),
        (NO_OFFSET, 1.0, 10000),
        (NO_OFFSET + TWO_SQUARE_ANCHORS, 0.5, 10000),
    ],
)
def test_fast_inference_equals_naive_per_anchor_expansion(assets, opts, nms_thresh, max_det):
    model = build_model(make_cfg(assets, *opts)).eval()
    num_anchors = model.head.num_anchors
    _random_head(model)
    model.test_topk_candidates = num_anchors * 20  # a multiple of A: the same candidates
    model.test_score_thresh = 0.05
    model.test_nms_thresh = nms_thresh
    model.max_detections_per_image = max_det
    images, features = dense_inputs(model, n=2, size=(2, 96, 72), seed=2)
    seen_rows = []
    logits_fn = model.head.logits
    with torch.no_grad():
        with mock.patch.object(
            model.head,
            "logits",
            lambda rows, idx=None: seen_rows.append(rows.shape[-2]) or logits_fn(rows, idx),
        ):
            fast = model.forward_inference(
                images, features, list(model.head.forward_embeddings(features))
            )
        naive = _naive_inference(model, images, features)
    # the fast path scored every location once (per image and level), never every anchor
    assert seen_rows == [f.shape[2] * f.shape[3] for f in features] * len(images)
    for a, b in zip(fast, naive):
        assert len(a) > 5
        assert_same_detections(a, b)


@pytest.mark.parametrize(
    "num_rows,num_classes,k", [(300, 50, 40), (30, 50, 200), (7, 3, 21), (5, 4, 1)]
)
def test_top_pairs_threshold_first_equals_plain_topk(num_rows, num_classes, k):
    g = torch.Generator().manual_seed(num_rows)
    logits = torch.randn(num_rows, num_classes, generator=g) * 3
    bonus = torch.randn(num_rows, generator=g)
    for row_bonus in (None, bonus):
        full = logits if row_bonus is None else logits + row_bonus[:, None]
        want = full.flatten().topk(k)
        for exhaustive in (False, True):  # threshold-first (CPU) and one top-k (GPU default)
            rows, classes = GridCLIP._top_pairs(logits, row_bonus, k, exhaustive=exhaustive)
            assert rows.shape == classes.shape == (k,)
            torch.testing.assert_close(full[rows, classes], want.values)  # same, best first
            assert torch.equal(rows * num_classes + classes, want.indices)  # no ties here
    # k larger than the matrix: everything
    rows, classes = GridCLIP._top_pairs(logits[:2, :3], None, 50)
    assert sorted((rows * 3 + classes).tolist()) == list(range(6))
    # NaN logits (their scores fail the score threshold later): still k pairs, no error
    nan = logits.clone()
    nan[1, 2] = float("nan")
    rows, classes = GridCLIP._top_pairs(nan, bonus, k)
    assert rows.numel() == classes.numel() == k
    rows, classes = GridCLIP._top_pairs(torch.full_like(logits, float("nan")), bonus, k)
    assert rows.numel() == classes.numel() == k


@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_top_pairs_keeps_the_pairs_at_tau_when_sums_round(scale):
    """Rows compared with tau - bonus: with a large bonus, logit + bonus rounds (many equal
    sums), and tau - bonus may round above a pair that reaches tau; none may be lost."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 30, generator=g)
    bonus = torch.randn(200, generator=g) * scale
    full = logits + bonus[:, None]
    for k in (1, 17, 600, 5999):
        rows, classes = GridCLIP._top_pairs(logits, bonus, k, exhaustive=False)
        assert rows.numel() == k
        torch.testing.assert_close(full[rows, classes], full.flatten().topk(k).values)


def test_eval_forward_shapes_and_inf_nan_inputs(assets):
    model = build_model(make_cfg(assets)).eval()
    inputs = make_inputs()
    inputs[0]["height"], inputs[0]["width"] = 194, 226  # rescaled to the original size
    with torch.no_grad():
        out = model(inputs)
    inst = out[0]["instances"]
    assert inst.image_size == (194, 226) and len(inst) <= model.max_detections_per_image
    assert inst.pred_classes.max() < K
    for value in (float("inf"), float("nan")):
        images = ImageList(torch.full((1, 3, 96, 96), value), [(96, 96)])
        with torch.no_grad():
            feats = model.backbone(images.tensor)
            feats = [feats[f] for f in model.head_in_features]
            results = model.forward_inference(
                images, feats, list(model.head.forward_embeddings(feats))
            )
        boxes = results[0].pred_boxes.tensor
        assert not torch.isfinite(boxes).all(dim=1).any() if len(boxes) else True


# ----------------------------------------------------------------------------------- vocabulary
def test_set_vocabulary_with_tensor_to_and_state_dict(assets):
    model = build_model(make_cfg(assets)).eval()
    new = torch.randn(7, D)
    model.set_vocabulary(new)
    assert model.num_classes == 7 and model.trained_class_mask.shape == (7,)
    torch.testing.assert_close(model.text_embeddings, F.normalize(new, dim=1))
    assert "head.classifier.text_embeddings" in dict(model.named_buffers())
    assert model.state_dict()["head.classifier.text_embeddings"].shape == (7, D)
    _random_head(model)
    images, features = dense_inputs(model, n=1, size=(2, 64, 72), seed=3)
    with torch.no_grad():
        grid_embeddings = model.head.forward_embeddings(features)[0]
        rows = torch.cat([model.head.embedding_rows(x) for x in grid_embeddings], dim=1)[0]
        new[6] = F.normalize(rows, dim=1).mean(dim=0)  # a new class close to every location
        model.set_vocabulary(new)
        out = model.forward_inference(
            images, features, list(model.head.forward_embeddings(features))
        )
    assert out[0].pred_classes[0] == 6  # the new classes are scored
    model.to("meta")
    assert model.text_embeddings.device.type == "meta"
    assert model.trained_class_mask.device.type == "meta"
    with pytest.raises(ValueError, match="dimension"):
        build_model(make_cfg(assets)).set_vocabulary(torch.randn(3, D + 1))


def test_set_vocabulary_with_names_uses_clip_text_encoder(assets):
    model = build_model(make_cfg(assets))
    names = ["red square", "blue ring", "green triangle"]
    model.set_vocabulary(names)
    assert model.num_classes == 3 and model.class_names == names
    clip_model = gclip.load_clip(assets["clip"])
    expected = gclip.get_text_embeddings(
        names, clip_model, model_key="test", prompts="single", cache_dir=None, progress=False
    )
    torch.testing.assert_close(model.text_embeddings, F.normalize(expected.float(), dim=1))
    with pytest.raises(ValueError, match="duplicate"):
        model.set_vocabulary(["cat", "Cat"])
    with pytest.raises(ValueError, match="empty"):
        model.set_vocabulary([" ", ""])


def test_resolve_vocabulary_inputs(assets, tmp_path):
    emb, names = resolve_vocabulary(assets["text"])
    assert emb.shape == (K, D) and names is None
    emb2, _ = resolve_vocabulary(np.load(assets["text"]))
    torch.testing.assert_close(emb, emb2)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_vocabulary(str(tmp_path / "missing.npy"))
    with pytest.raises(TypeError):
        resolve_vocabulary(42)
    with pytest.raises(ValueError, match="config"):
        resolve_vocabulary(["cat", "dog"], None)
    cfg = make_cfg(assets)
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        check_class_count(torch.randn(K + 1, D), cfg)


def test_checkpoint_round_trip_and_other_vocabulary_size(assets, tmp_path):
    cfg = make_cfg(assets)
    model = build_model(cfg)
    _random_head(model)
    model.set_vocabulary(torch.randn(7, D))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_7")
    saved = torch.load(tmp_path / "model_7.pth", weights_only=False)["model"]
    assert not any("teacher" in k for k in saved)

    # Detectron2's checkpointer keeps the model's (config's) vocabulary on a size mismatch ...
    other = build_model(cfg)
    DetectionCheckpointer(other).load(str(tmp_path / "model_7.pth"))
    assert other.num_classes == K and other.text_embeddings.shape == (K, D)
    torch.testing.assert_close(other.head.grid_embed.weight, model.head.grid_embed.weight)
    # ... while load_state_dict adopts the checkpoint's vocabulary and syncs num_classes
    other.load_state_dict(saved)
    assert other.num_classes == 7 and other.trained_class_mask.shape == (7,)
    torch.testing.assert_close(other.text_embeddings, model.text_embeddings)
    # same vocabulary size: an exact round trip
    same = build_model(cfg)
    same.set_vocabulary(torch.randn(7, D))
    DetectionCheckpointer(same).load(str(tmp_path / "model_7.pth"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v, msg=k)


# ------------------------------------------------------------------------------ image alignment
def test_image_alignment_off_builds_no_teacher(assets, monkeypatch):
    def fail(cfg):
        raise AssertionError("the teacher must not be built")

    monkeypatch.setattr(image_alignment, "build_clip_teacher_from_cfg", fail)
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.0))
    assert model.image_alignment is None
    losses, _ = train_losses(model, make_inputs())
    assert "loss_image_align" not in losses
    # on, it is built lazily: building the model (e.g. for evaluation) does not load it
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0))
    assert model.image_alignment is not None
    assert not model.image_alignment.teacher_holder.is_built


def test_pool_grid_embeddings_valid_region_and_tile_order():
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 2.0, 5.0
    x = torch.empty(1, D, 4, 6)
    x[0, :, :, :2] = a[:, None, None]
    x[0, :, :, 2:4] = b[:, None, None]
    x[0, :, :, 4:] = 1e6  # padding beyond the image (width 4 cells x stride 8 = 32 px)
    x[0, :, 3:, :] = 1e6  # and below it (3 rows)
    whole, tiles = pool_grid_embeddings([x], [8], [(24, 32)], [1, 2], D)
    torch.testing.assert_close(
        whole[0, 0], F.normalize(F.normalize(a, dim=0) + F.normalize(b, dim=0), dim=0)
    )
    # row-major 2x2 tiles: left half a, right half b (rows 0-1 and 1-2 overlap: adaptive pool)
    expected = torch.stack([F.normalize(a, dim=0), F.normalize(b, dim=0)] * 2)
    torch.testing.assert_close(tiles[0], expected)
    torch.testing.assert_close(mirror_tiles(tiles, 2)[0], expected[[1, 0, 3, 2]])
    # per-anchor embeddings: anchors' normalised embeddings are averaged
    two = torch.cat([x[:, :, :3, :4], x[:, :, :3, :4]], dim=1)
    torch.testing.assert_close(pool_grid_embeddings([two], [8], [(24, 32)], [1], D)[0], whole)


def test_raw_images_for_the_teacher_are_rgb():
    bgr = torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
    assert raw_rgb_image(bgr, "BGR").flatten().tolist() == [3.0, 2.0, 1.0]
    assert raw_rgb_image(bgr, "RGB").flatten().tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        ImageAlignment(embed_dim=D, teacher=torch.nn.Identity(), input_format="L")


def test_alignment_loss_values():
    align = ImageAlignment(embed_dim=4, teacher=torch.nn.Identity(), loss_type="l1", grids=[1])
    s = torch.tensor([[[1.0, 0, 0, 0]]])
    t = torch.tensor([[[0.0, 1, 0, 0]]])
    assert align.alignment_loss([s], [t], False).item() == pytest.approx(2.0)  # sum |s - t|
    align.loss_type = "cosine"
    assert align.alignment_loss([s], [t], False).item() == pytest.approx(1.0)
    assert align.alignment_loss([s], [s], False).item() == pytest.approx(0.0)


def test_teacher_cache_tool_round_trip_and_errors(assets, tiny_lvis_json, tmp_path, monkeypatch):
    name = register_tiny(tiny_lvis_json)
    out = str(tmp_path / "teacher.pt")
    tool = runpy.run_path(os.path.join(REPO_ROOT, "tools", "cache_teacher_embeddings.py"))
    common = [
        "--dataset", name, "--output", out, "--grids", "1,2", "--no-progress",
        "MODEL.CLIP.WEIGHTS", assets["clip"], "MODEL.CLIP.EMBED_DIM", str(D),
        "MODEL.CLIP.TEACHER_INPUT_SIZE", "64", "MODEL.DEVICE", "cpu",
    ]  # fmt: skip
    tool["main"](["--limit", "1"] + common)
    assert len(TeacherEmbeddingCache.load(out)) == 1
    first = TeacherEmbeddingCache.load(out).get(TeacherEmbeddingCache.load(out).keys()[0])
    tool["main"](common)  # resumes: embeds only the missing image
    cache = TeacherEmbeddingCache.load(out, embed_dim=D, grids=[1, 2])
    assert sorted(cache.keys()) == ["1", "2"] and cache.meta["dataset"] == name
    torch.testing.assert_close(cache.get(cache.keys()[0])[1], first[1])

    # the cached views equal the online teacher's (fp16 storage)
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    d = DatasetCatalog.get(name)[0]
    image = torch.as_tensor(read_image(d["file_name"], format="RGB").copy()).permute(2, 0, 1)
    cfg = make_cfg(
        assets,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT",
        1.0,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS",
        "[1, 2]",
    )
    online = ImageAlignment(cfg)
    inputs = [{"image": image, "image_id": d["image_id"]}]
    expected = online.teacher_embeddings(inputs, "cpu")
    cached = cache.get(teacher_cache_key(d), [1, 2])
    for e, c in zip(expected, cached):
        torch.testing.assert_close(e[0], c, atol=2e-3, rtol=0)

    # a model trained from the cache builds no teacher and reads it
    monkeypatch.setattr(image_alignment, "build_clip_teacher_from_cfg", None)
    cfg.MODEL.GRIDCLIP.TEACHER_CACHE = out
    model = build_model(cfg)
    assert model.image_alignment.teacher is None
    h, w = image.shape[1:]
    batch = [
        {"image": image, "instances": gt(h, w, [[10, 10, 40, 40]], [0]), "image_id": d["image_id"]}
    ]
    losses, _ = train_losses(model, batch)
    assert torch.isfinite(losses["loss_image_align"])
    with pytest.raises(KeyError, match="not in the teacher cache"):
        train_losses(model, [dict(batch[0], image_id=999)])

    # validation: wrong dimension, missing grid, not a cache
    with pytest.raises(ValueError, match="64-d embeddings but the model's CLIP space is 32-d"):
        TeacherEmbeddingCache.load(out, embed_dim=32)
    with pytest.raises(ValueError, match="grids"):
        TeacherEmbeddingCache.load(out, grids=[3])
    torch.save({"hello": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a GridCLIP teacher cache"):
        TeacherEmbeddingCache.load(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="cache_teacher_embeddings"):
        TeacherEmbeddingCache.load(str(tmp_path / "none.pt"))


# ------------------------------------------------------------------------------------- backbone
def test_clip_resnet_backbone_matches_clip_trunk(assets):
    cfg = make_cfg(assets, "MODEL.CLIP_RESNET.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']")
    model = build_model(cfg)
    trunk = model.backbone.bottom_up
    assert isinstance(trunk, CLIPResNet)
    shapes = trunk.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (64, 4), "res3": (128, 8), "res4": (256, 16), "res5": (512, 32),
    }  # fmt: skip
    assert not any("attnpool" in n for n, _ in trunk.named_parameters())
    # frozen stem (FREEZE_AT 1), FrozenBN everywhere when initialised from CLIP
    assert not any(p.requires_grad for p in trunk.stem.parameters())
    assert all(p.requires_grad for p in trunk.res2.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules())
    visual = gclip.load_clip(assets["clip"]).visual
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = trunk(x), modified_resnet_features(visual, x)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-4, rtol=1e-4)
    # random init keeps trainable BatchNorm in the trainable stages
    rand = build_model(
        make_cfg(assets, "MODEL.CLIP_RESNET.INIT_FROM_CLIP", False)
    ).backbone.bottom_up
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in rand.res3.modules())
    assert not torch.allclose(rand.res3[0].conv1.weight, trunk.res3[0].conv1.weight)


def test_detectron2_resnet_backbone_also_works(assets):
    cfg = make_cfg(
        assets,
        "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']",
        "MODEL.RESNETS.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", 0,
    )  # fmt: skip
    model = build_model(cfg)
    losses, _ = train_losses(model, make_inputs())
    assert all(torch.isfinite(v) for v in losses.values())


def test_deepcopy_keeps_teacher_out_of_modules(assets):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0))
    assert model.image_alignment.teacher is not None  # built
    twin = copy.deepcopy(model)
    assert twin.image_alignment.teacher_holder.is_built
    assert not any("teacher" in name for name, _ in twin.named_modules())
    assert set(twin.state_dict()) == set(model.state_dict())


def test_device_rule_config_says_it_or_auto_follows_the_machine(tmp_path, monkeypatch):
    import gridclip.config as gconfig

    assert get_gridclip_cfg(opts=["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"
    # an explicit device is kept as written, whatever the machine has
    monkeypatch.setattr(gconfig.torch.cuda, "is_available", lambda: False)
    assert get_gridclip_cfg(opts=["MODEL.DEVICE", "cuda:1"]).MODEL.DEVICE == "cuda:1"
    config = tmp_path / "on_gpu.yaml"
    config.write_text(
        '_BASE_: "%s"\nMODEL:\n  DEVICE: "cuda"\n'
        % gconfig.resolve_config_path("Base-GridCLIP.yaml")
    )
    assert get_gridclip_cfg(str(config)).MODEL.DEVICE == "cuda"
    # unset (or "auto"): resolved once, after merging, to what this machine has
    assert get_gridclip_cfg().MODEL.DEVICE == "cpu"
    assert get_gridclip_cfg(opts=["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cpu"
    monkeypatch.setattr(gconfig.torch.cuda, "is_available", lambda: True)
    assert get_gridclip_cfg("Base-GridCLIP.yaml").MODEL.DEVICE == "cuda"
    assert gconfig.resolve_device("cpu") == "cpu"


def test_code_defaults_equal_the_base_configs():
    """config.py's defaults of the project's keys are what the base YAMLs write (the shared
    MODEL.CLIP_RESNET node follows GridCLIP's; ViLD's FPN also needs res2)."""
    import yaml

    from gridclip.config import CONFIGS_DIR

    defaults = get_gridclip_cfg()
    for name, groups in (
        ("Base-GridCLIP.yaml", ("GRIDCLIP", "CLIP_RESNET")),
        ("Base-ViLD.yaml", ("VILD",)),
    ):
        with open(os.path.join(CONFIGS_DIR, name)) as f:
            written = yaml.safe_load(f)["MODEL"]
        for group in groups:
            for key, value in written[group].items():
                want = getattr(defaults.MODEL, group)[key]
                assert want == value, f"{name}: MODEL.{group}.{key} {value!r} != default {want!r}"
