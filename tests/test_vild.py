"""ViLD baseline: meta-arch, ROI heads, output layers, teacher cache + tool (tiny CPU models)."""

import math
import os

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

import gridclip  # noqa: F401
from gridclip import get_gridclip_cfg
from gridclip.clip import CLIPImageTeacher
from gridclip.clip.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    cache_entry_path,
    read_cache_entry,
    sliding_window_proposals,
)
from gridclip.data import register_lvis_format_dataset
from gridclip.data.mapper import ViLDDatasetMapper
from gridclip.modeling.clip_rescoring import clip_rescored_scores
from gridclip.modeling.vild import (
    ViLD,
    ViLDOutputLayers,
    ensemble_probabilities,
    fast_rcnn_inference_topk,
)
from gridclip_tools import cache_vild_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, K = 64, 4
DATASET = "vild_test_tiny"
FREQUENCIES = ["f", "c", "r", "f"]  # class 2 is novel
MetadataCatalog.get(DATASET).set(
    thing_classes=["red square", "blue ring", "green star", "gray disk"],
    class_frequencies=FREQUENCIES,
)


def make_tiny_clip(seed=0):
    return tiny_models.make_tiny_clip(D, seed=seed)


@pytest.fixture(scope="module")
def teacher(assets):
    return CLIPImageTeacher(make_tiny_clip(), input_size=64)


def tiny_opts(assets):
    # fmt: off
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.NAME", "tiny",
        "MODEL.CLIP.WEIGHTS", assets["weights"],
        "MODEL.CLIP.EMBED_DIM", str(D),
        "MODEL.CLIP.TEACHER_INPUT_SIZE", "64",
        "MODEL.CLIP.TEXT_EMBEDDINGS", assets["text"],
        "MODEL.CLIP.TEXT_CACHE_DIR", str(assets["root"] / "text_cache"),
        "MODEL.CLIP.PROMPTS", "single",
        "MODEL.CLIP_RESNET.FREEZE_AT", "0",
        "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(K),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.VILD.NUM_DISTILL_PROPOSALS", "8",
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)",
        "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128",
    ]
    # fmt: on


def make_cfg(assets, *opts):
    """The shipped Base-ViLD.yaml on a tiny CLIP trunk (width 16) and tiny heads."""
    return get_gridclip_cfg("Base-ViLD.yaml", tiny_opts(assets) + list(opts))


def build(assets, teacher=None, *opts):
    torch.manual_seed(0)
    model = build_model(make_cfg(assets, *opts))
    if teacher is not None:
        model.set_clip_teacher(teacher)
    return model


def make_input(h, w, boxes=(), classes=(), image_id=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    image = torch.randint(0, 256, (3, h, w), generator=g).float()
    return {"image": image, "instances": inst, "height": h, "width": w, "image_id": image_id}


def train_losses(model, batch):
    model.train()
    with EventStorage():
        return model(batch)


@pytest.fixture(scope="module")
def model(assets, teacher):
    return build(assets, teacher)


# --------------------------------------------------------------------------------- training
def test_train_forward_online_finite_losses_and_grads(model):
    batch = [
        make_input(97, 113, [[10, 10, 50, 60], [30, 20, 90, 80]], [0, 1]),
        make_input(81, 67, [[5, 5, 40, 30]], [3], seed=1),
    ]
    losses = train_losses(model, batch)
    expected = {"loss_cls", "loss_box_reg", "loss_vild_image", "loss_rpn_cls", "loss_rpn_loc"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_vild_image"] > 0
    model.zero_grad()
    sum(losses.values()).backward()
    predictor = model.roi_heads.box_predictor
    assert predictor.text_projection.weight.grad.abs().sum() > 0
    assert predictor.background_embedding.grad.abs().sum() > 0
    # the text embeddings are a fixed buffer, never trained
    assert not predictor.text_classifier.text_embeddings.requires_grad


@pytest.mark.parametrize("gts", [((), ()), ([[10, 10, 50, 60]], [1])])
def test_empty_and_half_empty_gt(model, gts):
    batch = [make_input(65, 79), make_input(71, 99, *gts, seed=2)]
    losses = train_losses(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    if not gts[0]:
        assert losses["loss_box_reg"] == 0


def test_teacher_outside_state_dict(assets, model):
    assert model.clip_teacher is not None
    assert not any("visual" in k or "teacher" in k for k in model.state_dict())
    teacher_params = {id(p) for p in model.clip_teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    # a model built from the config builds its teacher lazily, only when distillation needs it
    lazy = build(assets)
    assert not lazy.teacher_holder.is_built
    train_losses(lazy, [make_input(64, 64, [[4, 4, 40, 40]], [0])])
    assert isinstance(lazy.teacher_holder.get(), CLIPImageTeacher)
    assert not any("visual" in k for k in lazy.state_dict())


def test_teacher_gets_raw_rgb_crops_of_top_rpn_proposals(model):
    calls = []

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def parameters(self):
            return self.inner.parameters()

        def buffers(self):
            return self.inner.buffers()

        def eval(self):
            return self

        def embed_boxes(self, image, boxes, scales):
            calls.append((image.clone(), boxes.clone(), tuple(scales)))
            return self.inner.embed_boxes(image, boxes, scales)

    rpn_outputs = []
    rpn_forward = model.proposal_generator.forward

    def recording_rpn(*args, **kwargs):
        rpn_outputs.append(rpn_forward(*args, **kwargs))
        return rpn_outputs[-1]

    real = model.clip_teacher
    model.set_clip_teacher(Recorder(real))
    model.proposal_generator.forward = recording_rpn
    try:
        x = make_input(77, 91, [[10, 10, 50, 60]], [0])
        train_losses(model, [x])
    finally:
        model.set_clip_teacher(real)
        del model.proposal_generator.forward
    ((image, boxes, scales),) = calls
    assert torch.equal(image, x["image"])  # raw 0-255 RGB, not the normalised tensor
    assert scales == (1.0, 1.5)
    # the top-N (N = 8) RPN proposals by objectness (minus boxes under 1 px)
    proposals = rpn_outputs[0][0][0]
    top = proposals.proposal_boxes[:8]
    assert torch.equal(boxes, top[top.nonempty(threshold=1.0)].tensor)
    assert len(boxes) > 0 and (boxes[:, 2] <= 91).all() and (boxes[:, 3] <= 77).all()
    # BGR inputs are flipped to RGB for the teacher
    model.input_format = "BGR"
    try:
        assert torch.equal(model.teacher_image(x["image"]), x["image"].flip(0))
    finally:
        model.input_format = "RGB"


def test_distill_rois_are_extra_and_do_not_change_ce_or_box_losses(model):
    """Distilled proposals go through the box head beside the sampled ones but only feed
    loss_vild_image (the box head has no cross-RoI normalisation here)."""
    heads = model.roi_heads
    heads.train()
    feats = {f"p{i}": torch.randn(1, 32, 128 // 2**i, 128 // 2**i) for i in range(2, 7)}
    props = Instances((128, 128))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 60, 60], [30, 30, 100, 90]]))
    props.gt_classes = torch.tensor([1, K])
    props.gt_boxes = Boxes(torch.tensor([[12.0, 8, 58, 62], [0, 0, 1, 1]]))
    distill = Instances((128, 128))
    distill.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 64, 64], [20, 40, 120, 127]]))
    distill.teacher_embeddings = F.normalize(torch.randn(2, D), dim=1)
    with EventStorage():
        plain = heads._forward_box(feats, [props])
        with_distill = heads._forward_box(feats, [props], [distill])
    assert set(with_distill) == {"loss_cls", "loss_box_reg", "loss_vild_image"}
    for k in ("loss_cls", "loss_box_reg"):
        assert torch.allclose(plain[k], with_distill[k]), k


# ------------------------------------------------------------------------------ golden losses
def hand_output_layers(temperature=0.1, ensemble=False, weight=0.5):
    """Output layers on 4-d features: identity projections, 3 classes e0, e1, e2 (2 is novel),
    background e3."""
    layers = ViLDOutputLayers(
        ShapeSpec(channels=4),
        text_embeddings=torch.eye(4)[:3] * 3.0,  # any norm: normalised inside
        temperature=temperature,
        novel_class_mask=torch.tensor([False, False, True]),
        image_distill_weight=weight,
        ensemble=ensemble,
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        cls_agnostic_bbox_reg=True,
    )
    with torch.no_grad():
        for proj in (layers.text_projection, layers.image_projection):
            if proj is not None:
                proj.weight.copy_(torch.eye(4))
                proj.bias.zero_()
        layers.background_embedding.copy_(torch.tensor([0.0, 0, 0, 0.5]))
    return layers


def test_golden_ce_with_background_and_novel_mask():
    layers = hand_output_layers(temperature=0.1)
    s = 1 / math.sqrt(2)
    x = torch.tensor([[s, s, 0.0, 0.0], [0.0, 0.0, s, s]])  # cos 0.707 to e0/e1; to e2/bg
    scores, deltas = layers(x)
    a = 10 * s  # 7.07: logit of a cosine of 0.707 at T = 0.1
    assert torch.allclose(scores, torch.tensor([[a, a, 0, 0], [0, 0, a, a]]), atol=1e-5)
    box = torch.tensor([[10.0, 10, 50, 50], [20, 20, 60, 60]])
    props = Instances((100, 100))
    props.proposal_boxes = Boxes(box)
    props.gt_boxes = Boxes(box)
    props.gt_classes = torch.tensor([0, 3])  # class 0; background (index K = 3)
    scores = scores.detach().requires_grad_(True)
    with EventStorage():
        losses = layers.losses((scores, torch.zeros(2, 4)), [props])
    # row 1: softmax over {e0, e1, bg} (novel e2 masked): -log(e^a / (2 e^a + 1))
    # row 2: target bg with logit a, competitors e0, e1 at 0 (e2 masked): -log(e^a/(e^a + 2))
    expected = (math.log(2 + math.exp(-a)) + math.log(1 + 2 * math.exp(-a))) / 2
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_box_reg"].item() == pytest.approx(0.0, abs=1e-6)
    losses["loss_cls"].backward()
    assert torch.all(scores.grad[:, 2] == 0), "novel logits must get no gradient"
    assert torch.all(scores.grad[:, [0, 1, 3]].abs().sum(0) > 0)
    # without the mask the novel class takes probability mass: a different loss
    layers.ignore_novel_in_training = False
    with EventStorage():
        unmasked = layers.losses((scores.detach(), torch.zeros(2, 4)), [props])
    # row 1: e2 adds e^0 to the denominator; row 2: e2 (logit a) competes with background
    expected_unmasked = (math.log(2 + 2 * math.exp(-a)) + math.log(2 + 2 * math.exp(-a))) / 2
    assert unmasked["loss_cls"].item() == pytest.approx(expected_unmasked, rel=1e-5)


def test_golden_l1_distillation():
    layers = hand_output_layers(weight=0.5)
    x = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]])  # student embeddings e0, e1
    teacher = torch.tensor([[0.6, 0.8, 0, 0], [0, 1.0, 0, 0]])
    loss = layers.distillation_loss(x, teacher)["loss_vild_image"]
    # row 1: |1 - 0.6| + |0 - 0.8| = 1.2 ; row 2: 0 ; mean 0.6 ; x weight 0.5
    assert loss.item() == pytest.approx(0.3, rel=1e-6)


def test_novel_gt_is_left_out_of_ce():
    layers = hand_output_layers()
    props = Instances((100, 100))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 50, 50], [20, 20, 60, 60]]))
    props.gt_boxes = props.proposal_boxes.clone()
    props.gt_classes = torch.tensor([2, 0])  # a novel gt (not the base-only split)
    scores = torch.randn(2, 4)
    with EventStorage():
        loss = layers.losses((scores, torch.zeros(2, 4)), [props])["loss_cls"]
    assert torch.isfinite(loss)
    masked = scores.clone()
    masked[:, 2] = float("-inf")
    assert loss.item() == pytest.approx(F.cross_entropy(masked[1:], torch.tensor([0])).item())


def test_parameter_count_pin():
    # bbox_pred 4*4+4, text projection 4*4+4, background 4 (+ image projection 20)
    assert sum(p.numel() for p in hand_output_layers().parameters()) == 44
    assert sum(p.numel() for p in hand_output_layers(ensemble=True).parameters()) == 64


# ---------------------------------------------------------------------------------- ensemble
def test_ensemble_probabilities_golden():
    text = torch.tensor([[0.5, 0.3, 0.2]])
    image = torch.tensor([[0.2, 0.6, 0.2]])
    out = ensemble_probabilities(text, image, torch.tensor([False, True]), 1 / 3, 2 / 3)
    expected = torch.tensor(
        [[0.5 ** (2 / 3) * 0.2 ** (1 / 3), 0.3 ** (1 / 3) * 0.6 ** (2 / 3), 0.2]]
    )
    assert torch.allclose(out, expected)


def test_ensemble_branches_train_separately_and_combine_at_inference():
    layers = hand_output_layers(ensemble=True)
    x = torch.randn(3, 4)
    layers.distillation_loss(x, F.normalize(torch.randn(3, 4), dim=1))["loss_vild_image"].backward()
    assert layers.image_projection.weight.grad.abs().sum() > 0
    assert layers.text_projection.weight.grad is None  # distillation trains the image branch
    layers.zero_grad()
    props = Instances((100, 100))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 50, 50]] * 3))
    props.gt_boxes = props.proposal_boxes.clone()
    props.gt_classes = torch.tensor([0, 1, 3])
    with EventStorage():
        sum(layers.losses(layers(x), [props]).values()).backward()
    assert layers.text_projection.weight.grad.abs().sum() > 0
    assert layers.image_projection.weight.grad is None  # CE trains the text branch
    layers.eval()
    with torch.no_grad():
        layers.image_projection.weight.copy_(torch.randn(4, 4))  # branches now disagree
        predictions = layers(x)
        assert len(predictions) == 3
        probs = layers.predict_probs(predictions, [props])[0]
        text_only = F.softmax(predictions[0], dim=1)
        assert not torch.allclose(probs, text_only)
        image_only = F.softmax(predictions[2], dim=1)
        w = torch.tensor([1 / 3, 1 / 3, 2 / 3, 1 / 3])
        assert torch.allclose(probs, text_only ** (1 - w) * image_only**w)


def test_ensemble_model_inference_on_and_off(assets, teacher):
    model = build(assets, teacher, "MODEL.VILD.ENSEMBLE", "True")
    losses = train_losses(model, [make_input(80, 96, [[10, 10, 50, 60]], [0])])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    inputs = [{"image": make_input(89, 75)["image"]}]
    with torch.no_grad():
        on = model(inputs)[0]["instances"]
        model.roi_heads.box_predictor.ensemble = False
        off = model(inputs)[0]["instances"]
    assert len(on) > 0 and len(off) > 0
    assert not torch.allclose(on.scores[:5], off.scores[:5])


def test_clip_rescoring_is_gridclips_rule_on_the_same_detections(assets, teacher):
    """MODEL.VILD.TEST_CLIP_ENSEMBLE: the final detections (same boxes and classes) rescored by
    the frozen CLIP with GridCLIP's function, base/novel weights by the novel-class mask, in the
    input image's coordinates (before the resize back to height x width)."""
    plain = build(assets, teacher).eval()
    rescoring = build(assets, teacher, "MODEL.VILD.TEST_CLIP_ENSEMBLE", "True").eval()
    rescoring.load_state_dict(plain.state_dict())
    image = make_input(89, 75)["image"]
    with torch.no_grad():
        raw = plain.inference([{"image": image}], do_postprocess=False)[0]
        a = plain([{"image": image, "height": 178, "width": 150}])[0]["instances"]
        b = rescoring([{"image": image, "height": 178, "width": 150}])[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)  # both resized back x2
    assert torch.equal(a.pred_classes, b.pred_classes)
    novel = rescoring.roi_heads.box_predictor.novel_class_mask
    expected = clip_rescored_scores(
        raw.scores,
        raw.pred_boxes.tensor,  # the crops are taken in the input image
        raw.pred_classes,
        rescoring.teacher_image(image),
        teacher,
        rescoring.text_embeddings,
        ~novel,
        (0.35, 0.65),
        (1.0, 1.5),
    )
    torch.testing.assert_close(b.scores, expected)
    assert not torch.allclose(a.scores, b.scores)
    rescoring.test_clip_ensemble_weights = (0.0, 0.0)
    with torch.no_grad():
        same = rescoring([{"image": image, "height": 178, "width": 150}])[0]["instances"]
    torch.testing.assert_close(same.scores, a.scores)
    with pytest.raises(ValueError, match="MODEL.VILD.TEST_CLIP_ENSEMBLE_WEIGHTS"):
        build(assets, teacher, "MODEL.VILD.TEST_CLIP_ENSEMBLE_WEIGHTS", "[0.5, 2.0]")
    shared = build(assets, teacher, "MODEL.VILD.TEST_CLIP_ENSEMBLE_SHARE_IOU", "0.9")
    assert shared.test_clip_ensemble_share_iou == 0.9
    with pytest.raises(ValueError, match="MODEL.VILD.TEST_CLIP_ENSEMBLE_SHARE_IOU"):
        build(assets, teacher, "MODEL.VILD.TEST_CLIP_ENSEMBLE_SHARE_IOU", "0.0")


# --------------------------------------------------------------------------------- inference
def test_inference_outputs_and_inf_nan(model):
    model.eval()
    with torch.no_grad():
        out = model([{"image": make_input(97, 113)["image"], "height": 194, "width": 226}])
    inst = out[0]["instances"]
    assert inst.image_size == (194, 226)
    assert 0 < len(inst) <= 300
    assert inst.pred_classes.max() < K and inst.scores.min() >= 0
    for bad in (float("inf"), float("nan")):
        image = torch.full((3, 70, 90), bad)
        with torch.no_grad():
            det = model([{"image": image}])[0]["instances"]
        assert len(det) == 0 or not torch.isfinite(det.pred_boxes.tensor).any()
        # ROI heads alone, given proposals on non-finite features: no detections
        feats = {f"p{i}": torch.full((1, 32, 128 // 2**i, 128 // 2**i), bad) for i in range(2, 7)}
        props = Instances((128, 128))
        props.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 60, 60], [30, 30, 100, 90]]))
        props.objectness_logits = torch.zeros(2)
        with torch.no_grad():
            images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
            det, _ = model.roi_heads(images, feats, [props])
        assert len(det[0]) == 0


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("thresh", [0.0, 0.02])
def test_topk_inference_matches_detectron2(class_specific, thresh):
    g = torch.Generator().manual_seed(3)
    R, C = 200, 50
    xy = torch.rand(R, 2, generator=g) * 100
    wh = torch.rand(R, 2, generator=g) * 60 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    if class_specific:
        boxes = (boxes[:, None, :] + torch.rand(R, C, 4, generator=g) * 8).reshape(R, C * 4)
    scores = F.softmax(torch.randn(R, C + 1, generator=g) * 3, dim=1)  # continuous: no ties
    args = ([boxes], [scores], [(120, 110)], thresh, 0.5, 100)
    ref, ref_idx = fast_rcnn_inference(*args)
    out, out_idx = fast_rcnn_inference_topk(*args, pre_nms_topk=8)  # forces growth rounds
    assert torch.equal(out_idx[0], ref_idx[0])
    assert torch.equal(out[0].pred_classes, ref[0].pred_classes)
    assert torch.allclose(out[0].scores, ref[0].scores)
    assert torch.allclose(out[0].pred_boxes.tensor, ref[0].pred_boxes.tensor)


def test_topk_inference_box_voting_moves_boxes_only():
    """Box voting after the top-k NMS: same detections (scores, classes, proposals), each box
    the score-weighted mean of its class's candidates at IoU >= 0.6 (checked by hand)."""
    g = torch.Generator().manual_seed(4)
    R, C = 120, 6
    xy = torch.rand(R, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 30 + torch.rand(R, 2, generator=g) * 10], dim=1)
    scores = F.softmax(torch.randn(R, C + 1, generator=g) * 2, dim=1)
    args = ([boxes], [scores], [(120, 110)], 0.05, 0.5, 30)
    plain, plain_idx = fast_rcnn_inference_topk(*args)
    voted, voted_idx = fast_rcnn_inference_topk(*args, box_voting_iou=0.6)
    assert torch.equal(voted_idx[0], plain_idx[0]) and len(plain[0]) == 30
    assert torch.equal(voted[0].scores, plain[0].scores)
    assert torch.equal(voted[0].pred_classes, plain[0].pred_classes)
    p, v = plain[0].pred_boxes.tensor, voted[0].pred_boxes.tensor
    assert ((v - p).abs().amax(dim=1) > 1e-3).any()
    # by hand for the top detection: every candidate (box, class) above the threshold
    box0, cls0 = p[0], int(plain[0].pred_classes[0])
    cand = scores[:, cls0] > 0.05
    iou = pairwise_iou(Boxes(box0[None]), Boxes(boxes[cand].clamp(min=0)))[0]
    w = scores[cand, cls0] * (iou >= 0.6)
    expected = (w[:, None] * boxes[cand].clamp(min=0)).sum(0) / w.sum()
    torch.testing.assert_close(v[0], expected, rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------- vocabulary
def test_set_vocabulary_names_tensors_to_and_checkpoint_round_trip(assets, teacher):
    model = build(assets, teacher)
    model.eval()
    # class names go through CLIP's text encoder (here the tiny CLIP of the config); a name that
    # was a base class of the training vocabulary stays base, others are novel
    model.set_vocabulary(["Red_Square", "purple star", "green star"])
    predictor = model.roi_heads.box_predictor
    assert model.num_classes == 3
    assert model.class_names == ["Red_Square", "purple star", "green star"]
    assert predictor.novel_class_mask.tolist() == [False, True, True]  # green star was 'r'
    assert torch.allclose(model.text_embeddings.norm(dim=1), torch.ones(3))
    # a (K, D) tensor: any K, all novel unless told
    new = torch.randn(7, D)
    model.set_vocabulary(new)
    assert model.num_classes == 7 and model.roi_heads.num_classes == 7
    assert model.class_names is None
    assert torch.allclose(model.text_embeddings, F.normalize(new, dim=1))
    assert predictor.novel_class_mask.shape == (7,) and predictor.novel_class_mask.all()
    inputs = [{"image": make_input(83, 101)["image"]}]
    with torch.no_grad():
        before = model(inputs)[0]["instances"]
    assert len(before) > 0 and before.pred_classes.max() < 7
    assert "roi_heads.box_predictor.text_classifier.text_embeddings" in model.state_dict()
    # another model of the config's 4 classes takes the checkpoint's 7-class vocabulary
    other = build(assets)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert other.num_classes == 7 and other.class_names is None
    assert torch.equal(other.roi_heads.box_predictor.novel_class_mask, predictor.novel_class_mask)
    with torch.no_grad():
        after = other(inputs)[0]["instances"]
    assert torch.equal(after.pred_classes, before.pred_classes)
    assert torch.allclose(after.scores, before.scores)
    # the buffer follows module conversions like .to()
    other.double()
    assert other.text_embeddings.dtype == torch.float64
    with pytest.raises(ValueError, match="dimension"):
        model.set_vocabulary(torch.randn(3, D + 1))
    # training with every class novel would mask them all: refused with a clear message
    with pytest.raises(ValueError, match="novel"):
        train_losses(model, [make_input(64, 64, [[4, 4, 40, 40]], [0])])


def test_detection_checkpointer_round_trip(assets, teacher, tmp_path):
    model = build(assets, teacher)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    other = build(assets, None, "MODEL.VILD.ENSEMBLE", "False")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    DetectionCheckpointer(other).load(str(tmp_path / "ckpt.pth"))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    # Detectron2's checkpointer skips tensors of another shape: the config's vocabulary wins
    model.set_vocabulary(torch.randn(6, D))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt6")
    DetectionCheckpointer(other).load(str(tmp_path / "ckpt6.pth"))
    assert other.num_classes == K
    novel = other.roi_heads.box_predictor.novel_class_mask
    assert novel.tolist() == [f == "r" for f in FREQUENCIES]


# -------------------------------------------------------------------------------- validation
def test_class_count_mismatch_is_a_clear_error(assets):
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build(assets, None, "MODEL.ROI_HEADS.NUM_CLASSES", "5")


def test_class_specific_boxes_rejected(assets):
    with pytest.raises(ValueError, match="CLS_AGNOSTIC_BBOX_REG"):
        build(assets, None, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False")


def test_novel_mask_needs_frequencies(assets, tmp_path):
    name = "vild_test_nofreq"
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="IGNORE_NOVEL_IN_TRAINING"):
        build(assets, None, "DATASETS.TRAIN", f"('{name}',)")
    ok = build(
        assets,
        None,
        "DATASETS.TRAIN",
        f"('{name}',)",
        "MODEL.VILD.IGNORE_NOVEL_IN_TRAINING",
        "False",
    )
    assert not ok.roi_heads.box_predictor.novel_class_mask.any()


def test_no_distillation_needs_no_teacher(assets, caplog):
    model = build(assets, None, "MODEL.VILD.IMAGE_DISTILL_WEIGHT", "0.0")
    model.teacher_holder.builder = None  # any teacher use would raise
    losses = train_losses(model, [make_input(64, 80, [[4, 4, 40, 40]], [0])])
    assert "loss_vild_image" not in losses and not model.teacher_holder.is_built
    # an ensemble model loading a checkpoint trained without the image branch says so
    ensemble = build(assets, None, "MODEL.VILD.ENSEMBLE", "True")
    with caplog.at_level("WARNING"):
        ensemble.load_state_dict(model.state_dict(), strict=False)
    assert "image-branch projection" in caplog.text


def test_cache_mode_without_mapper_or_directory(assets, teacher):
    with pytest.raises(ValueError, match="TEACHER_CACHE"):
        build(assets, None, "MODEL.VILD.TEACHER", "cache")
    model = build(assets, None, "MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", "/x")
    with pytest.raises(KeyError, match="ViLDDatasetMapper"):
        train_losses(model, [make_input(64, 64, [[4, 4, 40, 40]], [0])])


# ------------------------------------------------------------------- teacher cache and tool
def load_tool():
    return cache_vild_teacher


def test_sliding_window_proposals_deterministic_and_in_bounds():
    a = sliding_window_proposals(80, 96, 50)
    b = sliding_window_proposals(80, 96, 50)
    assert torch.equal(a, b) and a.shape == (50, 4)
    assert (a[:, 0] >= 0).all() and (a[:, 2] <= 96).all() and (a[:, 3] <= 80).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    assert areas.max() / areas.min() > 20  # several scales in the first N


def test_cache_tool_round_trip_resume_corruption_and_training(
    assets, teacher, tiny_lvis_json, tmp_path, monkeypatch
):
    json_file, root = tiny_lvis_json
    name = f"vild_test_lvis_{abs(hash(json_file))}"
    register_lvis_format_dataset(name, json_file, root, base_only=True)
    out = str(tmp_path / "cache")
    tool = load_tool()
    # fmt: off
    common = [
        "--dataset", name, "--output", out, "--num-proposals", "12", "--no-progress",
        "MODEL.CLIP.WEIGHTS", assets["weights"], "MODEL.CLIP.EMBED_DIM", str(D),
        "MODEL.CLIP.TEACHER_INPUT_SIZE", "64", "MODEL.DEVICE", "cpu",
    ]
    # fmt: on
    counts = tool.main(common)
    assert counts == {"total": 2, "computed": 2, "skipped": 0, "recomputed": 0}
    dicts = DatasetCatalog.get(name)
    entry = read_cache_entry(cache_entry_path(out, dicts[0]["image_id"]), embed_dim=D)
    assert entry["boxes"].shape == (12, 4) and entry["embeddings"].shape == (12, D)
    assert (entry["boxes"][:, 2] <= 96).all() and (entry["boxes"][:, 3] <= 80).all()
    from detectron2.data.detection_utils import read_image

    image = torch.as_tensor(read_image(dicts[0]["file_name"], "RGB").transpose(2, 0, 1).copy())
    again = teacher.embed_boxes(image.float(), entry["boxes"], scales=(1.0, 1.5))
    assert torch.allclose(entry["embeddings"].float(), again, atol=2e-3)

    # a second run does no work (not even loading CLIP)
    def no_clip(cfg):
        raise AssertionError("the teacher must not be built when every entry is done")

    monkeypatch.setattr(tool, "build_clip_teacher_from_cfg", no_clip)
    assert tool.main(common)["skipped"] == 2
    monkeypatch.undo()

    # a corrupt (truncated) entry: a clear error on load, recomputed by the tool
    path = cache_entry_path(out, dicts[1]["image_id"])
    with open(path, "r+b") as f:
        f.truncate(100)
    cache = TeacherCache(out, embed_dim=D)
    with pytest.raises(TeacherCacheError, match="rerun"):
        cache.get(dicts[1]["image_id"])
    with pytest.raises(TeacherCacheError, match="EMBED_DIM"):
        TeacherCache(out, embed_dim=D + 1)
    counts = load_tool().main(common)
    assert counts == {"total": 2, "computed": 0, "skipped": 1, "recomputed": 1}
    cache.get(dicts[1]["image_id"], (80, 96))

    # other settings are refused instead of mixing two caches
    with pytest.raises(SystemExit, match="crop_scales"):
        load_tool().main(common + ["MODEL.VILD.CROP_SCALES", "[1.0]"])

    # the mapper carries the cached boxes through the augmentation (here: a sure flip)
    mapper = ViLDDatasetMapper(
        True,
        augmentations=[T.RandomFlip(prob=1.0)],
        image_format="RGB",
        teacher_cache=cache,
        num_distill_proposals=8,
    )
    mapped = mapper(dicts[0])
    distill = mapped["distill_proposals"]
    original = entry["boxes"][:8]
    x1, y1, x2, y2 = original.unbind(1)
    flipped = torch.stack([96 - x2, y1, 96 - x1, y2], dim=1)
    assert torch.allclose(distill.proposal_boxes.tensor, flipped, atol=1e-4)
    assert torch.allclose(distill.teacher_embeddings, entry["embeddings"][:8].float())

    # training in cache mode with the config-built mapper: no teacher involved
    # fmt: off
    cfg = make_cfg(
        assets,
        "MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", out,
        "DATASETS.TRAIN", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
        "MODEL.CLIP.TEXT_EMBEDDINGS", "", "INPUT.MIN_SIZE_TRAIN", "(72,)",
    )
    # fmt: on
    mapper = ViLDDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in dicts]
    assert batch[0]["image"].shape[1] == 72
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ViLD)
    model.set_clip_teacher(None)
    model.teacher_holder.builder = None  # any teacher use would raise
    losses = train_losses(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_vild_image"] > 0


def test_cache_tool_with_rpn_proposals_of_a_checkpoint(assets, model, tiny_lvis_json, tmp_path):
    json_file, root = tiny_lvis_json
    name = f"vild_test_lvis_rpn_{abs(hash(json_file))}"
    register_lvis_format_dataset(name, json_file, root)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("rpn")
    out = str(tmp_path / "cache_rpn")
    args = ["--config-file", "Base-ViLD.yaml", "--dataset", name, "--output", out]
    args += ["--weights", str(tmp_path / "rpn.pth"), "--num-proposals", "10", "--no-progress"]
    counts = load_tool().main(args + tiny_opts(assets))
    assert counts["computed"] == 2
    cache = TeacherCache(out, embed_dim=D)
    assert cache.meta["proposals"].startswith("rpn:")
    boxes = cache.get(1, (80, 96))["boxes"]
    assert 0 < len(boxes) <= 10
    assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 80).all() and (boxes >= 0).all()
    assert not torch.equal(boxes, sliding_window_proposals(80, 96, 10)[: len(boxes)])
