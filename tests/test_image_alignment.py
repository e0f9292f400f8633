"""Image-level alignment variants (MODEL.GRIDCLIP.IMAGE_ALIGN_POOL): matched-level pooling,
multiple-instance (soft-max) pooling and the dense MaskCLIP-style teacher. Tiny models, CPU."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from test_gridclip import D, assets, make_cfg, make_inputs, make_tiny_clip, train_losses  # noqa

from gridclip.clip import CLIPImageTeacher, modified_resnet_features
from gridclip.clip.dense import attnpool_dense
from gridclip.modeling.image_alignment import (
    ImageAlignment,
    TeacherEmbeddingCache,
    attention_pool_grid_embeddings,
    level_anchor_sizes,
    matched_levels,
    pool_grid_embeddings,
    pool_matched_grid_embeddings,
    sample_dense_targets,
)


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_matched_levels_follow_anchor_sizes():
    sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
    # 256 px image: whole image -> 256 px anchors (P7), 2x2 tiles -> 128, 4x4 -> 64, 8x8 -> 32
    assert matched_levels([(256, 256)], [1, 2, 4, 8], sizes) == [[4, 3, 2, 1]]
    # non-square: the tile's geometric-mean side decides
    assert matched_levels([(128, 512)], [1], sizes) == [[4]]
    assert matched_levels([(64, 64)], [1, 4], sizes) == [[2, 0]]


def test_matched_pooling_uses_only_the_matched_level():
    torch.manual_seed(0)
    x = [torch.randn(1, 8, 32 // 2**i, 32 // 2**i) for i in range(5)]
    strides = [8, 16, 32, 64, 128]
    sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
    whole, tiles = pool_matched_grid_embeddings(x, strides, [(256, 256)], [1, 2], 8, sizes)
    # whole image on P7 (anchors 256), 2x2 tiles on P6 (anchors 128): those levels alone
    torch.testing.assert_close(whole, pool_grid_embeddings([x[4]], [128], [(256, 256)], [1], 8)[0])
    torch.testing.assert_close(tiles, pool_grid_embeddings([x[3]], [64], [(256, 256)], [2], 8)[0])
    # a change on another level does not move them
    y = [t.clone() for t in x]
    y[0] += 10.0
    again = pool_matched_grid_embeddings(y, strides, [(256, 256)], [1, 2], 8, sizes)
    torch.testing.assert_close(again[1], tiles)


def test_level_anchor_sizes_from_config(assets):  # noqa: F811
    cfg = make_cfg(assets)
    assert level_anchor_sizes(cfg) == [32.0, 64.0, 128.0, 256.0, 512.0]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[24, 48]]  # one list: repeated for every level
    assert level_anchor_sizes(cfg) == [24.0] * 5


def test_attention_pooling_is_a_soft_maximum_per_tile():
    torch.manual_seed(0)
    x = [torch.randn(1, 8, 4, 4, requires_grad=True), torch.randn(1, 8, 2, 2, requires_grad=True)]
    teacher = [unit(1, 1, 8), unit(1, 4, 8)]
    sims, pooled = attention_pool_grid_embeddings(
        x, [8, 16], [(32, 32)], [1, 2], 8, teacher, temperature=1e-4
    )
    p3 = F.normalize(x[0][0].detach(), dim=0)  # (8, 4, 4)
    p4 = F.normalize(x[1][0].detach(), dim=0)  # (8, 2, 2)
    # whole image: the best cosine over all 16 + 4 locations
    everything = torch.cat([p3.flatten(1), p4.flatten(1)], dim=1)
    assert sims[0][0, 0].item() == pytest.approx((teacher[0][0, 0] @ everything).max().item())
    # top-left tile (rows/cols 0-15 px): P3 cells [0:2, 0:2] and P4 cell (0, 0) only
    inside = torch.cat([p3[:, :2, :2].flatten(1), p4[:, :1, :1].flatten(1)], dim=1)
    assert sims[1][0, 0].item() == pytest.approx((teacher[1][0, 0] @ inside).max().item())
    best = (teacher[1][0, 0] @ inside).argmax()
    torch.testing.assert_close(pooled[1][0, 0], inside[:, best], atol=1e-5, rtol=0)
    # a high temperature tends to the plain average of the cosines
    soft, _ = attention_pool_grid_embeddings(x, [8, 16], [(32, 32)], [1], 8, teacher[:1], 1e4)
    expected = (teacher[0][0, 0] @ everything).mean().item()
    assert soft[0][0, 0].item() == pytest.approx(expected, abs=1e-3)
    (1 - sims[1]).sum().backward()
    assert x[0].grad.abs().sum() > 0 and x[1].grad.abs().sum() > 0


def test_dense_targets_sample_the_teacher_map_at_location_centres():
    teacher = F.normalize(torch.randn(6, 4, 4), dim=0)  # covers a 64 x 64 image, 16 px cells
    # stride 16: the location centres are the teacher's cell centres: exact values
    (same,) = sample_dense_targets(teacher, [16], [(4, 4)], 64, 64)
    torch.testing.assert_close(same, teacher)
    # stride 32: each centre is the corner of 4 teacher cells: their normalised mean
    (coarse,) = sample_dense_targets(teacher, [32], [(2, 2)], 64, 64)
    expected = F.normalize(F.avg_pool2d(teacher[None], 2)[0], dim=0)
    torch.testing.assert_close(coarse, expected)


def test_teacher_dense_embeddings_are_the_attention_pool_value_path():
    clip = make_tiny_clip()
    teacher = CLIPImageTeacher(clip, input_size=64)
    images = torch.rand(2, 3, 64, 96) * 255
    dense = teacher.embed_dense(images)
    assert dense.shape == (2, D, 2, 3)
    normalised = (images - teacher.pixel_mean) / teacher.pixel_std
    res5 = modified_resnet_features(teacher.visual, normalised)["res5"]
    expected = F.normalize(attnpool_dense(teacher.visual.attnpool, res5), dim=1)
    torch.testing.assert_close(dense, expected)
    assert teacher.embed_dense(images, scale=2.0).shape == (2, D, 4, 6)


@pytest.mark.parametrize("pool", ["matched", "max", "dense"])
def test_every_pool_trains_end_to_end(assets, pool):  # noqa: F811
    torch.manual_seed(0)
    cfg = make_cfg(
        assets,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS", "cosine",
        "MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS", "[1, 2]",
        "MODEL.GRIDCLIP.IMAGE_ALIGN_POOL", pool,
        "MODEL.CLIP.TEACHER_INPUT_SIZE", 64,
    )  # fmt: skip
    model = build_model(cfg)
    losses, _ = train_losses(model, make_inputs())
    loss = losses["loss_image_align"]
    assert torch.isfinite(loss) and 0 < loss.item() < 2
    loss.backward()
    assert model.head.grid_embed.weight.grad.abs().sum() > 0
    assert pool in repr(model.image_alignment)


def test_dense_alignment_is_zero_when_the_student_copies_the_teacher():
    clip = make_tiny_clip()
    teacher = CLIPImageTeacher(clip, input_size=64)
    align = ImageAlignment(embed_dim=D, teacher=teacher, loss_type="l1", pool="dense")
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    dense = teacher.embed_dense(image[None].float())[0]  # (D, 2, 2): stride 32 cells
    # one level at the teacher's stride: sampling at cell centres returns the map itself
    student = [3.0 * dense[None]]  # any positive scale: the loss normalises
    out = align(student, [32], [(64, 64)], [{"image": image}])
    assert out["loss_image_align"].item() == pytest.approx(0.0, abs=1e-5)
    other = align([torch.randn_like(student[0])], [32], [(64, 64)], [{"image": image}])
    assert other["loss_image_align"].item() > 1.0


def test_bad_alignment_settings_name_the_key():
    teacher = torch.nn.Identity()
    with pytest.raises(ValueError, match="IMAGE_ALIGN_POOL"):
        ImageAlignment(embed_dim=D, teacher=teacher, pool="median")
    with pytest.raises(ValueError, match="IMAGE_ALIGN_TEMPERATURE"):
        ImageAlignment(embed_dim=D, teacher=teacher, pool="max", temperature=0.0)
    with pytest.raises(ValueError, match="IMAGE_ALIGN_DENSE_SCALE"):
        ImageAlignment(embed_dim=D, teacher=teacher, pool="dense", dense_scale=-1.0)
    with pytest.raises(ValueError, match="anchor size"):
        ImageAlignment(embed_dim=D, teacher=teacher, pool="matched")
    cache = TeacherEmbeddingCache(D, [1])
    with pytest.raises(ValueError, match="TEACHER_CACHE"):
        ImageAlignment(embed_dim=D, teacher_cache=cache, pool="dense")


def test_vit_teacher_has_no_dense_embeddings():
    teacher = CLIPImageTeacher(make_tiny_clip(), input_size=64)
    teacher.is_resnet = False  # as for a ViT visual tower: no attention-pool value path
    with pytest.raises(ValueError, match="ModifiedResNet"):
        teacher.embed_dense(torch.rand(1, 3, 64, 64) * 255)
