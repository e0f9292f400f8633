"""Image-level alignment (mean pooling, the one kept variant) settings and the lazy teacher
holder shared by GridCLIP's image alignment and ViLD."""

import pytest
import torch
from test_gridclip import D, make_tiny_clip

from gridclip.clip import CLIPImageTeacher
from gridclip.modeling.image_alignment import ImageAlignment, TeacherEmbeddingCache
from gridclip.modeling.teacher_holder import TeacherHolder


def test_bad_alignment_settings_name_the_key():
    teacher = torch.nn.Identity()
    with pytest.raises(ValueError, match="IMAGE_ALIGN_LOSS"):
        ImageAlignment(embed_dim=D, teacher=teacher, loss_type="l2")
    with pytest.raises(ValueError, match="IMAGE_ALIGN_GRIDS"):
        ImageAlignment(embed_dim=D, teacher=teacher, grids=[1, 1])
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        ImageAlignment(embed_dim=D, teacher=teacher, input_format="YUV")
    with pytest.raises(ValueError, match="teacher"):
        ImageAlignment(embed_dim=D)
    with pytest.raises(AssertionError, match="lacks grids"):
        ImageAlignment(embed_dim=D, teacher_cache=TeacherEmbeddingCache(D, [1]), grids=[1, 2])


def test_mean_pooling_loss_is_zero_for_the_teachers_own_embedding():
    teacher = CLIPImageTeacher(make_tiny_clip(), input_size=64)
    align = ImageAlignment(embed_dim=D, teacher=teacher, loss_type="l1", grids=[1])
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    target = teacher.embed_images(image[None].float())[0]  # (D,)
    # every location of both levels carries the teacher's embedding (any positive scale)
    student = [3.0 * target[None, :, None, None].expand(1, D, 8, 8), target[None, :, None, None]]
    out = align(student, [8, 64], [(64, 64)], [{"image": image}])
    assert out["loss_image_align"].item() == pytest.approx(0.0, abs=1e-4)
    other = align([torch.randn(1, D, 8, 8)], [8], [(64, 64)], [{"image": image}])
    assert other["loss_image_align"].item() > 1.0


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return torch.nn.Linear(2, 2)


def test_teacher_holder_builds_once_frozen_and_outside_the_module_tree():
    builder = _Counting()
    owner = torch.nn.Module()
    owner.holder = TeacherHolder(builder=builder, name="test teacher")
    assert not owner.holder.is_built and owner.holder.available and builder.calls == 0
    teacher = owner.holder.get()
    assert owner.holder.get() is teacher and builder.calls == 1
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert owner.state_dict() == {} and list(owner.parameters()) == []
    assert owner.holder.on("cpu") is teacher and teacher.weight.device.type == "cpu"
    given = torch.nn.Linear(2, 2)
    owner.holder.set(given)
    assert owner.holder.get() is given and not given.weight.requires_grad
    owner.holder.set(None)  # back to the builder
    assert owner.holder.get() is not given and builder.calls == 2


def test_teacher_holder_without_teacher_or_builder_says_how_to_get_one():
    holder = TeacherHolder(name="ViLD teacher", missing_hint=": call set_clip_teacher")
    assert not holder.available
    with pytest.raises(RuntimeError, match="no ViLD teacher.*set_clip_teacher"):
        holder.get()
