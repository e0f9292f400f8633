"""Image-level alignment in class space (``IMAGE_ALIGN_LOSS class_kl``): known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from gridclip.modeling.image_alignment import ImageAlignment, class_max_cosines


class _Teacher(torch.nn.Module):
    logit_scale = 10.0

    def __init__(self, views):
        super().__init__()
        self.views = views  # list over grids of (g*g, D)

    def embed_tiles(self, images, grids):
        return [v[None] for v in self.views]


def test_class_max_cosines_takes_the_best_location_of_each_tile_over_levels():
    d = 3
    text = torch.eye(d)
    p3 = torch.zeros(1, d, 4, 4)
    p3[0, 0] = 1.0  # everywhere class 0 ...
    p3[0, :, 3, 3] = torch.tensor([0.0, 1.0, 0.0])  # ... except the bottom-right corner: class 1
    p4 = torch.zeros(1, d, 2, 2)
    p4[0, 2] = 1.0  # the coarse level sees class 2 everywhere
    whole, tiles = class_max_cosines([p3, p4], [8, 16], [(32, 32)], [1, 2], d, text)
    assert whole.shape == (1, 1, 3) and tiles.shape == (1, 4, 3)
    assert whole[0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # only the bottom-right tile (index 3) holds the class-1 location
    assert tiles[0, :, 1].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])
    assert tiles[0, :, 2].tolist() == pytest.approx([1.0] * 4)


def test_class_kl_loss_value_and_gradient_reach_only_the_best_locations():
    d = 2
    text = torch.eye(d)
    teacher_view = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)  # CLIP sees class 0
    align = ImageAlignment(
        embed_dim=d,
        weight=2.0,
        loss_type="class_kl",
        grids=[1],
        teacher=_Teacher([teacher_view]),
        student_logit_scale=5.0,
    )
    # (1, D=2, 2, 2): locations (0,0) = (0.8, 0.6), (0,1) = (0.6, 0.8), (1,0) = (0.7, 0.7),
    # (1,1) = 0
    grid = torch.tensor([[[[0.8, 0.6], [0.7, 0.0]], [[0.6, 0.8], [0.7, 0.0]]]])
    grid.requires_grad_(True)
    inputs = [{"image": torch.zeros(3, 16, 16)}]
    loss = align([grid], [8], [(16, 16)], inputs, text)["loss_image_align"]
    m = torch.tensor([0.8, 0.8])  # best cosine of class 0 at (0,0), of class 1 at (0,1)
    q = torch.softmax(10.0 * torch.tensor([1.0, 0.0]), 0)
    log_p = torch.log_softmax(5.0 * m, 0)
    expected = 2.0 * float((q * (q.log() - log_p)).sum())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # equal best cosines: p is uniform, so KL = log 2 - H(q)
    assert expected == pytest.approx(2.0 * (math.log(2) + float((q * q.log()).sum())), rel=1e-4)
    loss.backward()
    # (1,0) is no class's best and (1,1) is empty: no gradient there
    assert torch.count_nonzero(grid.grad[0, :, 1, 0]) == 0
    assert torch.count_nonzero(grid.grad[0, :, 1, 1]) == 0
    # the loss raises class 0's best cosine (CLIP sees class 0) and lowers class 1's
    assert float(grid.grad[0, 0, 0, 0]) < 0 < float(grid.grad[0, 1, 0, 0])
    assert torch.count_nonzero(grid.grad[0, :, 0, 1]) > 0


def test_class_kl_refuses_a_teacher_cache():
    class _Cache:
        grids = [1]
        embed_dim = 2
        path = "x"

    with pytest.raises(ValueError, match="online teacher"):
        ImageAlignment(embed_dim=2, loss_type="class_kl", grids=[1], teacher_cache=_Cache())
