"""Prompt-ensembled CLIP text embeddings of class names, with an on-disk cache.

A class embedding is the L2-normalised mean of the L2-normalised CLIP text embeddings of the
class name in every prompt template (ViLD's prompt ensemble). Results are cached as
``<cache_dir>/<key>.safetensors`` (the project's cache format, :mod:`gridclip.utils.cache`, kind
``text_embeddings``) keyed by the CLIP weights, the names and the templates, with those recorded
in the header's provenance, so training and evaluation need no text encoder once a vocabulary
has been seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..utils.cache import CacheError, load_cache, save_cache
from ..utils.io import atomic_write
from .embeddings import check_text_embeddings
from .loading import clip_embed_dim, clip_model_key, load_clip_from_cfg, resolve_clip_weights

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_TEMPLATES",
    "load_prompts",
    "clean_class_name",
    "tokenize_for_model",
    "encode_text_tokens",
    "encode_text_embeddings",
    "get_text_embeddings",
    "text_embeddings_cache_key",
    "text_embeddings_from_cfg",
    "load_text_embeddings",
    "save_text_embeddings",
    "text_embeddings_provenance",
    "TEXT_EMBEDDINGS_KIND",
    "PER_NAME_CACHE_MAX_NAMES",
]

#: ``kind`` of text-embedding caches and ``.safetensors`` files (:mod:`gridclip.utils.cache`).
TEXT_EMBEDDINGS_KIND = "text_embeddings"
_TOOL = "tools/dump_text_embeddings.py"

#: Prompt-template sets; ``{}`` is replaced by the class name.
PROMPT_TEMPLATES: Dict[str, List[str]] = {
    "single": ["a photo of a {}."],
    # An ensemble in the spirit of ViLD's: plain photos, sizes, quality, context, styles.
    "vild": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a close-up photo of a {}.",
        "a cropped photo of a {}.",
        "a blurry photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of the {}.",
        "a low resolution photo of a {}.",
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "a {} in the scene.",
        "an image containing a {}.",
        "a rendering of a {}.",
        "itap of a {}.",
    ],
}

_SOT_TOKEN = 49406
_EOT_TOKEN = 49407


def load_prompts(spec: str) -> List[str]:
    """Prompt templates from a key of :data:`PROMPT_TEMPLATES` or a text file.

    The file has one template per line, each containing ``{}`` exactly once; blank lines and
    lines starting with ``#`` are skipped.

    Raises:
        ValueError: unknown key / missing file, a template without ``{}``, or an empty file.
    """
    if isinstance(spec, (list, tuple)):
        return _check_templates(list(spec), "prompt list")
    spec = str(spec).strip()
    if spec in PROMPT_TEMPLATES:
        return list(PROMPT_TEMPLATES[spec])
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ValueError(
            f"Prompt templates {spec!r} (MODEL.CLIP.PROMPTS): neither a known set "
            f"{sorted(PROMPT_TEMPLATES)} nor an existing file"
        )
    templates = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            _check_templates([line], f"{path}, line {lineno}")
            templates.append(line)
    if not templates:
        raise ValueError(f"Prompt file {path} has no templates (one per line, each with '{{}}')")
    return templates


def _check_templates(templates: List[str], source: str) -> List[str]:
    if not templates:
        raise ValueError(f"{source}: no prompt templates")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(
                f"{source}: prompt template {t!r} must contain '{{}}' exactly once "
                f"(where the class name goes)"
            )
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(
                f"{source}: prompt template {t!r} has other braces; escape them as '{{{{' and "
                f"'}}}}' ({e})"
            ) from e
    return templates


def clean_class_name(name: str) -> str:
    """LVIS-style name to prompt text: ``"bow_(weapon)"`` -> ``"bow (weapon)"``.

    Underscores become spaces, a space is put before an opening parenthesis, runs of spaces
    collapse; letter case is kept.
    """
    name = str(name).replace("_", " ")
    name = re.sub(r"\s*\(\s*", " (", name)
    name = re.sub(r"\s*\)", ")", name)
    return re.sub(r"\s+", " ", name).strip()


def tokenize_for_model(clip_model, texts: Sequence[str], warn: bool = True) -> torch.Tensor:
    """Tokenise for a CLIP model whose context may be shorter than 77 tokens.

    Texts are tokenised to 77 tokens (truncating); when the model's ``context_length`` is
    shorter, longer token sequences are cut and their last kept token becomes the end-of-text
    token, so ``argmax`` still finds EOT. Returns (len(texts), context_length) int64.
    """
    tokens, truncated = _tokenize(clip_model, texts)
    if warn and truncated.any():
        _warn_truncated(
            int(truncated.sum()),
            len(texts),
            clip_model.context_length,
            texts[int(truncated.nonzero()[0])],
        )
    return tokens


def _tokenize(clip_model, texts: Sequence[str]):
    import clip

    ctx = int(clip_model.context_length)
    tokens = clip.tokenize(list(texts), context_length=max(77, ctx), truncate=True)
    truncated = torch.zeros(len(texts), dtype=torch.bool)
    if ctx < tokens.shape[1]:
        truncated = tokens.argmax(dim=-1) >= ctx
        tokens = tokens[:, :ctx].clone()
        tokens[truncated, ctx - 1] = _EOT_TOKEN
    return tokens, truncated


def _warn_truncated(count: int, total: int, ctx: int, example: str) -> None:
    logger.warning(
        "%d of %d prompts are longer than the CLIP text context (%d tokens) and were truncated, "
        "e.g. %r",
        count,
        total,
        ctx,
        example,
    )


def encode_text_tokens(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """``clip_model.encode_text`` computed on the shortest prefix holding every EOT.

    CLIP's text transformer is causal and reads the output at the EOT token, so the padding
    after the longest prompt of a batch cannot change the result: dropping it makes short
    prompts ~7x cheaper. Falls back to ``encode_text`` for unknown block types.

    Args:
        tokens: (B, L) token ids, as from :func:`tokenize_for_model`.
    Returns:
        (B, D) text embeddings (not normalised).
    """
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    blocks = list(getattr(clip_model.transformer, "resblocks", []))
    if not blocks or not all(hasattr(b, "attn") and hasattr(b, "ln_1") for b in blocks):
        return clip_model.encode_text(tokens)
    dtype = clip_model.text_projection.dtype
    x = clip_model.token_embedding(tokens[:, :n]).to(dtype)
    x = x + clip_model.positional_embedding[:n].to(dtype)
    x = x.permute(1, 0, 2)  # (n, B, width)
    mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    for block in blocks:
        x = x + block.attn(*(block.ln_1(x),) * 3, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = clip_model.ln_final(x.permute(1, 0, 2)).to(dtype)
    return x[torch.arange(x.shape[0], device=x.device), eot] @ clip_model.text_projection


@torch.no_grad()
def encode_text_embeddings(
    clip_model,
    names: Sequence[str],
    prompts: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Prompt-ensembled text embeddings.

    For each class: embed every template filled with the name, L2-normalise, average,
    L2-normalise again.

    Args:
        clip_model: a ``clip.model.CLIP`` (its device is used).
        names: C class names, used as given (see :func:`clean_class_name`).
        prompts: P templates with ``{}``.
        batch_size: texts per text-encoder forward.
        progress: show a tqdm bar over classes.
    Returns:
        (C, D) float32 CPU tensor, rows of unit norm.
    """
    names = list(names)
    templates = _check_templates(list(prompts), "prompt templates")
    assert names, "no class names to embed"
    device = clip_model.text_projection.device
    per_batch = max(1, batch_size // len(templates))  # classes per forward
    out, num_truncated, example = [], 0, ""
    with tqdm(
        total=len(names), desc="CLIP text embeddings", unit="class", disable=not progress
    ) as bar:
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            texts = [t.format(n) for n in chunk for t in templates]
            tokens, truncated = _tokenize(clip_model, texts)
            if truncated.any():
                num_truncated += int(truncated.sum())
                example = example or texts[int(truncated.nonzero()[0])]
            tokens = tokens.to(device)
            emb = F.normalize(encode_text_tokens(clip_model, tokens).float(), dim=-1)
            emb = emb.reshape(len(chunk), len(templates), -1).mean(dim=1)
            out.append(F.normalize(emb, dim=-1).cpu())
            bar.update(len(chunk))
    if num_truncated:
        _warn_truncated(
            num_truncated, len(names) * len(templates), clip_model.context_length, example
        )
    return torch.cat(out, dim=0)


def text_embeddings_cache_key(
    model_key: str, names: Sequence[str], templates: Sequence[str]
) -> str:
    """sha256 (24 hex digits) of the CLIP model id, the names and the templates."""
    payload = json.dumps(
        {"version": 1, "model": str(model_key), "names": list(names), "templates": list(templates)},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def text_embeddings_provenance(
    model_key: str, names: Sequence[str], templates: Sequence[str]
) -> Dict[str, object]:
    """What text embeddings are computed from, as recorded in their cache header: the CLIP
    weights' content key, the number and sha256 of the class names, and the prompt templates."""
    names = [str(n) for n in names]
    digest = hashlib.sha256(json.dumps(names, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "clip": str(model_key),
        "num_classes": len(names),
        "class_names_sha256": digest,
        "prompts": [str(t) for t in templates],
    }


def _validate(emb, num_classes: int, embed_dim: Optional[int]) -> Optional[str]:
    """Reason why a loaded (C, D) array is unusable, or None."""
    if emb.ndim != 2 or emb.shape[0] != num_classes:
        return f"shape {tuple(emb.shape)}, expected ({num_classes}, D)"
    if embed_dim is not None and emb.shape[1] != embed_dim:
        return f"dimension {emb.shape[1]}, expected {embed_dim}"
    if not np.isfinite(emb).all():
        return "non-finite values"
    if (np.linalg.norm(emb, axis=1) == 0).any():
        return "all-zero rows"
    return None


#: Vocabularies of at most this many names are cached name by name (each name's file is the
#: one of a one-name vocabulary): grounding prompts make one small vocabulary per caption, and
#: whole-vocabulary files would leave one cache file per caption; per name, the cache holds at
#: most one file per distinct phrase. Larger vocabularies (class lists) keep one file.
PER_NAME_CACHE_MAX_NAMES = 8


def _read_cached(
    path: str, provenance: Dict[str, object], num_names: int, embed_dim: Optional[int]
) -> Optional[torch.Tensor]:
    """The embeddings cached at ``path`` when usable, else None (a corrupt one is warned of)."""
    if not os.path.isfile(path):
        return None
    try:
        tensors, _ = load_cache(path, TEXT_EMBEDDINGS_KIND, provenance)
        emb = tensors["text_embeddings"].numpy()
        reason = _validate(emb, num_names, embed_dim)
    except (CacheError, KeyError) as e:  # truncated, foreign, or of another vocabulary
        reason = f"unusable ({type(e).__name__}: {e})"
    if reason is None:
        logger.info("Text embeddings (%d x %d) from cache %s", *emb.shape, path)
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    logger.warning("Ignoring corrupt text-embedding cache %s (%s); recomputing", path, reason)
    return None


def _write_cached(path: str, emb: torch.Tensor, provenance: Dict[str, object]) -> None:
    try:
        save_text_embeddings(path, emb, provenance)
        logger.info("Cached text embeddings (%d x %d) at %s", *emb.shape, path)
    except OSError as e:
        logger.warning("Could not write the text-embedding cache %s: %s", path, e)


def get_text_embeddings(
    names: Sequence[str],
    clip_model=None,
    *,
    model_key: str,
    prompts: Union[str, Sequence[str]] = "vild",
    cache_dir: Optional[str] = "~/.cache/gridclip/text_embeddings",
    progress: bool = True,
    clip_loader: Optional[Callable[[], object]] = None,
) -> torch.Tensor:
    """Cached prompt-ensembled text embeddings of ``names``.

    Args:
        names: C class names (used as given).
        clip_model: the CLIP text encoder; may be None when ``clip_loader`` is given, which is
            then called only on a cache miss (a hit needs no CLIP at all).
        model_key: id of the CLIP weights (:func:`clip_model_key`), part of the cache key.
        prompts: a template-set key, a template file, or a list of templates.
        cache_dir: cache directory; empty/None disables caching. A vocabulary of at most
            :data:`PER_NAME_CACHE_MAX_NAMES` names is cached name by name, a larger one as one
            file.
    Returns:
        (C, D) float32 CPU tensor of unit rows.
    """
    names = list(names)
    if not names:
        raise ValueError("get_text_embeddings: the vocabulary is empty")
    templates = (
        load_prompts(prompts)
        if isinstance(prompts, str)
        else _check_templates(list(prompts), "prompt list")
    )
    expected_dim = clip_embed_dim(clip_model) if clip_model is not None else None
    # the cache entries: one for the vocabulary, or one per distinct name of a small one
    groups = [names]
    if cache_dir and 1 < len(names) <= PER_NAME_CACHE_MAX_NAMES:
        groups = [[n] for n in dict.fromkeys(names)]
    paths, found = [], {}
    for i, group in enumerate(groups):
        path = None
        if cache_dir:
            key = text_embeddings_cache_key(model_key, group, templates)
            path = os.path.join(os.path.expanduser(cache_dir), key + ".safetensors")
            provenance = text_embeddings_provenance(model_key, group, templates)
            emb = _read_cached(path, provenance, len(group), expected_dim)
            if emb is not None:
                found[i] = emb
        paths.append(path)
    missing = [i for i in range(len(groups)) if i not in found]
    if missing:
        if clip_model is None:
            if clip_loader is None:
                raise ValueError(
                    "get_text_embeddings: the cache has no entry for this vocabulary and "
                    "neither clip_model nor clip_loader was given"
                )
            clip_model = clip_loader()
        todo = [n for i in missing for n in groups[i]]
        emb = encode_text_embeddings(clip_model, todo, templates, progress=progress)
        row = 0
        for i in missing:
            found[i] = emb[row : row + len(groups[i])]
            row += len(groups[i])
            if paths[i] is not None:
                provenance = text_embeddings_provenance(model_key, groups[i], templates)
                _write_cached(paths[i], found[i], provenance)
    if len(groups) == 1:
        return found[0]
    by_name = {group[0]: found[i][0] for i, group in enumerate(groups)}
    return torch.stack([by_name[n] for n in names])


def save_text_embeddings(path: str, emb, provenance: Optional[Dict[str, object]] = None) -> str:
    """Write (C, D) embeddings atomically; returns the path.

    ``.safetensors``: the project's cache format (kind ``text_embeddings``) with ``provenance``
    (see :func:`text_embeddings_provenance`) in its header. ``.npy`` (float32) or ``.pt``: a
    plain array/tensor, for other tools (no provenance).
    """
    path = os.path.expanduser(path)
    emb = torch.as_tensor(emb).detach().float().cpu()
    if path.endswith(".safetensors"):
        return save_cache(path, {"text_embeddings": emb}, TEXT_EMBEDDINGS_KIND, provenance or {})
    with atomic_write(path, "wb") as f:
        if path.endswith(".pt"):
            torch.save(emb, f)
        else:
            np.save(f, emb.numpy())
    return path


def load_text_embeddings(path: str) -> torch.Tensor:
    """Read a (C, D) text-embedding file: the project's ``.safetensors`` cache format, a
    ``.npy``, or a ``.pt`` holding a tensor/array or a dict with one. Raises ValueError naming
    the file when it is missing or unreadable."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ValueError(
            f"Text-embedding file {full} (MODEL.CLIP.TEXT_EMBEDDINGS) does not exist. Write it "
            f"with {_TOOL}, or leave the key empty to compute embeddings."
        )
    if full.endswith(".safetensors"):
        tensors, _ = load_cache(full, TEXT_EMBEDDINGS_KIND, hint=f"Regenerate it with {_TOOL}.")
        if "text_embeddings" not in tensors:
            raise ValueError(f"{full}: no 'text_embeddings' tensor (has {sorted(tensors)})")
        return tensors["text_embeddings"].float()
    try:
        if full.endswith(".npy"):
            obj = np.load(full, allow_pickle=False)
        else:
            obj = torch.load(full, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, (torch.Tensor, np.ndarray))]
                obj = obj.get("text_embeddings", tensors[0] if len(tensors) == 1 else None)
        if obj is None:
            raise ValueError("no single (C, D) tensor inside")
        return torch.as_tensor(np.asarray(obj) if isinstance(obj, np.ndarray) else obj).float()
    except Exception as e:
        raise ValueError(
            f"Could not read text embeddings from {full} ({type(e).__name__}: {e}); expected a "
            f"(C, D) array in .safetensors, .npy or .pt. Regenerate it with {_TOOL}."
        ) from e


def text_embeddings_from_cfg(cfg, names: Sequence[str]) -> torch.Tensor:
    """The (C, D) class text embeddings a detector uses for ``names``.

    ``cfg.MODEL.CLIP.TEXT_EMBEDDINGS`` set: that file (checked against len(names) and
    MODEL.CLIP.EMBED_DIM). Otherwise computed with the CLIP of ``cfg`` (loaded only on a cache
    miss) for the cleaned names and MODEL.CLIP.PROMPTS, cached in MODEL.CLIP.TEXT_CACHE_DIR.
    """
    c = cfg.MODEL.CLIP
    names = list(names)
    if c.TEXT_EMBEDDINGS:
        emb = load_text_embeddings(c.TEXT_EMBEDDINGS)
        return check_text_embeddings(
            emb, embed_dim=c.EMBED_DIM, num_classes=len(names), source=c.TEXT_EMBEDDINGS
        )
    weights_path = resolve_clip_weights(c.WEIGHTS, c.NAME, c.CACHE_DIR)
    device = str(getattr(cfg.MODEL, "DEVICE", "cpu"))

    def loader():
        if device.startswith("cuda") and torch.cuda.is_available():
            return load_clip_from_cfg(cfg, copy_model=True).to(device)
        return load_clip_from_cfg(cfg, copy_model=False)

    emb = get_text_embeddings(
        [clean_class_name(n) for n in names],
        model_key=clip_model_key(weights_path),
        prompts=c.PROMPTS,
        cache_dir=c.TEXT_CACHE_DIR,
        clip_loader=loader,
    )
    return check_text_embeddings(
        emb,
        embed_dim=c.EMBED_DIM,
        num_classes=len(names),
        source=f"text embeddings of {weights_path}",
    )
