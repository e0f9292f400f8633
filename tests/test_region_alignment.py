"""Region-level alignment on the dense head's own unlabelled boxes: box selection and loss on
hand-built cases with known answers, and the training path of a tiny GridCLIP."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from test_gridclip import D, K, make_cfg, make_inputs, make_tiny_clip

from gridclip.modeling.region_alignment import region_alignment_loss, select_unlabelled_boxes


def test_selection_drops_ground_truth_overlaps_duplicates_and_tiny_boxes():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # 0: the ground-truth object (IoU 1)
            [20.0, 20.0, 40.0, 40.0],  # 1: an unlabelled object
            [21.0, 21.0, 41.0, 41.0],  # 2: its near-duplicate (NMS removes it)
            [50.0, 50.0, 52.0, 70.0],  # 3: 2 px wide
            [60.0, 0.0, 80.0, 20.0],  # 4: another unlabelled object
            [1.0, 0.0, 11.0, 10.0],  # 5: on the ground truth (IoU 0.82)
        ]
    )
    objectness = torch.tensor([9.0, 5.0, 6.0, 8.0, 1.0, 7.0])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    picked = select_unlabelled_boxes(objectness, boxes, gt, 5, max_gt_iou=0.5, min_size=4.0)
    assert picked.tolist() == [2, 4]  # by objectness; 2 outranks its duplicate 1
    assert select_unlabelled_boxes(objectness, boxes, gt, 1, 0.5, 4.0).tolist() == [2]
    # every box kept but the tiny one and the duplicates when ground truth is not excluded
    every = select_unlabelled_boxes(objectness, boxes, gt, 10, max_gt_iou=1.0, min_size=4.0)
    assert every.tolist() == [0, 2, 4]
    none = select_unlabelled_boxes(objectness, boxes, torch.zeros(0, 4), 0, 0.5, 4.0)
    assert none.numel() == 0


def test_loss_is_one_minus_cosine_averaged_over_every_box():
    s = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.zeros(0, 2), torch.tensor([[1.0, 1.0]])]
    t = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.zeros(0, 2), torch.tensor([[-1.0, -1.0]])]
    # cosines 1, 0 and -1: losses 0, 1 and 2
    assert region_alignment_loss(s, t).item() == pytest.approx(1.0)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = region_alignment_loss([empty], [torch.zeros(0, 2)])
    assert loss.item() == 0.0 and loss.requires_grad  # no box: zero, still backpropagates
    with pytest.raises(AssertionError, match="differ"):
        region_alignment_loss([torch.zeros(2, 2)], [torch.zeros(3, 2)])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("region_assets")
    clip_path = str(root / "tiny_clip.pt")
    torch.save(make_tiny_clip().state_dict(), clip_path)
    text_path = str(root / "text.npy")
    np.save(text_path, np.random.RandomState(0).randn(K, D).astype("float32"))
    return {"clip": clip_path, "text": text_path, "root": root}


def test_training_adds_the_weighted_loss_and_it_reaches_the_head(assets):
    torch.manual_seed(0)
    weight = 0.7
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.REGION_ALIGN_WEIGHT", weight)).train()
    model.region_align_boxes = 3
    inputs = make_inputs(with_boxes=(True, True))
    with EventStorage():
        losses = model(inputs)
    assert "loss_region_align" in losses and torch.isfinite(losses["loss_region_align"])
    # unweighted, it is 1 - cos in [0, 2]; the reported loss carries the weight
    assert 0.0 < losses["loss_region_align"].item() / weight <= 2.0
    model.zero_grad()
    losses["loss_region_align"].backward()
    assert model.head.grid_embed.weight.grad.abs().sum() > 0
    # no loss key at weight 0 (the default), and the teacher is not built for it
    plain = build_model(make_cfg(assets)).train()
    with EventStorage():
        assert "loss_region_align" not in plain(make_inputs(with_boxes=(True, True)))
    assert not plain.clip_ensemble


def test_bad_region_alignment_settings_name_the_key(assets):
    with pytest.raises(ValueError, match="REGION_ALIGN_WEIGHT"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.REGION_ALIGN_WEIGHT", -1.0))
    with pytest.raises(ValueError, match="REGION_ALIGN_MAX_GT_IOU"):
        build_model(
            make_cfg(
                assets,
                "MODEL.GRIDCLIP.REGION_ALIGN_WEIGHT",
                1.0,
                "MODEL.GRIDCLIP.REGION_ALIGN_MAX_GT_IOU",
                0.0,
            )
        )
