"""The project's small CLIP: OpenAI's ``clip.model.CLIP`` with tiny widths, trained on the world.

Real CLIP weights cannot be downloaded everywhere, so the embedded default ships its own CLIP
(``assets/world_clip.pt``, ``MODEL.CLIP.NAME embedded``). This module holds what the detector
needs of it at run time: the architecture, building it, and saving / loading the shipped
fp16 state dict. How it is trained (the scene pool, the losses, the loop) and evaluated
(zero-shot accuracy, scene retrieval) is tool-side: ``gridclip_tools.small_clip_training`` and
``gridclip_tools.small_clip_eval`` (command: ``tools/train_small_clip.py``).

The architecture is ModifiedResNet (layers (1, 1, 1, 1), width 16, res5 = 512 channels, attention
pool) + a 3-layer, 64-wide text transformer, 256-d joint space, 64 px input, context length 32.
It is stored in OpenAI's state-dict format (fp16) and loads with ``clip.model.build_model``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..utils.io import atomic_write

__all__ = [
    "SMALL_CLIP_ARCH",
    "SMALL_CLIP_WEIGHTS",
    "build_small_clip",
    "load_small_clip",
    "fp16_state_dict",
    "save_state_dict_atomic",
]

#: Arguments of ``clip.model.CLIP`` (what ``build_model`` infers back from the state dict).
SMALL_CLIP_ARCH = dict(
    embed_dim=256,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,  # res5 has 16 * 32 = 512 channels; attention pool with 8 heads of 64
    vision_patch_size=None,
    context_length=32,  # scene captions name up to 4 objects
    vocab_size=49408,  # OpenAI's BPE tokenizer
    transformer_width=64,  # build_model infers heads = width // 64
    transformer_heads=1,
    transformer_layers=3,
)
#: Where the trained weights ship (``MODEL.CLIP.NAME embedded``).
SMALL_CLIP_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world_clip.pt"
)


def build_small_clip(**overrides):
    """A randomly initialised small CLIP (float32); ``overrides`` change :data:`SMALL_CLIP_ARCH`."""
    from clip.model import CLIP  # OpenAI's package, imported where it is needed

    arch = {**SMALL_CLIP_ARCH, **overrides}
    assert arch["transformer_width"] % 64 == 0, (
        f"transformer_width must be a multiple of 64 (build_model infers heads = width // 64), "
        f"got {arch['transformer_width']}"
    )
    arch["transformer_heads"] = arch["transformer_width"] // 64
    return CLIP(**arch)


def fp16_state_dict(model) -> Dict[str, torch.Tensor]:
    """OpenAI-format state dict with every floating tensor in fp16 (the shipped format)."""
    return {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }


def save_state_dict_atomic(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`gridclip.utils.io.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        torch.save(state_dict, f)


def load_small_clip(path: Optional[str] = None):
    """Load a small-CLIP state dict with ``clip.model.build_model``; float32, eval mode."""
    from clip.model import build_model

    path = path or SMALL_CLIP_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"small CLIP weights not found: {path!r}. Train them with "
            "`python tools/train_small_clip.py --output <path>`."
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return build_model(state_dict).float().eval()
