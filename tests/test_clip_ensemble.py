"""The score-level CLIP ensemble at inference (F-VLM's rule): known answers and the full path."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from test_gridclip import D, K, _random_head, make_cfg, make_tiny_clip

from gridclip.modeling.clip_rescoring import clip_rescored_scores, shared_crop_groups
from gridclip.modeling.gridclip import GridCLIP


class _FixedTeacher:
    """embed_boxes returns the given rows; records what it was shown."""

    logit_scale = 10.0

    def __init__(self, rows):
        self.rows = torch.as_tensor(rows, dtype=torch.float32)
        self.seen = None

    def on(self, device):
        return self

    def embed_boxes(self, image, boxes, scales):
        self.seen = (image.clone(), boxes.clone(), scales)
        return self.rows


def test_ensemble_is_the_weighted_geometric_mean_with_base_and_novel_weights():
    teacher = _FixedTeacher([[1.0, 0.0], [0.0, 1.0]])  # box 0 looks like class 0, box 1 class 1
    fake = SimpleNamespace(
        clip_ensemble=teacher,
        device=torch.device("cpu"),
        input_format="BGR",
        text_embeddings=torch.eye(2),
        trained_class_mask=torch.tensor([True, False]),  # class 0 base, class 1 novel
        clip_ensemble_weights=(0.35, 0.65),
        clip_ensemble_crop_scales=(1.0, 1.5),
        clip_ensemble_share_iou=1.0,
    )
    det = Instances((8, 8))
    det.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 8.0, 8.0]]))
    det.scores = torch.tensor([0.5, 0.2])
    det.pred_classes = torch.tensor([0, 1])
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    out = GridCLIP.clip_ensemble_scores(fake, det, image)
    p_match = math.exp(10.0) / (math.exp(10.0) + 1.0)  # softmax(10 * [1, 0]) at its class
    expected = [0.5**0.65 * p_match**0.35, 0.2**0.35 * p_match**0.65]
    assert out.tolist() == pytest.approx(expected, rel=1e-5)
    shown, boxes, scales = teacher.seen
    assert torch.equal(shown, image.flip(0))  # BGR model input -> RGB for CLIP
    assert scales == (1.0, 1.5) and torch.equal(boxes, det.pred_boxes.tensor)
    # a wrong class gets a tiny CLIP probability: its score drops, never rises above p_det
    det.pred_classes = torch.tensor([1, 0])
    out = GridCLIP.clip_ensemble_scores(fake, det, image)
    assert (out < det.scores).all()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_assets")
    clip_path = str(root / "tiny_clip.pt")
    torch.save(make_tiny_clip().state_dict(), clip_path)
    text_path = str(root / "text5.npy")
    np.save(text_path, np.random.RandomState(0).randn(K, D).astype("float32"))
    return {"clip": clip_path, "text": text_path, "root": root}


def _detect(model, image):
    with torch.no_grad():
        return model([{"image": image, "height": 64, "width": 80}])[0]["instances"]


def test_ensemble_rescores_the_same_detections_and_zero_weights_change_nothing(assets):
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 64, 80)).float()
    plain = build_model(make_cfg(assets)).eval()
    _random_head(plain)
    plain.test_score_thresh, plain.max_detections_per_image = 0.0, 20
    ens = build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE", True)).eval()
    ens.load_state_dict(plain.state_dict())
    ens.test_score_thresh, ens.max_detections_per_image = 0.0, 20
    a, b = _detect(plain, image), _detect(ens, image)
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert not torch.allclose(a.scores, b.scores)
    assert ((b.scores > 0) & (b.scores <= 1)).all()
    ens.clip_ensemble_weights = (0.0, 0.0)
    assert torch.allclose(_detect(ens, image).scores, a.scores)
    assert "clip_ensemble" not in " ".join(ens.state_dict())  # the teacher is not saved


def test_ensemble_weights_are_checked(assets):
    with pytest.raises(ValueError, match="TEST_CLIP_ENSEMBLE_WEIGHTS"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_WEIGHTS", [0.5, 1.5]))


def test_pseudo_box_ranking_has_its_own_weight_and_crops_not_the_inference_ones():
    """The pseudo-box search of pair training ranks a phrase's candidates with
    PAIRS_PSEUDO_CLIP_WEIGHT for every phrase, through crops at PAIRS_PSEUDO_CLIP_CROP_SCALES:
    tuning the inference settings (TEST_CLIP_ENSEMBLE_WEIGHTS / _CROP_SCALES) must not change
    what pairs train on."""
    teacher = _FixedTeacher([[1.0, 0.0], [0.0, 1.0]])  # box 0 looks like phrase 0, box 1 phrase 1
    fake = SimpleNamespace(
        clip_ensemble=teacher,
        device=torch.device("cpu"),
        input_format="RGB",
        clip_ensemble_weights=(0.0, 0.0),  # inference weights: would leave p_det unchanged
        clip_ensemble_crop_scales=(1.0,),
        pairs_pseudo_clip_weight=0.65,
        pairs_pseudo_clip_crop_scales=(1.0, 1.5),
    )
    image = torch.zeros(3, 8, 8)
    rescore = GridCLIP._pseudo_box_rescorer(fake, image, torch.eye(2), torch.tensor([0, 1]))
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 8.0, 8.0]])
    probs = torch.tensor([0.5, 0.2])
    p_match = math.exp(10.0) / (math.exp(10.0) + 1.0)
    out = rescore(boxes, torch.tensor([1, 1]), probs)  # both boxes as phrase 1
    expected = [0.5**0.35 * (1 - p_match) ** 0.65, 0.2**0.35 * p_match**0.65]
    assert out.tolist() == pytest.approx(expected, rel=1e-5)
    assert out[1] > out[0]  # CLIP's view outranks the detector's higher probability
    assert tuple(teacher.seen[2]) == (1.0, 1.5)  # the search's crops, not inference's (1.0,)


def test_pseudo_box_weight_is_checked_and_test_ensemble_off_keeps_scores(assets):
    with pytest.raises(ValueError, match="PAIRS_PSEUDO_CLIP_WEIGHT"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT", 1.5))
    with pytest.raises(ValueError, match="PAIRS_PSEUDO_CLIP_CROP_SCALES"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_CROP_SCALES", [1.0, 0.0]))
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 64, 80)).float()
    plain = build_model(make_cfg(assets)).eval()
    _random_head(plain)
    plain.test_score_thresh, plain.max_detections_per_image = 0.0, 20
    held = build_model(make_cfg(assets)).eval()  # a teacher kept for the pseudo-box search only
    held.load_state_dict(plain.state_dict())
    held.test_score_thresh, held.max_detections_per_image = 0.0, 20
    held.clip_ensemble, held.test_clip_ensemble = _FixedTeacher([[1.0] + [0.0] * (D - 1)]), False
    assert torch.equal(_detect(held, image).scores, _detect(plain, image).scores)


def test_near_duplicate_boxes_share_their_crops():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # a
            [20.0, 20.0, 30.0, 30.0],  # b, apart
            [0.0, 0.0, 10.0, 10.2],  # a under another class name: IoU 0.98 with a
            [0.0, 0.0, 10.0, 11.0],  # IoU 0.91 with a
            [5.0, 5.0, 5.0, 9.0],  # degenerate (no area): overlaps nothing
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    cropped, owner = shared_crop_groups(boxes, scores, 0.95)
    assert cropped.tolist() == [0, 1, 3, 4]
    assert owner.tolist() == [0, 1, 0, 2, 3]  # box 2 uses a's crop, the others their own
    cropped, owner = shared_crop_groups(boxes, scores, 0.9)
    assert cropped.tolist() == [0, 1, 4] and owner.tolist() == [0, 1, 0, 0, 2]
    # the lower-scored box of a pair uses the higher one's crop, whatever the order given
    cropped, owner = shared_crop_groups(boxes[[2, 0]], scores[[2, 0]], 0.95)
    assert cropped.tolist() == [1] and owner.tolist() == [0, 0]
    cropped, owner = shared_crop_groups(boxes, scores, 1.0)  # 1: no sharing
    assert cropped.tolist() == owner.tolist() == [0, 1, 2, 3, 4]


def test_shared_crops_give_each_detection_clip_s_probability_of_its_own_class():
    # two detections of one object under two class names, one of another object
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.05], [4.0, 4.0, 8.0, 8.0]])
    scores, classes = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0, 1, 1])
    image = torch.zeros(3, 8, 8)
    args = (torch.eye(2), torch.tensor([True, True]), (0.5, 0.5), (1.0,))
    teacher = _FixedTeacher([[1.0, 0.0], [0.0, 1.0]])  # crop 0 looks like class 0, crop 1 class 1
    shared = clip_rescored_scores(scores, boxes, classes, image, teacher, *args, share_iou=0.9)
    assert torch.equal(teacher.seen[1], boxes[[0, 2]])  # two crops for three detections
    teacher = _FixedTeacher([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # what each box's crop shows
    alone = clip_rescored_scores(scores, boxes, classes, image, teacher, *args)
    assert torch.equal(teacher.seen[1], boxes)
    torch.testing.assert_close(shared, alone)
    assert shared[1] < scores[1] < shared[2]  # class 1 on the class-0 crop: CLIP disagrees


def test_crop_sharing_iou_reaches_the_model_and_is_checked(assets):
    key = "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_SHARE_IOU"
    assert build_model(make_cfg(assets, key, 0.9)).clip_ensemble_share_iou == 0.9
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="TEST_CLIP_ENSEMBLE_SHARE_IOU"):
            build_model(make_cfg(assets, key, bad))
