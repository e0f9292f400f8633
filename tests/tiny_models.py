"""Tiny random models shared by the tests (no weights files, CPU-fast)."""

import clip
import torch


def make_tiny_clip(
    embed_dim=64,
    image_resolution=64,
    vision_width=16,
    context_length=16,
    text_layers=1,
    seed=0,
    random_bn_stats=(),
):
    """OpenAI's CLIP architecture with a ModifiedResNet vision tower, random weights, eval mode.

    CLIP zero-initialises the last BN of each block; its BN affine parameters are randomised so
    every path is exercised, and the running statistics named in ``random_bn_stats``
    (``"running_mean"``, ``"running_var"``) too.
    """
    torch.manual_seed(seed)
    model = clip.model.CLIP(
        embed_dim=embed_dim,
        image_resolution=image_resolution,
        vision_layers=(1, 1, 1, 1),
        vision_width=vision_width,
        vision_patch_size=None,
        context_length=context_length,
        vocab_size=49408,
        transformer_width=64,  # build_model infers heads = width // 64 = 1
        transformer_heads=1,
        transformer_layers=text_layers,
    )
    ranges = {"running_mean": (-0.1, 0.1), "running_var": (0.5, 1.5)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                for stat in random_bn_stats:
                    getattr(m, stat).uniform_(*ranges[stat])
    return model.eval()


def tiny_clip_opts(assets, embed_dim):
    """Config overrides that point a project config at a tiny CLIP file and a text-embedding
    file (``assets``: dict with ``clip``, ``text`` paths and ``root`` folder), on CPU."""
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.NAME", "tiny",
        "MODEL.CLIP.WEIGHTS", assets["clip"],
        "MODEL.CLIP.EMBED_DIM", embed_dim,
        "MODEL.CLIP.TEACHER_INPUT_SIZE", 64,
        "MODEL.CLIP.TEXT_EMBEDDINGS", assets["text"],
        "MODEL.CLIP.TEXT_CACHE_DIR", str(assets["root"] / "text_cache"),
        "MODEL.CLIP.PROMPTS", "single",
    ]  # fmt: skip
