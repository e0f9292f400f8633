"""Files the benchmark's configs point at, written to a temporary folder: a random CLIP of the
real architecture, random text embeddings, registered metadata and teacher caches."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog

from gridclip.clip.teacher_cache import (
    TeacherEmbeddingCache,
    cache_entry_path,
    sliding_window_proposals,
    write_cache_entry,
    write_cache_meta,
)

from .specs import CLIPArchitecture

logger = logging.getLogger(__name__)

__all__ = [
    "lvis_like_frequencies",
    "random_text_embeddings",
    "synthetic_image",
    "BenchmarkAssets",
]


def lvis_like_frequencies(num_classes: int) -> List[str]:
    """LVIS v1's mix of frequent / common / rare (405 / 461 / 337 of 1,203), interleaved."""
    shares = (("f", 405 / 1203), ("c", 461 / 1203))
    out = []
    for i in range(num_classes):
        u = (i * 0.6180339887) % 1.0  # low-discrepancy: every prefix has about the LVIS mix
        out.append("f" if u < shares[0][1] else "c" if u < shares[0][1] + shares[1][1] else "r")
    return out


def random_text_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(C, D) random unit vectors standing in for CLIP text embeddings."""
    g = torch.Generator().manual_seed(seed + num_classes)
    x = torch.randn(num_classes, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


class BenchmarkAssets:
    """Files the configs point at, in a temporary folder removed by :meth:`close`.

    - ``clip_weights``: a random CLIP of ``architecture`` in OpenAI's state-dict format (fp16);
    - per class count C: ``text_embeddings(C)`` (.npy) and a registered metadata entry
      ``dataset(C)`` with ``thing_classes`` and LVIS-like ``class_frequencies``;
    - ``gridclip_teacher_cache(grids)``: a GridCLIP teacher cache holding the benchmark image;
    - ``vild_teacher_cache(...)``: a ViLD teacher cache directory holding the benchmark image.
    """

    def __init__(self, architecture: CLIPArchitecture, seed: int = 0, root: Optional[str] = None):
        self.architecture = architecture
        self.seed = seed
        self.root = tempfile.mkdtemp(prefix="gridclip-benchmark-", dir=root)
        self.clip_weights = self._write_clip_weights()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _write_clip_weights(self) -> str:
        from clip.model import CLIP

        a = self.architecture
        torch.manual_seed(self.seed)
        model = CLIP(
            embed_dim=a.embed_dim,
            image_resolution=a.image_resolution,
            vision_layers=a.vision_layers,
            vision_width=a.vision_width,
            vision_patch_size=None,
            context_length=a.context_length,
            vocab_size=a.vocab_size,
            transformer_width=a.text_width,
            transformer_heads=max(1, a.text_width // 64),
            transformer_layers=a.text_layers,
        )
        path = os.path.join(self.root, f"random_clip_{a.name}.pt")
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
        logger.info(
            f"Random {a.name} CLIP written to {path} ({os.path.getsize(path) / 2**20:.0f} MB)"
        )
        return path

    def text_embeddings(self, num_classes: int) -> str:
        path = os.path.join(self.root, f"text_embeddings_{num_classes}.npy")
        if not os.path.isfile(path):
            emb = random_text_embeddings(num_classes, self.architecture.embed_dim, self.seed)
            np.save(path, emb.numpy())
        return path

    def dataset(self, num_classes: int) -> str:
        name = f"gridclip_benchmark_{self.architecture.name}_{num_classes}"
        metadata = MetadataCatalog.get(name)
        if not hasattr(metadata, "thing_classes"):
            metadata.set(
                thing_classes=[f"class_{i}" for i in range(num_classes)],
                class_frequencies=lvis_like_frequencies(num_classes),
            )
        return name

    def gridclip_teacher_cache(self, grids: Sequence[int], image_key: str, provenance) -> str:
        """A cache of random teacher embeddings that records ``provenance`` (the model's
        :func:`~gridclip.clip.teacher_cache.gridclip_teacher_provenance`), as a real one would."""
        path = os.path.join(
            self.root, "gridclip_teacher_cache_" + "_".join(map(str, grids)) + ".pt"
        )
        if not os.path.isfile(path):
            d = self.architecture.embed_dim
            cache = TeacherEmbeddingCache(d, grids, dict(provenance, dataset="benchmark (random)"))
            cache.add(image_key, [random_text_embeddings(g * g, d, self.seed + 7) for g in grids])
            cache.save(path)
        return path

    def vild_teacher_cache(
        self, image_id: int, height: int, width: int, num_proposals: int, crop_scales
    ) -> str:
        path = os.path.join(self.root, f"vild_teacher_cache_{height}x{width}_{num_proposals}")
        if not os.path.isdir(path):
            d = self.architecture.embed_dim
            boxes = sliding_window_proposals(height, width, num_proposals)
            write_cache_meta(path, {"embed_dim": d, "crop_scales": list(crop_scales)})
            write_cache_entry(
                cache_entry_path(path, image_id),
                {
                    "image_id": image_id,
                    "file_name": "benchmark.png",
                    "height": height,
                    "width": width,
                    "boxes": boxes,
                    "embeddings": random_text_embeddings(len(boxes), d, self.seed + 11),
                },
            )
        return path


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A fixed random BGR uint8 image (H, W, 3)."""
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
