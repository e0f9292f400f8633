"""The trunk's inference forward with BN folded into the convolutions (gridclip/clip/fused.py):
the same features as CLIP's own modules, for the detector's trunk and for the teacher."""

import copy

import pytest
import torch
from clip.model import ModifiedResNet
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from gridclip.clip import modified_resnet_features
from gridclip.clip.fused import can_fold, folded_conv_bn, fusable_blocks, use_fused_forward
from gridclip.modeling.clip_backbone import CLIPResNet


def _visual(seed: int = 0) -> ModifiedResNet:
    """A small ModifiedResNet with BN statistics and affines far from the identity."""
    torch.manual_seed(seed)
    visual = ModifiedResNet((1, 2, 1, 1), 64, 4, 64, 16).eval()
    for m in visual.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
    return visual


def _module_trunk(trunk: CLIPResNet, x: torch.Tensor):
    """The trunk through its modules' own forward (what training runs)."""
    x = trunk.stem(x)
    out = {}
    for name in trunk.stage_names:
        x = getattr(trunk, name)(x)
        out[name] = x
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_fused_trunk_equals_its_modules(frozen_bn):
    trunk = CLIPResNet(
        _visual(), ("res3", "res4", "res5"), freeze_at=2, frozen_bn_in_trainable_stages=frozen_bn
    ).eval()
    # with trainable BatchNorm2d in the later stages, eval mode folds their running statistics
    assert any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()) == (not frozen_bn)
    assert use_fused_forward(trunk, [trunk.stem[1]], [trunk.res2, trunk.res3])
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        fused, reference = trunk(x), _module_trunk(trunk, x)
    assert set(fused) == {"res3", "res4", "res5"}
    for name, value in fused.items():
        assert value.shape == reference[name].shape
        assert _relative(value, reference[name]) < 1e-5, name
        # channels-last on a CPU, so that the FPN's convolutions run in it too
        assert value.is_contiguous(memory_format=torch.channels_last)


def test_training_mode_runs_the_modules():
    """Trainable BN in training normalises with the batch's statistics: no folding there."""
    trunk = CLIPResNet(_visual(), ("res5",), frozen_bn_in_trainable_stages=False).train()
    assert not use_fused_forward(trunk, [trunk.stem[1]], [trunk.res2])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(trunk(x)["res5"], _module_trunk(trunk, x)["res5"])
        fused = trunk.eval()(x)["res5"]
    assert _relative(fused, trunk.train()(x)["res5"].detach()) > 1e-3  # batch stats differ


def test_folding_follows_changed_weights():
    """The weights are folded at every call: a loaded checkpoint (new BN statistics, new conv
    weights) changes the output at once; nothing stale is cached."""
    trunk = CLIPResNet(_visual(0), ("res5",)).eval()
    other = CLIPResNet(_visual(1), ("res5",)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = trunk(x)["res5"]
        trunk.load_state_dict(other.state_dict())
        after, expected = trunk(x)["res5"], _module_trunk(other, x)["res5"]
    assert _relative(after, expected) < 1e-5
    assert _relative(before, expected) > 1e-2


def test_teacher_features_fused_equal_the_modules():
    visual = _visual()
    crops = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        fused = modified_resnet_features(visual, crops)
        x = visual.relu1(visual.bn1(visual.conv1(crops)))
        x = visual.relu2(visual.bn2(visual.conv2(x)))
        x = visual.avgpool(visual.relu3(visual.bn3(visual.conv3(x))))
        reference = {}
        for i, name in enumerate(("res2", "res3", "res4", "res5"), start=1):
            x = getattr(visual, f"layer{i}")(x)
            reference[name] = x
    for name in reference:
        assert _relative(fused[name], reference[name]) < 1e-5, name
        assert fused[name].is_contiguous()  # the teacher's outputs keep the default layout


def test_folded_conv_bn_with_bias_and_without_affine():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    for bn in (nn.BatchNorm2d(4, affine=False), FrozenBatchNorm2d(4)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.eval()
        assert can_fold(bn)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert _relative(folded_conv_bn(x, conv, bn), bn(conv(x))) < 1e-5


def test_other_layouts_are_not_fused():
    """Blocks that are not CLIP's Bottleneck, BN without running statistics, and BN in
    training keep their own forward."""
    visual = _visual()
    assert fusable_blocks([visual.layer1, visual.layer2])
    odd = copy.deepcopy(visual.layer1)
    odd[0].bn2 = nn.GroupNorm(1, odd[0].bn2.num_features)
    assert not fusable_blocks([odd])
    assert not can_fold(nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert not can_fold(nn.BatchNorm2d(4).train())
    assert can_fold(nn.BatchNorm2d(4).eval())
