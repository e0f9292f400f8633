"""MODEL.GRIDCLIP.DENSE_CLIP: CLIP's attention-pool value path added to the grid embeddings."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from test_gridclip import D, K, make_cfg, make_inputs, make_tiny_clip, train_losses  # noqa: F401

from gridclip.clip import CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255, load_clip_from_cfg
from gridclip.clip.dense import attnpool_dense
from gridclip.modeling.clip_backbone import DenseCLIPProjection


def dense_cfg(assets, *opts):  # noqa: F811
    return make_cfg(assets, "MODEL.GRIDCLIP.DENSE_CLIP", True, *opts)


def test_grid_embeddings_start_as_clip_dense_embeddings(assets):  # noqa: F811
    torch.manual_seed(0)
    cfg = dense_cfg(assets, "MODEL.GRIDCLIP.DENSE_CLIP_WEIGHT", 2.0)
    model = build_model(cfg).eval()
    # silence the learned branch: what is left is the CLIP term alone
    torch.nn.init.zeros_(model.head.grid_embed.weight)
    torch.nn.init.zeros_(model.head.grid_embed.bias)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    images = model.preprocess_image([{"image": image}])
    features = model.backbone(images.tensor)  # the FPN levels and the trunk's res5
    res5 = features["res5"]
    assert res5.shape[-2:] == (3, 4)  # 96 x 128 at stride 32
    assert model.backbone.output_shape()["res5"].stride == 32
    grid = model.predict([features[f] for f in model.head_in_features], res5)[0]

    visual = load_clip_from_cfg(cfg).visual  # the CLIP the backbone started from
    normalised = (image[None].float() - torch.tensor(CLIP_PIXEL_MEAN_255).view(1, 3, 1, 1)) / (
        torch.tensor(CLIP_PIXEL_STD_255).view(1, 3, 1, 1)
    )
    expected_res5 = model.backbone.bottom_up(normalised)["res5"]
    torch.testing.assert_close(res5, expected_res5, atol=1e-4, rtol=1e-4)
    expected = F.normalize(attnpool_dense(visual.attnpool, expected_res5), dim=1)
    p5 = model.head_in_features.index("p5")
    torch.testing.assert_close(grid[p5], 2.0 * expected, atol=1e-4, rtol=1e-4)
    for level in grid:  # every level: unit CLIP embeddings times the scale
        torch.testing.assert_close(level.norm(dim=1), torch.full_like(level[:, 0], 2.0))


def test_projection_is_frozen_and_saved_scale_is_learned(assets):  # noqa: F811
    model = build_model(dense_cfg(assets))
    assert isinstance(model.dense_clip, DenseCLIPProjection)
    assert not any(p.requires_grad for p in model.dense_clip.parameters())
    state = model.state_dict()
    assert "dense_clip.v_proj.weight" in state and "dense_clip_scale" in state
    losses, _ = train_losses(model, make_inputs())
    sum(losses.values()).backward()
    assert model.dense_clip_scale.grad is not None and model.dense_clip_scale.grad != 0
    assert all(p.grad is None for p in model.dense_clip.parameters())


def test_dense_clip_needs_the_clip_trunk(assets):  # noqa: F811
    cfg = dense_cfg(
        assets,
        "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
        "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
        "MODEL.BACKBONE.FREEZE_AT", 0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="DENSE_CLIP"):
        build_model(cfg)
